"""Every bad input a user could give, through the real CLI (`python -m saeforge ...` as a subprocess): exit code 2,
one message on stderr naming the problem, and no traceback. One row per input, grouped as the issue's table is
(train configs, eval, harvest, CLI, activation cache)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from saeforge import SAEMetadata, create_sae
from saeforge.commands.output import run_command

from saeforge.data.cache import CacheWriter, seal_manifest
from saeforge.models import tiny_lm

SRC = Path(__file__).resolve().parents[1] / "src"
SITE = "blocks.1.resid_post"
D = 64  # the tiny model's width at SITE


class Workspace:
    """A tiny model saved to disk, a corpus, a valid cache and a valid SAE; each case damages its own copy."""

    def __init__(self, root: Path):
        self.root = root
        self.model = root / "model"
        lm = tiny_lm("gemma3", seed=0)
        lm.model.save_pretrained(self.model)
        lm.tokenizer.save_pretrained(self.model)
        self.corpus = root / "corpus.txt"
        self.corpus.write_text("\n\n".join(f"doc{i} the river and the stone bridge in winter" for i in range(200)))

    def case_dir(self, name: str) -> Path:
        path = self.root / name
        path.mkdir()
        return path

    def cache(self, directory: Path, shards: int = 3) -> Path:
        torch.manual_seed(0)
        writer = CacheWriter(directory, dtype="float32", shard_tokens=256, grad=False)
        writer.add(torch.randn(256 * shards, D))
        writer.finish(model=str(self.model), model_spec=str(self.model), site=SITE, d_in=D, scale=0.5,
                      context_len=32, keep_bos=False, split="train", source="random")
        return directory

    def sae(self, directory: Path, d_in: int = D) -> Path:
        torch.manual_seed(0)
        sae = create_sae("relu", d_in=d_in, d_sae=2 * d_in)
        sae.meta = SAEMetadata(model_name=str(self.model), site=SITE, context_size=32)
        sae.save(directory)
        return directory

    def run_file(self, directory: Path, text: str = "", *, model: str | None = None, site: str = SITE,
                 data: str | None = None, train: str = "",
                 sae: str = 'architecture = "relu"\nexpansion = 2.0') -> Path:
        """A run file: [model] (the tiny model), [data] (the corpus), [train] (tiny, out_dir in `directory`), one
        [[sae]] (`sae`), then `text`."""
        data = data if data is not None else f'source = "{self.corpus}"\ncontext_len = 32\nbuffer_tokens = 1024'
        path = directory / "run.toml"
        path.write_text(f'[model]\nname = "{model or self.model}"\nsite = "{site}"\n[data]\n{data}\n'
                        f'[train]\ntokens = 512\nbatch_size = 128\ntensorboard = false\n'
                        f'out_dir = "{directory / "out"}"\n'
                        f"{train}\n[[sae]]\n{sae}\n{text}")
        return path

    def cache_run(self, directory: Path, cache: Path, train: str = "", sae: str = "") -> Path:
        return self.run_file(directory, data=f'cache_dir = "{cache}"\ncontext_len = 32\nbuffer_tokens = 512',
                             train=train, sae=sae or 'architecture = "relu"\nexpansion = 2.0')


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_manifest(cache: Path, edit, *, seal: bool) -> None:
    path = cache / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(seal_manifest(manifest) if seal else manifest))


def _damaged_cache(ws: Workspace, d: Path, damage) -> list[str]:
    cache = ws.cache(d / "cache")
    damage(cache)
    return ["train", str(ws.cache_run(d, cache))]


def _sae_with(ws: Workspace, d: Path, damage) -> list[str]:
    sae = ws.sae(d / "sae")
    damage(sae)
    return ["eval", str(sae), "--out", str(d / "eval"), "--source", str(ws.corpus), "--tokens", "64"]


def _edit_cfg(sae: Path, edit) -> None:
    cfg = json.loads((sae / "cfg.json").read_text())
    (sae / "cfg.json").write_text(json.dumps(edit(cfg)))


def _nan_weights(sae: Path) -> None:
    from safetensors.torch import load_file

    tensors = load_file(sae / "sae_weights.safetensors")
    tensors["W_enc"][3, 5] = float("nan")
    save_file(tensors, sae / "sae_weights.safetensors")


def _wrong_shape(sae: Path) -> None:
    from safetensors.torch import load_file

    tensors = load_file(sae / "sae_weights.safetensors")
    tensors["W_enc"] = tensors["W_enc"][:, :-1].contiguous()
    save_file(tensors, sae / "sae_weights.safetensors")


def _existing_checkpoint(ws: Workspace, d: Path) -> list[str]:
    run = ws.cache_run(d, ws.cache(d / "cache"))
    (d / "out" / "checkpoints" / "step_000000001").mkdir(parents=True)
    for name in ("state.json", "tensors.safetensors"):
        (d / "out" / "checkpoints" / "step_000000001" / name).write_text("{}")
    return ["train", str(run)]


def _out_dir_is_a_file(ws: Workspace, d: Path) -> list[str]:
    (d / "out").write_text("a file")
    return ["train", str(ws.cache_run(d, ws.cache(d / "cache")))]


def _harvest(ws: Workspace, d: Path, *extra: str, model: str | None = None) -> list[str]:
    return ["harvest", "--model", model or str(ws.model), "--site", SITE, "--source", str(ws.corpus),
            "--out", str(d / "acts"), "--tokens", "64", "--context-len", "32", *extra]


def _binary_file(d: Path) -> Path:
    path = d / "run.toml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe" * 10)
    return path


def _written(d: Path, name: str, text: str) -> Path:
    (d / name).write_text(text)
    return d / name


# (row of the table, case id, argv builder (workspace, case dir) -> argv, what stderr must say)
CASES = [
    # --- train configs
    ("train", "empty_file", lambda ws, d: ["train", str(_written(d, "run.toml", ""))], "the file is empty"),
    ("train", "no_sae_tables", lambda ws, d: ["train", str(_written(d, "run.toml", "[train]\ntokens = 512\n"))],
     "no [[sae]] table"),
    ("train", "missing_file", lambda ws, d: ["train", str(d / "nope.toml")], "config file not found"),
    ("train", "directory_as_config", lambda ws, d: ["train", str(d)], "is a directory"),
    ("train", "binary_config", lambda ws, d: ["train", str(_binary_file(d))], "not a text file"),
    ("train", "invalid_toml", lambda ws, d: ["train", str(_written(d, "run.toml", "[train\n"))], "not valid TOML"),
    ("train", "unknown_field", lambda ws, d: ["train", str(ws.run_file(d, train="tokenz = 5"))],
     "unknown field 'tokenz'"),
    ("train", "lr_nan", lambda ws, d: ["train", str(ws.run_file(d, train="lr = nan"))], "train.lr"),
    ("train", "sae_lr_nan", lambda ws, d: ["train", str(ws.run_file(d, sae='architecture = "relu"\nlr = nan'))],
     r"sae[0]"),
    ("train", "sparsity_coeff_nan_second_entry",
     lambda ws, d: ["train", str(ws.run_file(d, text='[[sae]]\narchitecture = "relu"\nsparsity_coeff = nan'))],
     r"sae[1]: sae.sparsity_coeff"),
    ("train", "expansion_nan", lambda ws, d: ["train", str(ws.run_file(d, sae="expansion = nan"))], "sae.expansion"),
    ("train", "expansion_inf", lambda ws, d: ["train", str(ws.run_file(d, sae="expansion = inf"))], "sae.expansion"),
    ("train", "wrong_type", lambda ws, d: ["train", str(ws.run_file(d, train='seed = "big"'))],
     "train.seed: expected an integer"),
    ("train", "topk_without_k", lambda ws, d: ["train", str(ws.run_file(d, sae='architecture = "topk"'))],
     "sae.k: required"),
    ("train", "jumprelu_bad_bandwidth",
     lambda ws, d: ["train", str(ws.run_file(d, sae='architecture = "jumprelu"\nexpansion = 2.0\n'
                                                    'options = {bandwidth = -1.0}'))],
     "bandwidth must be a positive number"),
    ("train", "fewer_tokens_than_a_batch", lambda ws, d: ["train", str(ws.run_file(d)), "--tokens", "5"],
     "less than one batch"),
    ("train", "negative_tokens_flag", lambda ws, d: ["train", str(ws.run_file(d)), "--tokens", "-5"],
     "train.tokens: must be positive"),
    ("train", "out_dir_is_a_file", _out_dir_is_a_file, "train.out_dir"),
    ("train", "missing_model_path", lambda ws, d: ["train", str(ws.run_file(d, model=str(d / "no-model")))],
     "model path not found"),
    ("train", "unknown_site", lambda ws, d: ["train", str(ws.run_file(d, site="blocks.1.resid_middle"))],
     "unknown site 'blocks.1.resid_middle'"),
    ("train", "block_out_of_range", lambda ws, d: ["train", str(ws.run_file(d, site="blocks.9.resid_post"))],
     "block 9 does not exist"),
    ("train", "missing_text_source",
     lambda ws, d: ["train", str(ws.run_file(d, data=f'source = "{d / "missing.txt"}"'))], "missing.txt"),
    ("train", "d_sae_too_large",
     lambda ws, d: ["train", str(ws.cache_run(d, ws.cache(d / "cache"), sae="architecture = \"relu\"\n"
                                                                             "d_sae = 1000000000000"))],
     "needs about"),
    ("train", "existing_checkpoint_without_resume", _existing_checkpoint, "--resume"),
    ("train", "unknown_option",
     lambda ws, d: ["train", str(ws.run_file(d, sae='expansion = 2.0\noptions = {tide = 1}'))], "sae[0]"),
    # --- eval
    ("eval", "no_sae_given", lambda ws, d: ["eval"], "no SAE directories"),
    ("eval", "not_an_sae_directory", lambda ws, d: ["eval", str(d)], "no cfg.json"),
    ("eval", "missing_directory", lambda ws, d: ["eval", str(d / "nope")], "no cfg.json"),
    ("eval", "missing_weights", lambda ws, d: _sae_with(ws, d, lambda s: (s / "sae_weights.safetensors").unlink()),
     "no sae_weights.safetensors"),
    ("eval", "truncated_weights",
     lambda ws, d: _sae_with(ws, d, lambda s: (s / "sae_weights.safetensors").write_bytes(
         (s / "sae_weights.safetensors").read_bytes()[:-100])), "not a readable safetensors file"),
    ("eval", "cfg_is_a_json_array", lambda ws, d: _sae_with(ws, d, lambda s: _edit_cfg(s, lambda c: [c])),
     "expected a JSON object"),
    ("eval", "cfg_not_json", lambda ws, d: _sae_with(ws, d, lambda s: (s / "cfg.json").write_text("{d_in: 3")),
     "cfg.json: not valid JSON"),
    ("eval", "unknown_architecture",
     lambda ws, d: _sae_with(ws, d, lambda s: _edit_cfg(s, lambda c: {**c, "saeforge": {
         **c["saeforge"], "architecture": "gatd"}})), "unknown SAE architecture 'gatd'"),
    ("eval", "wrong_shapes", lambda ws, d: _sae_with(ws, d, _wrong_shape), "tensor 'W_enc' has shape"),
    ("eval", "nan_weights", lambda ws, d: _sae_with(ws, d, _nan_weights), "tensor 'W_enc' holds 1 non-finite"),
    ("eval", "bad_max_input_norm", lambda ws, d: _sae_with(ws, d, lambda s: _edit_cfg(s, lambda c: {
        **c, "saeforge": {**c["saeforge"], "max_input_norm": -1}})), "max_input_norm"),
    ("eval", "d_in_does_not_match_site", lambda ws, d: _sae_with(ws, d, lambda s: ws.sae(s, d_in=32)),
     "has d_in = 32, but site"),
    ("eval", "unknown_site", lambda ws, d: _sae_with(ws, d, lambda s: None) + ["--site", "blocks.1.nope"],
     "unknown site 'blocks.1.nope'"),
    ("eval", "block_out_of_range", lambda ws, d: _sae_with(ws, d, lambda s: None) + ["--site", "blocks.9.attn_out"],
     "block 9 does not exist"),
    ("eval", "tokens_zero", lambda ws, d: _sae_with(ws, d, lambda s: None) + ["--tokens", "0"], "eval.tokens"),
    ("eval", "steering_alpha_nan",
     lambda ws, d: _sae_with(ws, d, lambda s: None) + ["--steering-alphas", "0.1", "nan"], "eval.steering_alphas"),
    ("eval", "out_is_a_file",
     lambda ws, d: _sae_with(ws, d, lambda s: None) + ["--out", str(_written(d, "out.txt", "x"))], "--out"),
    ("eval", "missing_model", lambda ws, d: _sae_with(ws, d, lambda s: None) + ["--model", str(d / "no-model")],
     "model path not found"),
    # --- harvest
    ("harvest", "tokens_zero", lambda ws, d: _harvest(ws, d, "--tokens", "0"), "--tokens: must be at least 1"),
    ("harvest", "shard_tokens_zero", lambda ws, d: _harvest(ws, d, "--shard-tokens", "0"), "--shard-tokens"),
    ("harvest", "missing_model_path", lambda ws, d: _harvest(ws, d, model=str(d / "no-model")),
     "model path not found"),
    ("harvest", "model_directory_without_config", lambda ws, d: _harvest(ws, d, model=str(d)), "no config.json"),
    ("harvest", "unknown_site", lambda ws, d: _harvest(ws, d) + ["--site", "blocks.1.resid_middle"],
     "unknown site 'blocks.1.resid_middle'"),
    ("harvest", "block_out_of_range", lambda ws, d: _harvest(ws, d) + ["--site", "blocks.9.mlp_out"],
     "block 9 does not exist"),
    ("harvest", "missing_source", lambda ws, d: _harvest(ws, d) + ["--source", str(d / "missing.txt")],
     "missing.txt"),
    ("harvest", "unsupported_source_type",
     lambda ws, d: _harvest(ws, d) + ["--source", str(_written(d, "c.csv", "a,b"))], "unsupported file type"),
    ("harvest", "binary_source",
     lambda ws, d: _harvest(ws, d) + ["--source", str(_binary_file(d).rename(d / "c.txt"))], "not UTF-8 text"),
    ("harvest", "out_is_a_file", lambda ws, d: _harvest(ws, d) + ["--out", str(_written(d, "out", "x"))], "--out"),
    # --- CLI
    ("cli", "unknown_command", lambda ws, d: ["trian"], "unknown command 'trian'"),
    ("cli", "no_command", lambda ws, d: [], "usage: saeforge"),
    ("cli", "missing_argument", lambda ws, d: ["train"], "Missing from saeforge train"),
    ("cli", "unknown_flag", lambda ws, d: ["harvest", "--tokenz", "5"], "--tokenz"),
    ("cli", "flag_of_wrong_type", lambda ws, d: ["harvest", "--tokens", "many"], "many"),
    ("cli", "sweep_empty_file", lambda ws, d: ["sweep", str(_written(d, "run.toml", ""))], "the file is empty"),
    ("cli", "sweep_out_dir_is_a_file",
     lambda ws, d: ["sweep", str(ws.run_file(d)), "--out", str(_written(d, "o", "x"))], "--out"),
    # --- activation cache (refused before step 1)
    ("cache", "missing_manifest", lambda ws, d: _damaged_cache(ws, d, lambda c: (c / "manifest.json").unlink()),
     "has no manifest.json"),
    ("cache", "manifest_not_json",
     lambda ws, d: _damaged_cache(ws, d, lambda c: (c / "manifest.json").write_text("{")), "not valid JSON"),
    ("cache", "manifest_scale_edited",
     lambda ws, d: _damaged_cache(ws, d, lambda c: _edit_manifest(c, lambda m: m.update(scale=5.0), seal=False)),
     "fails its own checksum"),
    ("cache", "manifest_tokens_edited",
     lambda ws, d: _damaged_cache(ws, d, lambda c: _edit_manifest(c, lambda m: m.update(tokens=10), seal=False)),
     "fails its own checksum"),
    ("cache", "manifest_tokens_inconsistent",
     lambda ws, d: _damaged_cache(ws, d, lambda c: _edit_manifest(c, lambda m: m.update(tokens=10), seal=True)),
     "'tokens' is 10, but its shards hold 768"),
    ("cache", "manifest_scale_nan",
     lambda ws, d: _damaged_cache(ws, d, lambda c: _edit_manifest(c, lambda m: m.update(scale=float("nan")),
                                                                  seal=True)), "'scale' must be a finite"),
    ("cache", "manifest_without_shards",
     lambda ws, d: _damaged_cache(ws, d, lambda c: _edit_manifest(c, lambda m: m.pop("shards"), seal=True)),
     "'shards' must be a non-empty list"),
    ("cache", "manifest_with_empty_shards",
     lambda ws, d: _damaged_cache(ws, d, lambda c: _edit_manifest(c, lambda m: m.update(shards=[]), seal=True)),
     "'shards' must be a non-empty list"),
    ("cache", "last_shard_bit_flip",
     lambda ws, d: _damaged_cache(ws, d, lambda c: _flip_last_byte(c / "shard_00002.safetensors")),
     "shard_00002.safetensors fails its sha256"),
    ("cache", "last_shard_bytes_appended",
     lambda ws, d: _damaged_cache(ws, d, lambda c: open(c / "shard_00002.safetensors", "ab").write(b"\0" * 8)),
     "shard_00002.safetensors has 8 bytes appended"),
    ("cache", "last_shard_truncated",
     lambda ws, d: _damaged_cache(ws, d, lambda c: (c / "shard_00002.safetensors").write_bytes(
         (c / "shard_00002.safetensors").read_bytes()[:-4])), "shard_00002.safetensors is truncated"),
    ("cache", "last_shard_missing",
     lambda ws, d: _damaged_cache(ws, d, lambda c: (c / "shard_00002.safetensors").unlink()),
     "shard_00002.safetensors listed in"),
    ("cache", "shard_not_safetensors",
     lambda ws, d: _damaged_cache(ws, d, lambda c: (c / "shard_00001.safetensors").write_bytes(b"\xff" * 64)),
     "shard_00001.safetensors"),
    ("cache", "cache_of_another_site",
     lambda ws, d: ["train", str(ws.run_file(d, site="blocks.0.resid_post",
                                             data=f'cache_dir = "{ws.cache(d / "cache")}"\ncontext_len = 32'))],
     "has site 'blocks.1.resid_post', but 'blocks.0.resid_post' was expected"),
    ("cache", "gradient_sae_on_cache_without_gradients",
     lambda ws, d: ["train", str(ws.cache_run(d, ws.cache(d / "cache"), sae='architecture = "gradient_topk"\nk = 4\n'
                                                                           'expansion = 2.0'))], "holds no gradients"),
]


# Found from the model's config.json, before its weights load (the command prints its precision once they have).
BEFORE_THE_MODEL_LOADS = {("eval", "d_in_does_not_match_site"), ("eval", "block_out_of_range"),
                          ("harvest", "block_out_of_range")}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Every case run once, two at a time (the commands are mostly interpreter start-up)."""
    ws = Workspace(tmp_path_factory.mktemp("bad_input"))
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}

    def run(case):
        row, name, argv_of, _ = case
        argv = argv_of(ws, ws.case_dir(f"{row}-{name}"))
        return subprocess.run([sys.executable, "-m", "saeforge", *argv], capture_output=True, text=True, env=env,
                              timeout=300)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip([(row, name) for row, name, _, _ in CASES], pool.map(run, CASES)))


@pytest.mark.parametrize("row,name,expected", [(row, name, expected) for row, name, _, expected in CASES],
                         ids=[f"{row}-{name}" for row, name, _, _ in CASES])
def test_bad_input_is_one_clear_message_and_exit_code_2(outcomes, row, name, expected):
    proc = outcomes[row, name]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert expected in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    if (row, name) in BEFORE_THE_MODEL_LOADS:
        assert "language model:" not in proc.stderr, proc.stderr[-3000:]


def test_debug_flag_shows_the_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run([sys.executable, "-m", "saeforge", "--debug", "train", str(tmp_path / "nope.toml")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "config file not found" in proc.stderr


def test_a_bug_is_not_dressed_up_as_a_user_error():
    def buggy():
        return {}["missing"]

    with pytest.raises(KeyError):
        run_command("train", buggy)
