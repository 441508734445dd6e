"""Dead latents: firing trackers, and resampling for ReLU and Gated SAEs (METHODS.md, after Anthropic 2023).

Resampling: latents that did not fire in the window are dead. Compute each input's reconstruction loss on a sample
of fresh inputs; draw inputs with probability proportional to loss^p (Anthropic: p = 2; train.resample_loss_power);
each dead latent gets one drawn input's CENTRED direction x - b_dec as its new decoder row (normalised) and, scaled
by 0.2 x the mean live encoder norm, as its encoder row; its biases become 0 (`SAE.resample_latents`), and the Adam
moments of its rows are reset. On a residual stream with a large mean the raw x is nearly the mean direction
(median cosine 0.986 on Gemma 3 270M), so raw inputs would make every new row a copy of the mean (METHODS.md).
The effective sample size of the draw weights, (sum w)^2 / sum w^2, is returned so that a collapse onto a few
inputs shows in the log. The learning-rate drop that paper A adds after each resample lives in
`schedules.LRSchedule`.
"""

from __future__ import annotations

import torch

from saeforge.training.optim import ConstrainedAdam


class FiringTracker:
    """Per-latent firing counts and the token count at which each latent last fired.

    Both are sums / maxima over tokens, so under data parallelism they reduce across ranks (counts: sum;
    last_fired: max) without changing meaning.
    """

    def __init__(self, d_sae: int, device: torch.device):
        self.counts = torch.zeros(d_sae, dtype=torch.int64, device=device)
        self.last_fired = torch.zeros(d_sae, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, fired: torch.Tensor, n_tokens: int, tokens_after: int) -> torch.Tensor:
        """Record a batch's per-latent firing counts [d_sae] (SAELoss.fired()) over n_tokens tokens; returns the
        batch's L0 (a 0-dim tensor)."""
        self.counts += fired
        self.last_fired.masked_fill_(fired > 0, tokens_after)
        return fired.sum() / n_tokens

    def dead_mask(self, tokens: int, window_tokens: int, *, strict: bool = True) -> torch.Tensor:
        """Latents with no firing in the last `window_tokens` tokens. Not strict: when fewer tokens than the window
        have been seen, "never fired so far" counts as dead (for reporting)."""
        window = window_tokens if strict else min(window_tokens, max(tokens, 1))
        return (tokens - self.last_fired) >= window

    def revive(self, idx: torch.Tensor, tokens: int) -> None:
        """Resampled latents start a fresh window."""
        self.last_fired[idx] = tokens

    def state_dict(self) -> dict:
        return {"counts": self.counts, "last_fired": self.last_fired}

    def load_state_dict(self, state: dict) -> None:
        self.counts.copy_(state["counts"])
        self.last_fired.copy_(state["last_fired"])


@torch.no_grad()
def per_token_loss(sae, inputs: torch.Tensor, chunk: int) -> torch.Tensor:
    """||x - x_hat||^2 for every input row, in chunks (float32)."""
    out = []
    for start in range(0, inputs.shape[0], chunk):
        x = inputs[start : start + chunk]
        out.append((x.float() - sae(x).float()).pow(2).sum(-1))
    return torch.cat(out)


@torch.no_grad()
def resample_dead_latents(
    sae,
    optimizer: ConstrainedAdam,
    dead: torch.Tensor,
    inputs: torch.Tensor,
    generator: torch.Generator,
    *,
    chunk: int = 4096,
    loss_power: float = 2.0,
) -> tuple[torch.Tensor, float]:
    """Resample the latents where `dead` [d_sae] is True from `inputs` [n, d_in]; returns their indices and the
    effective sample size of the draw weights (nan when nothing was resampled). The two halves, drawing and applying,
    are also used apart: under data parallelism rank 0 draws and every rank applies (sae_run.SAERun.resample_now)."""
    idx = dead.nonzero().squeeze(1)
    if idx.numel() == 0 or inputs.shape[0] == 0:
        return idx[:0], float("nan")
    drawn, ess = draw_resample_inputs(sae, idx.numel(), inputs, generator, chunk=chunk, loss_power=loss_power)
    apply_resample(sae, optimizer, idx, inputs[drawn.to(inputs.device)])
    return idx, ess


@torch.no_grad()
def draw_resample_inputs(sae, n: int, inputs: torch.Tensor, generator: torch.Generator, *, chunk: int,
                         loss_power: float) -> tuple[torch.Tensor, float]:
    """Draw n rows of `inputs` with probability ~ loss^p; returns their indices (int64, CPU) and the effective sample
    size of the draw weights."""
    weights = per_token_loss(sae, inputs, chunk).double().cpu().pow(loss_power)  # probability ~ loss^p
    if not torch.isfinite(weights).all() or weights.sum() <= 0:
        weights = torch.ones_like(weights)  # a perfect (or broken) reconstruction: draw uniformly
    ess = effective_sample_size(weights)
    replacement = n > int((weights > 0).sum())
    return torch.multinomial(weights, n, replacement=replacement, generator=generator), ess


@torch.no_grad()
def apply_resample(sae, optimizer: ConstrainedAdam, idx: torch.Tensor, chosen: torch.Tensor) -> None:
    """Give latents `idx` the drawn inputs `chosen` [len(idx), d_in] (their centred directions) and reset their
    Adam moments."""
    sae.resample_latents(idx, chosen - sae.b_dec.detach().to(chosen.dtype))  # the centred direction x - b_dec
    params = dict(sae.named_parameters())
    for name, dim in sae.latent_params().items():
        if name in params:
            optimizer.reset_rows(params[name], idx, dim)


def effective_sample_size(weights: torch.Tensor) -> float:
    """Kish's effective sample size (sum w)^2 / sum w^2 of non-negative weights: n for equal weights, 1 when one
    weight holds everything."""
    weights = weights.double()
    return float(weights.sum() ** 2 / weights.pow(2).sum())
