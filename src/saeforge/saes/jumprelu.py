"""JumpReLU SAE: trained directly (Rajamanoharan et al. 2024, "Jumping Ahead", arXiv:2407.14435), or converted
exactly from a tied Gated SAE (METHODS.md).

    pi = W_enc (x - b_dec) + b_enc
    f  = JumpReLU_theta(pi) = pi * H(pi - theta)             (a threshold theta per latent)
    L  = ||x - x_hat(f)||^2 + lambda * ||f||_0,   ||f||_0 = sum_i H(pi_i - theta_i)   (an L0 penalty, not an L1)

H has no useful derivative, so theta learns through the paper's pseudo-derivatives (straight-through estimators),
with K a kernel of bandwidth eps; here K is the paper's rectangle, K(u) = 1[-1/2 < u < 1/2]:

    d/dtheta JumpReLU_theta(pi) := -(theta / eps) K((pi - theta) / eps)                                  (eq. 11)
    d/dtheta H(pi - theta)      := -(1 / eps) K((pi - theta) / eps)                                      (eq. 12)

and pi gets only its ordinary derivative: H(pi - theta) through the first factor of JumpReLU, none through H (the
paper's pseudo-code: "we don't apply STE to x input"). So the L0 penalty reaches theta alone, and lambda sets where
each threshold settles: a latent keeps the tokens at its threshold when their reconstruction benefit (to first order
-theta * dL/df) exceeds lambda.

A threshold at or below 0 acts as 0: f = pi * H(pi - max(theta, 0)), i.e. a ReLU. That is the function the paper's
pseudo-code computes (it applies a ReLU to the pre-activations before the JumpReLU), and the one SAELens, Gemma
Scope and dictionary_learning compute for any threshold; the pseudo-derivatives are taken at max(theta, 0) and
passed to theta unchanged. For theta >= 0, which every trained or converted SAE has but for at most one optimizer
step's dip, it is the paper's JumpReLU exactly.

An L0 target (sae.target_l0) steers lambda as for the L1 architectures (training/l0_target.py moves log lambda
against log L0; L0 falls as lambda rises here too). Two differences show: L0 falls only as fast as the thresholds
rise, about lr per step, so it lags lambda and a short run overshoots (on the synthetic stream, 2000 steps at lr 1e-2
reach a target within 10%, 600 steps undershoot by 20-25%); and since the thresholds screen out noise even at
lambda = 0, a target above the L0 that reconstruction itself wants is not reached (lambda falls towards 0).

From Gated: W_enc = diag(exp(r_mag)) W_gate, b_enc = b_mag, threshold = max(b_mag - exp(r_mag) * b_gate, 0).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from saeforge.saes.active import ActiveEntries, goes_sparse
from saeforge.saes.base import (SAE, SAELoss, add_grad, add_linear_grads, count_fired, decoder_grad,
                                encoder_pre_acts, register, relu_backward_, squared_error, with_bias_row,
                                with_ones_column)

# The paper's initial threshold and bandwidth (its training details: theta = eps = 0.001), in its units: activations
# scaled to a mean squared norm of 1. saeforge trains on activations scaled to E||c (x - mu)||^2 = d_in (METHODS.md,
# "Activation scale"), sqrt(d_in) times larger, so both are 0.001 * sqrt(d_in) here: the same fraction of the
# pre-activations' spread (about 0.05 of it at Gemma 2's widths) as in the paper.
PAPER_VALUE = 1e-3


def paper_scale(d_in: int) -> float:
    """The paper's 0.001 in saeforge's units (see PAPER_VALUE): 0.001 * sqrt(d_in)."""
    return PAPER_VALUE * math.sqrt(d_in)


def _positive(theta: Tensor) -> Tensor:
    """max(theta, 0): the threshold the function uses (a threshold at or below 0 is a ReLU)."""
    return theta.clamp(min=0)


def _window(pi: Tensor, theta: Tensor, eps: float) -> Tensor:
    """K((pi - theta) / eps) for the rectangle kernel, as a bool mask: |pi - theta| < eps / 2 (theta >= 0)."""
    return (pi - theta).abs_() < 0.5 * eps


def _token_sum(a: Tensor) -> Tensor:
    """Sum over every leading (token) dimension of [..., d_sae], in float32."""
    return a.reshape(-1, a.shape[-1]).sum(0, dtype=torch.float32)


class _JumpReLU(torch.autograd.Function):
    """f = pi * H(pi - theta+); d f/d pi = H(pi - theta+); d f/d theta := -(theta+ / eps) K((pi - theta+) / eps)
    (eq. 11), theta+ = max(theta, 0)."""

    @staticmethod
    def forward(ctx, pi: Tensor, theta: Tensor, eps: float) -> Tensor:
        theta_pos = _positive(theta)
        ctx.save_for_backward(pi, theta_pos)
        ctx.eps, ctx.theta_dtype = eps, theta.dtype
        return pi * (pi > theta_pos).to(pi.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        pi, theta_pos = ctx.saved_tensors
        d_pi = g * (pi > theta_pos).to(g.dtype)
        in_window = _token_sum(g * _window(pi, theta_pos, ctx.eps).to(g.dtype))
        d_theta = (-(theta_pos.float() / ctx.eps) * in_window).to(ctx.theta_dtype)
        return d_pi, d_theta, None


class _Step(torch.autograd.Function):
    """H(pi - theta+) as float32 (exact counts); no derivative to pi; d H/d theta := -(1 / eps) K((pi - theta+) / eps)
    (eq. 12)."""

    @staticmethod
    def forward(ctx, pi: Tensor, theta: Tensor, eps: float) -> Tensor:
        theta_pos = _positive(theta)
        ctx.save_for_backward(pi, theta_pos)
        ctx.eps, ctx.theta_dtype = eps, theta.dtype
        return (pi > theta_pos).float()

    @staticmethod
    def backward(ctx, g: Tensor):
        pi, theta_pos = ctx.saved_tensors
        in_window = _token_sum(g.float() * _window(pi, theta_pos, ctx.eps).float())
        return None, (-in_window / ctx.eps).to(ctx.theta_dtype), None


@register("jumprelu")
class JumpReLUSAE(SAE):
    saelens_architecture = "jumprelu"
    sparsity = "coefficient"  # lambda of the L0 penalty; a target L0 steers it like any other lambda
    # The paper (like paper A) trains with Adam betas (0, 0.999), unit-norm decoder rows (constrained Adam) and no
    # resampling of dead latents. An L0 penalty cannot be lowered by shrinking f against a growing decoder, but the
    # constraint fixes the scale of f, and so the units of theta and of the bandwidth.
    adam_betas = (0.0, 0.999)
    dead_latents = "none"
    constrain_decoder_norm = True
    # As ReLU's: the same products on the entries that fire or lie in the window (0.68x / 0.75x / 1.14x the dense
    # step's time at densities 0.008 / 0.031 / 0.063 measured on a loaded machine).
    sparse_below = 0.04
    option_names = ("bandwidth",)

    def __init__(self, d_in: int, d_sae: int, *, bandwidth: float | None = None, dtype: torch.dtype = torch.float32,
                 device=None):
        super().__init__(d_in, d_sae, dtype=dtype, device=device)
        if bandwidth is not None and (isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float))
                                      or not (math.isfinite(bandwidth) and bandwidth > 0)):
            raise ValueError(f"JumpReLUSAE: bandwidth must be a positive number (or None: the paper's 0.001 in "
                             f"saeforge's units, 0.001 * sqrt(d_in)), got {bandwidth!r}")
        # eps, in the units of the pre-activations the SAE is trained on (folding the activation scale into a
        # saved SAE does not change it: it matters for training only).
        self.bandwidth = None if bandwidth is None else float(bandwidth)
        # The paper's initialisation: W_enc = W_dec^T (the base's unit-norm rows), b_enc = 0, theta = 0.001.
        self.W_enc = nn.Parameter(self.W_dec.detach().T.clone())
        self.b_enc = nn.Parameter(torch.zeros(d_sae, dtype=dtype, device=device))
        # theta itself is the parameter, not log theta (the paper's pseudo-code trains log theta). Adam moves a
        # parameter by about lr per step: on log theta that is a relative change of lr, so from the paper's
        # initial 0.001 a threshold needs ln(theta_final / theta_0) / lr steps (about 5 / lr) to reach the level
        # that separates features from noise, where theta needs theta_final / lr (about 1 / lr here). Measured on
        # the synthetic stream (d_in 32, 12 features per token, target L0 8, lambda steered by the L0 controller):
        # at lr 3e-3, after 600 steps log theta left L0 at 50 (lambda wound up to 5e3) where theta reached 6.2;
        # after 2000, log theta overshot to 4.3 (lambda 7e3) where theta gave 7.0. It is the "L0 does not fall
        # for the first ~1B tokens" reported with log-threshold trainers (dictionary_learning trains theta too).
        # theta is also what SAELens and Gemma Scope store, so saving, export and from_gated (whose thresholds
        # may be exactly 0, which a log cannot hold) copy it, and a resumed run continues it bit for bit.
        # Positivity, log theta's other purpose, is kept by the function itself (max(theta, 0), module doc).
        # float32 whatever the dtype of the other parameters (and the compute dtype): in bfloat16 an update of
        # lr = 3e-4 to a threshold near 1 rounds away (spacing 2^-7), so the threshold stops learning.
        self.threshold = nn.Parameter(torch.full((d_sae,), paper_scale(d_in), dtype=_theta_dtype(dtype),
                                                 device=device))

    @property
    def epsilon(self) -> float:
        """The kernel bandwidth in use: the option, or the paper's 0.001 in saeforge's units."""
        return self.bandwidth if self.bandwidth is not None else paper_scale(self.d_in)

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
        sae.meta = copy.deepcopy(gated.meta)
        return sae

    def encode(self, x: Tensor, grad: Tensor | None = None) -> Tensor:
        self.check_input(x)
        pi = encoder_pre_acts(x, self.W_enc, self.b_enc, self.b_dec)
        return pi * (pi > _positive(self.threshold)).to(pi.dtype)

    def loss(self, x, sparsity_coeff=None, grad=None, dead_mask=None) -> SAELoss:
        """The paper's loss through autograd, the pseudo-derivatives (eqs. 11-12) as custom autograd functions.
        `sparsity` is the L0 (mean number of firing latents per token)."""
        if sparsity_coeff is None:
            raise ValueError("JumpReLUSAE.loss needs sparsity_coeff (lambda of the L0 penalty)")
        self.check_input(x)
        pi = encoder_pre_acts(x, self.W_enc, self.b_enc, self.b_dec)
        f = _JumpReLU.apply(pi, self.threshold, self.epsilon)
        x_hat = self.decode(f)
        recon = squared_error(x, x_hat)
        l0 = _Step.apply(pi, self.threshold, self.epsilon).sum(-1).mean()
        total = recon + sparsity_coeff * l0
        return SAELoss(total, recon, l0, torch.zeros_like(recon), f, x_hat)

    def grads_by_hand(self, x, sparsity_coeff, grad, dead_mask, compute_dtype) -> SAELoss:
        """`loss` and its gradients by hand (n tokens, g = d recon / d x_hat = 2 (x_hat - x) / n):
            d f           = g W_dec^T
            d pi          = d f * H(pi - theta)                          (no STE to pi)
            d theta_i     = -(1 / eps) sum_t K_ti (theta_i d f_ti + lambda / n)      (eqs. 11 and 12)
        with K_ti = 1[|pi_ti - theta_i| < eps / 2]; W_enc, b_enc, W_dec and b_dec as in the ReLU SAE. d f is needed
        where a latent fires and within the window around theta, where it may be off; on a batch where those
        entries are few (`goes_sparse`), everything after the encoder product runs on them alone."""
        if sparsity_coeff is None:
            raise ValueError("JumpReLUSAE needs sparsity_coeff (lambda of the L0 penalty)")
        cd = compute_dtype
        n, lam, eps = x.shape[0], float(sparsity_coeff), self.epsilon
        theta = _positive(self.threshold.detach()).float()
        x_1 = with_ones_column(x - self.b_dec, cd)
        pi = x_1 @ with_bias_row(self.W_enc, self.b_enc, cd)
        # Every entry that fires (pi > theta) or lies in the window (|pi - theta| < eps / 2) is above theta - eps:
        # a superset, so that rounding at the window's edge cannot leave one out.
        floor = theta - eps
        if goes_sparse(pi, floor, self.sparse_below):
            return self._grads_on_active(x, x_1.float(), pi, floor, theta, lam)
        window = _window(pi, theta, eps)
        f = pi.mul_(pi > theta)  # in place: pi is not needed again
        W_dec = self.W_dec.to(cd)
        x_hat = (f @ W_dec).float() + self.b_dec
        err = x_hat - x
        recon = err.pow(2).sum() / n
        g = err.mul_(2.0 / n).to(cd)
        d_f = g @ W_dec.T
        in_window = (d_f * window).sum(0, dtype=torch.float32)
        d_theta = -(theta * in_window + (lam / n) * window.sum(0, dtype=torch.float32)) / eps
        d_pi = relu_backward_(d_f, f)  # f > 0 exactly where pi > theta >= 0
        w_enc_grad = x_1.T.contiguous() @ d_pi  # [d_in + 1, d_sae]: the last row is b_enc's gradient
        add_linear_grads(self, decoder_grad(f, g)[0], w_enc_grad[:-1], w_enc_grad[-1], g.float().sum(0))
        add_grad(self.threshold, d_theta)
        fired = count_fired(f)
        l0 = fired.sum(dtype=torch.float32) / n
        return SAELoss(recon + lam * l0, recon, l0, torch.zeros_like(recon), f, x_hat, fired_counts=fired)

    def _grads_on_active(self, x, x_1, pi, floor, theta, lam) -> SAELoss:
        """The same step on the entries above `floor` only (active.py): those that fire and those in the window."""
        n, eps = x.shape[0], self.epsilon
        active, pi = ActiveEntries.above(pi, floor)
        theta_a = theta[active.lat]
        window = _window(pi, theta_a, eps)
        f = pi * (pi > theta_a)
        x_hat = active.decode(f, self.W_dec) + self.b_dec
        err = x_hat - x
        recon = err.pow(2).sum() / n
        g = err.mul_(2.0 / n)
        d_f = active.dot_rows(g, self.W_dec)
        in_window = active.latent_sums(d_f * window)
        d_theta = -(theta * in_window + (lam / n) * active.latent_sums(window)) / eps
        enc_grad_t = active.sum_over_tokens(d_f.mul_(f > 0), x_1)  # [d_sae, d_in + 1]; b_enc's in the last column
        add_linear_grads(self, active.sum_over_tokens(f, g), enc_grad_t[:, :-1].T, enc_grad_t[:, -1], g.sum(0))
        add_grad(self.threshold, d_theta)
        fired = active.fired(f)
        l0 = fired.sum(dtype=torch.float32) / n
        return SAELoss(recon + lam * l0, recon, l0, torch.zeros_like(recon), None, x_hat, active=(f, active),
                       d_sae=self.d_sae, fired_counts=fired)

    def latent_params(self) -> dict[str, int]:
        return {"W_enc": 1, "b_enc": 0, "threshold": 0, "W_dec": 0}

    def fold_activation_scale(self, c: float) -> None:
        with torch.no_grad():  # pi scales by 1/c, and theta with it: the same latents fire
            self.b_enc.div_(c)
            self.threshold.div_(c)
        super().fold_activation_scale(c)

    def _apply(self, fn, recurse=True):
        # Module.to / .half / .bfloat16 convert every floating parameter; theta keeps float32 (float64 with
        # float64 weights) and its unrounded value, and follows the device.
        theta = self.threshold.detach().clone()
        grad = self.threshold.grad
        super()._apply(fn, recurse)
        moved = self.threshold
        keep = _theta_dtype(moved.dtype)
        if moved.dtype != keep:
            moved.data = theta.to(device=moved.device, dtype=keep)
            if moved.grad is not None and grad is not None:
                moved.grad = grad.to(device=moved.device, dtype=keep)
        return self


def _theta_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 beside float64 weights."""
    return torch.promote_types(dtype, torch.float32)
