"""Baseline SAE (paper A eqs. 2-4): ReLU encoder, L1 sparsity; or the decoder-norm-weighted L1 (Anthropic, April 2024)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from saeforge.saes.base import SAE, SAELoss, encoder_pre_acts, register, squared_error

SparsityPenalty = Literal["l1", "l1_decoder_norm"]


@register("relu")
class ReluSAE(SAE):
    saelens_architecture = "standard"
    uses_sparsity_coeff = True
    supports_resampling = True
    option_names = ("sparsity_penalty",)

    def __init__(self, d_in: int, d_sae: int, *, sparsity_penalty: SparsityPenalty = "l1",
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__(d_in, d_sae, dtype=dtype, device=device)
        if sparsity_penalty not in ("l1", "l1_decoder_norm"):
            raise ValueError(f"ReluSAE: unknown sparsity_penalty {sparsity_penalty!r}; use 'l1' or 'l1_decoder_norm'")
        self.sparsity_penalty = sparsity_penalty
        self.W_enc = nn.Parameter(self.W_dec.detach().T.clone())
        self.b_enc = nn.Parameter(torch.zeros(d_sae, dtype=dtype, device=device))

    @property
    def constrain_decoder_norm(self) -> bool:
        # The decoder-norm-weighted penalty replaces the unit-norm constraint (the norm is in the loss instead).
        return self.sparsity_penalty == "l1"

    def encode(self, x: Tensor, grad: Tensor | None = None) -> Tensor:
        self.check_input(x)
        return torch.relu(encoder_pre_acts(x, self.W_enc, self.b_enc, self.b_dec))  # eq. 2

    def loss(self, x, sparsity_coeff=None, grad=None, dead_mask=None) -> SAELoss:
        if sparsity_coeff is None:
            raise ValueError("ReluSAE.loss needs sparsity_coeff (lambda in paper A eq. 4)")
        f = self.encode(x)
        x_hat = self.decode(f)
        recon = squared_error(x, x_hat)
        if self.sparsity_penalty == "l1":
            sparsity = f.float().sum(-1).mean()  # ||f||_1; f >= 0
        else:
            sparsity = (f.float() * self.W_dec.float().norm(dim=1)).sum(-1).mean()
        total = recon + sparsity_coeff * sparsity  # eq. 4
        return SAELoss(total, recon, sparsity, torch.zeros_like(recon), f, x_hat)

    def latent_params(self) -> dict[str, int]:
        return {"W_enc": 1, "b_enc": 0, "W_dec": 0}

    def fold_activation_scale(self, c: float) -> None:
        with torch.no_grad():
            self.b_enc.div_(c)
        super().fold_activation_scale(c)
