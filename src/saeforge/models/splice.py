"""Splicing a replacement into the LM at a site, and scoring the spliced run against the clean one: the edits that
replace the site activation at chosen positions, the clean next-token distribution that every spliced run's CE and
KL are measured against, and `SiteSplice`, one batch of contexts run clean and kept so that replacements can be run
through the rest of the model with gradients (end-to-end SAE training; evaluation splices under no_grad).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .lm import position_chunks
from .sites import SiteError


def spliced_positions(mask: Tensor, act: Tensor, max_norm: float | None) -> Tensor:
    """bool [B, S]: the positions of `mask` whose site activation act [B, S, d] has norm <= max_norm (all of them
    when max_norm is None)."""
    if max_norm is None:
        return mask
    return mask & (act.float().norm(dim=-1) <= max_norm)


def replace_within(mask: Tensor, max_norm: float | None,
                   fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """An LM edit that replaces the activations at `spliced_positions(mask, act, max_norm)` by fn(x [N, d], keep)
    (keep: those positions, bool [B, S]) and keeps the others."""

    def edit(act: Tensor) -> Tensor:
        keep = spliced_positions(mask, act, max_norm)
        out = act.clone()
        out[keep] = fn(act[keep], keep).to(act.dtype)
        return out

    return edit


def replace_at(mask: Tensor, fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """An LM edit that applies fn to the activations [N, d] at the masked positions and keeps the others."""

    def edit(act: Tensor) -> Tensor:
        out = act.clone()
        out[mask] = fn(act[mask]).to(act.dtype)
        return out

    return edit


class CleanDistribution:
    """The clean model's next-token distribution on one batch, kept to score every spliced run against it.

    KL(P || Q) = sum_v p_v log p_v - sum_v p_v log q_v, and with z the spliced logits,
    sum_v p_v log q_v = p . z - logsumexp(z). So per spliced run one logsumexp and one dot product give both its CE
    and its KL (float32, a chunk of positions at a time)."""

    def __init__(self, clean_logits: Tensor, tokens: Tensor) -> None:
        flat = clean_logits[:, :-1].reshape(-1, clean_logits.shape[-1])
        self._fill(lambda rows: flat[rows].float(), flat.shape, flat.device, tokens, tuple(clean_logits.shape[:2]))

    @classmethod
    def from_hidden(cls, lm, hidden: Tensor, tokens: Tensor) -> "CleanDistribution":
        """From the final hidden states [B, S, d_model] (lm.run_to_hidden's): the logits are made a chunk of
        positions at a time and never held whole."""
        flat = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        self = cls.__new__(cls)
        self._fill(lambda rows: lm._logits(flat[rows]), (flat.shape[0], lm.vocab_size), flat.device, tokens,
                   tuple(hidden.shape[:2]))
        return self

    @torch.no_grad()
    def _fill(self, logits_of: Callable[[slice], Tensor], flat_shape: tuple[int, int], device: torch.device,
              tokens: Tensor, batch_shape: tuple[int, int]) -> None:
        n, vocab = flat_shape
        targets = tokens[:, 1:].reshape(-1, 1).to(device)
        self.shape = (batch_shape[0], batch_shape[1] - 1)
        self.probs = torch.empty(n, vocab, dtype=torch.float32, device=device)
        self.neg_entropy = torch.empty(n, dtype=torch.float32, device=device)
        ce = torch.empty_like(self.neg_entropy)
        for rows in position_chunks(n, vocab):
            logp = torch.log_softmax(logits_of(rows), dim=-1)
            self.probs[rows] = logp.exp()
            self.neg_entropy[rows] = (self.probs[rows] * logp).sum(-1)
            ce[rows] = -logp.gather(1, targets[rows]).squeeze(1)
        self.ce = ce.view(self.shape)  # the clean model's own per-position CE

    def kl(self, z: Tensor, rows: slice) -> Tensor:
        """KL(P_clean || softmax(z)) [rows] for spliced logits z [rows, vocab] float32 of the positions `rows`
        (differentiable with respect to z)."""
        return self.neg_entropy[rows] - ((self.probs[rows] * z).sum(-1) - z.logsumexp(-1))

    def ce_and_kl(self, logits: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Per-position next-token CE and KL(P_clean || P_spliced), both [B, S-1] float32."""
        flat = logits[:, :-1].reshape(-1, logits.shape[-1])
        targets = tokens[:, 1:].reshape(-1, 1).to(flat.device)
        ce = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)
        kl = torch.empty_like(ce)
        for rows in position_chunks(flat.shape[0], flat.shape[1]):
            z = flat[rows].float()
            ce[rows] = z.logsumexp(-1) - z.gather(1, targets[rows]).squeeze(1)
            kl[rows] = self.kl(z, rows)
        return ce.view(self.shape), kl.clamp_min(0).view(self.shape)


class SiteSplice:
    """One batch of contexts [B, S] run clean through the LM once, kept so that replacements of the site activation
    can be run through the rest of the model and scored against the clean run (Braun et al. 2024, end-to-end SAEs).

    The spliced positions are `mask`'s whose activation norm is <= max_norm (as in evaluation); `x` [N, d] holds
    the clean activations there, in the model's dtype. Kept: the clean next-token distribution and the residual
    streams after the site (`lm.residual_sites_after`), for the downstream term of e2e+ds."""

    def __init__(self, lm, site: str, tokens: Tensor, mask: Tensor, max_norm: float | None = None):
        self.lm, self.site, self.tokens = lm, site, tokens.to(lm.device)
        self.residual_sites = lm.residual_sites_after(site)
        with torch.no_grad():
            hidden, acts = lm.run_to_hidden(self.tokens, record=[site, *self.residual_sites])
            self.clean = CleanDistribution.from_hidden(lm, hidden, self.tokens)
        self.keep = spliced_positions(mask.to(lm.device), acts[site], max_norm)
        self.x = acts[site][self.keep]
        self.clean_residuals = {s: acts[s] for s in self.residual_sites}

    def run(self, x_hat: Tensor, *, scale: float = 1.0, downstream: bool = False) -> tuple[Tensor, Tensor | None]:
        """Splice x_hat [N, d] in at the kept positions (in units of scale x the raw activation: x_hat / scale goes
        into the model) and run the model on from the site. Returns the mean over predicted positions of
        KL(P_clean || P_spliced), and with downstream=True the downstream error: the squared difference of each later
        residual stream from its clean value, in the same units, averaged over positions, dimensions and streams
        (else None). Both are differentiable with respect to x_hat; the model's weights get no gradient from them
        when they do not require one (a loaded model's do not)."""
        if x_hat.shape != self.x.shape:
            raise ValueError(f"x_hat has shape {tuple(x_hat.shape)}; the batch splices {tuple(self.x.shape)}")
        if downstream and not self.residual_sites:
            raise SiteError(f"site {self.site!r} feeds no later residual stream of {self.lm.name!r}, so there is no "
                            "downstream error to train on; set the downstream coefficient to 0 or train at an "
                            "earlier canonical site")
        replacement = (x_hat / scale).to(self.lm.device)
        record = self.residual_sites if downstream else ()
        hidden, acts = self.lm.run_to_hidden(self.tokens, edits={self.site: replace_at(self.keep, lambda _: replacement)},
                                             record=record)
        flat = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        kl = self.lm.logit_loss(flat, lambda z, rows: self.clean.kl(z, rows).sum()) / flat.shape[0]
        if not downstream:
            return kl, None
        errors = [((acts[s].float() - self.clean_residuals[s].float()) * scale).pow(2).mean() for s in record]
        return kl, torch.stack(errors).mean()
