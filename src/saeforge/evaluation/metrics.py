"""Streaming metric accumulators (METHODS.md, "Metrics"). Pure tensor code: no language model here.

Every accumulator takes any number of batches through `update` and reports dataset-level values, so a metric
defined as a ratio of expectations (gamma, FVU) is a ratio of sums over the whole evaluation set, never a mean of
per-batch ratios. Sums are kept in float64.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

# log10 firing-frequency bins shared by every SAE, so histograms of different SAEs line up.
LOG10_FREQ_EDGES = [round(-7.0 + 0.1 * i, 1) for i in range(71)]
# Max-cosine-similarity bins for the decoder feature-splitting proxy (paper B Fig. 8).
COSINE_EDGES = [round(-1.0 + 0.02 * i, 2) for i in range(101)]


class ReconstructionStats:
    """NMSE, FVU, cosine similarity and the relative reconstruction bias gamma of x_hat against x.

    x, x_hat: [tokens, d]. Definitions:
      NMSE   = mean over tokens of ||x - x_hat|| / ||x||                           (paper B)
      FVU    = E||x - x_hat||^2 / E||x - E x||^2
      cosine = mean over tokens of cos(x, x_hat)
      gamma  = E||x_hat||^2 / E[x_hat . x]    (paper A eq. 9, corrected in the authors' thread; not eq. 10)
      gamma_centered = the same with x and x_hat taken about `center` (the SAE's b_dec), when one is given: where
             b_dec carries most of the norm (a residual stream with a large mean), gamma is pinned near 1 for any
             SAE, and this shows the shrinkage of the part the latents reconstruct.
    """

    def __init__(self) -> None:
        self.n = 0
        self.sum_sq_err = 0.0
        self.sum_sq_x = 0.0
        self.sum_x: Tensor | None = None
        self.sum_nmse = 0.0
        self.sum_cos = 0.0
        self.sum_sq_xhat = 0.0
        self.sum_xhat_dot_x = 0.0
        self.sum_sq_xhat_c = 0.0
        self.sum_xhat_dot_x_c = 0.0

    def update(self, x: Tensor, x_hat: Tensor, center: Tensor | None = None) -> None:
        if x.shape != x_hat.shape or x.ndim != 2:
            raise ValueError(f"x and x_hat must both be [tokens, d]; got {tuple(x.shape)} and {tuple(x_hat.shape)}")
        x, x_hat = x.double(), x_hat.double()
        err = (x - x_hat).pow(2).sum(-1)
        x_norm = x.norm(dim=-1)
        self.n += x.shape[0]
        self.sum_sq_err += float(err.sum())
        self.sum_sq_x += float(x.pow(2).sum())
        self.sum_x = x.sum(0) if self.sum_x is None else self.sum_x + x.sum(0)
        self.sum_nmse += float((err.sqrt() / x_norm.clamp_min(1e-12)).sum())
        self.sum_cos += float(torch.nn.functional.cosine_similarity(x, x_hat, dim=-1, eps=1e-12).sum())
        self.sum_sq_xhat += float(x_hat.pow(2).sum())
        self.sum_xhat_dot_x += float((x_hat * x).sum())
        if center is not None:
            c = center.double().to(x.device)
            self.sum_sq_xhat_c += float((x_hat - c).pow(2).sum())
            self.sum_xhat_dot_x_c += float(((x_hat - c) * (x - c)).sum())

    def result(self) -> dict[str, float]:
        if self.n == 0:
            raise ValueError("ReconstructionStats: no tokens were fed")
        mean_x = self.sum_x / self.n
        # E||x - E x||^2 = E||x||^2 - ||E x||^2
        variance = self.sum_sq_x / self.n - float(mean_x.pow(2).sum())
        return {
            "mse": self.sum_sq_err / self.n,
            "nmse": self.sum_nmse / self.n,
            "fvu": (self.sum_sq_err / self.n) / variance if variance > 0 else math.nan,
            "cosine": self.sum_cos / self.n,
            "gamma": self.sum_sq_xhat / self.sum_xhat_dot_x if self.sum_xhat_dot_x != 0 else math.nan,
            "gamma_centered": (self.sum_sq_xhat_c / self.sum_xhat_dot_x_c if self.sum_xhat_dot_x_c != 0
                               else math.nan),
        }


class FiringStats:
    """L0 and per-latent firing counts of feature activations f [tokens, d_sae]."""

    def __init__(self, d_sae: int) -> None:
        self.n = 0
        self.counts = torch.zeros(d_sae, dtype=torch.float64)
        self.sum_l0 = 0.0

    def update(self, f: Tensor) -> None:
        if f.ndim != 2 or f.shape[1] != self.counts.numel():
            raise ValueError(f"f must be [tokens, {self.counts.numel()}], got {tuple(f.shape)}")
        active = f != 0
        self.n += f.shape[0]
        self.counts += active.sum(0).to(device="cpu", dtype=torch.float64)
        self.sum_l0 += float(active.sum())

    def frequencies(self) -> Tensor:
        """Fraction of tokens each latent fires on."""
        if self.n == 0:
            raise ValueError("FiringStats: no tokens were fed")
        return self.counts / self.n

    def result(self, dense_threshold: float = 0.1) -> dict:
        freq = self.frequencies()
        return {
            "l0": self.sum_l0 / self.n,
            "dead_fraction": float((freq == 0).double().mean()),  # never fires on the evaluation tokens
            "dense_fraction": float((freq > dense_threshold).double().mean()),
            "dense_threshold": dense_threshold,
            "firing_log10_hist": log10_frequency_histogram(freq),
        }


def log10_frequency_histogram(freq: Tensor) -> dict:
    """Histogram of log10(firing frequency) over live latents on LOG10_FREQ_EDGES, the dead count apart, and the
    CDF over all latents (dead ones at -inf) at each edge."""
    freq = freq.double().cpu()
    alive = freq > 0
    logf = freq[alive].log10().clamp(LOG10_FREQ_EDGES[0], LOG10_FREQ_EDGES[-1])
    counts = torch.histogram(logf, bins=torch.tensor(LOG10_FREQ_EDGES, dtype=torch.float64)).hist
    log_all = torch.where(alive, freq.clamp_min(1e-300).log10(), torch.full_like(freq, -math.inf))
    cdf = [float((log_all <= e).double().mean()) for e in LOG10_FREQ_EDGES]
    return {
        "edges": LOG10_FREQ_EDGES,
        "counts": [int(c) for c in counts],
        "dead": int((~alive).sum()),
        "cdf": cdf,
        "median_log10_freq": float(log_all.median()) if freq.numel() else math.nan,
    }


def histogram(values: Tensor, edges: list[float]) -> dict:
    """Counts of `values` on fixed edges (values outside are clipped into the end bins)."""
    v = values.double().cpu().clamp(edges[0], edges[-1])
    counts = torch.histogram(v, bins=torch.tensor(edges, dtype=torch.float64)).hist
    return {"edges": edges, "counts": [int(c) for c in counts]}


class LossStats:
    """Mean next-token CE of the spliced model and its KL divergence from the clean model, over positions, and the
    same per context (the unit the bootstrap resamples; see bootstrap.py).

    `update` takes [contexts, predicted positions] tensors; every context of an evaluation set has the same number
    of predicted positions, so the mean of the per-context means is the mean over positions."""

    def __init__(self) -> None:
        self.n = 0
        self.sum_ce = 0.0
        self.sum_kl = 0.0
        self.context_ce: list[float] = []
        self.context_kl: list[float] = []

    def update(self, ce: Tensor, kl: Tensor | None = None) -> None:
        if ce.ndim != 2:
            raise ValueError(f"ce must be [contexts, positions], got {tuple(ce.shape)}")
        ce = ce.double()
        self.n += ce.numel()
        self.sum_ce += float(ce.sum())
        self.context_ce += ce.mean(1).tolist()
        if kl is not None:
            kl = kl.double().reshape(ce.shape)
            self.sum_kl += float(kl.sum())
            self.context_kl += kl.mean(1).tolist()

    @property
    def ce(self) -> float:
        return self.sum_ce / self.n

    @property
    def kl(self) -> float:
        return self.sum_kl / self.n


def is_finite_number(value) -> bool:
    """A finite int or float (result rows hold None or NaN where a metric does not exist)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def finite_ci(row: dict, key: str):
    """The row's (lo, hi) interval for `key` when it has one with finite ends, else None."""
    ci = row.get(f"{key}_ci")
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(map(is_finite_number, ci)):
        return ci[0], ci[1]
    return None


def loss_recovered(ce_clean, ce_spliced, ce_ablated):
    """(CE_ablated - CE_spliced) / (CE_ablated - CE_clean): 1 = as good as the clean model, 0 = as bad as ablation.
    Floats give a float, numpy arrays (bootstrap resamples) an array; NaN where the ablation changes nothing."""
    denom = np.asarray(ce_ablated - ce_clean, dtype=np.float64)
    ratio = np.divide(ce_ablated - ce_spliced, denom, out=np.full(denom.shape, np.nan), where=denom != 0)
    return float(ratio) if ratio.ndim == 0 else ratio


def loss_added(ce_clean, ce_spliced):
    """Paper B's L_added = (L(x_hat) - L(x)) / L(x) (floats, or numpy arrays of bootstrap resamples)."""
    return (ce_spliced - ce_clean) / ce_clean
