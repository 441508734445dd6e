"""The `saeforge` dispatcher (real subprocesses) and the demo's configuration and table."""

import os
import subprocess
import sys
from pathlib import Path

from saeforge.config import from_dict, to_dict, RunConfig
from saeforge.commands.demo import demo_config, demo_table

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "saeforge", *args], capture_output=True, text=True, env=ENV,
                          timeout=120)


def test_help_lists_every_command():
    out = run_cli("--help")
    assert out.returncode == 0
    for name in ("demo", "harvest", "train", "eval", "sweep"):
        assert f"  {name} " in out.stdout


def test_unknown_command_is_named():
    out = run_cli("trian")
    assert out.returncode == 2 and "unknown command 'trian'" in out.stderr


def test_demo_config_is_paper_a_equal_compute_at_l0_targets_and_round_trips(tmp_path):
    cfg = demo_config(tmp_path, "blocks.6.resid_post", harvest_tokens=65_536, epochs=4, eval_tokens=8192,
                      d_sae=1024, gated_l0=(20.0, 50.0), relu_l0=(40.0, 100.0))
    gated = [s for s in cfg.sae if s.architecture == "gated"]
    relu = [s for s in cfg.sae if s.architecture == "relu"]
    assert [s.target_l0 for s in gated] == [20.0, 50.0] and [s.target_l0 for s in relu] == [40.0, 100.0]
    assert all(s.sparsity_coeff is None for s in cfg.sae)  # lambdas come from the L0 controller
    assert all(s.d_sae == 3 * 1024 // 2 for s in relu)  # the baseline gets 1.5x the latents
    assert cfg.train.tokens == 4 * 65_536 and cfg.data.cache_dir == str(tmp_path / "activations")
    assert cfg.model.dtype == "auto" and cfg.train.compute_dtype == "auto"
    assert cfg.model.name == "embedded" and cfg.data.source == "embedded"
    assert from_dict(RunConfig, to_dict(cfg)) == cfg  # the typed config survives its own checks


def test_demo_table_has_one_line_per_sae_and_per_pca_rank_with_intervals():
    row = dict(name="gated", d_sae=2048, l0=12.5, delta_ce=0.2, delta_ce_ci=[0.15, 0.25], kl_div=0.19,
               loss_recovered_zero=0.9, loss_recovered_mean=0.5, gamma_centered=0.93, dead_fraction=0.01)
    pca = [dict(rank=16, delta_ce=0.4, kl_div=0.38, loss_recovered_zero=0.8, loss_recovered_mean=0.3)]
    table = demo_table([row, {**row, "name": "relu_baseline", "gamma_centered": 0.75}], pca).splitlines()
    assert len(table) == 5
    assert table[2].startswith("| gated | 2048 | 12.5 | 0.200 [0.150, 0.250] | 0.190 | 0.500 | 0.900 | 0.930 |")
    assert "| relu_baseline |" in table[3] and table[4].startswith("| PCA rank 16 | - | 16 | 0.400 |")
