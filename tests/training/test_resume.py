"""Killing a run (SIGKILL, a real subprocess) and resuming it ends with bitwise the weights of an unbroken run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from saeforge.training import latest_checkpoint, load_checkpoint

CHILD = Path(__file__).with_name("child_run.py")
SRC = Path(__file__).resolve().parents[2] / "src"
SAES = ("relu_w48_l3", "gated_w32_l3", "gated_w32_t4", "topk_w48_k3", "gradient_topk_w48_k3")


def child(out_dir: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(CHILD), str(out_dir), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> str:
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    return err


def checkpoint_step(out_dir: Path) -> int:
    path = latest_checkpoint(out_dir / "checkpoints")
    return -1 if path is None else int(path.name.split("_")[1])


def saved_tensors(out_dir: Path, name: str) -> dict[str, torch.Tensor]:
    tensors = load_file(str(out_dir / name / "sae_weights.safetensors"))
    tensors.update({f"sparsity.{k}": v for k, v in load_file(str(out_dir / name / "sparsity.safetensors")).items()})
    return tensors


def test_sigkilled_run_resumes_to_identical_weights(tmp_path):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    finish(child(whole))

    proc = child(broken, "--slow-after", "6")
    deadline = time.time() + 240
    while checkpoint_step(broken) < 6:
        assert proc.poll() is None, proc.communicate()[1]
        assert time.time() < deadline, "the child never reached its step-6 checkpoint"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    killed_at = checkpoint_step(broken)
    assert 6 <= killed_at < 12
    assert not (broken / SAES[0]).exists()  # it really stopped before the end

    err = finish(child(broken, "--resume"))
    assert f"(step {killed_at})" in err
    for name in SAES:
        a, b = saved_tensors(whole, name), saved_tensors(broken, name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}.{key} differs after resume"
    # The run did resample and use AuxK state across the kill, so the comparison covers that state too.
    _, state = load_checkpoint(latest_checkpoint(broken / "checkpoints"))
    assert any(event["n_resampled"] > 0 for event in state["resamples"])
    # ... and the L0 controller's state: lambda moved from its start (3.0) and matches the unbroken run's.
    records = [json.loads((run / "gated_w32_t4" / "cfg.json").read_text())["training"] for run in (whole, broken)]
    assert records[0] == records[1] and records[0]["sparsity_coeff"] != 3.0 and records[0]["target_l0"] == 4.0


def test_kill_during_checkpoint_write_keeps_previous_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = child(out, "--kill-in-checkpoint", "4")
    proc.communicate(timeout=240)
    assert proc.returncode == -signal.SIGKILL
    leftovers = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert leftovers, "the kill should have hit a half-written checkpoint"
    path = latest_checkpoint(out / "checkpoints")
    assert path is not None and path.name == "step_000000002"
    step, state = load_checkpoint(path)
    assert step == 2 and state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["saes"]["relu_w48_l3"]["weights"].values())
    # ... and the run resumes from it, cleaning up the half-written one.
    err = finish(child(out, "--resume"))
    assert "(step 2)" in err
    assert checkpoint_step(out) == 12
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
