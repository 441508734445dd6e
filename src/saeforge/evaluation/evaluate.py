"""Evaluate SAEs spliced into their language model on held-out tokens (METHODS.md, "Metrics").

Batches are the outer loop and SAEs the inner one: per batch the clean forward (site activations and clean logits
for the KL) runs once and is shared by every SAE; the clean and ablated CE come from `baseline_losses`, computed once
per (model, site, tokens) and cached. SAEs saved by the trainer work on raw activations, which is what they get.

One row (dict) per SAE, then one per SAE and ITO target:
  name, path, architecture ("ito:<arch>" for gradient pursuit), model, site, d_in, d_sae, k, sparsity_coeff, ito_k
  eval_contexts, eval_tokens            contexts, and spliced positions (all but BOS/padding) the metrics average over
  ce_clean, ce_spliced                  mean next-token CE, clean and with the SAE spliced in (every predicted position)
  ce_zero_ablation, ce_mean_ablation    CE with the site zero- / mean-ablated at the spliced positions
  loss_recovered_zero, _mean            (CE_ablated - CE_spliced) / (CE_ablated - CE_clean)
  kl_div                                mean KL(clean || spliced) of the next-token distributions
  l_added                               (CE_spliced - CE_clean) / CE_clean
  l0, mse, nmse, fvu, cosine, gamma     see metrics.py (gamma: ratio of sums over the whole set)
  dead_fraction, dense_fraction, dense_threshold
  firing_log10_hist                     {edges, counts (live latents), dead, cdf (all latents, at each edge),
                                         median_log10_freq}
  decoder_max_cos                       {mean, median, edges, counts}                       (analyses; not for ITO)
  directional_derivative                {decoder, random, covariance_matched, tokens}      (analyses; not for ITO)
  steering                              steering.steering_effects output, or {error}       (steering; not for ITO)
"""

from __future__ import annotations

import dataclasses
import sys
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
from saeforge.evaluation.ito import GradientPursuitSAE
from saeforge.evaluation.metrics import (
    COSINE_EDGES,
    FiringStats,
    LossStats,
    ReconstructionStats,
    histogram,
    loss_added,
    loss_recovered,
)
from saeforge.evaluation.splice import (
    CleanDistribution,
    ablated_losses,
    record_clean_loss,
    replace_at,
    site_statistics,
    splice_mask,
)
from saeforge.evaluation.steering import steering_effects

# Directions per set for the directional-derivative analysis (random sets, and decoder rows sampled when wider).
N_DIRECTIONS = 4096


def _load(entry, index: int):
    """An SAE object or a saved SAE directory -> (sae, name, path or None)."""
    if isinstance(entry, (str, Path)):
        from saeforge.saes import load_sae

        path = Path(entry)
        if not path.is_dir():
            raise FileNotFoundError(f"SAE directory not found: {path}")
        return load_sae(path), path.name, str(path)
    name = (getattr(entry, "cfg", None) or {}).get("name") or f"{entry.architecture}_{index}"
    return entry, name, None


def _as_batches(contexts, batch_size: int, device) -> list[Tensor]:
    if isinstance(contexts, Tensor):
        contexts = contexts if contexts.ndim == 2 else contexts[None]
    else:
        contexts = torch.cat([c if c.ndim == 2 else c[None] for c in contexts])
    if contexts.ndim != 2 or contexts.shape[0] == 0 or contexts.shape[1] < 2:
        raise ValueError(f"contexts must be token ids [n_contexts, context_len >= 2]; got {tuple(contexts.shape)}")
    contexts = contexts.to(device=device, dtype=torch.long)
    return list(contexts.split(batch_size))


def _describe(sae, name: str, path, lm, site: str) -> dict:
    cfg = getattr(sae, "cfg", None) or {}
    variant = sae.variant() if hasattr(sae, "variant") else sae.architecture
    row = {"name": name, "path": path, "architecture": sae.architecture, "variant": variant,
           "model": lm.name, "site": site, "d_in": sae.d_in, "d_sae": sae.d_sae}
    k = getattr(sae, "k", None)
    if isinstance(sae, GradientPursuitSAE):
        row["ito_k"] = k
        k = getattr(sae.sae, "k", None)
    row["k"] = k
    training = cfg.get("training") if isinstance(cfg.get("training"), dict) else {}
    row["sparsity_coeff"] = cfg.get("sparsity_coeff", training.get("sparsity_coeff"))
    return row


