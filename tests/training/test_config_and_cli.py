"""Run files: bad fields are named; the example configs load; `python -m saeforge train` runs end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from saeforge.config import ConfigError, load_config
from saeforge.data.store import activation_stats
from saeforge.training import Trainer

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, names", [
    ("[train]\nlearning_rate = 1e-3\n", ["train", "'learning_rate'"]),
    ("[train]\nbatch_size = \"big\"\n", ["train.batch_size", "expected an integer"]),
    ("[train]\nadam_betas = [0.9]\n", ["train.adam_betas", "two numbers"]),
    ("[train]\nlr_decay = \"exp\"\n", ["train.lr_decay", "'exp'"]),
    ("[train]\ncheckpoint_every = 0\n", ["train.checkpoint_every", "positive"]),
    ("[[sae]]\narchitecture = \"topk\"\n", ["sae.k", "required"]),
    ("[[sae]]\narchitecture = \"sparse\"\n", ["sae[0]", "sae.architecture", "'sparse'", "'topk'"]),
    ("[[sae]]\narchitecture = \"gated\"\nsparsity = 1.0\n", ["sae[0]", "'sparsity'"]),
    ("[[sae]]\narchitecture = \"relu\"\nk = 4\n", ["sae[0]", "sae.k", "'relu' does not take k"]),
])
def test_bad_fields_are_named(tmp_path, text, names):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    for name in names:
        assert name in str(err.value)


@pytest.mark.parametrize("sae, message", [
    ('architecture = "topk"\nk = 4\noptions = { kk = 1 }', "'kk'"),
    ('architecture = "jumprelu"\noptions = { bandwidth = -0.1 }', "bandwidth must be a positive number"),
])
def test_trainer_refuses_specs_it_cannot_train(tmp_path, sae, message):
    cfg = load_config(write(tmp_path, f"[train]\nout_dir = '{tmp_path / 'run'}'\n[[sae]]\n{sae}\n"))
    with pytest.raises(ConfigError, match=message):
        trainer = Trainer(cfg, stream=_Stream(), progress=False)
        trainer.prepare()


def test_duplicate_names_are_refused(tmp_path):
    cfg = load_config(write(tmp_path, "[[sae]]\narchitecture = 'relu'\nd_sae = 8\n[[sae]]\narchitecture = 'relu'\n"
                                      "d_sae = 8\n"))
    with pytest.raises(ConfigError, match="both called 'relu_w8_t40'"):  # the default: an L0 target of 40
        Trainer(cfg, stream=_Stream(), progress=False).prepare()


class _Stream:
    """The smallest object with the stream interface that `prepare` reads (no batches are drawn)."""

    d_in, scale = 4, 1.0

    def activation_stats(self):
        return activation_stats(torch.randn(16, self.d_in, generator=torch.Generator().manual_seed(0)), None)

    def state_dict(self):
        return {}


def test_example_configs_load_and_describe_the_papers():
    paths = sorted((ROOT / "configs").glob("*.toml"))
    assert {p.name for p in paths} >= {"paper_a_gated_vs_relu.toml", "paper_b_gsae_vs_topk.toml", "cpu_demo.toml"}
    for path in paths:
        Trainer(load_config(path), progress=False)  # the trainer's own checks pass too
    a = load_config(ROOT / "configs/paper_a_gated_vs_relu.toml")
    gated = {s.d_sae for s in a.sae if s.architecture == "gated"}
    relu = {s.d_sae for s in a.sae if s.architecture == "relu"}
    assert len(gated) == len(relu) == 1 and relu.pop() == 1.5 * gated.pop()
    assert {s.target_l0 for s in a.sae if s.architecture == "gated"} == \
        {s.target_l0 for s in a.sae if s.architecture == "relu"} == {20, 40, 80, 160}
    for path in sorted((ROOT / "configs" / "results").glob("*.toml")):  # what docs/reproduce_results.sh runs
        if path.name != "paper_b_e2e.toml":  # one seed, sized to an hour (tests/training/test_e2e_training.py)
            assert len(load_config(path).sae) >= 8, path
    b = load_config(ROOT / "configs/paper_b_gsae_vs_topk.toml")
    for arch in ("topk", "gradient_topk"):
        assert sorted(s.k for s in b.sae if s.architecture == arch) == [8, 16, 32, 64]


def test_cli_trains_from_a_harvested_cache(tmp_path):
    from saeforge.data import harvest
    from saeforge.models import tiny_lm

    lm = tiny_lm("llama", seed=0)
    words = "the cat sat on a mat while dogs ran far away over green hills and rivers".split()
    docs = [" ".join(words[(i * 7 + j) % len(words)] for j in range(40 + i % 13)) for i in range(60)]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    site = lm.sites()[1]
    harvest(lm, site, str(corpus), tmp_path / "cache", tokens=1536, context_len=32, grad=True, shard_tokens=512)
    out = tmp_path / "run"
    config = write(tmp_path, f"""
[model]
name = "{lm.name}"
site = "{site}"
[data]
cache_dir = "{tmp_path / 'cache'}"
context_len = 32
buffer_tokens = 1024
[train]
tokens = 1024
batch_size = 128
checkpoint_every = 3
out_dir = "{out}"
[[sae]]
architecture = "gated"
expansion = 2.0
[[sae]]
architecture = "gradient_topk"
expansion = 2.0
k = 4
""")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run([sys.executable, "-m", "saeforge", "train", str(config)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    d = lm.site_dim(site)
    assert "trained 8 steps (1,024 tokens)" in proc.stdout
    assert "L0" in proc.stderr  # the summary table
    for name in (f"gated_w{2 * d}_t40", f"gradient_topk_w{2 * d}_k4"):
        cfg = json.loads((out / name / "cfg.json").read_text())
        assert cfg["model_name"] == lm.name and cfg["hook_name"] == site and cfg["d_in"] == d
        assert cfg["saeforge"]["normalization"]["mode"] == "centered"
        assert cfg["saeforge"]["max_input_norm"] > 0  # raw units: the outlier threshold the run used
    assert "left out of training as outliers" in proc.stderr
    assert (out / "checkpoints" / "step_000000008").is_dir()
    assert list((out / "tensorboard").iterdir())

    again = subprocess.run([sys.executable, "-m", "saeforge", "train", str(config)], env=env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 2 and "--resume" in again.stderr
    bad = write(tmp_path, "[train]\ntokenz = 5\n")
    proc = subprocess.run([sys.executable, "-m", "saeforge", "train", str(bad)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "unknown field 'tokenz'" in proc.stderr
