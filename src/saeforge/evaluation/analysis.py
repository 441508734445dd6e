"""Paper B's analyses of a dictionary: the feature-splitting proxy (each decoder row's maximum cosine similarity to
the other rows, §4.4 / Fig. 8) and the mean |directional derivative| of the LM loss along decoder directions, against
isotropic and covariance-matched random directions (§2.3 / Fig. 2; the CDF of firing frequencies lives in metrics)."""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def decoder_max_cosine(W_dec: Tensor, chunk: int = 2048) -> Tensor:
    """[M]: for each decoder row, the largest cosine similarity to any OTHER row (computed in row chunks)."""
    D = W_dec.float()
    D = D / D.norm(dim=1, keepdim=True).clamp_min(1e-12)
    M = D.shape[0]
    if M < 2:
        raise ValueError("decoder_max_cosine needs at least two decoder rows")
    out = torch.empty(M, device=D.device)
    for i in range(0, M, chunk):
        sims = D[i : i + chunk] @ D.T
        rows = torch.arange(sims.shape[0], device=D.device)
        sims[rows, rows + i] = -float("inf")
        out[i : i + chunk] = sims.max(dim=1).values
    return out


def isotropic_directions(n: int, d: int, generator: torch.Generator) -> Tensor:
    """n unit vectors uniformly distributed on the sphere in R^d."""
    u = torch.randn(n, d, generator=generator, dtype=torch.float64)
    return (u / u.norm(dim=1, keepdim=True)).float()


def covariance_matched_directions(cov: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """n unit vectors along samples of N(0, cov): random directions with the activations' covariance structure
    (Lee & Heimersheim 2024, as used by paper B)."""
    evals, evecs = torch.linalg.eigh(cov.double())
    root = evecs * evals.clamp_min(0).sqrt()  # cov = root @ root.T
    z = torch.randn(n, cov.shape[0], generator=generator, dtype=torch.float64)
    u = z @ root.T
    return (u / u.norm(dim=1, keepdim=True).clamp_min(1e-30)).float()


class DirectionalDerivatives:
    """Mean |grad . u| over tokens and unit directions u: the first-order change of the LM loss along u.

    grad [tokens, d] are site gradients of the next-token loss (lm.capture(..., grad=True))."""

    def __init__(self, directions: Tensor) -> None:
        self.directions = directions.float()
        self.total = 0.0
        self.count = 0
        self.tokens = 0

    def update(self, grad: Tensor) -> None:
        d = (grad.float() @ self.directions.to(grad.device).T).abs()
        self.total += float(d.double().sum())
        self.count += d.numel()
        self.tokens += grad.shape[0]

    def result(self) -> float:
        return self.total / self.count if self.count else float("nan")
