"""Data-parallel training with real torchrun subprocesses: 2 CPU ranks (gloo), synthetic streams, tiny SAEs.

The uninterrupted 2-rank run (`two_rank_run`, started once) serves as the reference of several tests: it equals one
process reading the same global batches, its ranks end with identical states, and a run killed and resumed ends
equal to it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from ddp_helpers import GlobalBatches, finish, max_abs_diff, torchrun
from safetensors.torch import load_file

from saeforge.config import ConfigError
from saeforge.training import Trainer, TrainingError, latest_checkpoint, load_checkpoint
from saeforge.training.distributed import (Distributed, backend_for, launched, local_device, process_group,
                                           rank_label)

CHILD = str(Path(__file__).with_name("ddp_child.py"))
# Architectures whose selection is batch-wide act on a rank's rows, not the global batch (distributed.py), so one
# process over the global batches trains them differently; the rank-agreement test covers them.
BATCH_WIDE = ("batchtopk",)


def saved(out_dir: Path, name: str) -> dict[str, torch.Tensor]:
    tensors = load_file(str(out_dir / name / "sae_weights.safetensors"))
    tensors.update({f"sparsity.{k}": v for k, v in load_file(str(out_dir / name / "sparsity.safetensors")).items()})
    return tensors


def sae_names(out_dir: Path) -> list[str]:
    return sorted(p.parent.name for p in out_dir.glob("*/sae_weights.safetensors"))


def checkpoint_step(out_dir: Path) -> int:
    path = latest_checkpoint(out_dir / "checkpoints")
    return -1 if path is None else int(path.name.split("_")[1])


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "whole"
    finish(torchrun([CHILD, str(out), "--dump", "--check-collectives"]))
    return out


def test_collectives_handle_uneven_ranks_and_mixed_dtypes(two_rank_run):
    for rank in range(2):
        found = json.loads((two_rank_run / f"collectives_{rank}.json").read_text())
        assert found and all(found.values()), (rank, found)


def test_two_ranks_train_like_one_process_over_the_same_global_batches(two_rank_run, tmp_path):
    import ddp_child

    reference = tmp_path / "one_process"
    streams = [ddp_child.rank_stream(rank, 2) for rank in range(2)]
    result = Trainer(ddp_child.run_config(str(reference)), stream=GlobalBatches(streams), progress=False).run()
    compared = [name for name in result.sae_dirs if not name.startswith(BATCH_WIDE)]
    assert len(compared) >= 6
    worst = {}
    for name in compared:
        a, b = saved(two_rank_run, name), saved(reference, name)
        diffs = max_abs_diff({k: v for k, v in a.items() if not k.startswith("sparsity.")},
                             {k: v for k, v in b.items() if not k.startswith("sparsity.")})
        worst[name] = max(diffs.values())
        assert worst[name] < 1e-4, f"{name}: {diffs}"
        # Firing counts are summed over the ranks: the same integers as one process counts.
        assert torch.equal(a["sparsity.firing_counts"], b["sparsity.firing_counts"]), name
        ra, rb = (json.loads((run / name / "cfg.json").read_text())["training"] for run in (two_rank_run, reference))
        assert ra["tokens"] == rb["tokens"] and ra["steps"] == rb["steps"]
        if ra.get("target_l0") is not None:  # lambda steered by the global L0
            assert ra["sparsity_coeff"] == pytest.approx(rb["sparsity_coeff"], rel=1e-5)
            assert ra["sparsity_coeff"] != 3.0
    print("max |two ranks - one process| per SAE:", worst)
    # Resampling happened, at the same steps, with the same counts.
    events = json.loads((two_rank_run / "rank_events_0.json").read_text())
    assert [(e["step"], e["sae"], e["n_resampled"]) for e in events] == \
        [(e["step"], e["sae"], e["n_resampled"]) for e in result.resamples]
    assert sum(e["n_resampled"] for e in events) >= 5


def test_ranks_end_with_identical_state(two_rank_run):
    a = load_file(str(two_rank_run / "rank_state_0.safetensors"))
    b = load_file(str(two_rank_run / "rank_state_1.safetensors"))
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"the ranks differ in {differ}"
    # ... and that state is not trivial: latents fired, some were resampled, AuxK has dead latents, lambda
    # moved, and a buffer updated in training (BatchTopK's threshold, when registered) is shared.
    assert int(a["relu_sparse.tracker.counts"].sum()) > 0
    assert int(a["topk_w48_k3.dead_resample"].sum()) > 0  # dead over the AuxK window (2 batches): AuxK's mask
    assert float(a["gated_w32_t4.lambda"]) != 3.0
    if "batchtopk_w48_k3.weights.threshold" in a:
        assert float(a["batchtopk_w48_k3.weights.threshold"]) > 0
    events = [json.loads((two_rank_run / f"rank_events_{r}.json").read_text()) for r in range(2)]
    assert events[0] == events[1] and any(e["n_resampled"] for e in events[0])
    # The checkpoint (rank 0's) holds every rank's stream position.
    _, state = load_checkpoint(latest_checkpoint(two_rank_run / "checkpoints"))
    streams = state["distributed"]["streams"]
    assert state["distributed"]["world_size"] == 2 and [s["rank"] for s in streams] == [0, 1]
    assert streams[0]["batches"] == streams[1]["batches"] > 12


def test_sigkilled_rank_then_resume_equals_uninterrupted_run(two_rank_run, tmp_path):
    broken = tmp_path / "broken"
    proc = torchrun([CHILD, str(broken), "--slow-after", "6"])
    deadline = time.time() + 240
    while checkpoint_step(broken) < 6:
        assert proc.poll() is None, proc.communicate()[1][-4000:]
        assert time.time() < deadline, "the run never reached its step-6 checkpoint"
        time.sleep(0.02)
    os.kill(int((broken / "pid_1").read_text()), signal.SIGKILL)
    killed = time.time()
    _, err = proc.communicate(timeout=60)
    stopped_after = time.time() - killed
    assert proc.returncode != 0
    assert stopped_after < 20, f"the job took {stopped_after:.1f} s to stop after rank 1 died"
    killed_at = checkpoint_step(broken)
    assert 6 <= killed_at < 12
    assert not (broken / "relu_w48_l3").exists()  # it really stopped before the end
    step, _ = load_checkpoint(latest_checkpoint(broken / "checkpoints"))  # the last checkpoint verifies and loads
    assert step == killed_at

    _, err = finish(torchrun([CHILD, str(broken), "--resume"]))
    assert f"(step {killed_at})" in err
    names = sae_names(two_rank_run)
    assert names == sae_names(broken) and len(names) >= 6
    for name in names:
        a, b = saved(two_rank_run, name), saved(broken, name)
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}.{key} differs after the kill and resume"


def test_resuming_with_another_world_size_is_refused(two_rank_run, tmp_path):
    import ddp_child

    out = tmp_path / "copy"
    shutil.copytree(two_rank_run, out)
    trainer = Trainer(ddp_child.run_config(str(out)), stream=ddp_child.rank_stream(0, 1), progress=False)
    with pytest.raises(TrainingError, match=r"a run of 2 ranks .* this run has one process.* world size of 2"):
        trainer.prepare(resume=True)


def test_a_rank_that_raises_ends_the_job_naming_the_rank(tmp_path):
    out = tmp_path / "failing"
    start = time.time()
    proc = torchrun([CHILD, str(out), "--fail-rank", "1", "--fail-at", "5"])
    _, err = proc.communicate(timeout=120)
    ended = time.time()
    assert proc.returncode != 0
    failed_at = float((out / "failed_at").read_text())
    assert ended - failed_at < 15, f"the job took {ended - failed_at:.1f} s to end after rank 1 failed"
    message = r"saeforge train: error \(rank 1 of 2\): step \d+: the activation batch holds 1 NaN"
    assert re.search(message, err), err[-3000:]
    assert "rank 0 of 2" not in err.split("saeforge train: error (rank 1 of 2)")[0]  # rank 1 spoke first
    assert ended - start < 120
    # A checkpoint written before the failure is whole.
    assert load_checkpoint(latest_checkpoint(out / "checkpoints"))[0] >= 2


# ---------------------------------------------------------------------------------------------- in-process units
def test_backend_follows_the_device():
    assert backend_for("cpu") == "gloo"
    assert backend_for("cuda") == backend_for(torch.device("cuda", 3)) == "cpu:gloo,cuda:nccl"
    assert local_device("cuda", 2) == torch.device("cuda", 2) == local_device("cuda:0", 2)
    assert local_device("cpu", 2) == torch.device("cpu")


def test_one_process_without_torchrun_runs_no_process_group(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert launched() is None and rank_label() == ""
    with process_group("cpu") as dist:
        assert dist is None
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with process_group("cpu") as dist:  # torchrun with one process: the single-process path
        assert dist is None
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert launched().rank == 1 and rank_label() == " (rank 1 of 4)"


def test_global_batch_must_split_evenly_over_the_ranks(tmp_path):
    import ddp_child

    dist = Distributed(0, 3, 0, torch.device("cpu"), "gloo")  # no collective runs before the check
    with pytest.raises(ConfigError, match="global batch.*3 ranks.*multiple of 3"):
        Trainer(ddp_child.run_config(str(tmp_path)), stream=ddp_child.rank_stream(0, 1), dist=dist)
