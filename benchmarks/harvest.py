"""Harvest speed: capture() at a mid-depth site of the embedded model against the model's own forward passes.

Prints JSON. For fp32 and bf16, tokens/s of
  full_forward      the whole model with its 262k-token unembedding (what a naive harvest without early stop pays),
  truncated_forward a copy of the model cut after the site's block (the floor for a harvest of that site),
  capture           lm.capture(tokens, [site]) (hooks + early stop),
  capture_grad      lm.capture(tokens, [site], grad=True) (full forward and backward to the site),
and capture_over_truncated = time(capture) / time(truncated_forward) (median over rounds that run both back to
back); the target is at most 1.05. tokens/s are from median times.

Usage: PYTHONPATH=src python benchmarks/harvest.py [--batch 2] [--seq 128] [--repeats 16]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import torch.nn as nn

from saeforge.models import load_lm
from saeforge.models.precision import hardware_record


def truncated_backbone(lm, last_block: int) -> nn.Module:
    """A copy of the backbone that shares its weights but has only blocks 0..last_block."""
    backbone = lm.model.base_model
    cut = copy.copy(backbone)
    cut._modules = dict(backbone._modules)
    cut._modules["layers"] = nn.ModuleList(list(backbone.layers)[: last_block + 1])
    return cut


def paired_seconds(fns: dict, repeats: int, warmup: bool = True) -> tuple[dict, list[dict]]:
    """Median wall time of each function, and the per-round times, running them back to back in rotating order.

    The machine is shared, so its speed drifts; functions timed in the same round see about the same load, which
    makes the median of per-round ratios a steadier comparison than the ratio of separately taken times."""
    for fn in fns.values() if warmup else ():
        fn()
    names = list(fns)
    rounds = []
    for r in range(repeats):
        times = {}
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            fns[name]()
            times[name] = time.perf_counter() - start
        rounds.append(times)
    return {name: statistics.median(t[name] for t in rounds) for name in names}, rounds


def measure(dtype: torch.dtype, site: str, block: int, batch: int, seq: int, repeats: int, grad_repeats: int) -> dict:
    lm = load_lm("embedded", dtype=dtype)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, lm.vocab_size, (batch, seq), generator=generator)
    tokens[:, 0] = lm.bos_token_id
    cut = truncated_backbone(lm, block)

    # Check before timing: the capture is the model's own residual stream, and the cut model computes the same
    # blocks (its output is the final norm of the captured activation).
    with torch.no_grad():
        acts = lm.capture(tokens, [site])[site]
        reference = lm.model(input_ids=tokens, use_cache=False, output_hidden_states=True).hidden_states
        cut_out = cut(input_ids=tokens, use_cache=False).last_hidden_state
    assert torch.equal(acts, reference[block + 1])
    torch.testing.assert_close(cut_out, lm.model.base_model.norm(acts))

    def full():
        with torch.no_grad():
            lm.model(input_ids=tokens, use_cache=False)

    def truncated():
        with torch.no_grad():
            cut(input_ids=tokens, use_cache=False)

    def capture():
        lm.capture(tokens, [site])

    def capture_grad():
        lm.capture(tokens, [site], grad=True)

    seconds, rounds = paired_seconds({"truncated_forward": truncated, "capture": capture}, repeats)
    # The slow ones (seconds each) are context, not the target: fewer repeats, warmed up by the passes above.
    slow, _ = paired_seconds({"full_forward": full, "capture_grad": capture_grad}, grad_repeats, warmup=False)
    seconds.update(slow)
    n = batch * seq
    return {
        "tokens_per_s": {name: round(n / t, 1) for name, t in seconds.items()},
        "capture_over_truncated": round(statistics.median(r["capture"] / r["truncated_forward"] for r in rounds), 4),
        "full_over_capture": round(seconds["full_forward"] / seconds["capture"], 3),
        "capture_grad_over_capture": round(seconds["capture_grad"] / seconds["capture"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--block", type=int, default=9)
    parser.add_argument("--repeats", type=int, default=16)
    parser.add_argument("--grad-repeats", type=int, default=2)
    args = parser.parse_args()
    site = f"blocks.{args.block}.resid_post"
    result = {
        "model": "embedded (Gemma 3 270M, dequantised Q4_K_M)",
        "site": site,
        "batch": args.batch,
        "seq": args.seq,
        **hardware_record(),
    }
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        result[name] = measure(dtype, site, args.block, args.batch, args.seq, args.repeats, args.grad_repeats)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
