"""A peer check of SAE quality: saeforge's ReLU SAE against SAELens's standard SAE at equal L0 (issue 12).

    .venv/bin/python benchmarks/peer_quality.py --cache-dir CACHE [--width 4096 --steps 1500 --batch-size 4096
        --lr 3e-4 --target-l0 40 --eval-tokens 32768] [--out runs/peer_quality] > result.json

CACHE is a saeforge activation cache (`saeforge harvest --out CACHE ...`, split "train"). Both SAEs train on it with
the same width, batch size, number of steps and learning rate; everything else follows each library's own recipe:

- saeforge: its `Trainer` with the defaults of `TrainConfig` (centred normalisation, outlier tokens left out,
  warm-ups sized to the run, resampling), reading the cache for as many epochs as the steps need, with an L0 target
  (`[[sae]] target_l0`: lambda steered during the first part of training, then frozen). Products in float32 unless
  --compute-dtype says else.
- the peer: SAELens's `StandardTrainingSAE` (ReLU, L1 weighted by decoder-row norms, no norm constraint) in
  SAELens's own `SAETrainer` (Adam (0.9, 0.999), constant lr, gradient clipping, no resampling, normalize_activations
  = "expected_average_only_in"), run by `benchmarks/peers/saelens_train.py` in its own virtual environment
  (`--peer-venv`, created here when missing; it never touches saeforge's venv). It reads the same cache, with the
  rows saeforge's training left out (raw norm above saeforge's max_input_norm) left out too, unless
  --peer-keep-outliers. Its L1 coefficient is searched (a few full-length runs, secant steps on log L1 vs log L0)
  until its L0 matches the L0 saeforge reached (within --l0-tolerance), both L0s measured the same way on a fixed
  sample of the cache. Batch order differs (each library shuffles the cache its own way); the rows are the same.

Conversion of the peer's weights into a saeforge `ReluSAE` (exact, up to float rounding): SAELens saves weights that
act on raw activations (`fit` folds its normalisation factor s into them: W_enc * s, W_dec / s, b_dec / s), and its
encoder is f = ReLU((x - b_dec) @ W_enc + b_enc) with x_hat = f @ W_dec + b_dec, saeforge's formula and tensor layout.
SAELens's decoder rows are not unit norm; saeforge's are, so each latent's decoder norm n_i is moved into the encoder:
W_dec[i] / n_i, W_enc[:, i] * n_i, b_enc[i] * n_i (ReLU(n z) = n ReLU(z) for n > 0, so f_i scales by n_i and
f_i * W_dec[i] is unchanged). The check on the L0 sample (largest |x_hat difference| relative to the mean ||x||, and
latents whose firing differs) is in the JSON.

Both SAEs are then measured by saeforge's own evaluation (`evaluate_saes`) in one call, on the same held-out contexts
of the cache's text source (`eval_contexts`, split "eval"), with the same outlier rule: the converted peer carries
saeforge's max_input_norm, so the same positions are spliced for both (--splice-outliers splices every non-BOS
position for both). Prints one JSON object: per SAE L0, FVU, delta-CE (CE with the SAE spliced in minus clean CE)
with its bootstrap CI, KL, loss recovered; the paired difference of delta-CE with a bootstrap CI over contexts; the
L1 search; the CPU capability, threads, torch and peer versions; the settings; install steps and their times.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))
from cache_batches import load_cache_rows, read_manifest, sample_rows  # noqa: E402
from peer_venv import ensure_peer_venv  # noqa: E402  (benchmarks/ is the script's own directory)

PEER_TRAIN_SCRIPT = HERE / "peers" / "saelens_train.py"
SAEFORGE_NAME = "saeforge_relu"
PEER_NAME = "sae_lens_standard"
L0_SAMPLE_SEED = 12345


def log(message: str) -> None:
    print(f"[peer_quality] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ L0 and search
@torch.no_grad()
def sample_l0(sae, x: torch.Tensor) -> float:
    return float((sae.encode(x) > 0).float().sum(-1).mean())


def next_coefficient(trials: list[dict], target: float, default_slope: float = -1.8) -> float:
    """The next L1 coefficient to try: linear in (log coefficient, log L0) between the nearest trials on either
    side of the target when there are such (kept within the middle half of that bracket, since L0 falls off a cliff
    as an SAE collapses), else a secant step from the nearest (slope from the two nearest, clipped; METHODS.md:
    L0 ~ lambda^-1.8), at most a factor of 10 per step."""
    pts = [(math.log(t["coeff"]), math.log(max(t["l0"], 1e-2))) for t in trials]
    goal = math.log(target)
    below = [p for p in pts if p[1] < goal]
    above = [p for p in pts if p[1] > goal]
    if below and above:
        (c0, l0), (c1, l1) = max(below, key=lambda p: p[1]), min(above, key=lambda p: p[1])
        frac = min(max((goal - l0) / (l1 - l0), 0.25), 0.75)
        return math.exp(c0 + frac * (c1 - c0))
    nearest = sorted(pts, key=lambda p: abs(p[1] - goal))
    slope = default_slope
    if len(nearest) >= 2 and nearest[0][0] != nearest[1][0]:
        fitted = (nearest[0][1] - nearest[1][1]) / (nearest[0][0] - nearest[1][0])
        if math.isfinite(fitted) and fitted < 0:
            slope = min(max(fitted, -4.0), -0.3)
    step = max(min((goal - nearest[0][1]) / slope, math.log(10.0)), -math.log(10.0))
    return math.exp(nearest[0][0] + step)


def search(train_and_measure, target: float, start: float, rounds: int, tolerance: float) -> tuple[dict, list]:
    """Train at coefficients chosen by `next_coefficient` until the L0 lies within `tolerance` (relative) of the
    target or `rounds` runs are done; the trial nearest the target (in log L0) wins."""
    trials, coeff = [], start
    for _ in range(rounds):
        trial = {"coeff": coeff, **train_and_measure(coeff)}
        trials.append(trial)
        log(f"  coefficient {coeff:.5g} -> L0 {trial['l0']:.2f} (target {target:.2f})")
        if abs(math.log(max(trial["l0"], 1e-2) / target)) <= math.log1p(tolerance):
            break
        coeff = next_coefficient(trials, target)
    best = min(trials, key=lambda t: abs(math.log(max(t["l0"], 1e-2) / target)))
    return best, trials


# ------------------------------------------------------------------------------------------------ saeforge
def train_saeforge(args, manifest: dict, out: Path) -> dict:
    from saeforge.config import DataConfig, ModelConfig, RunConfig, SAESpec, TrainConfig
    from saeforge.training.trainer import Trainer

    spec = SAESpec(architecture="relu", name=SAEFORGE_NAME, d_sae=args.width, target_l0=args.target_l0)
    train = {"tokens": args.steps * args.batch_size, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
             "out_dir": str(out), "tensorboard": False, "checkpoint_every": args.steps, "keep_checkpoints": 1,
             "log_every": max(1, args.steps // 10), "compute_dtype": args.compute_dtype, "heldout_tokens": 0}
    data = {"source": manifest.get("source", "embedded"), "context_len": manifest["context_len"],
            "keep_bos": manifest.get("keep_bos", False), "cache_dir": str(args.cache_dir)}
    if "text_field" in manifest:
        data["text_field"] = manifest["text_field"]
    cfg = RunConfig(model=ModelConfig(name=manifest.get("model_spec") or manifest["model"], site=manifest["site"],
                                      device="cpu"),
                    data=DataConfig(**data), train=TrainConfig(**train),
                    sae=[spec])
    t0 = time.perf_counter()
    result = Trainer(cfg, progress=False).run(overwrite=True)
    seconds = time.perf_counter() - t0
    sae_dir = result.sae_dirs[SAEFORGE_NAME]
    saved = json.loads((sae_dir / "cfg.json").read_text())
    return {"dir": sae_dir, "train_s": seconds, "steps": result.steps, "tokens": result.tokens_seen,
            "data_exhausted": result.data_exhausted, "training": saved.get("training", {}),
            "saeforge_cfg": saved.get("saeforge", {}),
            "train_config": {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(cfg.train))).items()
                             if k not in ("out_dir", "device", "wandb_project", "tensorboard")}}


# ------------------------------------------------------------------------------------------------ the peer
def train_peer(args, python: Path, out: Path, coeff: float, max_input_norm: float | None) -> dict:
    cmd = [str(python), str(PEER_TRAIN_SCRIPT), "--cache-dir", str(args.cache_dir), "--width", str(args.width),
           "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr", repr(args.lr),
           "--l1-coefficient", repr(coeff), "--l1-warmup-steps", str(round(args.peer_l1_warmup_frac * args.steps)),
           "--seed", str(args.seed), "--b-dec-init", args.peer_b_dec_init, "--out", str(out)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if max_input_norm is not None:
        cmd += ["--max-input-norm", repr(max_input_norm)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the peer's training failed (rc {done.returncode}):\n{done.stderr[-4000:]}")
    record = json.loads((out / "peer_run.json").read_text())
    record["wall_s"] = time.perf_counter() - t0
    return record


def peer_to_saeforge(weights_file: Path, max_input_norm: float | None, meta):
    """SAELens standard weights (acting on raw activations) -> an equivalent saeforge ReluSAE with unit-norm decoder
    rows (the module docstring gives the algebra)."""
    from safetensors.torch import load_file

    from saeforge.saes import ReluSAE

    w = {k: v.float() for k, v in load_file(str(weights_file)).items()}
    d_in, d_sae = w["W_enc"].shape
    norms = w["W_dec"].norm(dim=1)
    live = norms > 0
    safe = torch.where(live, norms, torch.ones_like(norms))
    sae = ReluSAE(d_in, d_sae)
    with torch.no_grad():
        sae.W_dec.copy_(torch.where(live[:, None], w["W_dec"] / safe[:, None], sae.W_dec))
        # A zero decoder row contributes nothing: its latent is switched off (never fires) in the converted SAE.
        sae.W_enc.copy_(torch.where(live[None, :], w["W_enc"] * safe[None, :], torch.zeros_like(w["W_enc"])))
        sae.b_enc.copy_(torch.where(live, w["b_enc"] * safe, torch.full_like(norms, -1.0)))
        sae.b_dec.copy_(w["b_dec"])
    sae.meta = dataclasses.replace(meta, max_input_norm=max_input_norm, converted_from="sae_lens standard")
    return sae, w, int((~live).sum())


@torch.no_grad()
def conversion_check(sae, w: dict, x: torch.Tensor) -> dict:
    f_peer = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    x_hat_peer = f_peer @ w["W_dec"] + w["b_dec"]
    f = sae.encode(x)
    x_hat = sae.decode(f)
    return {"max_abs_x_hat_diff_over_mean_norm": float((x_hat - x_hat_peer).abs().max() / x.norm(dim=1).mean()),
            "firing_mismatches": int(((f > 0) != (f_peer > 0)).sum()), "tokens": int(x.shape[0])}


# ------------------------------------------------------------------------------------------------ comparison
def paired_delta_ce_diff(a: dict, b: dict, resamples: int, level: float, seed: int) -> dict:
    """delta-CE(a) - delta-CE(b) (= CE_spliced(a) - CE_spliced(b): the clean CE cancels) and a percentile bootstrap
    CI over contexts, both SAEs resampled together."""
    ca, cb = a.get("per_context", {}).get("ce_spliced"), b.get("per_context", {}).get("ce_spliced")
    if not ca or not cb or len(ca) != len(cb):
        return {"diff": a["delta_ce"] - b["delta_ce"], "ci": None}
    d = np.asarray(ca, dtype=np.float64) - np.asarray(cb, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {"diff": float(d.mean()), "ci": [float(lo), float(hi)], "contexts": len(d),
            "method": f"percentile bootstrap over contexts, {resamples} resamples, paired"}


ROW_KEYS = ("l0", "fvu", "delta_ce", "delta_ce_ci", "kl_div", "kl_div_ci", "loss_recovered_mean",
            "loss_recovered_mean_ci", "loss_recovered_zero", "nmse", "mse", "cosine", "gamma", "dead_fraction",
            "dense_fraction", "ce_clean", "ce_spliced", "eval_tokens", "eval_contexts", "eval_excluded_positions",
            "max_input_norm")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--cache-dir", type=Path, required=True, help="saeforge activation cache (split train)")
    p.add_argument("--width", type=int, default=4096, help="latents of both SAEs")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--target-l0", type=float, default=40.0, help="saeforge's L0 target; the peer then matches the "
                   "L0 saeforge reached")
    p.add_argument("--eval-tokens", type=int, default=32768, help="held-out tokens (whole contexts)")
    p.add_argument("--eval-batch-size", type=int, default=4, help="contexts per LM forward pass in evaluation")
    p.add_argument("--lm-dtype", default="float32", choices=["float32", "bfloat16"], help="the LM's dtype in eval")
    p.add_argument("--ablations", nargs="+", default=["mean"], choices=["zero", "mean"],
                   help="loss recovered against these ablations (each costs one LM pass over the eval set)")
    p.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16", "auto"],
                   help="saeforge's training products (the peer trains in float32)")
    p.add_argument("--l0-tolerance", type=float, default=0.1, help="relative L0 difference accepted by the search")
    p.add_argument("--search-rounds", type=int, default=6, help="most full-length training runs per search")
    p.add_argument("--l0-sample-tokens", type=int, default=8192, help="cache rows the search measures L0 on")
    p.add_argument("--peer-l1-start", type=float, default=None, help="first L1 coefficient of the peer's search "
                   "(default: saeforge's final lambda rescaled by the ratio of the two normalisation factors)")
    p.add_argument("--peer-l1-warmup-frac", type=float, default=0.05,
                   help="the peer's L1 warm-up as a fraction of the steps (SAELens's tutorials use 5%%)")
    p.add_argument("--peer-b-dec-init", choices=["zeros", "mean"], default="zeros",
                   help="zeros: SAELens's own recipe; mean: start the peer's b_dec at the data mean (saeforge starts "
                        "its b_dec at the geometric median; at sites with a large mean this matters in short runs)")
    p.add_argument("--peer-keep-outliers", action="store_true",
                   help="train the peer on every cached row, outliers saeforge leaves out included")
    p.add_argument("--splice-outliers", action="store_true",
                   help="evaluate both SAEs at every non-BOS position, outliers included")
    p.add_argument("--peer-spec", default="sae-lens", help="pip requirement of the peer")
    p.add_argument("--peer-venv", type=Path, default=HERE / ".venv-peers")
    p.add_argument("--threads", type=int, default=0, help="torch threads for both (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/peer_quality"), help="SAEs and runs go here")
    p.add_argument("--json-out", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    from saeforge import __version__ as saeforge_version
    from saeforge.config import DataConfig
    from saeforge.data import eval_contexts
    from saeforge.evaluation.evaluate import evaluate_saes
    from saeforge.models import load_lm
    from saeforge.saes import SAEMetadata, TrainingRecord, load_sae

    manifest = read_manifest(args.cache_dir)
    if manifest.get("split", "train") != "train":
        raise SystemExit(f"{args.cache_dir} holds the {manifest.get('split')!r} split; train on a 'train' cache")
    args.out.mkdir(parents=True, exist_ok=True)

    log(f"peer venv {args.peer_venv}")
    install = ensure_peer_venv(args.peer_venv, args.peer_spec)
    peer_python = args.peer_venv / "bin" / "python"

    rows = load_cache_rows(args.cache_dir)
    l0_sample_all = sample_rows(rows, args.l0_sample_tokens, L0_SAMPLE_SEED)
    del rows

    # saeforge: one run with an L0 target (its controller sets lambda).
    log(f"training saeforge's ReLU SAE (target L0 {args.target_l0:g})")
    sf_run = train_saeforge(args, manifest, args.out / "saeforge")
    sf_sae = load_sae(sf_run["dir"])
    max_input_norm = sf_sae.meta.max_input_norm
    l0_sample = l0_sample_all if max_input_norm is None else l0_sample_all[l0_sample_all.norm(dim=1) <= max_input_norm]
    sf_l0 = sample_l0(sf_sae, l0_sample)
    log(f"  L0 {sf_l0:.2f} on the sample")
    sf_lambda = sf_run["training"].get("sparsity_coeff")

    # The peer: search its L1 coefficient for saeforge's L0 (both measured on the same sample).
    peer_thr = None if args.peer_keep_outliers else max_input_norm
    peer_trials: list[dict] = []

    def peer_trial(coeff):
        out = args.out / f"peer_{len(peer_trials)}"
        record = train_peer(args, peer_python, out, coeff, peer_thr)
        meta = SAEMetadata(model_name=sf_sae.meta.model_name, site=sf_sae.meta.site,
                           context_size=sf_sae.meta.context_size, dataset=str(args.cache_dir),
                           training=TrainingRecord(tokens=args.steps * args.batch_size, steps=args.steps,
                                                   lr=args.lr, sparsity_coeff=coeff))
        sae, w, zero_rows = peer_to_saeforge(out / "sae_weights.safetensors", max_input_norm, meta)
        trial = {"l0": sample_l0(sae, l0_sample), "record": record, "sae": sae, "weights": w,
                 "zero_decoder_rows": zero_rows, "out": out}
        peer_trials.append(trial)
        return trial

    if args.peer_l1_start is not None:
        start = args.peer_l1_start
    else:
        # Both losses are ||c x - x_hat||^2 + lambda ||f||_1 with f in units of c x, so lambda scales like c.
        sf_scale = sf_sae.meta.normalization.scale if sf_sae.meta.normalization else manifest["scale"]
        peer_scale = 1.0 / float(l0_sample.norm(dim=1).mean()) * math.sqrt(manifest["d_in"])
        start = float(sf_lambda or 1.0) * peer_scale / float(sf_scale)
    target = sf_l0
    log(f"training SAELens's standard SAE: searching its L1 coefficient for L0 {target:.2f} (start {start:.4g})")
    peer_best, _ = search(peer_trial, target, start, args.search_rounds, args.l0_tolerance)
    peer_sae = peer_best["sae"]
    check = conversion_check(peer_sae, peer_best["weights"], l0_sample)
    peer_dir = peer_sae.save(args.out / PEER_NAME)
    if args.splice_outliers:
        for directory in (sf_run["dir"], peer_dir):
            cfg_file = Path(directory) / "cfg.json"
            cfg = json.loads(cfg_file.read_text())
            cfg.setdefault("saeforge", {})["max_input_norm"] = None
            cfg_file.write_text(json.dumps(cfg, indent=2))

    # Evaluation: both SAEs in one call, same contexts, same outlier rule.
    log(f"evaluating both on {args.eval_tokens:,} held-out tokens")
    lm = load_lm(manifest.get("model_spec") or manifest["model"], dtype=getattr(torch, args.lm_dtype))
    data_cfg = DataConfig(source=manifest.get("source", "embedded"), context_len=manifest["context_len"],
                          keep_bos=manifest.get("keep_bos", False), text_field=manifest.get("text_field", "text"))
    contexts = eval_contexts(lm, data_cfg, args.eval_tokens, args.eval_batch_size)
    t_eval = time.perf_counter()
    eval_rows = evaluate_saes(lm, [sf_run["dir"], peer_dir], manifest["site"], contexts,
                              keep_bos=manifest.get("keep_bos", False), seed=args.seed, progress=False,
                              batch_size=args.eval_batch_size, analyses=False, pca_ranks=(),
                              ablation=tuple(args.ablations))
    eval_s = time.perf_counter() - t_eval
    by_name = {r["name"]: r for r in eval_rows}
    sf_row, peer_row = by_name[Path(sf_run["dir"]).name], by_name[PEER_NAME]
    diff = paired_delta_ce_diff(sf_row, peer_row, 2000, 0.95, args.seed)

    from saeforge.models.precision import hardware_record

    peer_record = peer_best["record"]
    l0_ratio = sf_row["l0"] / peer_row["l0"] if peer_row["l0"] else None
    result = {
        "benchmark": "peer_quality",
        "hardware": {**hardware_record("cpu"), "peer_cpu_capability": peer_record["cpu_capability"],
                     "peer_torch_threads": peer_record["torch_threads"]},
        "versions": {"saeforge": saeforge_version, "torch": torch.__version__, "peer": "sae_lens",
                     "sae_lens": install["sae_lens"], "peer_torch": install["torch"]},
        "settings": {
            "cache_dir": str(args.cache_dir), "model": manifest.get("model"), "site": manifest["site"],
            "cache_tokens": manifest["tokens"], "cache_dtype": manifest.get("dtype"), "d_in": manifest["d_in"],
            "width": args.width, "batch_size": args.batch_size, "steps": args.steps, "lr": args.lr,
            "tokens_per_sae": args.steps * args.batch_size,
            "epochs": args.steps * args.batch_size / manifest["tokens"], "seed": args.seed,
            "target_l0": args.target_l0, "l0_tolerance": args.l0_tolerance, "search_rounds": args.search_rounds,
            "l0_sample_tokens": int(l0_sample.shape[0]), "eval_tokens_asked": args.eval_tokens,
            "lm_dtype": args.lm_dtype, "saeforge_compute_dtype": args.compute_dtype,
            "saeforge_l0_by": "target_l0 controller",
            "saeforge_train_config": sf_run["train_config"],
            "peer_recipe": {k: peer_record.get(k) for k in ("adam_betas", "lr_scheduler", "normalize_activations",
                                                             "l1_warmup_steps", "b_dec_init")}
                           | {"grad_clip_norm": 1.0, "decoder_init_norm": 0.1, "resampling": None,
                              "sparsity": "L1 weighted by decoder-row norms"},
            "outliers": {"max_input_norm": max_input_norm, "peer_trained_without_them": peer_thr is not None,
                         "peer_rows_left_out": peer_record.get("rows_left_out"),
                         "spliced_in_eval": bool(args.splice_outliers or max_input_norm is None)},
            "batch_order": "each library shuffles the same rows its own way",
        },
        "install": install,
        "saeforge": {**{k: sf_row.get(k) for k in ROW_KEYS}, "sparsity_coeff_final": sf_lambda,
                     "l0_sample": sf_l0, "train_s": round(sf_run["train_s"], 1),
                     "training": sf_run["training"]},
        "peer": {**{k: peer_row.get(k) for k in ROW_KEYS}, "l1_coefficient": peer_best["coeff"],
                 "l0_sample": peer_best["l0"], "train_s": round(peer_record["train_s"], 1),
                 "scaling_factor": peer_record["scaling_factor"], "epochs": peer_record["epochs"],
                 "zero_decoder_rows": peer_best["zero_decoder_rows"],
                 "search": [{"coeff": t["record"]["l1_coefficient"], "l0_sample": t["l0"],
                             "train_s": round(t["record"]["train_s"], 1)} for t in peer_trials],
                 "conversion": {"how": "weights act on raw activations (SAELens folds its scaling factor in fit); "
                                       "decoder-row norms moved into W_enc columns and b_enc (exact for ReLU)",
                                **check}},
        "comparison": {
            "l0_ratio_saeforge_over_peer": l0_ratio,
            "delta_ce_saeforge_minus_peer": diff,
            "fvu_saeforge_minus_peer": sf_row["fvu"] - peer_row["fvu"],
            "l0_matched_within_tolerance": l0_ratio is not None and abs(math.log(l0_ratio)) <= math.log1p(args.l0_tolerance),
            "saeforge_delta_ce_lower_or_equal": diff["diff"] <= 0,
            "saeforge_delta_ce_not_significantly_worse": diff["diff"] <= 0 or (diff["ci"] is not None
                                                                               and diff["ci"][0] <= 0),
            "saeforge_fvu_not_worse": sf_row["fvu"] <= peer_row["fvu"],
        },
        "eval_s": round(eval_s, 1), "total_s": round(time.perf_counter() - t_start, 1),
    }
    from saeforge.commands.output import finite_or_null

    text = json.dumps(finite_or_null(result), indent=1, allow_nan=False)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
