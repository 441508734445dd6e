"""JumpReLU SAE (inference), and the exact conversion from a tied Gated SAE (METHODS.md).

    f = pi * 1[pi > threshold],  pi = W_enc (x - b_dec) + b_enc
From Gated: W_enc = diag(exp(r_mag)) W_gate, b_enc = b_mag, threshold = max(b_mag - exp(r_mag) * b_gate, 0).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from saeforge.saes.base import SAE, SAELoss, encoder_pre_acts, register, squared_error


@register("jumprelu")
class JumpReLUSAE(SAE):
    saelens_architecture = "jumprelu"
    trainable = False
    made_by = "train a gated SAE and convert it with JumpReLUSAE.from_gated"
    sparsity = "none"

    def __init__(self, d_in: int, d_sae: int, *, dtype: torch.dtype = torch.float32, device=None):
        super().__init__(d_in, d_sae, dtype=dtype, device=device)
        self.W_enc = nn.Parameter(self.W_dec.detach().T.clone())
        self.b_enc = nn.Parameter(torch.zeros(d_sae, dtype=dtype, device=device))
        self.threshold = nn.Parameter(torch.zeros(d_sae, dtype=dtype, device=device))

    @classmethod
    def from_gated(cls, gated: SAE) -> "JumpReLUSAE":
        if gated.architecture != "gated":
            raise ValueError(f"from_gated needs a gated SAE, got {gated.architecture!r}")
        if not gated.tied:
            raise ValueError("from_gated needs tied weights (tied=True): an untied Gated SAE is not a JumpReLU")
        W_gate, b_gate, r_mag, b_mag = gated.W_enc, gated.b_gate, gated.r_mag, gated.b_mag
        sae = cls(gated.d_in, gated.d_sae, dtype=W_gate.dtype, device=W_gate.device)
        with torch.no_grad():
            scale = torch.exp(r_mag)
            sae.W_enc.copy_(W_gate * scale)  # columns of W_enc are rows of W_gate
            sae.b_enc.copy_(b_mag)
            sae.threshold.copy_(torch.clamp(b_mag - scale * b_gate, min=0))
            sae.W_dec.copy_(gated.W_dec)
            sae.b_dec.copy_(gated.b_dec)
        sae.cfg = dict(gated.cfg)
        return sae

    def encode(self, x: Tensor, grad: Tensor | None = None) -> Tensor:
        self.check_input(x)
        pi = encoder_pre_acts(x, self.W_enc, self.b_enc, self.b_dec)
        return pi * (pi > self.threshold).to(pi.dtype)

    def loss(self, x, sparsity_coeff=None, grad=None, dead_mask=None) -> SAELoss:
        """Inference architecture: reconstruction only; `sparsity` reports L0 (not differentiable)."""
        f = self.encode(x)
        x_hat = self.decode(f)
        recon = squared_error(x, x_hat)
        l0 = (f != 0).float().sum(-1).mean()
        return SAELoss(recon, recon, l0, torch.zeros_like(recon), f, x_hat)

    def latent_params(self) -> dict[str, int]:
        return {"W_enc": 1, "b_enc": 0, "threshold": 0, "W_dec": 0}

    def fold_activation_scale(self, c: float) -> None:
        with torch.no_grad():
            self.b_enc.div_(c)
            self.threshold.div_(c)
        super().fold_activation_scale(c)
