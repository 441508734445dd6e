"""Splicing into the language model for evaluation: which positions get replaced, and the clean and ablated losses of
an evaluation set, computed once and cached per (model, site, tokens, keep_bos, max_norm). The edits themselves and
the clean distribution that CE and KL are measured against are models/splice.py's (training splices too).

Positions: the SAE replaces the site activation at every token except BOS and padding (the positions it was trained
on; `keep_bos=True` replaces BOS too), and except positions whose activation norm exceeds the SAE's `max_input_norm`
(attention-sink outliers left out of its training; recorded in cfg.json as saeforge.max_input_norm, raw activation
units). Ablations, the site statistics (mean-ablation value, covariance) and the PCA reference use exactly the
positions the SAE replaces, so the cache is keyed by the threshold too: SAEs with different thresholds get their
own baselines (two more forward passes over the evaluation set per distinct threshold), and a loss recovered of 0
always means "as bad as ablating the positions this SAE replaces". CE is the mean next-token loss over every
predicted position of the context, spliced or not.
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from saeforge.data import training_mask
from saeforge.models.splice import replace_within, spliced_positions


def splice_mask(lm, tokens: Tensor, keep_bos: bool = False) -> Tensor:
    """bool [B, S]: positions whose site activation an SAE or an ablation replaces: exactly the positions the
    training stream feeds SAEs (saeforge.data.training_mask: all but BOS and padding unless keep_bos)."""
    return training_mask(tokens, lm.bos_token_id, lm.pad_token_id, keep_bos)


@dataclass
class SiteStats:
    """Statistics of the site activation over the spliced positions of an evaluation set."""

    mean: Tensor  # [d] (the mean-ablation value)
    cov: Tensor  # [d, d] (covariance-matched random directions, the PCA reference)
    mean_norm: float  # mean ||x||
    n_positions: int  # positions spliced
    n_excluded: int = 0  # positions left unspliced because their norm exceeds the threshold (not BOS/padding)


@dataclass
class Baseline:
    """Everything about an evaluation set that does not depend on the SAE."""

    ce_clean: float
    ce_ablated: dict[str, float]  # "zero" / "mean" -> CE with the site ablated at the spliced positions
    stats: SiteStats


# lm.model (weakly) -> {(site, tokens digest, keep_bos, max_norm): {"stats": SiteStats, "clean": float,
#                       "zero"/"mean": per-context mean CE [n_contexts], "pca": {(fit digest, rank): row}}}
_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def eval_set_digest(batches: list[Tensor]) -> str:
    """A short fingerprint of an evaluation set's tokens (rows with the same one were scored on the same
    contexts, so their per-context arrays can be resampled jointly)."""
    tokens = torch.cat([b.reshape(-1) for b in batches]).detach().cpu().contiguous()
    return hashlib.sha1(tokens.numpy().tobytes() + str([tuple(b.shape) for b in batches]).encode()).hexdigest()[:16]


def cache_entry(lm, site: str, batches: list[Tensor], keep_bos: bool, max_norm: float | None = None) -> dict:
    """The cache of one evaluation set (see _CACHE)."""
    key = (site, eval_set_digest(batches), keep_bos, max_norm)
    return _CACHE.setdefault(lm.model, {}).setdefault(key, {})


@torch.no_grad()
def site_statistics(lm, site: str, batches: list[Tensor], *, keep_bos: bool = False,
                    max_norm: float | None = None) -> SiteStats:
    """Mean, covariance and mean norm of the site activation over the spliced positions (a capture pass that stops
    at the site), and how many positions max_norm excludes; cached."""
    entry = cache_entry(lm, site, batches, keep_bos, max_norm)
    if "stats" not in entry:
        n, n_excluded, sum_x, sum_xx, sum_norm = 0, 0, 0.0, 0.0, 0.0
        for tokens in batches:
            act = lm.capture(tokens, [site])[site]
            mask = splice_mask(lm, tokens, keep_bos)
            keep = spliced_positions(mask, act, max_norm)
            n_excluded += int(mask.sum() - keep.sum())
            x = act[keep].double().cpu()
            n += x.shape[0]
            sum_x = sum_x + x.sum(0)
            sum_xx = sum_xx + x.T @ x
            sum_norm += float(x.norm(dim=-1).sum())
        if n == 0:
            raise ValueError("evaluation set has no positions to splice (every token is BOS, padding or above "
                             f"max_input_norm={max_norm})")
        mean = sum_x / n
        entry["stats"] = SiteStats(mean=mean.float(), cov=(sum_xx / n - torch.outer(mean, mean)).float(),
                                   mean_norm=sum_norm / n, n_positions=n, n_excluded=n_excluded)
    return entry["stats"]


@torch.no_grad()
def ablated_context_losses(lm, site: str, batches: list[Tensor], kinds: tuple[str, ...] = ("zero", "mean"), *,
                           keep_bos: bool = False, max_norm: float | None = None,
                           progress=None) -> dict[str, list[float]]:
    """Per-context mean next-token CE with the site zero- or mean-ablated at the spliced positions (those with
    norm <= max_norm); cached per kind."""
    entry = cache_entry(lm, site, batches, keep_bos, max_norm)
    for kind in kinds:
        if kind not in ("zero", "mean"):
            raise ValueError(f"unknown ablation {kind!r}; use 'zero' or 'mean'")
        if kind in entry:
            continue
        mean = site_statistics(lm, site, batches, keep_bos=keep_bos, max_norm=max_norm).mean
        value = torch.zeros_like(mean) if kind == "zero" else mean
        per_context: list[float] = []
        for tokens in batches:
            edit = replace_within(splice_mask(lm, tokens, keep_bos), max_norm,
                                  lambda a, keep, v=value: v.to(device=a.device, dtype=a.dtype).expand_as(a))
            ce = lm.next_token_loss(tokens, edits={site: edit})
            per_context += ce.double().mean(1).tolist()
            if progress is not None:
                progress.update(1)
        entry[kind] = per_context
    return {kind: entry[kind] for kind in kinds}


def ablated_losses(lm, site: str, batches: list[Tensor], kinds: tuple[str, ...] = ("zero", "mean"), *,
                   keep_bos: bool = False, max_norm: float | None = None, progress=None) -> dict[str, float]:
    """Mean next-token CE with the site zero- or mean-ablated at the spliced positions; cached per kind. (Every
    context has the same number of predicted positions, so the mean of per-context means is the mean.)"""
    per_context = ablated_context_losses(lm, site, batches, kinds, keep_bos=keep_bos, max_norm=max_norm,
                                         progress=progress)
    return {kind: sum(values) / len(values) for kind, values in per_context.items()}


@torch.no_grad()
def clean_loss(lm, site: str, batches: list[Tensor], *, keep_bos: bool = False) -> float:
    """Mean next-token CE of the unmodified model on the evaluation set; cached (evaluate_saes records it from the
    clean forward it runs anyway for the KL)."""
    entry = cache_entry(lm, site, batches, keep_bos)
    if "clean" not in entry:
        ce = torch.cat([lm.next_token_loss(tokens).flatten() for tokens in batches])
        entry["clean"] = float(ce.double().mean())
    return entry["clean"]


def record_clean_loss(lm, site: str, batches: list[Tensor], keep_bos: bool, value: float) -> None:
    cache_entry(lm, site, batches, keep_bos).setdefault("clean", value)


def baseline_losses(lm, site: str, batches: list[Tensor], *, keep_bos: bool = False, max_norm: float | None = None,
                    ablations: tuple[str, ...] = ("zero", "mean"), progress=None) -> Baseline:
    """Clean and ablated CE and the site statistics of an evaluation set, each computed once per (model, site,
    tokens, keep_bos, max_norm) and reused for every SAE evaluated on it."""
    return Baseline(ce_clean=clean_loss(lm, site, batches, keep_bos=keep_bos),
                    ce_ablated=ablated_losses(lm, site, batches, ablations, keep_bos=keep_bos, max_norm=max_norm,
                                              progress=progress),
                    stats=site_statistics(lm, site, batches, keep_bos=keep_bos, max_norm=max_norm))
