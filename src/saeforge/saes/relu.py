"""Baseline SAE (paper A eqs. 2-4): ReLU encoder, L1 sparsity; or the decoder-norm-weighted L1 (Anthropic, April 2024)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from saeforge.saes.active import ActiveEntries, goes_sparse
from saeforge.saes.base import (SAE, SAELoss, add_linear_grads, count_fired, decoder_grad,
                                decoder_norm_penalty_grad, encoder_pre_acts, register, relu_backward_, squared_error,
                                with_bias_row, with_ones_column)

SparsityPenalty = Literal["l1", "l1_decoder_norm"]


@register("relu")
class ReluSAE(SAE):
    saelens_architecture = "standard"
    dead_latents = "resample"
    option_names = ("sparsity_penalty",)
    # The sparse step took 0.38x / 0.77x / 1.22x the dense one's time at densities 0.008 / 0.031 / 0.063 (fp32,
    # batch 4096, d_in 640, d_sae 8192, 2 cores with AVX-512).
    sparse_below = 0.04

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
        """`loss` and its gradients by hand: the five products of a step, and three passes over [batch, d_sae]; on
        a sparse batch (`goes_sparse`) everything after the encoder product runs on the active latents."""
        if sparsity_coeff is None:
            raise ValueError("ReluSAE needs sparsity_coeff (lambda in paper A eq. 4)")
        cd = compute_dtype
        n, lam = x.shape[0], float(sparsity_coeff)
        x_1 = with_ones_column(x - self.b_dec, cd)
        pre = x_1 @ with_bias_row(self.W_enc, self.b_enc, cd)
        # d(lambda * penalty)/df is the same for every token.
        norms = self.W_dec.norm(dim=1) if self.sparsity_penalty == "l1_decoder_norm" else None
        d_penalty = (lam / n) * (norms if norms is not None else torch.ones_like(self.b_enc))
        if goes_sparse(pre, 0.0, self.sparse_below):
            return self._grads_on_active(x, x_1.float(), pre, lam, norms, d_penalty)
        f = pre.relu_()  # eq. 2
        W_dec = self.W_dec.to(cd)
        x_hat = (f @ W_dec).float() + self.b_dec  # eq. 3
        err = x_hat - x
        recon = err.pow(2).sum() / n
        g_1 = with_ones_column(err.mul_(2.0 / n), cd)  # d recon / d x_hat
        # The penalty's gradient as a bias of the product that gives d f.
        d_pre = relu_backward_(g_1 @ with_bias_row(self.W_dec.T, d_penalty, cd), f)
        w_dec_grad, f_sums = decoder_grad(f, g_1[:, :-1])
        f_sums = f_sums.float()
        w_enc_grad = x_1.T.contiguous() @ d_pre  # [d_in + 1, d_sae]: the last row is b_enc's gradient
        self._add_grads(w_dec_grad, w_enc_grad[:-1], w_enc_grad[-1], g_1[:, :-1].float().sum(0), f_sums, norms,
                        lam / n)
        sparsity = (f_sums @ norms if norms is not None else f_sums.sum()) / n
        return SAELoss(recon + lam * sparsity, recon, sparsity, torch.zeros_like(recon), f, x_hat,
                       fired_counts=count_fired(f))

    def _grads_on_active(self, x, x_1, pre, lam, norms, d_penalty) -> SAELoss:
        """The same step on the active latents (f > 0) only: decode, d f, and the two gradients from sparse
        products (active.py). The ReLU passes d f on exactly those entries, the penalty's gradient included."""
        n = x.shape[0]
        active, f = ActiveEntries.above(pre, 0.0)
        x_hat = active.decode(f, self.W_dec) + self.b_dec  # eq. 3
        err = x_hat - x
        recon = err.pow(2).sum() / n
        g = err.mul_(2.0 / n)
        d_pre = active.dot_rows(g, self.W_dec) + d_penalty[active.lat]
        enc_grad_t = active.sum_over_tokens(d_pre, x_1)  # [d_sae, d_in + 1]: the last column is b_enc's gradient
        f_sums = active.latent_sums(f)
        self._add_grads(active.sum_over_tokens(f, g), enc_grad_t[:, :-1].T, enc_grad_t[:, -1], g.sum(0), f_sums,
                        norms, lam / n)
        sparsity = (f_sums @ norms if norms is not None else f_sums.sum()) / n
        return SAELoss(recon + lam * sparsity, recon, sparsity, torch.zeros_like(recon), None, x_hat,
                       active=(f, active), d_sae=self.d_sae, fired_counts=active.fired(f))

    def _add_grads(self, w_dec_grad, w_enc_grad, b_enc_grad, g_sum, f_sums, norms, coeff) -> None:
        if norms is not None:
            w_dec_grad = w_dec_grad.float() + decoder_norm_penalty_grad(self.W_dec, f_sums, norms, coeff)
        add_linear_grads(self, w_dec_grad, w_enc_grad, b_enc_grad, g_sum)

    def latent_params(self) -> dict[str, int]:
        return {"W_enc": 1, "b_enc": 0, "W_dec": 0}

    def fold_activation_scale(self, c: float) -> None:
        with torch.no_grad():
            self.b_enc.div_(c)
        super().fold_activation_scale(c)
