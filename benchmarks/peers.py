"""saeforge's training step against the peers' (SAELens, dictionary_learning, sparsify) at the same shapes, dtype and
threads, with the floors that place them (issue 17). Not part of the tests.

    PYTHONPATH=src .venv/bin/python benchmarks/peers.py [--threads 2] [--rounds 5] [--archs relu,gated,topk]
        [--l0 16,64,256] [--peer-venv benchmarks/.venv-peers] > peers.json

The peers run in their own virtual environment (benchmarks/peer_venv.py creates it when missing: sae-lens,
dictionary-learning, eai-sparsify beside the CPU torch of saeforge's version), one worker process per library
(benchmarks/peers/peer_step.py), all alive at once for a setting and taking turns step by step with saeforge's step
and the floors, so that a shared machine's drift falls on all of them alike. Every process uses the same thread
count, builds the same batch (4096 rows of torch.manual_seed(0)'s randn, d_in 640) and an SAE of d_sae 8192 in
float32, and plants the L0 the same way: for ReLU and Gated each latent's (gate's) bias is set so that a fraction
L0 / d_sae of the batch fires it (the magnitude bias 1 above it for Gated); TopK takes k = L0. Each reports the L0
its own encoder measures. The learning rate is tiny, so the density holds over the steps.

Per architecture and L0 the JSON holds the step times (median and minimum over the rounds) of saeforge (`SAERun.step`:
the hand-derived step, sparse or dense as it decides, constrained Adam, firing counts) and of each peer, and two
floors measured alongside: `dense_floor` (the bare dense products of a dense step of that architecture, as
benchmarks/train_step.py counts them; a dense ReLU's for TopK) and `active_floor` (the encoder product plus the
selection of the active set: the positive entries for ReLU, the gate's for Gated, the exact top k for TopK). The
speed-up is the fastest peer's median over saeforge's median. The CPU capability is in the JSON; run under
ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 for an AVX2 machine's kernels (float32
products run in MKL, which reads only the last; without it they keep AVX-512).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from peer_venv import ensure_peer_venv  # noqa: E402  (benchmarks/ is the script's own directory)
from train_step import DENSE_STEP, FLOOR_PRODUCTS, products  # noqa: E402

from saeforge.config import TrainConfig  # noqa: E402
from saeforge.models.precision import hardware_record  # noqa: E402
from saeforge.saes import create_sae  # noqa: E402
from saeforge.saes.active import ActiveEntries  # noqa: E402
from saeforge.saes.base import with_bias_row, with_ones_column  # noqa: E402
from saeforge.saes.topk import top_k_indices  # noqa: E402
from saeforge.training.memory import keep_freed_memory  # noqa: E402
from saeforge.training.sae_run import SAERun  # noqa: E402
from saeforge.training.schedules import StepPlan  # noqa: E402

D_IN, D_SAE, BATCH, LR = 640, 8192, 4096, 1e-7
PEER_SPECS = ("sae-lens", "dictionary-learning==0.1.0", "eai-sparsify")
PEERS = {"relu": ("sae_lens", "dictionary_learning"), "gated": ("sae_lens", "dictionary_learning"),
         "topk": ("sae_lens", "dictionary_learning", "sparsify")}
WORKER = HERE / "peers" / "peer_step.py"


def log(message: str) -> None:
    print(f"[peers] {message}", file=sys.stderr, flush=True)


def batch() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(BATCH, D_IN)


def planted_sae(arch: str, l0: int, x: torch.Tensor):
    """saeforge's SAE with the L0 planted as peer_step.py plants it (k = L0 for TopK)."""
    torch.manual_seed(0)
    sae = create_sae(arch, d_in=D_IN, d_sae=D_SAE, **({"k": l0} if arch == "topk" else {}))
    with torch.no_grad():
        if arch != "topk":
            bias = -torch.quantile((x[: BATCH // 2] - sae.b_dec) @ sae.W_enc, 1 - l0 / D_SAE, dim=0)
            if arch == "relu":
                sae.b_enc.copy_(bias)
            else:
                sae.b_gate.copy_(bias)
                sae.b_mag.copy_(bias + 1)
    return sae


def saeforge_step(arch: str, l0: int, x: torch.Tensor):
    sae = planted_sae(arch, l0, x)
    train = TrainConfig(batch_size=BATCH, lr_warmup_steps=0, tensorboard=False)
    run = SAERun(arch, sae, train, total_steps=10**6, plan=StepPlan.of(train, 10**6), lr=LR, betas=sae.adam_betas,
                 sparsity_coeff=1.0 if sae.uses_sparsity_coeff else None, resample=False, seed=0)
    with torch.no_grad():
        l0_measured = float((sae.encode(x) > 0).float().sum(-1).mean())
    counter = iter(range(10**9))

    def step():
        i = next(counter)
        run.step(x, None, i, (i + 1) * BATCH)

    return step, l0_measured


def active_floor(arch: str, l0: int, x: torch.Tensor):
    """The encoder product and the selection of the active set, on the planted SAE's weights."""
    sae = planted_sae(arch, l0, x)
    bias = sae.b_enc if arch != "gated" else sae.b_gate
    x_1, W_1 = with_ones_column(x - sae.b_dec, torch.float32), with_bias_row(sae.W_enc, bias, torch.float32)

    def run():
        pre = x_1 @ W_1
        return top_k_indices(pre, l0) if arch == "topk" else ActiveEntries.above(pre, 0.0)

    return run


class Worker:
    """A peer library's step in its own process (peer_step.py), timed there, one step per request."""

    def __init__(self, python: Path, library: str, arch: str, l0: int, threads: int):
        self.library = library
        self.proc = subprocess.Popen([str(python), str(WORKER), "--library", library, "--arch", arch, "--l0",
                                      str(l0), "--threads", str(threads)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{library} worker for {arch} L0 {l0} did not start (rc {self.proc.wait()})")
        self.info = json.loads(line)

    def step(self) -> float:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.library} worker died (rc {self.proc.wait()})")
        return float(line)

    def close(self) -> None:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        self.proc.wait()


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def summary(times: list[float]) -> dict:
    return {"s": round(statistics.median(times), 4), "s_min": round(min(times), 4)}


def bench(arch: str, l0: int, rounds: int, threads: int, python: Path, x: torch.Tensor) -> dict:
    step, l0_measured = saeforge_step(arch, l0, x)
    dense = products(FLOOR_PRODUCTS[arch] if arch != "topk" else DENSE_STEP, torch.float32, torch.device("cpu"))
    active = active_floor(arch, l0, x)
    own = {"saeforge": lambda: timed(step), "dense_floor": lambda: timed(dense), "active_floor": lambda: timed(active)}
    workers = [Worker(python, library, arch, l0, threads) for library in PEERS[arch]]
    try:
        takers = {**own, **{w.library: w.step for w in workers}}
        for take in takers.values():  # warm-up
            take()
        times = {name: [] for name in takers}
        for _ in range(rounds):
            for name, take in takers.items():
                times[name].append(take())
    finally:
        for w in workers:
            w.close()
    peers = {w.library: {**summary(times[w.library]), "version": w.info["version"], "l0_measured": w.info["l0"]}
             for w in workers}
    fastest = min(peers, key=lambda name: peers[name]["s"])
    result = {"arch": arch, "l0": l0, "l0_measured": round(l0_measured, 2), "saeforge": summary(times["saeforge"]),
              "dense_floor": summary(times["dense_floor"]), "active_floor": summary(times["active_floor"]),
              "peers": peers, "fastest_peer": fastest,
              "speedup_vs_fastest_peer": round(peers[fastest]["s"] / statistics.median(times["saeforge"]), 2),
              "speedup_vs_fastest_peer_min": round(peers[fastest]["s_min"] / min(times["saeforge"]), 2)}
    log(json.dumps(result))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--archs", default="relu,gated,topk")
    p.add_argument("--l0", default="16,64,256")
    p.add_argument("--peer-venv", type=Path, default=HERE / ".venv-peers")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as saeforge's trainer does on a CPU
    install = ensure_peer_venv(args.peer_venv, PEER_SPECS)
    python = args.peer_venv / "bin" / "python"
    x = batch()
    results = [bench(arch, int(l0), args.rounds, args.threads, python, x)
               for arch in args.archs.split(",") for l0 in args.l0.split(",")]
    env = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
                                         "OMP_NUM_THREADS")
           if k in os.environ}
    print(json.dumps({**hardware_record("cpu"), "env": env, "d_in": D_IN, "d_sae": D_SAE, "batch": BATCH,
                      "dtype": "float32", "rounds": args.rounds, "warmup_rounds": 1, "lr": LR,
                      "peer_venv": {k: install[k] for k in ("torch", "sae_lens", "dictionary_learning", "sparsify")},
                      "results": results}, indent=1))


if __name__ == "__main__":
    main()
