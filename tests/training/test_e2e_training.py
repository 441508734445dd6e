"""Training E2E TopK SAEs from the live LM (needs_lm): the CLI trains, saves, loads and evaluates them (real
subprocesses on a tiny saved model and a corpus on disk), training lowers their KL, a resumed run continues
exactly, and runs the trainer cannot do are refused by name."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saeforge.config import ConfigError, load_config
from saeforge.data import eval_contexts
from saeforge.evaluation import evaluate_saes
from saeforge.models import load_lm
from saeforge.saes import E2ETopKSAE, load_sae
from saeforge.training import Trainer

ROOT = Path(__file__).resolve().parents[2]
SITE = "blocks.1.resid_post"

E2E_AND_TOPK = """
[[sae]]
architecture = "e2e_topk"
d_sae = 128
k = 4

[[sae]]
architecture = "e2e_topk"
name = "e2e_ds"
d_sae = 128
k = 4
options = { ds_coeff = 0.5 }

[[sae]]
architecture = "topk"
d_sae = 128
k = 4
"""


def write_config(tmp_path: Path, model_dir: Path, corpus: Path, *, tokens: int = 1024, saes: str = E2E_AND_TOPK,
                 extra_data: str = "", batch_size: int = 128) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(f"""
[model]
name = "{model_dir}"
site = "{SITE}"

[data]
source = "{corpus}"
context_len = 32
buffer_tokens = 1024
{extra_data}

[train]
tokens = {tokens}
batch_size = {batch_size}
lr = 3e-3
lr_warmup_steps = 2
resample = false
out_dir = "{tmp_path / 'run'}"
tensorboard = false
log_every = 4

