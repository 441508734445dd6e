"""Inference-time optimisation (paper A, Appendix A): ignore the encoder and find a k-sparse, non-negative code for
the SAE's own decoder by gradient pursuit."""

from __future__ import annotations

import torch
from torch import Tensor, nn


@torch.no_grad()
def gradient_pursuit(y: Tensor, W_dec: Tensor, k: int) -> Tensor:
    """Approximately solve min_a ||y - W_dec^T a||^2 with ||a||_0 <= k and a >= 0.

    y [N, d] (already centred: x - b_dec), W_dec [M, d]. k iterations of (METHODS.md, "ITO"):
      r = y - W_dec^T a;  add argmax(W_dec r) to the support;  g = (W_dec r) on the support;
      c = W_dec^T g;  step = (c . r) / (c . c);  a = clip(a + step * g, 0)
    Returns a [N, M]."""
    if k < 1:
        raise ValueError(f"gradient pursuit needs k >= 1, got {k}")
    y = y.float()
    D = W_dec.float()
    a = torch.zeros(y.shape[0], D.shape[0], dtype=y.dtype, device=y.device)
    support = torch.zeros_like(a, dtype=torch.bool)
    residual = y.clone()
    for _ in range(k):
        corr = residual @ D.T  # D r, [N, M]
        support.scatter_(1, corr.argmax(dim=1, keepdim=True), True)
        g = torch.where(support, corr, torch.zeros_like(corr))
        c = g @ D  # D^T g, [N, d]
        cc = (c * c).sum(-1)
        step = torch.where(cc > 0, (c * residual).sum(-1) / cc.clamp_min(1e-30), torch.zeros_like(cc))
        a = (a + step[:, None] * g).clamp_min(0.0)
        residual = y - a @ D
    return a


class GradientPursuitSAE(nn.Module):
    """An SAE's decoder with gradient pursuit as its encoder: evaluated like any SAE, at L0 <= k."""

    needs_grad = False

    def __init__(self, sae, k: int) -> None:
        super().__init__()
        self.sae, self.k = sae, int(k)
        self.d_in, self.d_sae = sae.d_in, sae.d_sae
        self.architecture = f"ito:{sae.architecture}"
        self.meta = sae.meta

    @property
    def W_dec(self) -> Tensor:
        return self.sae.W_dec

    @property
    def b_dec(self) -> Tensor:
        return self.sae.b_dec

    def encode(self, x: Tensor, grad: Tensor | None = None) -> Tensor:
        return gradient_pursuit(x - self.b_dec, self.W_dec, self.k)

    def decode(self, f: Tensor) -> Tensor:
        return self.sae.decode(f)

    def forward(self, x: Tensor, grad: Tensor | None = None) -> Tensor:
        return self.decode(self.encode(x))
