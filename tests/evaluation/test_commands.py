"""`saeforge eval` as a real subprocess, and `saeforge sweep` training and evaluating a tiny grid."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from saeforge import SAEMetadata, create_sae
from saeforge.config import ConfigError, load_config
from saeforge.commands.output import markdown_table
from saeforge.commands.sweep import expand_grid, sweep_command

SITE = "blocks.1.resid_post"
SRC = Path(__file__).resolve().parents[2] / "src"


def _save_sae(directory: Path, model_dir: Path, architecture: str, **options) -> Path:
    torch.manual_seed(0)
    sae = create_sae(architecture, d_in=64, d_sae=128, **options)
    sae.meta = SAEMetadata(model_name=str(model_dir), site=SITE, context_size=32)
    sae.save(directory)
    return directory


def test_eval_cli_subprocess_writes_json_table_and_figures(tmp_path, tiny_model_dir, corpus_txt):
    relu = _save_sae(tmp_path / "relu", tiny_model_dir, "relu")
    topk = _save_sae(tmp_path / "topk", tiny_model_dir, "topk", k=8)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run(
        [sys.executable, "-m", "saeforge", "eval", str(relu), str(topk), "--out", str(out), "--tokens", "256",
         "--source", str(corpus_txt), "--ito", "2", "4", "--steering", "--steering-alphas", "0.5", "2",
         "--batch-size", "4", "--no-progress"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "eval.json").read_text())
    rows = report["results"]
    assert [r["name"] for r in rows] == ["relu", "topk", "relu@ito2", "relu@ito4", "topk@ito2", "topk@ito4"]
    assert all(r["site"] == SITE and r["eval_contexts"] == 8 for r in rows)
    assert rows[1]["l0"] <= 8 + 1e-9 and rows[3]["l0"] <= 4 + 1e-9
    steer = rows[0]["steering"]
    assert len(steer["latents"]) > 0 and steer["alpha_scales"] == [0.5, 2.0] and steer["alpha_unit"] > 0
    assert [p["alpha"] for p in steer["sweep"]] == pytest.approx([0.5 * steer["alpha_unit"], 2 * steer["alpha_unit"]])
    assert 0.0 <= rows[0]["dead_fraction"] <= 1.0
    # delta-CE, KL and loss recovered with bootstrap CIs over the 8 contexts; the per-context arrays kept.
    for key in ("delta_ce", "kl_div", "loss_recovered_mean", "loss_recovered_zero", "l_added"):
        lo, hi = rows[0][f"{key}_ci"]
        assert lo <= rows[0][key] <= hi, key
    assert rows[0]["delta_ce"] == pytest.approx(rows[0]["ce_spliced"] - rows[0]["ce_clean"])
    assert all(len(v) == 8 for v in rows[0]["per_context"].values())
    assert rows[0]["eval_excluded_positions"] == 0 and rows[0]["max_input_norm"] is None
    # The PCA reference at every default rank up to d = 64, fitted on the training split.
    pca = report["pca_reference"]
    assert [r["rank"] for r in pca] == [8, 16, 32, 64] and "training-split sample" in pca[0]["fit"]
    assert pca[-1]["fvu"] < pca[0]["fvu"] and pca[0]["kl_div_ci"][0] <= pca[0]["kl_div"] <= pca[0]["kl_div_ci"][1]
    for name in ("firing_frequency", "decoder_max_cosine", "directional_derivatives", "ito_l0_vs_loss_recovered",
                 "steering"):
        png = out / f"{name}.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    # The terminal ends with the table (delta-CE first, CIs in brackets), the PCA reference and the paths.
    assert "| relu | relu |" in proc.stdout and "| topk@ito4 | ito:topk |" in proc.stdout
    assert "| L0 | delta CE (nats) | KL | loss rec. (mean) |" in proc.stdout
    assert "| PCA rank 8 | pca |" in proc.stdout
    assert str(out / "eval.json") in proc.stdout


def test_eval_cli_refuses_a_directory_without_an_sae(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run([sys.executable, "-m", "saeforge", "eval", str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 2 and "no cfg.json" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "saeforge", "eval"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2 and "no SAE directories" in proc.stderr


def test_sweep_trains_the_grid_and_writes_csv_and_figures(tmp_path, sweep_config):
    config = sweep_config('grid_architectures = ["relu", "gated", "topk", "gradient_topk"]\n'
                          'grid_sparsity_coeffs = [1e-3, 1e-1]\ngrid_k = [4, 16]')
    out = tmp_path / "sweep_out"
    sweep_command(config, out=out, progress=False)
    with open(out / "sweep.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted((r["architecture"], r["k"] or r["sparsity_coeff"]) for r in rows) == sorted(
        [("relu", "0.001"), ("relu", "0.1"), ("gated", "0.001"), ("gated", "0.1"),
         ("topk", "4"), ("topk", "16"), ("gradient_topk", "4"), ("gradient_topk", "16")])
    for r in rows:
        assert 0.0 <= float(r["dead_fraction"]) <= 1.0 and float(r["l0"]) >= 0
    topk = {int(r["k"]): float(r["l0"]) for r in rows if r["architecture"] == "topk"}
    assert topk[4] <= 4 + 1e-9 and topk[16] <= 16 + 1e-9
    for name in ("pareto_l0_vs_delta_ce", "pareto_l0_vs_kl", "pareto_l0_vs_loss_recovered_zero",
                 "pareto_l0_vs_loss_recovered_mean", "pareto_l0_vs_gamma", "pareto_l0_vs_nmse", "dead_fraction_vs_k"):
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG", name
    for r in rows:
        assert float(r["delta_ce_ci_lo"]) <= float(r["delta_ce"]) <= float(r["delta_ce_ci_hi"])
    report = json.loads((out / "sweep.json").read_text())
    assert [p["rank"] for p in report["pca_reference"]] == [8, 16, 32, 64]
    # Two settings per architecture: a matched-L0 comparison for each pair whose curves overlap or not.
    assert {(m["a"], m["b"]) for m in report["matched_l0"]} >= {("relu", "gated")}
    # Evaluating again without training finds the same SAEs.
    sweep_command(config, out=tmp_path / "again", train=False, progress=False)
    with open(tmp_path / "again" / "sweep.csv") as fh:
        again = list(csv.DictReader(fh))
    assert [r["l0"] for r in again] == [r["l0"] for r in rows]


def test_grid_expansion_and_its_errors(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text("""
[eval]
grid_architectures = ["gated", "topk"]
grid_sparsity_coeffs = [1e-3, 3e-3]
grid_k = [8]

