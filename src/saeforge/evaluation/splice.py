"""Splicing into the language model: which positions get replaced, CE and KL from logits, and the clean and ablated
losses of an evaluation set, computed once and cached per (model, site, tokens).

Positions: the SAE replaces the site activation at every token except BOS and padding (the positions it was trained
on; `keep_bos=True` replaces BOS too). Ablations replace the same positions. CE is the mean next-token loss over
every predicted position of the context.
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from saeforge.data import training_mask

# Vocabulary-sized float32 copies are made this many positions at a time, to bound memory on large vocabularies.
CHUNK_POSITIONS = 256


def splice_mask(lm, tokens: Tensor, keep_bos: bool = False) -> Tensor:
    """bool [B, S]: positions whose site activation an SAE or an ablation replaces: exactly the positions the
    training stream feeds SAEs (saeforge.data.training_mask: all but BOS and padding unless keep_bos)."""
    return training_mask(tokens, lm.bos_token_id, lm.pad_token_id, keep_bos)


def replace_at(mask: Tensor, fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """An LM edit that applies fn to the activations [N, d] at the masked positions and keeps the others."""

    def edit(act: Tensor) -> Tensor:
        out = act.clone()
        out[mask] = fn(act[mask]).to(act.dtype)
        return out

    return edit


def next_token_ce(logits: Tensor, tokens: Tensor) -> Tensor:
    """Per-position next-token cross-entropy [B, S-1] in float32 (computed in chunks of positions)."""
    logits = logits[:, :-1]
    targets = tokens[:, 1:]
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_targets = targets.reshape(-1)
    out = torch.empty(flat_targets.shape, dtype=torch.float32, device=logits.device)
    for i in range(0, flat_targets.numel(), CHUNK_POSITIONS):
        chunk = flat_logits[i : i + CHUNK_POSITIONS].float()
        out[i : i + CHUNK_POSITIONS] = torch.nn.functional.cross_entropy(
            chunk, flat_targets[i : i + CHUNK_POSITIONS], reduction="none"
        )
    return out.view(targets.shape)


class CleanDistribution:
    """The clean model's next-token distribution on one batch, kept to score every spliced run against it.

    KL(P || Q) = sum_v p_v log p_v - sum_v p_v log q_v, and with z the spliced logits,
    sum_v p_v log q_v = p . z - logsumexp(z). So per spliced run one logsumexp and one dot product give both its CE
    and its KL (float32, a chunk of positions at a time)."""

    def __init__(self, clean_logits: Tensor, tokens: Tensor) -> None:
        flat = clean_logits[:, :-1].reshape(-1, clean_logits.shape[-1])
        targets = tokens[:, 1:].reshape(-1, 1).to(flat.device)
        self.shape = (clean_logits.shape[0], clean_logits.shape[1] - 1)
        self.probs = torch.empty(flat.shape, dtype=torch.float32, device=flat.device)
        self.neg_entropy = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)
        ce = torch.empty_like(self.neg_entropy)
        for i in range(0, flat.shape[0], CHUNK_POSITIONS):
            rows = slice(i, i + CHUNK_POSITIONS)
            logp = torch.log_softmax(flat[rows].float(), dim=-1)
            self.probs[rows] = logp.exp()
            self.neg_entropy[rows] = (self.probs[rows] * logp).sum(-1)
            ce[rows] = -logp.gather(1, targets[rows]).squeeze(1)
        self.ce = ce.view(self.shape)  # the clean model's own per-position CE

    def ce_and_kl(self, logits: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Per-position next-token CE and KL(P_clean || P_spliced), both [B, S-1] float32."""
        flat = logits[:, :-1].reshape(-1, logits.shape[-1])
        targets = tokens[:, 1:].reshape(-1, 1).to(flat.device)
        ce = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)
        kl = torch.empty_like(ce)
        for i in range(0, flat.shape[0], CHUNK_POSITIONS):
            rows = slice(i, i + CHUNK_POSITIONS)
            z = flat[rows].float()
            lse = z.logsumexp(-1)
            ce[rows] = lse - z.gather(1, targets[rows]).squeeze(1)
            kl[rows] = self.neg_entropy[rows] - ((self.probs[rows] * z).sum(-1) - lse)
        return ce.view(self.shape), kl.clamp_min(0).view(self.shape)


@dataclass
class SiteStats:
    """Statistics of the site activation over the spliced positions of an evaluation set."""

    mean: Tensor  # [d] (the mean-ablation value)
    cov: Tensor  # [d, d] (for covariance-matched random directions)
    mean_norm: float  # mean ||x||
    n_positions: int


