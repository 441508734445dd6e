"""The PCA reference (METHODS.md, "Metrics"): the rank-k reconstruction of the site activation,

    x_hat = mu + U_k U_k^T (x - mu),

with mu the mean and U_k the top-k eigenvectors of the site covariance, spliced in at the same positions as an SAE.
It is the yardstick for an SAE at L0 = k: an SAE that needs k latents per token to lose more than the best rank-k
linear reconstruction is suspect.

The principal directions are fitted on the positions an SAE would replace (all but BOS/padding, and without the
norm outliers above the SAE's max_input_norm) of either a sample of the training split (`evaluate(...,
pca_fit_contexts=...)`, what `saeforge eval` and `sweep` do) or, when none is given, the evaluation set itself
(then the reference is slightly optimistic: it has seen the held-out activations). Each reference row says which.
The rows are computed once per evaluation set, fit set and threshold, and cached with the ablations (splice.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saeforge.evaluation.splice import SiteStats


@dataclass
class PrincipalSubspace:
    """mean [d] and covariance eigenvectors [d, d] (columns, largest variance first) of a site's activations."""

    mean: Tensor
    directions: Tensor
    variances: Tensor  # [d], descending
    fitted_on: str  # a description of the activations they come from

    @classmethod
    def from_stats(cls, stats: SiteStats, fitted_on: str) -> "PrincipalSubspace":
        variances, vectors = torch.linalg.eigh(stats.cov.double())  # ascending
        return cls(mean=stats.mean.float(), directions=vectors.flip(1).float(),
                   variances=variances.flip(0).clamp_min(0), fitted_on=fitted_on)

    def explained_variance(self, rank: int) -> float:
        """Fraction of the fit set's total variance the top `rank` directions carry."""
        total = float(self.variances.sum())
        return float(self.variances[:rank].sum()) / total if total > 0 else float("nan")

    def reconstruction(self, rank: int):
        """x [N, d] -> mu + U_k U_k^T (x - mu), in x's dtype (float32 when x is lower precision)."""
        if not 1 <= rank <= self.directions.shape[0]:
            raise ValueError(f"PCA rank must lie in [1, {self.directions.shape[0]}], got {rank}")
        basis = self.directions[:, :rank]

        def reconstruct(x: Tensor) -> Tensor:
            x32 = x.float()
            U, mu = basis.to(x32.device), self.mean.to(x32.device)
            return mu + ((x32 - mu) @ U) @ U.T

        return reconstruct
