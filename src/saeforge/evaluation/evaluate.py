"""Evaluate SAEs spliced into their language model on held-out tokens (METHODS.md, "Metrics").

Batches are the outer loop and SAEs the inner one: per batch the clean forward (site activations and clean logits
for the KL) runs once and is shared by every SAE and by the PCA reference; the ablated CE, the site statistics and
the PCA reference are computed once per (model, site, tokens, keep_bos, max_input_norm) and cached (splice.py).
SAEs saved by the trainer work on raw activations, which is what they get. An SAE whose cfg.json carries
saeforge.max_input_norm is not spliced at positions whose activation norm exceeds it (like BOS; it was not trained
on them); those positions are counted in eval_excluded_positions.

One row (dict) per SAE, then one per SAE and ITO target:
  name, path, architecture ("ito:<arch>" for gradient pursuit), variant, model, site, d_in, d_sae, k,
  sparsity_coeff, target_l0, ito_k
  eval_set, eval_contexts               fingerprint of the evaluation tokens (rows with equal ones share contexts), and
                                        the number of contexts (the bootstrap's resampling unit)
  eval_tokens, eval_excluded_positions  spliced positions (all but BOS/padding/outliers), and outliers left unspliced
  max_input_norm                        the SAE's outlier threshold (raw activation units), or None
  delta_ce                              CE_spliced - CE_clean (nats per token), the headline
  kl_div                                mean KL(clean || spliced) of the next-token distributions
  loss_recovered_zero, _mean            (CE_ablated - CE_spliced) / (CE_ablated - CE_clean)
  l_added                               (CE_spliced - CE_clean) / CE_clean (paper B)
  <each of the five above>_ci           [lo, hi]: bootstrap CI over contexts (EvalConfig.ci_level; bootstrap.py)
  ce_clean, ce_spliced                  mean next-token CE, clean and with the SAE spliced in (every predicted position)
  ce_zero_ablation, ce_mean_ablation    CE with the site zero- / mean-ablated at the spliced positions
  per_context                           {ce_clean, ce_spliced, kl, ce_zero_ablation, ce_mean_ablation}: per-context
                                        means (lists, one value per context, in evaluation order), to resample jointly
  l0, mse, nmse, fvu, cosine, gamma     see metrics.py (gamma: ratio of sums over the whole set)
  dead_fraction, dense_fraction, dense_threshold
  firing_log10_hist                     {edges, counts (live latents), dead, cdf (all latents, at each edge),
                                         median_log10_freq}
  decoder_max_cos                       {mean, median, edges, counts}                       (analyses; not for ITO)
  directional_derivative                {decoder, random, covariance_matched, tokens}      (analyses; not for ITO)
  steering                              {alpha_unit (RMS centred norm), alpha_scales, + steering.steering_effects
                                         output (latents, sweep per alpha)}, or {error}     (steering; not for ITO)
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Union

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saeforge.config import EvalConfig
from saeforge.evaluation.analysis import (
    DirectionalDerivatives,
    covariance_matched_directions,
    decoder_max_cosine,
    isotropic_directions,
)
from saeforge.evaluation.bootstrap import loss_metric_cis, loss_metrics
from saeforge.evaluation.ito import GradientPursuitSAE
from saeforge.evaluation.metrics import (
    COSINE_EDGES,
    FiringStats,
    LossStats,
    ReconstructionStats,
    histogram,
)
from saeforge.evaluation.pca import PrincipalSubspace
from saeforge.evaluation.splice import (
    SiteStats,
    ablated_context_losses,
    cache_entry,
    eval_set_digest,
    record_clean_loss,
    site_statistics,
    splice_mask,
)
from saeforge.evaluation.steering import steering_effects
from saeforge.models.splice import CleanDistribution, replace_within

# Directions per set for the directional-derivative analysis (random sets, and decoder rows sampled when wider).
N_DIRECTIONS = 4096


def _load(entry, index: int):
    """An SAE object or a saved SAE directory -> (sae, name, path or None, max_input_norm or None)."""
    if isinstance(entry, (str, Path)):
        from saeforge.saes import load_sae

        path = Path(entry)
        if not path.is_dir():
            raise FileNotFoundError(f"SAE directory not found: {path}")
        sae, name, path = load_sae(path), path.name, str(path)
    else:
        sae, path = entry, None
        name = entry.meta.name or f"{entry.architecture}_{index}"
    return sae, name, path, sae.meta.max_input_norm


def context_batches(contexts, batch_size: int, device) -> list[Tensor]:
    """Token ids [n, len] (or a list of them) as batches of batch_size contexts on device; a clear error otherwise."""
    if isinstance(contexts, Tensor):
        contexts = contexts if contexts.ndim == 2 else contexts[None]
    else:
        contexts = torch.cat([c if c.ndim == 2 else c[None] for c in contexts])
    if contexts.ndim != 2 or contexts.shape[0] == 0 or contexts.shape[1] < 2:
        raise ValueError(f"contexts must be token ids [n_contexts, context_len >= 2]; got {tuple(contexts.shape)}")
    contexts = contexts.to(device=device, dtype=torch.long)
    return list(contexts.split(batch_size))


def _describe(sae, name: str, path, lm, site: str) -> dict:
    variant = sae.variant() if hasattr(sae, "variant") else sae.architecture
    row = {"name": name, "path": path, "architecture": sae.architecture, "variant": variant,
           "model": lm.name, "site": site, "d_in": sae.d_in, "d_sae": sae.d_sae}
    k = getattr(sae, "k", None)
    if isinstance(sae, GradientPursuitSAE):
        row["ito_k"] = k
        k = getattr(sae.sae, "k", None)
    row["k"] = k
    training = sae.meta.training
    row["sparsity_coeff"] = training.sparsity_coeff if training is not None else None
    row["target_l0"] = training.target_l0 if training is not None else None
    return row


@dataclass
class Evaluation:
    """What `evaluate` returns: one row per SAE (and ITO target), and the PCA reference rows of the evaluation set."""

    rows: list[dict]
    pca_reference: list[dict]


def evaluate_saes(lm, saes: Iterable[Union[str, Path, torch.nn.Module]], site: str, contexts,
                  cfg: EvalConfig | None = None, *, keep_bos: bool = False, seed: int = 0,
                  progress: bool = True, **options) -> list[dict]:
    """Evaluate each SAE spliced into `lm` at `site` on `contexts` (token ids [n, context_len]).

    `cfg` (or keyword `options` naming EvalConfig fields) chooses ablations, ITO targets, steering, analyses, CIs
    and the PCA ranks. Returns one dict per SAE (then one per SAE and ITO target), JSON-ready, with the keys in the
    module docstring. The PCA reference is computed too (unless cfg.pca_ranks is empty) and cached: `evaluate`
    returns it, and a later `evaluate` on the same contexts reuses it."""
    saes = list(saes)
    if not saes:
        raise ValueError("evaluate_saes: no SAEs given")
    return evaluate(lm, saes, site, contexts, cfg, keep_bos=keep_bos, seed=seed, progress=progress, **options).rows


def evaluate(lm, saes: Iterable[Union[str, Path, torch.nn.Module]], site: str, contexts,
             cfg: EvalConfig | None = None, *, keep_bos: bool = False, seed: int = 0, progress: bool = True,
             pca_fit_contexts=None, **options) -> Evaluation:
    """`evaluate_saes`, and the PCA reference (pca.py) at each rank of cfg.pca_ranks up to the site dimension.

    pca_fit_contexts: token ids whose site activations the principal directions are fitted on (a training-split
    sample); None fits them on `contexts` themselves. Ablated CE, site statistics and PCA rows are cached per
    (model, site, contexts, keep_bos, max_input_norm), so a later call on the same contexts runs only the clean
    forward and one forward per SAE. `saes` may be empty (the PCA reference alone)."""
    cfg = cfg or EvalConfig()
    if options:
        valid = {f.name for f in dataclasses.fields(EvalConfig)}
        unknown = sorted(set(options) - valid)
        if unknown:
            raise ValueError(f"evaluate_saes: unknown option {unknown[0]!r}; valid options are {sorted(valid)}")
        cfg = dataclasses.replace(cfg, **options)
    d_site = lm.site_dim(site)

    loaded = [_load(entry, i) for i, entry in enumerate(saes)]
    for sae, name, _, _ in loaded:
        if sae.d_in != d_site:
            raise ValueError(f"SAE {name!r} has d_in={sae.d_in} but site {site!r} of {lm.name} has d={d_site}")
        sae.to(lm.device).eval()
    entries = list(loaded)
    entries += [(GradientPursuitSAE(sae, k), f"{name}@ito{k}", path, max_norm)
                for sae, name, path, max_norm in loaded for k in cfg.ito]

    batches = context_batches(contexts, cfg.batch_size, lm.device)
    digest = eval_set_digest(batches)
    # Distinct outlier thresholds (None: splice every non-BOS position); each gets its own cached baselines.
    thresholds = list(dict.fromkeys(max_norm for _, _, _, max_norm in entries)) or [None]
    stats = site_statistics(lm, site, batches, keep_bos=keep_bos)
    stats_at = {t: site_statistics(lm, site, batches, keep_bos=keep_bos, max_norm=t) for t in thresholds}
    bar = tqdm(total=len(batches) * len(cfg.ablation) * len(thresholds),
               desc="eval: ablated loss (once per eval set)", disable=not progress, file=sys.stderr)
    ablated = {t: ablated_context_losses(lm, site, batches, tuple(cfg.ablation), keep_bos=keep_bos, max_norm=t,
                                         progress=bar) for t in thresholds}
    bar.close()
    pca_jobs = _pca_jobs(lm, site, batches, cfg, keep_bos, thresholds, d_site, pca_fit_contexts)
    clean = LossStats()

    gen = torch.Generator().manual_seed(seed)
    recon = [ReconstructionStats() for _ in entries]
    firing = [FiringStats(sae.d_sae) for sae, _, _, _ in entries]
    losses = [LossStats() for _ in entries]
    analyse = cfg.analyses and cfg.analysis_batches > 0 and bool(loaded)
    if analyse:
        random_dirs = {
            "random": DirectionalDerivatives(isotropic_directions(N_DIRECTIONS, d_site, gen)),
            "covariance_matched": DirectionalDerivatives(covariance_matched_directions(stats.cov, N_DIRECTIONS, gen)),
        }
        along_decoder = []
        for sae, _, _, _ in loaded:
            rows = torch.randperm(sae.d_sae, generator=gen)[:N_DIRECTIONS].sort().values
            W = sae.W_dec.detach()[rows.to(sae.W_dec.device)].float().cpu()
            along_decoder.append(DirectionalDerivatives(W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)))
    any_needs_grad = any(getattr(sae, "needs_grad", False) for sae, _, _, _ in entries)

    n_passes = len(entries) + len(pca_jobs)  # spliced forwards per batch; none: everything came from the cache
    scored = tqdm(batches, desc=f"eval: {len(entries)} SAE(s), {len(pca_jobs)} PCA rank(s)", disable=not progress,
                  file=sys.stderr) if n_passes else []
    for bi, tokens in enumerate(scored):
        mask = splice_mask(lm, tokens, keep_bos)
        site_grads = None
        if any_needs_grad or (analyse and bi < cfg.analysis_batches):
            _, g = lm.capture(tokens, [site], grad=True)
            site_grads = g[site].float()
        with torch.no_grad():
            clean_dist = CleanDistribution(lm.forward(tokens), tokens)
            clean.update(clean_dist.ce)
            if analyse and bi < cfg.analysis_batches:
                g_cpu = site_grads[mask].cpu()
                for dd in list(random_dirs.values()) + along_decoder:
                    dd.update(g_cpu)
            for j, (sae, _, _, max_norm) in enumerate(entries):

                def reconstruct(x: Tensor, keep: Tensor, j=j, sae=sae) -> Tensor:
                    x = x.to(sae.W_dec.dtype)
                    if getattr(sae, "needs_grad", False):
                        f = sae.encode(x, grad=site_grads[keep].to(x.dtype))
                    else:
                        f = sae.encode(x)
                    x_hat = sae.decode(f)
                    recon[j].update(x, x_hat, center=sae.b_dec.detach().float())
                    firing[j].update(f)
                    return x_hat

                logits = lm.forward(tokens, edits={site: replace_within(mask, max_norm, reconstruct)})
                losses[j].update(*clean_dist.ce_and_kl(logits, tokens))
                del logits
            for job in pca_jobs:
                logits = lm.forward(tokens, edits={site: replace_within(mask, job.max_norm, job.splice)})
                job.losses.update(*clean_dist.ce_and_kl(logits, tokens))
                del logits
            del clean_dist
    if n_passes:
        record_clean_loss(lm, site, batches, keep_bos, clean.ce)
    for job in pca_jobs:
        job.store(clean, ablated[job.max_norm], digest)

    results = []
    for j, (sae, name, path, max_norm) in enumerate(entries):
        row = _describe(sae, name, path, lm, site)
        per_context = {"ce_clean": clean.context_ce, "ce_spliced": losses[j].context_ce, "kl": losses[j].context_kl,
                       **{f"ce_{kind}_ablation": ablated[max_norm][kind] for kind in cfg.ablation}}
        row.update({
            "eval_set": digest,
            "eval_contexts": sum(b.shape[0] for b in batches),
            "eval_tokens": firing[j].n,
            "eval_excluded_positions": stats_at[max_norm].n_excluded,
            "max_input_norm": max_norm,
        })
        row.update(_loss_columns(per_context, clean.ce, losses[j].ce, losses[j].kl, cfg, seed))
        row.update(recon[j].result())
        row.update(firing[j].result(cfg.dense_threshold))
        if analyse and j < len(loaded):
            max_cos = decoder_max_cosine(sae.W_dec.detach())
            row["decoder_max_cos"] = {"mean": float(max_cos.mean()), "median": float(max_cos.median()),
                                      **histogram(max_cos, COSINE_EDGES)}
            row["directional_derivative"] = {
                "decoder": along_decoder[j].result(),
                **{kind: dd.result() for kind, dd in random_dirs.items()},
                "tokens": along_decoder[j].tokens,
            }
        if cfg.steering and j < len(loaded):
            row["steering"] = _steer(lm, sae, site, batches, firing[j], stats, cfg, keep_bos, gen, progress)
        row["per_context"] = per_context
        results.append(row)

    reference = []
    for t in thresholds:
        cached = cache_entry(lm, site, batches, keep_bos, t).get("pca", {})
        fit_key = _fit_key(batches, cfg, pca_fit_contexts)
        for rank in _pca_ranks(cfg, d_site):
            stored = cached[(fit_key, rank)]
            row = {**stored["describe"], "site": site, "model": lm.name}
            row.update(_loss_columns(stored["per_context"], *stored["means"], cfg, seed))
            row.update(stored["reconstruction"])
            row["per_context"] = stored["per_context"]
            reference.append(row)
    return Evaluation(rows=results, pca_reference=reference)


def _loss_columns(per_context: dict, ce_clean: float, ce_spliced: float, kl: float, cfg: EvalConfig,
                  seed: int) -> dict:
    """delta_ce, kl_div, loss recovered, l_added (and their CIs), then the CEs they come from, in table order."""
    ce_ablated = {key: sum(v) / len(v) for key, v in per_context.items() if key.endswith("_ablation")}
    metrics = loss_metrics({"ce_clean": ce_clean, "ce_spliced": ce_spliced, "kl": kl, **ce_ablated})
    cis = (loss_metric_cis(per_context, level=cfg.ci_level, resamples=cfg.bootstrap_resamples, seed=seed)
           if cfg.bootstrap_resamples > 0 else {})
    out = {}
    for name in ("delta_ce", "kl_div", "loss_recovered_mean", "loss_recovered_zero", "l_added"):
        if name in metrics:
            out[name] = float(metrics[name])
            if f"{name}_ci" in cis:
                out[f"{name}_ci"] = cis[f"{name}_ci"]
    return {**out, "ce_clean": ce_clean, "ce_spliced": ce_spliced, **ce_ablated}


def _pca_ranks(cfg: EvalConfig, d_site: int) -> list[int]:
    return [rank for rank in cfg.pca_ranks if rank <= d_site]


def _fit_key(batches: list[Tensor], cfg: EvalConfig, pca_fit_contexts) -> str:
    if pca_fit_contexts is None:
        return "eval:" + eval_set_digest(batches)
    return "fit:" + eval_set_digest(context_batches(pca_fit_contexts, cfg.batch_size, "cpu"))


class _PCAJob:
    """One PCA rank still to be scored on an evaluation set: its splice function and accumulators."""

    def __init__(self, entry: dict, key, subspace: PrincipalSubspace, rank: int, max_norm: float | None) -> None:
        self.entry, self.key, self.subspace, self.rank, self.max_norm = entry, key, subspace, rank, max_norm
        self.reconstruct = subspace.reconstruction(rank)
        self.recon, self.losses = ReconstructionStats(), LossStats()

    def splice(self, x: Tensor, keep: Tensor) -> Tensor:
        x_hat = self.reconstruct(x)
        self.recon.update(x.float(), x_hat, center=self.subspace.mean)
        return x_hat

    def store(self, clean: LossStats, ablated: dict[str, list[float]], digest: str) -> None:
        per_context = {"ce_clean": clean.context_ce, "ce_spliced": self.losses.context_ce,
                       "kl": self.losses.context_kl, **{f"ce_{k}_ablation": v for k, v in ablated.items()}}
        self.entry[self.key] = {
            "describe": {"name": f"PCA rank {self.rank}", "architecture": "pca", "rank": self.rank,
                         "max_input_norm": self.max_norm, "fit": self.subspace.fitted_on,
                         "explained_variance": self.subspace.explained_variance(self.rank), "eval_set": digest,
                         "eval_contexts": len(clean.context_ce), "eval_tokens": self.recon.n},
            "means": (clean.ce, self.losses.ce, self.losses.kl),
            "per_context": per_context,
            "reconstruction": self.recon.result(),
        }


def _pca_jobs(lm, site: str, batches: list[Tensor], cfg: EvalConfig, keep_bos: bool,
              thresholds: list, d_site: int, pca_fit_contexts) -> list[_PCAJob]:
    """The PCA ranks not yet cached for this evaluation set, fit set and each threshold."""
    ranks = _pca_ranks(cfg, d_site)
    if not ranks:
        return []
    fit_key = _fit_key(batches, cfg, pca_fit_contexts)
    fit_batches = batches if pca_fit_contexts is None else context_batches(pca_fit_contexts, cfg.batch_size, lm.device)
    jobs = []
    for t in thresholds:
        cached = cache_entry(lm, site, batches, keep_bos, t).setdefault("pca", {})
        missing = [rank for rank in ranks if (fit_key, rank) not in cached]
        if not missing:
            continue
        fit_stats = site_statistics(lm, site, fit_batches, keep_bos=keep_bos, max_norm=t)
        source = "the evaluation set itself" if pca_fit_contexts is None else "a training-split sample"
        subspace = PrincipalSubspace.from_stats(fit_stats, f"{source} ({fit_stats.n_positions} positions)")
        jobs += [_PCAJob(cached, (fit_key, rank), subspace, rank, t) for rank in missing]
    return jobs


def _steer(lm, sae, site, batches, firing: FiringStats, stats: SiteStats, cfg: EvalConfig, keep_bos: bool,
           gen, progress: bool) -> dict:
    """Paper B §4.2 on a seeded sample of the latents alive on the evaluation set, at each push size of
    cfg.steering_alphas (multiples of the RMS centred norm at the site)."""
    alive = torch.nonzero(firing.frequencies() > 0).flatten()
    if alive.numel() == 0:
        return {"error": "no latent fired on the evaluation tokens"}
    pick = alive[torch.randperm(alive.numel(), generator=gen)[: cfg.steering_latents]].sort().values
    contexts = torch.cat(batches)[: cfg.steering_contexts]
    unit = float(stats.cov.diagonal().sum().clamp_min(0).sqrt())
    try:
        out = steering_effects(lm, sae.W_dec.detach(), site, contexts, pick.tolist(),
                               alphas=[scale * unit for scale in cfg.steering_alphas],
                               top_tokens=cfg.steering_top_tokens, keep_bos=keep_bos, batch_size=cfg.batch_size,
                               progress=progress)
        return {"alpha_unit": unit, "alpha_scales": list(cfg.steering_alphas), **out}
    except ValueError as e:  # a site outside the residual stream has no unembedding to steer through
        return {"error": str(e)}

