"""The `saeforge` dispatcher (real subprocesses) and the demo's configuration and table."""

import os
import subprocess
import sys
from pathlib import Path

from saeforge.config import from_dict, to_dict, RunConfig
from saeforge.demo import demo_config, demo_table

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


def test_demo_config_is_paper_a_equal_compute_and_round_trips(tmp_path):
    cfg = demo_config(tmp_path, "blocks.9.resid_post", tokens=393_216, eval_tokens=8192, d_sae=2048,
                      sparsity_coeff=0.5)
    gated, relu = cfg.sae
    assert (gated.architecture, relu.architecture) == ("gated", "relu")
    assert relu.d_sae == 3 * gated.d_sae // 2  # the baseline gets 1.5x the latents
    assert cfg.model.name == "embedded" and cfg.data.source == "embedded"
    assert from_dict(RunConfig, to_dict(cfg)) == cfg  # the typed config survives its own checks


def test_demo_table_has_one_line_per_sae():
    row = dict(name="gated", d_sae=2048, l0=12.5, loss_recovered_zero=0.9, loss_recovered_mean=0.5, gamma=0.99,
               gamma_centered=0.93, dead_fraction=0.01)
    table = demo_table([row, {**row, "name": "relu_baseline", "gamma_centered": 0.75}]).splitlines()
    assert len(table) == 4 and table[2].startswith("| gated | 2048 | 12.5 | 0.900 | 0.500 | 0.990 | 0.930 |")
    assert "| relu_baseline |" in table[3]
