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


E2E_TRAIN = "lr = 3e-3\nresample = false"  # nothing here resamples; its draws would use up the small corpus
E2E_EVAL = "pca_ranks = [4]\nbootstrap_resamples = 100"


def with_train(cfg, **fields):
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **fields))


def saeforge(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "saeforge", *args, "--no-progress"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_cli_sweeps_saves_loads_and_evaluates_e2e_saes(tmp_path, sweep_config, corpus_txt):
    config = sweep_config(E2E_EVAL + '\ngrid_architectures = ["e2e_topk", "topk"]\ngrid_k = [2, 6]', E2E_TRAIN,
                          '[[sae]]\narchitecture = "e2e_topk"\nd_sae = 128\nk = 2\noptions = { ds_coeff = 0.5 }\n')
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


def test_training_lowers_the_kl_it_is_trained_on(tmp_path, tiny_model_dir, sweep_config):
    """The same run (same seed and data) after 1 step and after 32: the held-out KL of the spliced model falls for
    both E2E SAEs."""
    lm = load_lm(str(tiny_model_dir))
    cfg = load_config(sweep_config(E2E_EVAL, E2E_TRAIN, E2E_AND_TOPK))
    contexts = eval_contexts(lm, cfg.data, 512)
    kl = {}
    for tokens in (128, 4096):
        dirs = Trainer(with_train(cfg, tokens=tokens, out_dir=str(tmp_path / f"run{tokens}")), lm=lm,
                       progress=False).run().sae_dirs
        rows = evaluate_saes(lm, [str(dirs["e2e_topk_w128_k4"]), str(dirs["e2e_ds"])], SITE, contexts,
                             batch_size=4, analyses=False, progress=False)
        kl[tokens] = [r["kl_div"] for r in rows]
    for before, after in zip(kl[128], kl[4096]):
        assert after < 0.85 * before, kl


def test_a_resumed_run_continues_exactly(tmp_path, tiny_model_dir, sweep_config):
    lm = load_lm(str(tiny_model_dir))
    cfg = load_config(sweep_config(E2E_EVAL, E2E_TRAIN, E2E_AND_TOPK))
    Trainer(with_train(cfg, tokens=1024, out_dir=str(tmp_path / "whole")), lm=lm, progress=False).run()
    Trainer(with_train(cfg, tokens=512, out_dir=str(tmp_path / "split")), lm=lm, progress=False).run()
    result = Trainer(with_train(cfg, tokens=1024, out_dir=str(tmp_path / "split")), lm=lm,
                     progress=False).run(resume=True)
    assert result.steps == 8
    for name in ("e2e_topk_w128_k4", "e2e_ds", "topk_w128_k4"):
        a = load_file(str(tmp_path / "whole" / name / "sae_weights.safetensors"))
        b = load_file(str(tmp_path / "split" / name / "sae_weights.safetensors"))
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}.{key}"


@pytest.mark.parametrize("change, message", [
    ({"data": {"cache_dir": "somewhere"}}, r"data.cache_dir: sae\[0\] \('e2e_topk'\) trains through the live LM"),
    ({"train": {"batch_size": 100}}, "train.batch_size: .* 100 is not a multiple of data.context_len = 32"),
    ({"sae": '[[sae]]\narchitecture = "gradient_topk"\nd_sae = 128\nk = 4\n'},
     "an SAE that reads stored LM-loss gradients cannot share"),
])
def test_runs_the_trainer_cannot_do_are_refused(sweep_config, change, message):
    cfg = load_config(sweep_config("", E2E_TRAIN, E2E_AND_TOPK + change.get("sae", "")))
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **change.get("data", {})),
                              train=dataclasses.replace(cfg.train, **change.get("train", {})))
    with pytest.raises(ConfigError, match=message):
        Trainer(cfg, progress=False)


def test_paper_b_e2e_config_trains_e2e_topk_at_three_ks():
    cfg = load_config(ROOT / "configs/results/paper_b_e2e.toml")
    Trainer(cfg, progress=False)  # the trainer's own checks pass
    assert sorted((s.architecture, s.k, s.d_sae) for s in cfg.sae) == [
        ("e2e_topk", 16, 2048), ("e2e_topk", 32, 2048), ("e2e_topk", 64, 2048)]
    assert cfg.model.site == "blocks.9.resid_post" and not cfg.data.cache_dir and not cfg.train.resample
