"""Precision from the hardware: `dtype = "auto"` picks bf16 only where bf16 is actually fast.

bf16 matrix products are ~3.6x faster than fp32 on CPUs with AMX (and faster on AVX512-BF16), but ~20x SLOWER on
CPUs with only AVX2, where oneDNN emulates them. The CPU capability string alone does not say which (an AVX512 CPU
may lack BF16 instructions), so "auto" measures: a short probe times the same product in both dtypes (well under a
second) and picks bf16 only when it wins clearly. The answer is cached per machine, torch version and CPU-dispatch
setting in `$SAEFORGE_CACHE/precision.json`, so later jobs pay nothing. CUDA: bf16 where the device supports it.
An explicit dtype is always obeyed.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from saeforge.files import write_atomic

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# bf16 must beat fp32 by this factor to be chosen: the LM's elementwise work and the casts around the products do
# not speed up, so a bf16 product that is merely as fast as fp32 makes the whole job slower.
MIN_SPEEDUP = 1.3
PROBE_SHAPE = (512, 640, 512)  # one [512, 640] x [640, 512] product: the shape of an SAE step at d_in 640

# A probe returns fp32 time / bf16 time for one product (> 1: bf16 faster).
Probe = Callable[[], float]


@dataclass(frozen=True)
class Precision:
    """A chosen compute dtype and why it was chosen."""

    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def describe(self) -> str:
        return f"precision {self.name}: {self.reason}"

    def record(self) -> dict:
        return {"dtype": self.name, "reason": self.reason}


def measure_bf16_speedup(shape: tuple[int, int, int] = PROBE_SHAPE, repeats: int = 5) -> float:
    """fp32 time / bf16 time of one matrix product on this CPU (best of `repeats`, after a warm-up call)."""
    m, k, n = shape
    generator = torch.Generator().manual_seed(0)
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(m, k, generator=generator).to(dtype)
        b = torch.randn(k, n, generator=generator).to(dtype)
        a @ b  # first call: kernel selection and any JIT
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        best[dtype] = min(times)
    return best[torch.float32] / max(best[torch.bfloat16], 1e-9)


def _machine_key() -> str:
    """What the probe's answer depends on: CPU, torch build, CPU dispatch overrides and thread count."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    overrides = ",".join(f"{k}={os.environ.get(k, '')}" for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA"))
    return (f"{cpu}|torch {torch.__version__}|{torch.backends.cpu.get_cpu_capability()}|{overrides}|"
            f"threads {torch.get_num_threads()}")


def _cache_file() -> Path:
    from saeforge.models.loading import cache_root

    return cache_root() / "precision.json"


def cpu_bf16_speedup(probe: Optional[Probe] = None) -> tuple[float, bool]:
    """(fp32 time / bf16 time, whether it came from the cache). With `probe` given it is called and nothing is
    cached (tests inject one); otherwise the per-machine cache is read, or the probe runs once and is stored."""
    if probe is not None:
        return float(probe()), False
    key, path = _machine_key(), _cache_file()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if not isinstance(cached, dict):
        cached = {}
    if isinstance(cached.get(key), (int, float)):
        return float(cached[key]), True
    speedup = measure_bf16_speedup()
    cached[key] = speedup
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(cached, indent=1))
    except OSError:
        pass  # a read-only cache only costs the probe again next time
    return speedup, False


def choose_precision(requested: Union[str, torch.dtype, None], device: Union[str, torch.device] = "cpu", *,
                     probe: Optional[Probe] = None) -> Precision:
    """The dtype to compute in: `requested` when it names one, else ("auto" or None) bf16 where it is fast on
    `device` and float32 elsewhere. `probe` replaces the CPU timing (for tests)."""
    if isinstance(requested, torch.dtype):
        return Precision(requested, "set explicitly")
    if requested not in (None, "auto"):
        if requested not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}; got {requested!r}")
        return Precision(DTYPES[requested], "set explicitly")
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision(torch.bfloat16, f"{torch.cuda.get_device_name(device)} supports bf16")
        return Precision(torch.float32, f"{torch.cuda.get_device_name(device)} has no native bf16")
    if device.type != "cpu":
        return Precision(torch.float32, f"no bf16 probe for device type {device.type!r}")
    capability = torch.backends.cpu.get_cpu_capability()
    speedup, cached = cpu_bf16_speedup(probe)
    measured = f"bf16 products {speedup:.2f}x the speed of fp32{' (cached probe)' if cached else ''}"
    if speedup >= MIN_SPEEDUP:
        return Precision(torch.bfloat16, f"this CPU ({capability}) runs bf16 natively: {measured}")
    return Precision(torch.float32, f"this CPU ({capability}) has no fast native bf16: {measured}")


def hardware_record(device: Union[str, torch.device] = "cpu") -> dict:
    """What a measurement depends on, for benchmark JSON: CPU capability, threads, torch, and what "auto" picks."""
    device = torch.device(device)
    record = {"device": str(device), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
              "cpu": _machine_key().split("|", 1)[0], "auto_precision": choose_precision("auto", device).record()}
    if device.type == "cuda":
        record["gpu"] = torch.cuda.get_device_name(device)
    return record
