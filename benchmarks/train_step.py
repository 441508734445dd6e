"""Speed of one SAE training step against its floor: the bare matrix products the step contains.

    PYTHONPATH=src python benchmarks/train_step.py [--device cuda] [--steps 5] [--archs relu,gated,...]

For each architecture (relu, gated, topk, gradient_topk) at d_in=640, d_sae=8192, batch 4096, in float32 and
with bf16 autocast, it times the trainer's own step (`SAERun.step`: loss, backward, constrained Adam, firing
counts) and, in the same run, the dense products that step cannot avoid, and prints one JSON line each:
tokens/s, step and floor times, and ratio = step / floor (target <= 1.3).

The products per step (B = batch, d = d_in, M = d_sae):
  relu   5: encode [B,d]x[d,M]; decode [B,M]x[M,d]; backward: d f, d W_dec, d W_enc
  gated  7: one encode product (the gate and magnitude paths share W_gate); decode; auxiliary decode; backward:
            d f, d W_dec, d ReLU(pi_gate) through the frozen decoder, d W_enc
  topk   2: encode and d W_enc; the decoder touches only the k active rows (a gather), so it is not in the floor
  gradient_topk 3: topk's two, plus the selection score's projection grad [B,d] x W_dec^T
For the TopK family it also times the decoder alone, sparse (the SAE's gather) against dense (the product and
its two backward products), fields sparse_decode_s and dense_decode_s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from saeforge.config import TrainConfig
from saeforge.saes import create_sae
from saeforge.training.sae_run import DEFAULT_BETAS, SAERun

D_IN, D_SAE, BATCH, K = 640, 8192, 4096, 32


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, reps: int, device: torch.device) -> float:
    """Median seconds of `reps` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def floor_products(arch: str) -> list[tuple[int, int, int]]:
    """(m, k, n) of each dense product [m,k] x [k,n] in one step."""
    enc, dec, grad_enc = (BATCH, D_IN, D_SAE), (BATCH, D_SAE, D_IN), (D_IN, BATCH, D_SAE)
    d_f, d_w_dec = (BATCH, D_IN, D_SAE), (D_SAE, BATCH, D_IN)
    return {
        "relu": [enc, dec, d_f, d_w_dec, grad_enc],
        "gated": [enc, dec, dec, d_f, d_w_dec, d_f, grad_enc],
        "topk": [enc, grad_enc],
        "gradient_topk": [enc, grad_enc, enc],
    }[arch]


def time_floor(arch: str, dtype: torch.dtype, reps: int, device: torch.device) -> float:
    g = torch.Generator(device=device).manual_seed(0)
    operands = [(torch.randn(m, k, device=device, dtype=dtype, generator=g),
                 torch.randn(k, n, device=device, dtype=dtype, generator=g)) for m, k, n in floor_products(arch)]

    def run():
        for a, b in operands:
            torch.mm(a, b)

    return timed(run, reps, device)


def time_decoders(sae, dtype: torch.dtype, reps: int, device: torch.device) -> tuple[float, float]:
    """Forward + backward of the decoder alone: the SAE's sparse path, and the dense product."""
    x = torch.randn(BATCH, D_IN, device=device)
    with torch.no_grad():
        vals, idx, _ = sae.encode_sparse(x, torch.randn_like(x) if sae.needs_grad else None)
    vals = vals.detach().requires_grad_(True)
    dense_f = torch.zeros(BATCH, D_SAE, device=device, dtype=dtype).scatter_(-1, idx, vals.detach().to(dtype))
    dense_f.requires_grad_(True)
    w_dec = sae.W_dec.detach().to(dtype).requires_grad_(True)
    target = torch.randn(BATCH, D_IN, device=device, dtype=dtype)
    autocast = dtype == torch.bfloat16

    def sparse():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = sae.decode_sparse(vals, idx)
        (out.float() * target.float()).sum().backward()
        sae.zero_grad(set_to_none=True)
        vals.grad = None

    def dense():
        out = dense_f @ w_dec
        (out.float() * target.float()).sum().backward()
        dense_f.grad = w_dec.grad = None

    return timed(sparse, reps, device), timed(dense, reps, device)


def bench(arch: str, bf16: bool, steps: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    options = {"k": K} if arch in ("topk", "gradient_topk") else {}
    sae = create_sae(arch, d_in=D_IN, d_sae=D_SAE, **options).to(device)
    train = TrainConfig(batch_size=BATCH, autocast_bf16=bf16, lr_warmup_steps=0, tensorboard=False)
    run = SAERun(arch, sae, train, total_steps=10**6, lr=3e-4, betas=DEFAULT_BETAS[arch],
                 sparsity_coeff=1.0 if sae.uses_sparsity_coeff else None, resample=False, seed=0)
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(BATCH, D_IN, device=device, generator=g)  # E||x||^2 = d_in, as the trainer's scaled input
    grad = 1e-5 * torch.randn(BATCH, D_IN, device=device, generator=g) if sae.needs_grad else None
    counter = iter(range(10**9))

    def step():
        i = next(counter)
        run.step(x, grad, i, (i + 1) * BATCH)

    step_s = timed(step, steps, device)
    dtype = torch.bfloat16 if bf16 else torch.float32
    floor_s = time_floor(arch, dtype, steps, device)
    result = {"arch": arch, "dtype": "bf16-autocast" if bf16 else "fp32", "device": str(device),
              "d_in": D_IN, "d_sae": D_SAE, "batch": BATCH, **options,
              "tokens_per_s": round(BATCH / step_s), "step_s": round(step_s, 5), "floor_s": round(floor_s, 5),
              "floor_products": len(floor_products(arch)), "ratio": round(step_s / floor_s, 3)}
    if arch in ("topk", "gradient_topk"):
        sparse_s, dense_s = time_decoders(sae, dtype, steps, device)
        result.update(sparse_decode_s=round(sparse_s, 5), dense_decode_s=round(dense_s, 5))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=None, help="timed repetitions (default: 3 CPU, 20 GPU)")
    parser.add_argument("--archs", default="relu,gated,topk,gradient_topk")
    parser.add_argument("--dtypes", default="fp32,bf16")
    args = parser.parse_args()
    device = torch.device(args.device)
    steps = args.steps or (20 if device.type == "cuda" else 3)
    for dtype in args.dtypes.split(","):
        for arch in args.archs.split(","):
            print(json.dumps(bench(arch, dtype == "bf16", steps, device)), flush=True)


if __name__ == "__main__":
    main()
