"""Training cost per token of an E2E TopK SAE against a TopK SAE, both trained from the live LM.

    flock /tmp/saeforge-timing.lock env PYTHONPATH=src python benchmarks/e2e_cost.py [--steps 20] [--contexts 2]

On the embedded Gemma 3 270M at blocks.9.resid_post (d_sae 2048, k 32, contexts of 128 tokens, `--contexts` per
step), it times a training step of each kind on the same batches, the two kinds taking turns batch by batch so that
a shared machine's drift falls on both:
  topk    the LM's forward up to the site (capture stops there) + the SAE step on the activations (`SAERun.step`)
  e2e     the clean pass to the logits, kept (`SiteSplice`: the clean next-token distribution and the later residual
          streams) + the SAE step through the LM: the spliced forward from the embeddings to the logits, the KL's
          chunked gradient at the head, the backward through the blocks after the site (`E2ETopKSAE.lm_loss`)
  e2e_ds  e2e with the downstream term (ds_coeff = 1)
and, for scale, the TopK SAE step alone (as from an activation cache). One JSON line: seconds per step (median and
minimum over the timed steps, after --warmup untimed ones), tokens per second, and each kind's cost relative to
topk's. The LM runs in the precision "auto" picks (recorded), the TopK SAE's products too; E2E's stay float32.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import statistics
import time

import torch

from saeforge.config import TrainConfig
from saeforge.data import source_contexts, training_mask
from saeforge.models import choose_precision, load_lm
from saeforge.models.precision import hardware_record
from saeforge.models.splice import SiteSplice
from saeforge.saes import create_sae
from saeforge.training.memory import keep_freed_memory
from saeforge.training.sae_run import SAERun
from saeforge.training.schedules import StepPlan

SITE, D_SAE, K, CONTEXT_LEN = "blocks.9.resid_post", 2048, 32, 128


def sae_run(arch: str, d_in: int, tokens: int, compute_dtype: torch.dtype, **options) -> SAERun:
    torch.manual_seed(0)
    sae = create_sae(arch, d_in=d_in, d_sae=D_SAE, k=K, **options)
    train = TrainConfig(batch_size=tokens, lr_warmup_steps=0, tensorboard=False, resample=False)
    return SAERun(arch, sae, train, total_steps=10**6, plan=StepPlan.of(train, 10**6), lr=1e-3, betas=sae.adam_betas,
                  sparsity_coeff=None, resample=False, seed=0, compute_dtype=compute_dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each kind")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each kind first")
    parser.add_argument("--contexts", type=int, default=2, help="contexts of 128 tokens per step")
    parser.add_argument("--dtype", default="auto", help="the LM's dtype")
    args = parser.parse_args()
    keep_freed_memory()  # as the trainer does on a CPU
    t0 = time.perf_counter()
    lm = load_lm("embedded", dtype=args.dtype)
    load_s = time.perf_counter() - t0
    tokens_per_step = args.contexts * CONTEXT_LEN
    n_batches = args.warmup + args.steps
    contexts = list(itertools.islice(source_contexts(lm, "embedded", "train", CONTEXT_LEN, seed=0),
                                     n_batches * args.contexts))
    batches = torch.stack(contexts).split(args.contexts)
    d_in = lm.site_dim(SITE)
    with torch.no_grad():  # c with E||c (x - mu)||^2 = d_in on the first batch, as the trainer's centred scale
        x = lm.capture(batches[0], [SITE])[SITE][training_mask(batches[0], lm.bos_token_id, lm.pad_token_id)].float()
        scale = float((d_in / (x - x.mean(0)).pow(2).sum(1).mean()).sqrt())
    sae_dtype = choose_precision("auto", torch.device("cpu")).dtype
    runs = {"topk": sae_run("topk", d_in, tokens_per_step, sae_dtype),
            "e2e": sae_run("e2e_topk", d_in, tokens_per_step, sae_dtype),
            "e2e_ds": sae_run("e2e_topk", d_in, tokens_per_step, sae_dtype, ds_coeff=1.0),
            "topk_sae_step_only": sae_run("topk", d_in, tokens_per_step, sae_dtype)}

    def topk_step(i: int, tokens: torch.Tensor, run: SAERun, with_lm: bool = True) -> None:
        mask = training_mask(tokens, lm.bos_token_id, lm.pad_token_id)
        acts = lm.capture(tokens, [SITE]) if with_lm else cached[i]
        run.step(acts[SITE][mask].float() * scale, None, i, (i + 1) * tokens_per_step)

    def e2e_step(i: int, tokens: torch.Tensor, run: SAERun) -> None:
        splice = SiteSplice(lm, SITE, tokens, training_mask(tokens, lm.bos_token_id, lm.pad_token_id))
        run.step(splice.x.float() * scale, None, i, (i + 1) * tokens_per_step,
                 through_lm=functools.partial(splice.run, scale=scale))

    cached = [lm.capture(tokens, [SITE]) for tokens in batches]
    steps = {"topk": functools.partial(topk_step, run=runs["topk"]),
             "e2e": functools.partial(e2e_step, run=runs["e2e"]),
             "e2e_ds": functools.partial(e2e_step, run=runs["e2e_ds"]),
             "topk_sae_step_only": functools.partial(topk_step, run=runs["topk_sae_step_only"], with_lm=False)}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i, tokens in enumerate(batches):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step(i, tokens)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    medians = {name: statistics.median(t) for name, t in times.items()}
    result = {"benchmark": "e2e_cost", "model": lm.name, "site": SITE, "lm_precision": lm.precision.record(),
              **hardware_record("cpu"), "d_in": d_in, "d_sae": D_SAE, "k": K, "tokens_per_step": tokens_per_step,
              "steps": args.steps, "warmup": args.warmup, "lm_load_s": round(load_s, 1)}
    for name, t in times.items():
        result[name] = {"step_s": round(medians[name], 4), "step_s_min": round(min(t), 4),
                        "tokens_per_s": round(tokens_per_step / medians[name], 1),
                        "cost_vs_topk": round(medians[name] / medians["topk"], 2)}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
