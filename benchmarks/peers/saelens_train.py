"""Train SAELens's standard SAE (ReLU + decoder-norm-weighted L1) on a saeforge activation cache.

Run with the peer's own interpreter (benchmarks/.venv-peers/bin/python), never saeforge's: this file imports
sae_lens and torch only (plus the shared `cache_batches` beside it). `benchmarks/peer_quality.py` calls it.

    .venv-peers/bin/python benchmarks/peers/saelens_train.py --cache-dir CACHE --width 4096 --steps 1500 \
        --batch-size 4096 --lr 3e-4 --l1-coefficient 1.0 --out DIR

SAELens's own training loop (`SAETrainer.fit`) runs on batches from `cache_batches.EpochBatches`, the order
saeforge's side uses. Its recipe: Adam (0.9, 0.999), constant lr, gradient-norm clipping at 1, decoder rows
initialised at norm 0.1 with W_enc = W_dec^T, b_dec = 0, no resampling, and normalize_activations =
"expected_average_only_in" (x * sqrt(d_in) / E||x||). The scaling factor is estimated with SAELens's own
`ActivationScaler.estimate_scaling_factor`, on a separate pass over the cache so that the training batches are not
consumed by it, and `fit` folds it into the weights at the end.

Writes DIR/sae_weights.safetensors (W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec; acting on RAW
activations: f = ReLU((x - b_dec) @ W_enc + b_enc), x_hat = f @ W_dec + b_dec; decoder rows NOT unit norm) and
DIR/peer_run.json (settings, versions, timings, SAELens's config). With --max-input-norm, rows whose raw norm exceeds
it are left out before anything else (the outlier rule saeforge's training applied to the same cache).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cache_batches import EpochBatches, load_cache_rows  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache-dir", required=True)
    p.add_argument("--width", type=int, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--l1-coefficient", type=float, required=True)
    p.add_argument("--l1-warmup-steps", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--b-dec-init", choices=["zeros", "mean"], default="zeros",
                   help="zeros: SAELens's own initialisation; mean: b_dec starts at the (scaled) mean of the data")
    p.add_argument("--max-input-norm", type=float, default=None,
                   help="leave out rows whose raw norm exceeds this (saeforge's outlier threshold), as saeforge does")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import sae_lens
    from sae_lens import SAETrainer, StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    t_load = time.perf_counter()
    rows = load_cache_rows(args.cache_dir)
    load_s = time.perf_counter() - t_load
    cache_rows = rows.shape[0]
    if args.max_input_norm is not None:
        rows = rows[rows.norm(dim=1) <= args.max_input_norm]
    d_in = rows.shape[1]

    torch.manual_seed(args.seed)
    sae_cfg = StandardTrainingSAEConfig(
        d_in=d_in, d_sae=args.width, dtype="float32", device="cpu", apply_b_dec_to_input=True,
        normalize_activations="expected_average_only_in", l1_coefficient=args.l1_coefficient, lp_norm=1.0,
        l1_warm_up_steps=args.l1_warmup_steps,
    )
    sae = StandardTrainingSAE(sae_cfg)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=args.steps * args.batch_size, train_batch_size_samples=args.batch_size, lr=args.lr,
        lr_end=args.lr / 10,  # what the runner config sets; unused by the constant schedule
        device="cpu", autocast=False, logger=LoggingConfig(log_to_wandb=False), save_final_checkpoint=False,
    )
    batches = EpochBatches(rows, args.batch_size, args.seed)
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=batches)
    # The norm estimate on its own pass over the cache (one epoch's worth of batches, at most SAELens's 1000).
    norm_batches = max(1, min(trainer_cfg.n_batches_for_norm_estimate, math.ceil(rows.shape[0] / args.batch_size)))
    trainer.activation_scaler.estimate_scaling_factor(
        d_in=d_in, data_provider=EpochBatches(rows, args.batch_size, args.seed + 1_000_003),
        n_batches_for_norm_estimate=norm_batches)
    scaling_factor = float(trainer.activation_scaler.scaling_factor)
    if args.b_dec_init == "mean":
        with torch.no_grad():
            sae.b_dec.copy_(rows.mean(0) * scaling_factor)

    t0 = time.perf_counter()
    trained = trainer.fit()  # folds the scaling factor into W_enc, W_dec, b_dec
    train_s = time.perf_counter() - t0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state = {name: trained.state_dict()[name].detach().float().contiguous() for name in ("W_enc", "b_enc", "W_dec",
                                                                                           "b_dec")}
    save_file(state, str(out / "sae_weights.safetensors"))
    record = {
        "peer": "sae_lens", "sae_lens": sae_lens.__version__, "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch_threads": torch.get_num_threads(),
        "l1_coefficient": args.l1_coefficient, "l1_warmup_steps": args.l1_warmup_steps, "b_dec_init": args.b_dec_init,
        "steps": trainer.n_training_steps,
        "batch_size": args.batch_size, "lr": args.lr, "width": args.width, "seed": args.seed,
        "adam_betas": [trainer_cfg.adam_beta1, trainer_cfg.adam_beta2], "lr_scheduler": trainer_cfg.lr_scheduler_name,
        "normalize_activations": "expected_average_only_in", "scaling_factor": scaling_factor,
        "norm_estimate_batches": norm_batches, "epochs": batches.epochs_served(), "cache_rows": cache_rows,
        "max_input_norm": args.max_input_norm, "rows_left_out": cache_rows - rows.shape[0],
        "load_s": load_s, "train_s": train_s, "tokens_per_s": args.steps * args.batch_size / train_s,
        "training_window_l0": trained.cfg.metadata.l0, "dead_in_window": trained.cfg.metadata.num_dead_features,
        "sae_lens_cfg": {k: v for k, v in trained.cfg.to_dict().items() if k != "metadata"},
    }
    (out / "peer_run.json").write_text(json.dumps(record, indent=1, default=str))
    print(json.dumps({k: record[k] for k in ("l1_coefficient", "train_s", "training_window_l0")}))


if __name__ == "__main__":
    main()
