"""Baseline SAE (paper A eqs. 2-4): ReLU encoder, L1 sparsity; or the decoder-norm-weighted L1 (Anthropic, April 2024)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from saeforge.saes.base import (SAE, SAELoss, add_grad, count_fired, decoder_grad, decoder_norm_penalty_grad,
                                encoder_pre_acts, register, relu_backward_, squared_error, with_bias_row,
                                with_ones_column)

SparsityPenalty = Literal["l1", "l1_decoder_norm"]


@register("relu")
class ReluSAE(SAE):
    saelens_architecture = "standard"
    dead_latents = "resample"
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

    def grads_by_hand(self, x, sparsity_coeff, grad, dead_mask, compute_dtype) -> SAELoss:
        """`loss` and its gradients by hand: the five products of a step, and three passes over [batch, d_sae]."""
        if sparsity_coeff is None:
            raise ValueError("ReluSAE needs sparsity_coeff (lambda in paper A eq. 4)")
        cd = compute_dtype
        n, lam = x.shape[0], float(sparsity_coeff)
        x_1 = with_ones_column(x - self.b_dec, cd)
        f = (x_1 @ with_bias_row(self.W_enc, self.b_enc, cd)).relu_()  # eq. 2
        W_dec = self.W_dec.to(cd)
        x_hat = (f @ W_dec).float() + self.b_dec  # eq. 3
        err = x_hat - x
        recon = err.pow(2).sum() / n
        g_1 = with_ones_column(err.mul_(2.0 / n), cd)  # d recon / d x_hat
        # d(lambda * penalty)/df is the same for every token: a bias of the product that gives d f.
        norms = self.W_dec.norm(dim=1) if self.sparsity_penalty == "l1_decoder_norm" else None
        d_penalty = (lam / n) * (norms if norms is not None else torch.ones_like(self.b_enc))
        d_pre = relu_backward_(g_1 @ with_bias_row(self.W_dec.T, d_penalty, cd), f)
        w_dec_grad, f_sums = decoder_grad(f, g_1[:, :-1])
        f_sums = f_sums.float()
        sparsity = (f_sums @ norms if norms is not None else f_sums.sum()) / n
        if norms is not None:
            w_dec_grad = w_dec_grad.float() + decoder_norm_penalty_grad(self.W_dec, f_sums, norms, lam / n)
        w_enc_grad = x_1.T.contiguous() @ d_pre  # [d_in + 1, d_sae]: the last row is b_enc's gradient
        add_grad(self.W_dec, w_dec_grad)
        add_grad(self.W_enc, w_enc_grad[:-1])
        add_grad(self.b_enc, w_enc_grad[-1])
        # b_dec is added at the output and subtracted at the input.
        add_grad(self.b_dec, g_1[:, :-1].float().sum(0) - w_enc_grad[-1].float() @ self.W_enc.T)
        total = recon + lam * sparsity
        return SAELoss(total, recon, sparsity, torch.zeros_like(recon), f, x_hat, fired_counts=count_fired(f))

    def latent_params(self) -> dict[str, int]:
        return {"W_enc": 1, "b_enc": 0, "W_dec": 0}

    def fold_activation_scale(self, c: float) -> None:
        with torch.no_grad():
            self.b_enc.div_(c)
        super().fold_activation_scale(c)
