"""Dashboard collection speed: collect_latent_examples for an SAE of 4,096 latents at the demo site of the embedded
model, against the model's own forward pass over the same tokens.

Prints JSON with the seconds of
  lm_forward  the model's own forward (all blocks and the 262k-token unembedding) over every context, batch by batch;
  capture     lm.capture up to the site over the same contexts (the floor of the collection's LM work);
  collect     collect_latent_examples over them: the LM up to the site, the SAE, every latent's top contexts, band
              samples, histogram and density, then decoder neighbours and promoted/suppressed tokens;
and collect_over_forward = collect / lm_forward (target: at most 1.5 at 250k tokens).

The SAE is a Gated SAE with random unit decoder rows whose gate biases are set, on a calibration sample of other
contexts, so that each latent fires on about 1% of tokens (L0 about 40, like the demo's trained SAEs); the JSON
records the L0 it had. Contexts come from the training split by default: the embedded corpus holds only about 53k
held-out tokens, and the cost per token does not depend on which text it is.

Usage: PYTHONPATH=src python benchmarks/dashboard.py [--tokens 250000] [--latents 4096] [--batch 16]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from saeforge import GatedSAE
from saeforge.config import DataConfig
from saeforge.data import eval_contexts, training_mask
from saeforge.evaluation.latent_examples import collect_latent_examples
from saeforge.models import load_lm
from saeforge.models.precision import hardware_record

SITE = "blocks.6.resid_post"


def calibrated_sae(lm, d_sae: int, sample: torch.Tensor, density: float) -> GatedSAE:
    """A Gated SAE with random decoder rows (encoder tied to them) whose gate fires on `density` of the sample."""
    torch.manual_seed(0)
    sae = GatedSAE(d_in=lm.d_model, d_sae=d_sae)
    x = lm.capture(sample, [SITE])[SITE].float()
    x = x[training_mask(sample, lm.bos_token_id, lm.pad_token_id)]
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0))
        pre = (x - sae.b_dec) @ sae.W_enc
        sae.b_gate.copy_(-pre.quantile(1 - density, dim=0))
    return sae


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=250_000)
    parser.add_argument("--latents", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=16, help="contexts per forward pass (both sides)")
    parser.add_argument("--split", choices=("train", "eval"), default="train")
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    lm = load_lm("embedded", dtype=args.dtype)
    data = DataConfig(context_len=128)
    contexts = eval_contexts(lm, data, args.tokens, args.batch, split=args.split)
    sample = eval_contexts(lm, data, 8192, args.batch, split="eval")
    sae = calibrated_sae(lm, args.latents, sample, args.density)
    batches = contexts.split(args.batch)

    def forward():
        with torch.no_grad():
            for tokens in batches:
                lm.model(input_ids=tokens, use_cache=False)

    def capture():
        for tokens in batches:
            lm.capture(tokens, [SITE])

    collected = {}

    def collect():
        collected["examples"] = collect_latent_examples(lm, sae, contexts, site=SITE, batch_size=args.batch)

    lm.capture(batches[0], [SITE])  # warm up
    times = {"lm_forward": seconds(forward), "capture": seconds(capture), "collect": seconds(collect)}
    examples = collected["examples"]
    result = {
        "model": "embedded (Gemma 3 270M, dequantised Q4_K_M)",
        "lm_dtype": str(lm.dtype).removeprefix("torch."),
        "site": SITE,
        "latents": args.latents,
        "tokens": int(contexts.numel()),
        "counted_tokens": examples.info["n_tokens"],
        "split": args.split,
        "batch": args.batch,
        "sae_l0": round(float(examples.firing_counts.sum()) / examples.info["n_tokens"], 2),
        "dead_latents": len(examples.dead()),
        "seconds": {k: round(v, 2) for k, v in times.items()},
        "collect_over_forward": round(times["collect"] / times["lm_forward"], 3),
        "collect_over_capture": round(times["collect"] / times["capture"], 3),
        "target_collect_over_forward": 1.5,
        **hardware_record(lm.device),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