[[sae]]
architecture = "gated"
expansion = 4.0
options = {use_r_mag = false}
""")
    cfg = expand_grid(load_config(path))
    assert [(s.architecture, s.sparsity_coeff if s.k is None else s.k) for s in cfg.sae] == [
        ("gated", 1e-3), ("gated", 3e-3), ("topk", 8)]
    assert all(s.expansion == 4.0 for s in cfg.sae)
    assert cfg.sae[0].options == {"use_r_mag": False} and cfg.sae[2].options == {}
    path.write_text('[eval]\ngrid_architectures = ["topk"]\n')
    with pytest.raises(ConfigError, match="grid_k"):
        expand_grid(load_config(path))
    path.write_text('[eval]\ngrid_architectures = ["jumprelu2"]\ngrid_target_l0 = [8]\n')
    with pytest.raises(ConfigError, match=r"'jumprelu2' cannot be swept; use one of .*'jumprelu'"):
        expand_grid(load_config(path))
    # JumpReLU is trained directly now: swept by L0 target (or lambda) like relu and gated.
    path.write_text('[eval]\ngrid_architectures = ["jumprelu"]\ngrid_target_l0 = [8, 16]\n')
    assert [(s.architecture, s.target_l0) for s in expand_grid(load_config(path)).sae] == [
        ("jumprelu", 8), ("jumprelu", 16)]


def test_markdown_table_formats_missing_values():
    table = markdown_table([{"name": "a", "architecture": "relu", "l0": 3.25, "gamma": float("nan")}])
    assert table.splitlines()[2] == "| a | relu | 3.2 | - |"


def test_markdown_table_leads_with_delta_ce_and_shows_cis():
    table = markdown_table([{"name": "a", "architecture": "gated", "l0": 20.0, "delta_ce": 0.1234,
                             "delta_ce_ci": [0.11, 0.14], "loss_recovered_mean": 0.8, "kl_div": 0.05}])
    head, _, line = table.splitlines()
    assert head.startswith("| SAE | arch | L0 | delta CE (nats) | KL | loss rec. (mean) |")
    assert line == "| a | gated | 20.0 | 0.1234 [0.1100, 0.1400] | 0.0500 | 80.00% |"


def test_json_files_are_strict_json(tmp_path):
    from saeforge.commands.output import write_json

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    path = write_json(tmp_path / "eval.json", {"results": [{"gamma": float("nan"), "l0": 3.5, "kl": float("inf")}]})
    assert json.loads(path.read_text(), parse_constant=refuse) == {"results": [{"gamma": None, "l0": 3.5, "kl": None}]}