[eval]
tokens = 256
batch_size = 4
analysis_batches = 1
pca_ranks = [4]
bootstrap_resamples = 100
{saes}
""")
    return path


def saeforge(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "saeforge", *args, "--no-progress"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_cli_sweeps_saves_loads_and_evaluates_e2e_saes(tmp_path, tiny_model_dir, corpus_txt):
    grid = ('\ngrid_architectures = ["e2e_topk", "topk"]\ngrid_k = [2, 6]\n\n[[sae]]\narchitecture = "e2e_topk"\n'
            'd_sae = 128\nk = 2\noptions = { ds_coeff = 0.5 }\n')
    config = write_config(tmp_path, tiny_model_dir, corpus_txt, saes=grid)
    out = tmp_path / "sweep"
    saeforge("sweep", str(config), "--out", str(out))
    with open(out / "sweep.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted((r["architecture"], int(r["k"])) for r in rows) == [("e2e_topk", 2), ("e2e_topk", 6), ("topk", 2),
                                                                       ("topk", 6)]
    for r in rows:
        assert 0 < float(r["l0"]) <= int(r["k"]) + 1e-9 and float(r["kl_div"]) >= 0
    report = json.loads((out / "sweep.json").read_text())
    assert {r["variant"] for r in report["results"]} == {"e2e_topk (ds_coeff=0.5)", "topk"}
    assert all("decoder_max_cos" in r and "directional_derivative" in r for r in report["results"])
    assert any("firing" in p for p in report["figures"])
    for figure in report["figures"]:
        assert Path(figure).read_bytes()[:4] == b"\x89PNG", figure

    # Saved as a TopK SAE (its inference) with the architecture and options recorded; loaded back as itself.
    saved = tmp_path / "run" / "e2e_topk_w128_k2"
    cfg = json.loads((saved / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 2
    assert cfg["saeforge"]["architecture"] == "e2e_topk" and cfg["saeforge"]["options"]["ds_coeff"] == 0.5
    assert cfg["precision"]["sae_compute"]["dtype"] == "float32"
    sae = load_sae(saved)
    assert isinstance(sae, E2ETopKSAE) and sae.ds_coeff == 0.5 and sae.k == 2
    assert set(load_file(str(saved / "sae_weights.safetensors"))) == {"W_enc", "b_enc", "W_dec", "b_dec"}

    # `saeforge eval` on the saved directory (a fresh process loads it) gives the sweep's numbers.
    saeforge("eval", str(saved), "--out", str(tmp_path / "eval"), "--tokens", "256", "--source", str(corpus_txt),
             "--batch-size", "4", "--pca-ranks", "4", "--bootstrap-resamples", "0")
    (row,) = json.loads((tmp_path / "eval" / "eval.json").read_text())["results"]
    swept = next(r for r in report["results"] if r["name"] == "e2e_topk_w128_k2")
    assert row["architecture"] == "e2e_topk" and row["kl_div"] == pytest.approx(swept["kl_div"], rel=1e-5)


def test_training_lowers_the_kl_it_is_trained_on(tmp_path, tiny_model_dir, corpus_txt):
    """The same run (same seed and data) after 1 step and after 32: the held-out KL of the spliced model falls for
    both E2E SAEs."""
    lm = load_lm(str(tiny_model_dir))
    cfg = load_config(write_config(tmp_path, tiny_model_dir, corpus_txt, tokens=4096))
    contexts = eval_contexts(lm, cfg.data, 512)
    kl = {}
    for tokens in (128, 4096):
        run = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, tokens=tokens,
                                                                 out_dir=str(tmp_path / f"run{tokens}")))
        dirs = Trainer(run, lm=lm, progress=False).run().sae_dirs
        rows = evaluate_saes(lm, [str(dirs["e2e_topk_w128_k4"]), str(dirs["e2e_ds"])], SITE, contexts,
                             batch_size=4, analyses=False, progress=False)
        kl[tokens] = [r["kl_div"] for r in rows]
    for before, after in zip(kl[128], kl[4096]):
        assert after < 0.85 * before, kl


def test_a_resumed_run_continues_exactly(tmp_path, tiny_model_dir, corpus_txt):
    lm = load_lm(str(tiny_model_dir))
    cfg = load_config(write_config(tmp_path, tiny_model_dir, corpus_txt, tokens=1024))
    whole = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out_dir=str(tmp_path / "whole")))
    Trainer(whole, lm=lm, progress=False).run()
    half = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, tokens=512, out_dir=str(tmp_path / "split")))
    Trainer(half, lm=lm, progress=False).run()
    rest = dataclasses.replace(half, train=dataclasses.replace(half.train, tokens=1024))
    result = Trainer(rest, lm=lm, progress=False).run(resume=True)
    assert result.steps == 8
    for name in ("e2e_topk_w128_k4", "e2e_ds", "topk_w128_k4"):
        a = load_file(str(tmp_path / "whole" / name / "sae_weights.safetensors"))
        b = load_file(str(tmp_path / "split" / name / "sae_weights.safetensors"))
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}.{key}"


@pytest.mark.parametrize("saes, extra_data, batch_size, message", [
    (E2E_AND_TOPK, 'cache_dir = "somewhere"', 128, "data.cache_dir: sae.0. .'e2e_topk'. trains through the live LM"),
    (E2E_AND_TOPK, "", 100, "train.batch_size: .* 100 is not a multiple of data.context_len = 32"),
    (E2E_AND_TOPK + '\n[[sae]]\narchitecture = "gradient_topk"\nd_sae = 128\nk = 4\n', "", 128,
     "an SAE that reads stored LM-loss gradients cannot share"),
])
def test_runs_the_trainer_cannot_do_are_refused(tmp_path, saes, extra_data, batch_size, message):
    config = write_config(tmp_path, Path("unused"), Path("unused.txt"), saes=saes, extra_data=extra_data,
                          batch_size=batch_size)
    with pytest.raises(ConfigError, match=message):
        Trainer(load_config(config), progress=False)


def test_paper_b_e2e_config_trains_e2e_topk_at_three_ks():
    cfg = load_config(ROOT / "configs/results/paper_b_e2e.toml")
    Trainer(cfg, progress=False)  # the trainer's own checks pass
    assert sorted((s.architecture, s.k, s.d_sae) for s in cfg.sae) == [
        ("e2e_topk", 16, 2048), ("e2e_topk", 32, 2048), ("e2e_topk", 64, 2048)]
    assert cfg.model.site == "blocks.9.resid_post" and not cfg.data.cache_dir and not cfg.train.resample
