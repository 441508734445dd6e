"""One peer library's SAE training step, timed on request: the worker side of benchmarks/peers.py.

Run with the peers' interpreter (benchmarks/.venv-peers/bin/python), never saeforge's: it imports torch and the one
library named, nothing of saeforge.

    .venv-peers/bin/python benchmarks/peers/peer_step.py --library sae_lens --arch gated --l0 64 --threads 2

It builds the library's SAE at d_in 640, d_sae 8192, float32, and the batch every worker builds (4096 rows of
torch.manual_seed(0)'s randn, E||x||^2 = d_in), and for ReLU and Gated plants the L0: each latent's (gate's) bias is
set so that a fraction L0 / d_sae of the batch's tokens fires it, the magnitude bias 1 above it (Gated). TopK takes k
= L0. The learning rate is tiny (1e-7), so the density stays put over the steps. Then it prints one JSON line (its
version and the L0 measured with the library's own encoder), and for each line "step" on stdin runs one training
step as the library's trainer does and prints its seconds; "quit" ends it.

The steps: SAELens's `SAETrainer._train_step` (forward, firing statistics, backward, gradient clipping, Adam,
schedulers); dictionary_learning's `trainer.update` (StandardTrainer, GatedSAETrainer, TopKTrainer); sparsify's
inner step as `Trainer.fit` runs it for one SAE (decoder renormalised, forward with its fused encoder, FVU backward,
the gradient along the decoder rows removed, Adam as its "adam" optimizer builds it, firing mask updated).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

D_IN, D_SAE, BATCH, LR = 640, 8192, 4096, 1e-7


def batch() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(BATCH, D_IN)


@torch.no_grad()
def planted_bias(x: torch.Tensor, W_enc: torch.Tensor, l0: int) -> torch.Tensor:
    """Per latent, minus the (1 - l0/d_sae) quantile of x @ W_enc [d_in, d_sae] over the batch's first half (the
    same rule as saeforge's side)."""
    return -torch.quantile(x[: BATCH // 2] @ W_enc, 1 - l0 / D_SAE, dim=0)


def sae_lens_step(arch: str, l0: int, x: torch.Tensor):
    import sae_lens
    from sae_lens import SAETrainer
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.gated_sae import GatedTrainingSAE, GatedTrainingSAEConfig
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    common = dict(d_in=D_IN, d_sae=D_SAE, dtype="float32", device="cpu")
    if arch == "relu":
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(**common, l1_coefficient=1.0))
    elif arch == "gated":
        sae = GatedTrainingSAE(GatedTrainingSAEConfig(**common, l1_coefficient=1.0))
    else:
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(**common, k=l0))
    with torch.no_grad():
        if arch == "relu":
            sae.b_enc.copy_(planted_bias(x - sae.b_dec, sae.W_enc, l0))
        elif arch == "gated":
            sae.b_gate.copy_(planted_bias(x - sae.b_dec, sae.W_enc, l0))
            sae.b_mag.copy_(sae.b_gate + 1)
    cfg = SAETrainerConfig(total_training_samples=10**9, train_batch_size_samples=BATCH, lr=LR, lr_end=LR,
                           device="cpu", autocast=False, logger=LoggingConfig(log_to_wandb=False),
                           save_final_checkpoint=False)
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=iter(()))

    def step():
        trainer._train_step(sae=sae, sae_in=x)

    with torch.no_grad():
        l0_measured = float((sae.encode(x) > 0).float().sum(-1).mean())
    return step, sae_lens.__version__, l0_measured


def dictionary_learning_step(arch: str, l0: int, x: torch.Tensor):
    from importlib.metadata import version

    from dictionary_learning.trainers import GatedSAETrainer, StandardTrainer, TopKTrainer

    common = dict(steps=10**6, activation_dim=D_IN, dict_size=D_SAE, layer=0, lm_name="benchmark", lr=LR,
                  device="cpu", warmup_steps=0)
    if arch == "relu":
        trainer = StandardTrainer(**common, l1_penalty=1.0, sparsity_warmup_steps=None)
        ae = trainer.ae
        with torch.no_grad():
            ae.encoder.bias.copy_(planted_bias(x - ae.bias, ae.encoder.weight.T, l0))
    elif arch == "gated":
        trainer = GatedSAETrainer(**common, l1_penalty=1.0, sparsity_warmup_steps=None)
        ae = trainer.ae
        with torch.no_grad():
            ae.gate_bias.copy_(planted_bias(x - ae.decoder_bias, ae.encoder.weight.T, l0))
            ae.mag_bias.copy_(ae.gate_bias + 1)
    else:
        trainer = TopKTrainer(**common, k=l0)
        ae = trainer.ae
    counter = iter(range(1, 10**9))  # step 0 would re-initialise b_dec (TopKTrainer's geometric median)

    def step():
        trainer.update(next(counter), x)

    with torch.no_grad():
        l0_measured = float((ae.encode(x) > 0).float().sum(-1).mean())
    return step, version("dictionary-learning"), l0_measured


def sparsify_step(arch: str, l0: int, x: torch.Tensor):
    if arch != "topk":
        raise SystemExit("sparsify trains TopK SAEs only")
    import sparsify
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(D_IN, SparseCoderConfig(num_latents=D_SAE, k=l0), device="cpu", dtype=torch.float32)
    # What its Trainer builds for optimizer="adam": one Adam group per SAE.
    optimizer = torch.optim.Adam([{"params": sae.parameters(), "lr": LR}])
    did_fire = torch.zeros(D_SAE, dtype=torch.bool)

    def step():
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x=x, y=x, dead_mask=None)
        did_fire[out.latent_indices.flatten()] = True
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()

    with torch.no_grad():
        l0_measured = float(l0)  # k latents per token by construction
    return step, sparsify.__version__, l0_measured


LIBRARIES = {"sae_lens": sae_lens_step, "dictionary_learning": dictionary_learning_step, "sparsify": sparsify_step}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--library", choices=sorted(LIBRARIES), required=True)
    p.add_argument("--arch", choices=["relu", "gated", "topk"], required=True)
    p.add_argument("--l0", type=int, required=True)
    p.add_argument("--threads", type=int, required=True)
    args = p.parse_args()
    answers, sys.stdout = sys.stdout, sys.stderr  # the libraries' own prints (sparsify's "Triton not installed")
    torch.set_num_threads(args.threads)
    x = batch()
    step, version, l0_measured = LIBRARIES[args.library](args.arch, args.l0, x)
    print(json.dumps({"version": version, "l0": l0_measured, "torch": torch.__version__,
                      "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                      "threads": torch.get_num_threads()}), file=answers, flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        t0 = time.perf_counter()
        step()
        print(time.perf_counter() - t0, file=answers, flush=True)


if __name__ == "__main__":
    main()
