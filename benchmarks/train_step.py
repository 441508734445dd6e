"""Speed of one SAE training step against its floor: the bare matrix products the step contains.

    PYTHONPATH=src python benchmarks/train_step.py [--device cuda] [--rounds 7] [--archs relu,gated,...]

For each architecture (relu, gated, topk, gradient_topk, batchtopk, matryoshka_batchtopk, jumprelu) at d_in=640, d_sae=8192, batch 4096, in float32 and with
bf16 products, it times the trainer's own step (`SAERun.step`: `SAE.loss_and_grads`, constrained Adam, firing
counts) and, in the same run and taking turns with it, the dense products that step performs, each on fresh
operands of its shape. One JSON line each: tokens/s, step and floor times (minimum and median over the rounds),
ratio = step / floor on the medians and ratio_min on the minima (target <= 1.3). The minimum is the better
estimate of the work itself on a shared machine; the median includes its noise.

The dense products per step (B = batch, d = d_in, M = d_sae), as `loss_and_grads` does them:
  relu   5: encode [B,d]x[d,M]; decode [B,M]x[M,d]; d f [B,d]x[d,M]; W_dec's gradient [M,B]x[B,d];
            W_enc's gradient [d,B]x[B,M] (biases and column sums ride along as one more row or column)
  gated  8: one encode (the tied paths share W_gate); decode; auxiliary decode; d pi_mag and d ReLU(pi_gate)
            through the decoder; W_dec's gradient; the input-side gradients of the two paths, kept apart
  topk   1: encode. After the selection everything is sparse (tokens * k rows): decode, W_dec's and W_enc's
            gradients, the gradient at the selected values
  gradient_topk 2: encode, and the projection of the LM gradient onto the decoder rows [B,d]x[d,M]
  batchtopk, matryoshka_batchtopk 1: encode; the selection is over the whole batch (k*B entries), then sparse
  jumprelu 5: as relu (dense; the threshold's pseudo-derivatives are elementwise)
These are the dense steps: the SAEs start from their initialisation, where about half the latents fire, far above
the density below which relu, gated and jumprelu go sparse (`SAE.sparse_below`; benchmarks/peers.py times the
sparse steps at planted L0s, against the peers). For the k family it also gives selection_s (the exact top-k
selection over [B, M] alone, `topk.top_k_indices`) and dense_floor_s (the five products a dense implementation
would run, as relu's), which place the step between what it cannot avoid and what the sparse path saves.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import types

import torch

from saeforge.config import TrainConfig
from saeforge.models.precision import hardware_record
from saeforge.saes import architecture_class, create_sae
from saeforge.saes.base import SAE
from saeforge.saes.topk import top_k_indices
from saeforge.training.memory import keep_freed_memory
from saeforge.training.sae_run import SAERun
from saeforge.training.schedules import StepPlan

D_IN, D_SAE, BATCH, K = 640, 8192, 4096, 32


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict, rounds: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds of each call of each function, the functions taking turns (after one warm-up call each), so that a
    shared machine's drift falls on all of them alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


ENCODE, DECODE, FROM_INPUT_GRAD = (BATCH, D_IN, D_SAE), (BATCH, D_SAE, D_IN), (D_IN, BATCH, D_SAE)
D_FEATURES, DECODER_GRAD = (BATCH, D_IN, D_SAE), (D_SAE, BATCH, D_IN)
DENSE_STEP = [ENCODE, DECODE, D_FEATURES, DECODER_GRAD, FROM_INPUT_GRAD]
FLOOR_PRODUCTS = {
    "relu": DENSE_STEP,
    "gated": [ENCODE, DECODE, DECODE, D_FEATURES, D_FEATURES, DECODER_GRAD, FROM_INPUT_GRAD, FROM_INPUT_GRAD],
    "topk": [ENCODE],
    "gradient_topk": [ENCODE, ENCODE],
    "batchtopk": [ENCODE],  # the selection is over the whole batch (k * B entries), then sparse like topk
    "matryoshka_batchtopk": [ENCODE],  # as batchtopk; the prefix losses reuse the kept entries
    "jumprelu": DENSE_STEP,  # dense like relu; the threshold's pseudo-derivative is elementwise
}


def products(shapes: list[tuple[int, int, int]], dtype: torch.dtype, device: torch.device):
    """A function running the products [m,k] x [k,n] once each, on operands made once."""
    g = torch.Generator(device=device).manual_seed(0)
    operands = [(torch.randn(m, k, device=device, dtype=dtype, generator=g),
                 torch.randn(k, n, device=device, dtype=dtype, generator=g)) for m, k, n in shapes]

    def run():
        for a, b in operands:
            torch.mm(a, b)

    return run


def summary(times: list[float]) -> tuple[float, float]:
    return min(times), statistics.median(times)


def bench(arch: str, bf16: bool, rounds: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    takes_k = architecture_class(arch).sparsity == "k"
    options = {"k": K} if takes_k else {}
    sae = create_sae(arch, d_in=D_IN, d_sae=D_SAE, **options).to(device)
    train = TrainConfig(batch_size=BATCH, lr_warmup_steps=0, tensorboard=False)
    compute_dtype = torch.bfloat16 if bf16 else torch.float32
    plan = StepPlan.of(train, 10**6)
    run = SAERun(arch, sae, train, total_steps=10**6, plan=plan, lr=3e-4, betas=sae.adam_betas,
                 sparsity_coeff=1.0 if sae.uses_sparsity_coeff else None, resample=False, seed=0,
                 compute_dtype=compute_dtype)
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(BATCH, D_IN, device=device, generator=g)  # E||x||^2 = d_in, as the trainer's scaled input
    grad = torch.randn(BATCH, D_IN, device=device, generator=g) if sae.needs_grad else None
    counter = iter(range(10**9))

    def step():
        i = next(counter)
        run.step(x, grad, i, (i + 1) * BATCH)

    reference = copy.deepcopy(sae)
    reference.grads_by_hand = types.MethodType(SAE.grads_by_hand, reference)  # None: loss_and_grads uses autograd
    run_autograd = SAERun(arch, reference, train, total_steps=10**6, plan=plan, lr=3e-4, betas=sae.adam_betas,
                          sparsity_coeff=run.sparsity_coeff, resample=False, seed=0, compute_dtype=compute_dtype)
    counter_autograd = iter(range(10**9))

    def autograd_step():
        i = next(counter_autograd)
        run_autograd.step(x, grad, i, (i + 1) * BATCH)

    dtype = torch.bfloat16 if bf16 else torch.float32
    fns = {"step": step, "floor": products(FLOOR_PRODUCTS[arch], dtype, device), "autograd_step": autograd_step}
    if takes_k:
        scores = torch.randn(BATCH, D_SAE, device=device, dtype=dtype, generator=g)
        fns["selection"] = lambda: top_k_indices(scores, K)
        fns["dense_floor"] = products(DENSE_STEP, dtype, device)
    times = {name: summary(t) for name, t in interleaved(fns, rounds, device).items()}
    (step_min, step_med), (floor_min, floor_med) = times["step"], times["floor"]
    result = {"arch": arch, "dtype": "bf16" if bf16 else "fp32", **hardware_record(device),
              "d_in": D_IN, "d_sae": D_SAE, "batch": BATCH, **options, "rounds": rounds,
              "tokens_per_s": round(BATCH / step_med), "step_s": round(step_med, 5), "step_s_min": round(step_min, 5),
              "floor_s": round(floor_med, 5), "floor_s_min": round(floor_min, 5),
              "floor_products": len(FLOOR_PRODUCTS[arch]),
              "ratio": round(step_med / floor_med, 3), "ratio_min": round(step_min / floor_min, 3),
              "autograd_step_s": round(times["autograd_step"][1], 5),
              "speedup_vs_autograd": round(times["autograd_step"][1] / step_med, 2)}
    if "selection" in times:
        result.update(selection_s_min=round(times["selection"][0], 5),
                      dense_floor_s_min=round(times["dense_floor"][0], 5))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default: 7 CPU, 20 GPU)")
    parser.add_argument("--archs", default="relu,gated,topk,gradient_topk,batchtopk,matryoshka_batchtopk,jumprelu")
    parser.add_argument("--dtypes", default="fp32,bf16")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        keep_freed_memory()  # as the trainer does on a CPU
    rounds = args.rounds or (20 if device.type == "cuda" else 7)
    for dtype in args.dtypes.split(","):
        for arch in args.archs.split(","):
            print(json.dumps(bench(arch, dtype == "bf16", rounds, device)), flush=True)


if __name__ == "__main__":
    main()
