"""Splicing into the language model: which positions get replaced, CE and KL from logits, and the clean and ablated
losses of an evaluation set, computed once and cached per (model, site, tokens).

Positions: the SAE replaces the site activation at every token except BOS and padding (the positions it was trained
on; `keep_bos=True` replaces BOS too). Ablations replace the same positions. CE is the mean next-token loss over
every predicted position of the context.
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from saeforge.data import training_mask

# Vocabulary-sized float32 copies are made this many positions at a time, to bound memory on large vocabularies.
_CHUNK_POSITIONS = 256


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


def recorder(store: dict, key: str = "act") -> Callable[[Tensor], Tensor]:
    """An LM edit that changes nothing and keeps a detached copy of the activation."""

    def edit(act: Tensor) -> Tensor:
        store[key] = act.detach()
        return act

    return edit


def next_token_ce(logits: Tensor, tokens: Tensor) -> Tensor:
    """Per-position next-token cross-entropy [B, S-1] in float32 (computed in chunks of positions)."""
    logits = logits[:, :-1]
    targets = tokens[:, 1:]
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_targets = targets.reshape(-1)
    out = torch.empty(flat_targets.shape, dtype=torch.float32, device=logits.device)
    for i in range(0, flat_targets.numel(), _CHUNK_POSITIONS):
        chunk = flat_logits[i : i + _CHUNK_POSITIONS].float()
        out[i : i + _CHUNK_POSITIONS] = torch.nn.functional.cross_entropy(
            chunk, flat_targets[i : i + _CHUNK_POSITIONS], reduction="none"
        )
    return out.view(targets.shape)


def kl_to_clean(logits: Tensor, clean_logits: Tensor) -> Tensor:
    """Per-position KL(P_clean || P_spliced) [B, S-1] over the predicted positions, float32, chunked."""
    a = clean_logits[:, :-1].reshape(-1, clean_logits.shape[-1])
    b = logits[:, :-1].reshape(-1, logits.shape[-1])
    out = torch.empty(a.shape[0], dtype=torch.float32, device=logits.device)
    for i in range(0, a.shape[0], _CHUNK_POSITIONS):
        lp_clean = torch.log_softmax(a[i : i + _CHUNK_POSITIONS].float(), dim=-1)
        lp_spliced = torch.log_softmax(b[i : i + _CHUNK_POSITIONS].float(), dim=-1)
        out[i : i + _CHUNK_POSITIONS] = (lp_clean.exp() * (lp_clean - lp_spliced)).sum(-1)
    return out.view(logits.shape[0], logits.shape[1] - 1)


@dataclass
class Baseline:
    """Everything about an evaluation set that does not depend on the SAE."""

    ce_clean: float
    ce_ablated: dict[str, float]  # "zero" / "mean" -> CE with the site ablated at the spliced positions
    mean_act: Tensor  # [d] mean site activation over the spliced positions (the mean-ablation value)
    cov_act: Tensor  # [d, d] their covariance (for covariance-matched random directions)
    mean_norm: float  # mean ||x|| over the spliced positions
    n_positions: int  # spliced positions (SAE inputs)
    extras: dict = field(default_factory=dict)  # SAE-independent analyses, filled by their owners


# lm.model (weakly) -> {(site, tokens digest, keep_bos, ablations): Baseline}
_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def tokens_digest(tokens: Tensor) -> str:
    return hashlib.sha1(tokens.detach().cpu().contiguous().numpy().tobytes() + str(tuple(tokens.shape)).encode()).hexdigest()


def baseline_losses(lm, site: str, batches: list[Tensor], *, keep_bos: bool = False,
                    ablations: tuple[str, ...] = ("zero", "mean"), progress=None) -> Baseline:
    """Clean and ablated CE of an evaluation set (and the site's activation statistics), computed once per
    (model, site, tokens, keep_bos) and reused for every SAE evaluated on it."""
    key = (site, tokens_digest(torch.cat([b.reshape(-1) for b in batches])), keep_bos, tuple(sorted(ablations)))
    per_model = _CACHE.setdefault(lm.model, {})
    if key in per_model:
        return per_model[key]

    clean_sum, n_pred = 0.0, 0
    n, sum_x, sum_xx, sum_norm = 0, None, None, 0.0
    with torch.no_grad():
        # Pass 1: clean loss and activation statistics, from one forward per batch.
        for tokens in batches:
            store: dict = {}
            logits = lm.forward(tokens, edits={site: recorder(store)})
            ce = next_token_ce(logits, tokens)
            clean_sum += float(ce.double().sum())
            n_pred += ce.numel()
            x = store["act"][splice_mask(lm, tokens, keep_bos)].double().cpu()
            n += x.shape[0]
            sum_x = x.sum(0) if sum_x is None else sum_x + x.sum(0)
            sum_xx = x.T @ x if sum_xx is None else sum_xx + x.T @ x
            sum_norm += float(x.norm(dim=-1).sum())
            if progress is not None:
                progress.update(1)
        if n == 0:
            raise ValueError("evaluation set has no positions to splice (every token is BOS or padding)")
        mean = sum_x / n
        cov = sum_xx / n - torch.outer(mean, mean)
        # Pass 2: ablations need the mean, so they come after pass 1.
        ce_ablated = {}
        for kind in ablations:
            if kind not in ("zero", "mean"):
                raise ValueError(f"unknown ablation {kind!r}; use 'zero' or 'mean'")
            total = 0.0
            for tokens in batches:
                value = torch.zeros_like(mean) if kind == "zero" else mean
                edit = replace_at(splice_mask(lm, tokens, keep_bos),
                                  lambda a, v=value: v.to(device=a.device, dtype=a.dtype).expand_as(a))
                total += float(next_token_ce(lm.forward(tokens, edits={site: edit}), tokens).double().sum())
                if progress is not None:
                    progress.update(1)
            ce_ablated[kind] = total / n_pred
    result = Baseline(ce_clean=clean_sum / n_pred, ce_ablated=ce_ablated, mean_act=mean.float(), cov_act=cov.float(),
                      mean_norm=sum_norm / n, n_positions=n)
    per_model[key] = result
    return result