def evaluate_saes(lm, saes: Iterable[Union[str, Path, torch.nn.Module]], site: str, contexts,
                  cfg: EvalConfig | None = None, *, keep_bos: bool = False, seed: int = 0,
                  progress: bool = True, **options) -> list[dict]:
    """Evaluate each SAE spliced into `lm` at `site` on `contexts` (token ids [n, context_len]).

    `cfg` (or keyword `options` naming EvalConfig fields) chooses ablations, ITO targets, steering and analyses.
    Returns one dict per SAE (then one per SAE and ITO target), JSON-ready, with the keys in the module docstring.
    Ablated CE and site statistics are cached per (model, site, contexts), so a later call on the same contexts
    runs only the clean forward and one forward per SAE."""
    cfg = cfg or EvalConfig()
    if options:
        valid = {f.name for f in dataclasses.fields(EvalConfig)}
        unknown = sorted(set(options) - valid)
        if unknown:
            raise ValueError(f"evaluate_saes: unknown option {unknown[0]!r}; valid options are {sorted(valid)}")
        cfg = dataclasses.replace(cfg, **options)
    d_site = lm.site_dim(site)

    loaded = [_load(entry, i) for i, entry in enumerate(saes)]
    if not loaded:
        raise ValueError("evaluate_saes: no SAEs given")
    for sae, name, _ in loaded:
        if sae.d_in != d_site:
            raise ValueError(f"SAE {name!r} has d_in={sae.d_in} but site {site!r} of {lm.name} has d={d_site}")
        sae.to(lm.device).eval()
    entries = [(sae, name, path) for sae, name, path in loaded]
    entries += [(GradientPursuitSAE(sae, k), f"{name}@ito{k}", path) for sae, name, path in loaded for k in cfg.ito]

    batches = _as_batches(contexts, cfg.batch_size, lm.device)
    stats = site_statistics(lm, site, batches, keep_bos=keep_bos)
    bar = tqdm(total=len(batches) * len(cfg.ablation), desc="eval: ablated loss (once per eval set)",
               disable=not progress, file=sys.stderr)
    ce_ablated = ablated_losses(lm, site, batches, tuple(cfg.ablation), keep_bos=keep_bos, progress=bar)
    bar.close()
    clean = LossStats()

    gen = torch.Generator().manual_seed(seed)
    recon = [ReconstructionStats() for _ in entries]
    firing = [FiringStats(sae.d_sae) for sae, _, _ in entries]
    losses = [LossStats() for _ in entries]
    analyse = cfg.analyses and cfg.analysis_batches > 0
    if analyse:
        random_dirs = {
            "random": DirectionalDerivatives(isotropic_directions(N_DIRECTIONS, d_site, gen)),
            "covariance_matched": DirectionalDerivatives(covariance_matched_directions(stats.cov, N_DIRECTIONS, gen)),
        }
        along_decoder = []
        for sae, _, _ in loaded:
            rows = torch.randperm(sae.d_sae, generator=gen)[:N_DIRECTIONS].sort().values
            W = sae.W_dec.detach()[rows.to(sae.W_dec.device)].float().cpu()
            along_decoder.append(DirectionalDerivatives(W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)))
    any_needs_grad = any(getattr(sae, "needs_grad", False) for sae, _, _ in entries)

    for bi, tokens in enumerate(tqdm(batches, desc=f"eval: {len(entries)} SAE(s)", disable=not progress,
                                     file=sys.stderr)):
        mask = splice_mask(lm, tokens, keep_bos)
        grads = None
        if any_needs_grad or (analyse and bi < cfg.analysis_batches):
            _, g = lm.capture(tokens, [site], grad=True)
            grads = g[site][mask].float()
        with torch.no_grad():
            clean_dist = CleanDistribution(lm.forward(tokens), tokens)
            clean.update(clean_dist.ce)
            if analyse and bi < cfg.analysis_batches:
                g_cpu = grads.cpu()
                for dd in list(random_dirs.values()) + along_decoder:
                    dd.update(g_cpu)
            for j, (sae, _, _) in enumerate(entries):

                def reconstruct(x: Tensor, j=j, sae=sae) -> Tensor:
                    x = x.to(sae.W_dec.dtype)
                    if getattr(sae, "needs_grad", False):
                        f = sae.encode(x, grad=grads.to(x.dtype))
                    else:
                        f = sae.encode(x)
                    x_hat = sae.decode(f)
                    recon[j].update(x, x_hat, center=sae.b_dec.detach().float())
                    firing[j].update(f)
                    return x_hat

                logits = lm.forward(tokens, edits={site: replace_at(mask, reconstruct)})
                losses[j].update(*clean_dist.ce_and_kl(logits, tokens))
                del logits
            del clean_dist
    record_clean_loss(lm, site, batches, keep_bos, clean.ce)

    results = []
    for j, (sae, name, path) in enumerate(entries):
        row = _describe(sae, name, path, lm, site)
        ce = losses[j].ce
        row.update({
            "eval_contexts": sum(b.shape[0] for b in batches),
            "eval_tokens": firing[j].n,
            "ce_clean": clean.ce,
            "ce_spliced": ce,
            "kl_div": losses[j].kl,
            "l_added": loss_added(clean.ce, ce),
        })
        for kind, ce_abl in ce_ablated.items():
            row[f"ce_{kind}_ablation"] = ce_abl
            row[f"loss_recovered_{kind}"] = loss_recovered(clean.ce, ce, ce_abl)
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
            row["steering"] = _steer(lm, sae, site, batches, firing[j], stats.mean_norm, cfg, keep_bos, gen, progress)
        results.append(row)
    return results


def _steer(lm, sae, site, batches, firing: FiringStats, mean_norm: float, cfg: EvalConfig, keep_bos: bool,
           gen, progress: bool) -> dict:
    """Paper B §4.2 on a seeded sample of the latents alive on the evaluation set."""
    alive = torch.nonzero(firing.frequencies() > 0).flatten()
    if alive.numel() == 0:
        return {"error": "no latent fired on the evaluation tokens"}
    pick = alive[torch.randperm(alive.numel(), generator=gen)[: cfg.steering_latents]].sort().values
    contexts = torch.cat(batches)[: cfg.steering_contexts]
    alpha = cfg.steering_alpha if cfg.steering_alpha is not None else mean_norm
    try:
        return steering_effects(lm, sae.W_dec.detach(), site, contexts, pick.tolist(), alpha=alpha,
                                top_tokens=cfg.steering_top_tokens, keep_bos=keep_bos, batch_size=cfg.batch_size,
                                progress=progress)
    except ValueError as e:  # a site outside the residual stream has no unembedding to steer through
        return {"error": str(e)}

