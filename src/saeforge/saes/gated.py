"""Gated SAE (paper A eqs. 6-8, Appendix G), with the switches of its ablations (§5).

    pi_gate(x) = W_gate (x - b_dec) + b_gate
    pi_mag(x)  = W_mag  (x - b_dec) + b_mag,   W_mag[i, :] = exp(r_mag[i]) * W_gate[i, :]   (tied)
    f(x)       = 1[pi_gate(x) > 0] * ReLU(pi_mag(x))
    L          = ||x - x_hat(f)||^2 + lambda * ||ReLU(pi_gate)||_1 + ||x - (sg(W_dec)^T ReLU(pi_gate) + sg(b_dec))||^2

SAELens stores W_gate as `W_enc` [d_in, d_sae]. The Heaviside passes no gradient, so b_gate learns only from the
sparsity and auxiliary terms. `GatedSAE.from_relu` builds the "baseline + rescale & shift" ablation.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import Tensor, nn

from saeforge.saes.active import ActiveEntries, goes_sparse
from saeforge.saes.base import (SAE, SAELoss, add_grad, count_fired, decoder_grad, decoder_norm_penalty_grad,
                                encoder_pre_acts, register, relu_backward_, squared_error, with_bias_row,
                                with_ones_column)
from saeforge.saes.metadata import SAEMetadata


@register("gated")
class GatedSAE(SAE):
    saelens_architecture = "gated"
    dead_latents = "resample"
    option_names = ("tied", "use_r_mag", "freeze_aux_decoder", "sparsity_penalty", "magnitude_only")
    # The sparse step took 0.27x / 0.52x / 0.93x the dense one's time at gate densities 0.008 / 0.031 / 0.063 (fp32,
    # batch 4096, d_in 640, d_sae 8192, 2 cores with AVX-512).
    sparse_below = 0.06

    def __init__(self, d_in: int, d_sae: int, *, tied: bool = True, use_r_mag: bool = True,
                 freeze_aux_decoder: bool = True, sparsity_penalty: Literal["l1", "l1_decoder_norm"] = "l1",
                 magnitude_only: bool = False, dtype: torch.dtype = torch.float32, device=None):
        super().__init__(d_in, d_sae, dtype=dtype, device=device)
        if sparsity_penalty not in ("l1", "l1_decoder_norm"):
            raise ValueError(f"GatedSAE: unknown sparsity_penalty {sparsity_penalty!r}; use 'l1' or 'l1_decoder_norm'")
        if magnitude_only and not (tied and use_r_mag):
            raise ValueError("GatedSAE: magnitude_only (baseline + rescale & shift) needs tied=True, use_r_mag=True")
        self.tied, self.use_r_mag, self.freeze_aux_decoder = tied, use_r_mag, freeze_aux_decoder
        self.sparsity_penalty, self.magnitude_only = sparsity_penalty, magnitude_only
        self.W_enc = nn.Parameter(self.W_dec.detach().T.clone())  # W_gate
        self.b_gate = nn.Parameter(torch.zeros(d_sae, dtype=dtype, device=device))
        self.b_mag = nn.Parameter(torch.zeros(d_sae, dtype=dtype, device=device))
        r_mag = torch.zeros(d_sae, dtype=dtype, device=device)
        if use_r_mag:
            self.r_mag = nn.Parameter(r_mag)
        else:
            self.register_buffer("r_mag", r_mag)  # fixed at 0: the two paths differ only by their biases
        if not tied:
            self.W_mag = nn.Parameter(self.W_dec.detach().T.clone())
        if magnitude_only:
            # Only r_mag and b_mag learn; the gate, decoder and b_dec are those of a trained baseline.
            for p in (self.W_enc, self.b_gate, self.W_dec, self.b_dec):
                p.requires_grad_(False)

    @classmethod
    def from_relu(cls, relu: SAE) -> "GatedSAE":
        """Paper A's "baseline + rescale & shift": freeze a trained ReLU SAE, learn only r_mag and b_mag.
        gate = 1[W_enc(x - b_dec) + b_enc > 0], magnitude = ReLU(exp(r_mag) * W_enc(x - b_dec) + b_mag)."""
        if relu.architecture != "relu":
            raise ValueError(f"from_relu needs a relu SAE, got {relu.architecture!r}")
        sae = cls(relu.d_in, relu.d_sae, magnitude_only=True, dtype=relu.W_dec.dtype, device=relu.W_dec.device)
        with torch.no_grad():
            sae.W_enc.copy_(relu.W_enc)
            sae.b_gate.copy_(relu.b_enc)
            sae.b_mag.copy_(relu.b_enc)  # starts as the baseline itself
            sae.W_dec.copy_(relu.W_dec)
            sae.b_dec.copy_(relu.b_dec)
        sae.meta = copy.deepcopy(relu.meta)
        return sae

    @classmethod
    def for_training(cls, d_in: int, d_sae: int, options: dict, activation_scale: float) -> "GatedSAE":
        """options.rescale_shift_from = a saved ReLU SAE: paper A's "baseline + rescale & shift" (from_relu)."""
        options = dict(options)
        baseline = options.pop("rescale_shift_from", None)
        if baseline is None:
            return cls(d_in=d_in, d_sae=d_sae, **options)
        if options:
            raise ValueError(f"options.rescale_shift_from takes no other options, got {sorted(options)}")
        from saeforge.saes.base import load_sae

        sae = cls.from_relu(load_sae(baseline))
        if sae.d_in != d_in:
            raise ValueError(f"{baseline} has d_in={sae.d_in}, the site has d={d_in}")
        sae.fold_activation_scale(1.0 / activation_scale)  # the saved baseline acts on raw x; training sees c*x
        sae.meta = SAEMetadata()  # the baseline's facts describe the baseline, not this run
        return sae

    def saelens_refusal(self) -> str | None:
        if not self.tied:
            return ("it is untied (tied=False): its magnitude path has its own W_mag, while SAELens's gated SAE "
                    "ties it to the gate (W_mag = W_enc * exp(r_mag)); no SAELens SAE has two independent encoders "
                    "(nor is an untied Gated SAE a JumpReLU)")
        return None

    @property
    def uses_sparsity_coeff(self) -> bool:
        return not self.magnitude_only  # rescale & shift keeps the baseline's gate: no lambda, nothing to steer

    @property
    def supports_resampling(self) -> bool:
        return not self.magnitude_only  # its gate and decoder are frozen

    @property
    def constrain_decoder_norm(self) -> bool:
        return self.sparsity_penalty == "l1" and not self.magnitude_only

    def _pre_acts(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self.check_input(x)
        # The input side of b_dec (x - b_dec) is never frozen.
        if self.tied:
            pre_gate = encoder_pre_acts(x, self.W_enc, None, self.b_dec)
            pi_gate = pre_gate + self.b_gate
            pi_mag = pre_gate * torch.exp(self.r_mag) + self.b_mag  # W_mag = diag(exp(r_mag)) W_gate
        else:
            pi_gate = encoder_pre_acts(x, self.W_enc, self.b_gate, self.b_dec)
            pi_mag = encoder_pre_acts(x, self.W_mag, self.b_mag, self.b_dec)
        return pi_gate, pi_mag

    def encode(self, x: Tensor, grad: Tensor | None = None) -> Tensor:
        pi_gate, pi_mag = self._pre_acts(x)
        return (pi_gate > 0).to(pi_mag.dtype) * torch.relu(pi_mag)  # eq. 6

    def loss(self, x, sparsity_coeff=None, grad=None, dead_mask=None) -> SAELoss:
        pi_gate, pi_mag = self._pre_acts(x)
        f = (pi_gate > 0).to(pi_mag.dtype) * torch.relu(pi_mag)
        x_hat = self.decode(f)
        recon = squared_error(x, x_hat)
        zero = torch.zeros_like(recon)
        if self.magnitude_only:  # the rescale & shift ablation trains on reconstruction alone
            return SAELoss(recon, recon, zero, zero, f, x_hat)
        if sparsity_coeff is None:
            raise ValueError("GatedSAE.loss needs sparsity_coeff (lambda in paper A eq. 8)")
        via_gate = torch.relu(pi_gate)
        W_dec = self.W_dec.detach() if self.freeze_aux_decoder else self.W_dec
        b_dec = self.b_dec.detach() if self.freeze_aux_decoder else self.b_dec
        if self.sparsity_penalty == "l1":
            sparsity = via_gate.float().sum(-1).mean()
        else:
            # Decoder-norm-weighted L1: the decoder is frozen here exactly when it is frozen in the aux term.
            sparsity = (via_gate.float() * W_dec.float().norm(dim=1)).sum(-1).mean()
        aux = squared_error(x, via_gate @ W_dec + b_dec)  # eq. 8, third term
        total = recon + sparsity_coeff * sparsity + aux
        return SAELoss(total, recon, sparsity, aux, f, x_hat)

    def grads_by_hand(self, x, sparsity_coeff, grad, dead_mask, compute_dtype) -> SAELoss:
        """`loss` and its gradients by hand. Products: the encoder (one for the tied paths), the decoder and the
        auxiliary decoder, d f and d ReLU(pi_gate) through the decoder, W_dec's gradient (a second one when the
        auxiliary term trains the decoder too), and the input-side gradients of the two paths (kept apart, so that
        r_mag's gradient is a sum over [d_in, d_sae], not over the batch). On a batch whose gate is sparse
        (`goes_sparse`) everything after the gate's product runs on the gate's active set."""
        if sparsity_coeff is None and not self.magnitude_only:
            raise ValueError("GatedSAE needs sparsity_coeff (lambda in paper A eq. 8)")
        cd = compute_dtype
        lam = float(sparsity_coeff or 0.0)
        x_1 = with_ones_column(x - self.b_dec, cd)
        exp_r = torch.exp(self.r_mag)
        pi_gate = x_1 @ with_bias_row(self.W_enc, self.b_gate, cd)
        norms = self.W_dec.norm(dim=1) if self.sparsity_penalty == "l1_decoder_norm" else None
        if goes_sparse(pi_gate, 0.0, self.sparse_below):
            return self._grads_on_active(x, x_1.float(), pi_gate, exp_r, lam, norms, cd)
        n = x.shape[0]
        if self.tied:  # pi_mag = exp(r_mag) * (pi_gate - b_gate) + b_mag
            pi_mag = torch.addcmul((self.b_mag - exp_r * self.b_gate).to(cd), pi_gate, exp_r.to(cd))
        else:
            pi_mag = x_1 @ with_bias_row(self.W_mag, self.b_mag, cd)
        f = relu_backward_(pi_mag.relu_(), pi_gate)  # 1[pi_gate > 0] * ReLU(pi_mag), eq. 6, in place
        W_dec = self.W_dec.to(cd)
        x_hat = (f @ W_dec).float() + self.b_dec
        err = x_hat - x
        recon = err.pow(2).sum() / n
        g = err.mul_(2.0 / n).to(cd)  # d recon / d x_hat
        x_1_t = x_1.T.contiguous()
        d_mag = relu_backward_(g @ W_dec.T, f)  # d pi_mag: f = pi_mag where f > 0
        mag_grad = x_1_t @ d_mag  # [d_in + 1, d_sae]: the last row is b_mag's gradient
        mag_w = mag_grad[:-1].float()
        zero = torch.zeros_like(recon)
        sparsity = aux = zero
        w_dec_grad = decoder_grad(f, g)[0]
        b_dec_grad = g.float().sum(0)
        w_enc_grad = exp_r * mag_w if self.tied else None  # W_mag = diag(exp(r_mag)) W_gate
        b_gate_grad = None
        if not self.magnitude_only:
            via_gate = pi_gate.relu_()
            aux_err = (via_gate @ W_dec).float() + self.b_dec - x
            aux = aux_err.pow(2).sum() / n  # eq. 8, third term
            g_aux = aux_err.mul_(2.0 / n).to(cd)
            gate_sums = via_gate.sum(0).float()
            sparsity = (gate_sums @ norms if norms is not None else gate_sums.sum()) / n
            d_penalty = (lam / n) * (norms if norms is not None else torch.ones_like(self.b_gate))
            d_gate = relu_backward_(with_ones_column(g_aux, cd) @ with_bias_row(self.W_dec.T, d_penalty, cd),
                                    via_gate)
            gate_grad = x_1_t @ d_gate
            if not self.freeze_aux_decoder:  # the auxiliary term and the penalty's norms also train the decoder
                w_dec_grad = w_dec_grad + decoder_grad(via_gate, g_aux)[0]
                b_dec_grad += g_aux.float().sum(0)
                if norms is not None:
                    w_dec_grad = w_dec_grad + decoder_norm_penalty_grad(self.W_dec, gate_sums, norms, lam / n)
            w_enc_grad = gate_grad[:-1] if w_enc_grad is None else w_enc_grad + gate_grad[:-1]
            b_gate_grad = gate_grad[-1]
        r_mag_grad = exp_r * (self.W_enc * mag_w).sum(0) if self.tied else None  # d pi_mag/d r_mag = exp_r * pre
        self._add_grads(w_dec_grad, b_dec_grad, w_enc_grad, b_gate_grad, None if self.tied else mag_grad[:-1],
                        mag_grad[-1], r_mag_grad, exp_r)
        total = recon + lam * sparsity + aux
        return SAELoss(total, recon, sparsity, aux, f, x_hat, fired_counts=count_fired(f))

    def _grads_on_active(self, x, x_1, pi_gate, exp_r, lam, norms, cd) -> SAELoss:
        """The same step on the gate's active set A = {pi_gate > 0} only (active.py). f is 0 off A, and so is
        ReLU(pi_gate), the penalty's and the auxiliary term's only input: every term's gradient lives on A. The
        magnitude path is evaluated on A alone (for the untied one a sampled product instead of a second encoder
        product, rounded to the compute dtype cd as the dense path's); W_enc's gradient is one sparse product over
        both paths' gradients."""
        n = x.shape[0]
        active, gate = ActiveEntries.above(pi_gate, 0.0)  # gate = ReLU(pi_gate) on A
        lat = active.lat
        if self.tied:  # as the dense path computes it, so the same magnitudes come out
            pi_mag = torch.addcmul((self.b_mag - exp_r * self.b_gate).to(cd)[lat], gate.to(cd), exp_r.to(cd)[lat])
        else:
            pi_mag = active.dot_rows(x_1, with_bias_row(self.W_mag, self.b_mag, cd).float().T).to(cd)
        pi_mag = pi_mag.float()
        f = pi_mag.relu_()  # eq. 6 on A
        x_hat = active.decode(f, self.W_dec) + self.b_dec
        err = x_hat - x
        recon = err.pow(2).sum() / n
        g = err.mul_(2.0 / n)
        d_mag = active.dot_rows(g, self.W_dec).mul_(f > 0)
        zero = torch.zeros_like(recon)
        sparsity = aux = zero
        w_dec_grad = active.sum_over_tokens(f, g)
        b_dec_grad = g.sum(0)
        d_gate = b_gate_grad = None
        if not self.magnitude_only:
            aux_err = active.decode(gate, self.W_dec) + self.b_dec - x
            aux = aux_err.pow(2).sum() / n  # eq. 8, third term
            g_aux = aux_err.mul_(2.0 / n)
            gate_sums = active.latent_sums(gate)
            sparsity = (gate_sums @ norms if norms is not None else gate_sums.sum()) / n
            d_penalty = (lam / n) * (norms[lat] if norms is not None else 1.0)
            d_gate = active.dot_rows(g_aux, self.W_dec).add_(d_penalty)  # ReLU(pi_gate) > 0 on all of A
            if not self.freeze_aux_decoder:
                w_dec_grad += active.sum_over_tokens(gate, g_aux)
                b_dec_grad += g_aux.sum(0)
                if norms is not None:
                    w_dec_grad += decoder_norm_penalty_grad(self.W_dec, gate_sums, norms, lam / n)
            b_gate_grad = active.latent_sums(d_gate)
        b_mag_grad = active.latent_sums(d_mag)
        w_mag_grad = w_enc_grad = r_mag_grad = None
        if self.tied:
            r_mag_grad = exp_r * active.latent_sums(d_mag * (gate - self.b_gate[lat]))
            along_gate = exp_r[lat] * d_mag if d_gate is None else torch.addcmul(d_gate, exp_r[lat], d_mag)
            if self.W_enc.requires_grad:
                w_enc_grad = active.sum_over_tokens(along_gate, x_1)[:, :-1].T
        else:
            w_mag_grad = active.sum_over_tokens(d_mag, x_1)[:, :-1].T
            if d_gate is not None:
                w_enc_grad = active.sum_over_tokens(d_gate, x_1)[:, :-1].T
        self._add_grads(w_dec_grad, b_dec_grad, w_enc_grad, b_gate_grad, w_mag_grad, b_mag_grad, r_mag_grad, exp_r)
        return SAELoss(recon + lam * sparsity + aux, recon, sparsity, aux, None, x_hat, active=(f, active),
                       d_sae=self.d_sae, fired_counts=active.fired(f))

    def _add_grads(self, w_dec_grad, b_dec_grad, w_enc_grad, b_gate_grad, w_mag_grad, b_mag_grad, r_mag_grad,
                   exp_r) -> None:
        """Accumulate the step's gradients; b_dec's gets the input-side terms here: x - b_dec enters both paths."""
        add_grad(self.b_mag, b_mag_grad)
        if self.tied:
            add_grad(self.r_mag, r_mag_grad)
            b_dec_grad -= (exp_r * b_mag_grad.float()) @ self.W_enc.T
        else:
            add_grad(self.W_mag, w_mag_grad)
            b_dec_grad -= b_mag_grad.float() @ self.W_mag.T
        if w_enc_grad is not None:
            add_grad(self.W_enc, w_enc_grad)
        if b_gate_grad is not None:
            add_grad(self.b_gate, b_gate_grad)
            b_dec_grad -= b_gate_grad.float() @ self.W_enc.T
        add_grad(self.W_dec, w_dec_grad)
        add_grad(self.b_dec, b_dec_grad)

    def latent_params(self) -> dict[str, int]:
        params = {"W_enc": 1, "b_gate": 0, "b_mag": 0, "W_dec": 0}
        if self.use_r_mag:
            params["r_mag"] = 0
        if not self.tied:
            params["W_mag"] = 1
        return params

    def resample_latents(self, idx, directions) -> None:
        super().resample_latents(idx, directions)  # W_enc (gate), W_dec, and zero b_gate, b_mag, r_mag
        if not self.tied:
            with torch.no_grad():
                self.W_mag[:, idx] = self.W_enc[:, idx]

    def fold_activation_scale(self, c: float) -> None:
        with torch.no_grad():
            self.b_gate.div_(c)
            self.b_mag.div_(c)
        super().fold_activation_scale(c)
