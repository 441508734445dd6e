"""Shared by the interop tests: inputs at a language model's activation scale (norms 50..6000 around a large common
direction, like Gemma 3 270M's residual stream), SAE weights sized for them, and the comparison."""

from __future__ import annotations

import math

import torch

D_IN, D_SAE = 48, 160


def activations(d_in: int = D_IN, n: int = 400, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mean_dir = torch.randn(d_in, generator=g)
    mean_dir /= mean_dir.norm()
    noise = torch.randn(n, d_in, generator=g)
    noise /= noise.norm(dim=1, keepdim=True)
    u = 0.9 * mean_dir + 0.45 * noise
    u /= u.norm(dim=1, keepdim=True)
    r = torch.exp(torch.empty(n, 1).uniform_(math.log(50.0), math.log(6000.0), generator=g))
    return r * u


def realistic(sae, x: torch.Tensor, seed: int = 0, fire: float = 0.05):
    """Weights that make sense for inputs x: unit decoder rows, b_dec at x's mean, biases and thresholds at
    pre-activation quantiles so that a few percent of the latents fire on each token."""
    g = torch.Generator().manual_seed(seed)
    d_in, d_sae = sae.d_in, sae.d_sae
    with torch.no_grad():
        W_dec = torch.randn(d_sae, d_in, generator=g)
        sae.W_dec.copy_(W_dec / W_dec.norm(dim=1, keepdim=True))
        sae.b_dec.copy_(x.mean(0))
        sae.W_enc.copy_(sae.W_dec.T * (1 + 0.2 * torch.rand(1, d_sae, generator=g)))
        q = torch.quantile(((x - sae.b_dec) @ sae.W_enc)[:2048], 1 - fire, dim=0)  # quantile's input size limit
        if hasattr(sae, "b_enc"):
            sae.b_enc.copy_(-0.5 * q)
        if hasattr(sae, "threshold") and sae.threshold.ndim == 1:
            sae.threshold.copy_(0.5 * q.clamp_min(0) * torch.rand(d_sae, generator=g))
        if hasattr(sae, "b_gate"):
            sae.b_gate.copy_(-q)
            sae.b_mag.copy_(0.3 * q * torch.randn(d_sae, generator=g))
            if isinstance(sae.r_mag, torch.nn.Parameter):
                sae.r_mag.copy_(0.5 * torch.randn(d_sae, generator=g))
            if not sae.tied:
                sae.W_mag.copy_(sae.W_enc * (1 + 0.3 * torch.randn(1, d_sae, generator=g)))
        if hasattr(sae, "threshold") and sae.threshold.ndim == 0:
            sae.threshold.fill_(float(q.median()) * 0.5)
    return sae


def assert_same(f_ref, f, x_ref, x_hat, tol: float = 1e-5, what: str = "") -> None:
    """Features equal to float32 tolerance relative to the largest feature, reconstructions relative to their norm,
    and at least some latents firing (so the comparison means something)."""
    f_ref, f, x_ref, x_hat = (t.detach().double() for t in (f_ref, f, x_ref, x_hat))
    assert f_ref.shape == f.shape, what
    assert (f_ref != 0).any(), f"{what}: nothing fires"
    feat = float((f_ref - f).abs().max() / f_ref.abs().max())
    recon = float(((x_ref - x_hat).norm(dim=-1) / x_ref.norm(dim=-1)).max())
    assert feat <= tol and recon <= tol, f"{what}: features differ by {feat:.3g}, reconstructions by {recon:.3g}"

