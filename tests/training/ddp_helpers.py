"""Helpers of the data-parallel tests: real torchrun subprocesses, and one process reading a run's global batches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

SRC = Path(__file__).resolve().parents[2] / "src"


def child_env(**extra: str) -> dict:
    """The environment of a child Python importing this checkout's saeforge, one thread per process."""
    path = os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}


def torchrun(args: list[str], *, nproc: int = 2, **popen) -> subprocess.Popen:
    """`python -m torch.distributed.run --standalone --nproc-per-node nproc ARGS` (gloo on these CPUs); a free
    rendezvous port each time, so tests may run side by side."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    return subprocess.Popen(command, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[str, str]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"exit code {proc.returncode}\n{err[-6000:]}"
    return out, err


class GlobalBatches:
    """The global batches of a data-parallel run, read by one process: batch t is the concatenation, in rank order,
    of batch t of every rank's stream (training/distributed.py). Statistics and samples are rank 0's (every rank's
    are the same)."""

    def __init__(self, streams: list):
        self.streams = streams
        self.d_in = streams[0].d_in
        self.batch_size = sum(s.batch_size for s in streams)

    @property
    def scale(self) -> float:
        return self.streams[0].scale

    def activation_stats(self):
        return self.streams[0].activation_stats()

    def training_sample(self, n: int) -> torch.Tensor:
        return self.streams[0].training_sample(n)

    def heldout_sample(self, n: int) -> Optional[torch.Tensor]:
        return self.streams[0].heldout_sample(n)

    @property
    def excluded_tokens(self) -> int:
        return sum(getattr(s, "excluded_tokens", 0) for s in self.streams)

    @property
    def epoch(self) -> int:
        return getattr(self.streams[0], "epoch", 0)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        parts = [b for b in (next(s, None) for s in self.streams) if b is not None]
        if not parts:
            raise StopIteration
        return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}

    def state_dict(self) -> dict:
        return {"streams": [s.state_dict() for s in self.streams]}

    def load_state_dict(self, state: dict) -> None:
        for s, st in zip(self.streams, state["streams"]):
            s.load_state_dict(st)


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    assert a.keys() == b.keys()
    return {k: float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a}