@dataclass
class Baseline:
    """Everything about an evaluation set that does not depend on the SAE."""

    ce_clean: float
    ce_ablated: dict[str, float]  # "zero" / "mean" -> CE with the site ablated at the spliced positions
    stats: SiteStats


# lm.model (weakly) -> {(site, tokens digest, keep_bos): {"stats": SiteStats, "clean": float, "zero"/"mean": float}}
_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _entry(lm, site: str, batches: list[Tensor], keep_bos: bool) -> dict:
    tokens = torch.cat([b.reshape(-1) for b in batches]).detach().cpu().contiguous()
    digest = hashlib.sha1(tokens.numpy().tobytes() + str([tuple(b.shape) for b in batches]).encode()).hexdigest()
    return _CACHE.setdefault(lm.model, {}).setdefault((site, digest, keep_bos), {})


@torch.no_grad()
def site_statistics(lm, site: str, batches: list[Tensor], *, keep_bos: bool = False) -> SiteStats:
    """Mean, covariance and mean norm of the site activation (a capture pass that stops at the site); cached."""
    entry = _entry(lm, site, batches, keep_bos)
    if "stats" not in entry:
        n, sum_x, sum_xx, sum_norm = 0, 0.0, 0.0, 0.0
        for tokens in batches:
            x = lm.capture(tokens, [site])[site][splice_mask(lm, tokens, keep_bos)].double().cpu()
            n += x.shape[0]
            sum_x = sum_x + x.sum(0)
            sum_xx = sum_xx + x.T @ x
            sum_norm += float(x.norm(dim=-1).sum())
        if n == 0:
            raise ValueError("evaluation set has no positions to splice (every token is BOS or padding)")
        mean = sum_x / n
        entry["stats"] = SiteStats(mean=mean.float(), cov=(sum_xx / n - torch.outer(mean, mean)).float(),
                                   mean_norm=sum_norm / n, n_positions=n)
    return entry["stats"]


@torch.no_grad()
def ablated_losses(lm, site: str, batches: list[Tensor], kinds: tuple[str, ...] = ("zero", "mean"), *,
                   keep_bos: bool = False, progress=None) -> dict[str, float]:
    """Mean next-token CE with the site zero- or mean-ablated at the spliced positions; cached per kind."""
    entry = _entry(lm, site, batches, keep_bos)
    for kind in kinds:
        if kind not in ("zero", "mean"):
            raise ValueError(f"unknown ablation {kind!r}; use 'zero' or 'mean'")
        if kind in entry:
            continue
        mean = site_statistics(lm, site, batches, keep_bos=keep_bos).mean
        value = torch.zeros_like(mean) if kind == "zero" else mean
        total, count = 0.0, 0
        for tokens in batches:
            edit = replace_at(splice_mask(lm, tokens, keep_bos),
                              lambda a, v=value: v.to(device=a.device, dtype=a.dtype).expand_as(a))
            ce = next_token_ce(lm.forward(tokens, edits={site: edit}), tokens)
            total, count = total + float(ce.double().sum()), count + ce.numel()
            if progress is not None:
                progress.update(1)
        entry[kind] = total / count
    return {kind: entry[kind] for kind in kinds}


@torch.no_grad()
def clean_loss(lm, site: str, batches: list[Tensor], *, keep_bos: bool = False) -> float:
    """Mean next-token CE of the unmodified model on the evaluation set; cached (evaluate_saes records it from the
    clean forward it runs anyway for the KL)."""
    entry = _entry(lm, site, batches, keep_bos)
    if "clean" not in entry:
        ce = torch.cat([next_token_ce(lm.forward(tokens), tokens).flatten() for tokens in batches])
        entry["clean"] = float(ce.double().mean())
    return entry["clean"]


def record_clean_loss(lm, site: str, batches: list[Tensor], keep_bos: bool, value: float) -> None:
    _entry(lm, site, batches, keep_bos).setdefault("clean", value)


def baseline_losses(lm, site: str, batches: list[Tensor], *, keep_bos: bool = False,
                    ablations: tuple[str, ...] = ("zero", "mean"), progress=None) -> Baseline:
    """Clean and ablated CE and the site statistics of an evaluation set, each computed once per (model, site,
    tokens, keep_bos) and reused for every SAE evaluated on it."""
    return Baseline(ce_clean=clean_loss(lm, site, batches, keep_bos=keep_bos),
                    ce_ablated=ablated_losses(lm, site, batches, ablations, keep_bos=keep_bos, progress=progress),
                    stats=site_statistics(lm, site, batches, keep_bos=keep_bos))
