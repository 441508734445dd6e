"""BatchTopK SAE (Bussmann, Leask & Nanda 2024, "BatchTopK Sparse Autoencoders", arXiv:2412.06410).

Training, on a batch X of B tokens (the paper's BatchTopK activation):
    Z = ReLU(W_enc (X - b_dec) + b_enc)                       [B, d_sae], as in TopK
    F = Z restricted to the k*B largest entries of Z over the whole batch: BatchTopK(Z)
    L = ||X - (F W_dec + b_dec)||^2 (mean over tokens) + aux_coeff * AuxK
so L0 is k on average over the batch (exactly k*B entries are kept), not k for every token. AuxK is TopK's
(Gao et al. 2024): the top k_aux pre-activations among dead latents reconstruct the residual.

Inference (the paper's JumpReLU step): one threshold theta for every latent,
    f = z * 1[z > theta],  z = ReLU(W_enc (x - b_dec) + b_enc)
with theta = E_X[ min{ F_ij(X) : F_ij(X) > 0 } ], the expected smallest activation the batch selection keeps. It is
estimated during training (`update_threshold`) as a running mean over batches of each batch's smallest kept
activation: an exponential moving average with rate threshold_rate (0.01: about the last 100 batches, so the early,
untrained batches are forgotten), started at the first batch's value. The paper's own code, and SAELens, use the
same average started at 0, which pulls theta towards 0 for the first few hundred batches; here theta = 0 means "no
batch seen yet", so theta itself is the whole state and a resumed run continues it exactly. theta is the buffer
`threshold` (a scalar; not a parameter, so Adam never touches it; saved with the weights and in checkpoints);
`encode` and `forward` use it, and `to_jumprelu` exports the SAE as the JumpReLU SAE it is at inference. The
estimate moves only in training mode (`sae.train()`, the default): `sae.eval()` computes a loss without moving it.

The same class holds the Matryoshka variant's loss (matryoshka.py): `prefix_sizes` s_1 < ... < s_M = d_sae, each
prefix reconstructing on its own; here M = 1, the plain BatchTopK loss.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from saeforge.saes.active import ActiveEntries
from saeforge.saes.base import (SAELoss, add_linear_grads, register, squared_error, with_bias_row,
                                with_ones_column)
from saeforge.saes.jumprelu import JumpReLUSAE
from saeforge.saes.topk import TopKSAE


class BatchTopKLoss(SAELoss):
    """SAELoss with `prefix_recon` [M], each prefix's reconstruction loss (M = 1 for plain BatchTopK; `recon` is the
    last, the whole dictionary's)."""

    def __init__(self, *args, prefix_recon: Tensor, **kwargs):
        super().__init__(*args, **kwargs)
        self.prefix_recon = prefix_recon


@register("batchtopk")
class BatchTopKSAE(TopKSAE):
    saelens_architecture = "batchtopk"  # SAELens's name for its BatchTopK training SAE; to_jumprelu() for inference
    option_names = ("k", "k_aux", "aux_coeff", "threshold_rate")

    def __init__(self, d_in: int, d_sae: int, *, k: int = 32, k_aux: int | None = None, aux_coeff: float = 1 / 32,
                 threshold_rate: float = 0.01, dtype: torch.dtype = torch.float32, device=None):
        super().__init__(d_in, d_sae, k=k, k_aux=k_aux, aux_coeff=aux_coeff, dtype=dtype, device=device)
        if isinstance(threshold_rate, bool) or not isinstance(threshold_rate, (int, float)) \
                or not 0 < threshold_rate <= 1:
            raise ValueError(f"{type(self).__name__}: threshold_rate must be in (0, 1], got {threshold_rate!r}")
        self.threshold_rate = float(threshold_rate)
        # theta: a buffer, not a parameter; 0 until a batch is seen (inference is then a plain ReLU).
        self.register_buffer("threshold", torch.zeros((), dtype=dtype, device=device))
        # The nested prefixes whose reconstruction losses are summed; one here (Matryoshka sets several).
        self.prefix_sizes: tuple[int, ...] = (d_sae,)

    # ---------------------------------------------------------------- the batch-wide selection and theta
    @torch.no_grad()
    def batch_select(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        """The k*B largest entries of pre [B, d_sae] over the whole batch, as (token, latent) index pairs in
        row-major order. ReLU is monotone, so these are the k*B largest of z = ReLU(pre) (where fewer than k*B
        entries are positive, some kept entries are 0 and do not fire)."""
        n, d_sae = pre.shape
        flat = pre.reshape(-1).topk(self.k * n, sorted=False).indices.sort().values
        return flat // d_sae, flat % d_sae

    @torch.no_grad()
    def update_threshold(self, kept: Tensor) -> None:
        """Add this batch's smallest kept activation (the smallest positive entry of `kept`, any shape) to the
        running mean theta (see the module docstring): theta += rate * (smallest - theta), with rate 1 for the first
        batch (theta = 0) and threshold_rate afterwards. Nothing in eval mode or when nothing fired; no host
        synchronisation."""
        if not self.training:
            return
        kept = kept.detach().float()
        smallest = torch.where(kept > 0, kept, float("inf")).min()
        theta = self.threshold.float()
        rate = torch.where(theta > 0, self.threshold_rate, 1.0)
        self.threshold.copy_(torch.where(torch.isfinite(smallest), theta + rate * (smallest - theta), theta))

    # ---------------------------------------------------------------- inference: a JumpReLU at theta
    def encode(self, x: Tensor, grad: Tensor | None = None) -> Tensor:
        """f = z * 1[z > theta] (theta >= 0, so this is pre * 1[pre > theta])."""
        pre = self.pre_acts(x)
        return pre * (pre > self.threshold.clamp_min(0)).to(pre.dtype)

    def forward(self, x: Tensor, grad: Tensor | None = None) -> Tensor:
        return self.decode(self.encode(x))

    def encode_sparse(self, x: Tensor, grad: Tensor | None = None):
        raise NotImplementedError(f"{type(self).__name__} keeps no fixed number of latents per token; use encode")

    def to_jumprelu(self) -> JumpReLUSAE:
        """The JumpReLU SAE that computes this SAE's inference features: the same weights, threshold theta for
        every latent."""
        jr = JumpReLUSAE(self.d_in, self.d_sae, dtype=self.W_dec.dtype, device=self.W_dec.device)
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                getattr(jr, name).copy_(getattr(self, name))
            jr.threshold.fill_(self.threshold.clamp_min(0))
        jr.meta = copy.deepcopy(self.meta)
        return jr

    # ---------------------------------------------------------------- training
    def loss(self, x, sparsity_coeff=None, grad=None, dead_mask=None) -> BatchTopKLoss:
        """The loss as written (autograd): F = BatchTopK(Z), then each prefix m reconstructs from its latents,
        recon_m = ||x - (F[:, :s_m] W_dec[:s_m] + b_dec)||^2, and total = sum_m recon_m + aux_coeff * AuxK."""
        lead = x.shape[:-1]
        x = x.reshape(-1, self.d_in)
        pre = self.pre_acts(x)
        tok, lat = self.batch_select(pre)
        keep = torch.zeros_like(pre, dtype=torch.bool)
        keep[tok, lat] = True
        f = torch.relu(pre) * keep  # BatchTopK(Z): the selection is a mask (no gradient through it)
        self.update_threshold(f)
        recons = []
        for s in self.prefix_sizes:
            x_hat = f[:, :s] @ self.W_dec[:s] + self.b_dec
            recons.append(squared_error(x, x_hat))
        recons = torch.stack(recons)
        aux = self.aux_k_loss(x, x_hat, pre, dead_mask)  # the whole dictionary's residual
        total = recons.sum() + self.aux_coeff * aux
        return BatchTopKLoss(total, recons[-1], torch.zeros_like(total), aux, f.reshape(*lead, self.d_sae),
                             x_hat.reshape(*lead, self.d_in), d_sae=self.d_sae, prefix_recon=recons)

    def grads_by_hand(self, x, sparsity_coeff, grad, dead_mask, compute_dtype) -> BatchTopKLoss:
        """`loss` and its gradients by hand. The encoder is the one dense product; after the selection everything
        touches only the kept entries (`ActiveEntries`), one group of latents g_q = [s_{q-1}, s_q) at a time.

        Prefix m's reconstruction is x_hat_m = b_dec + sum_{q <= m} (group q's decoded part), so a latent of group q
        appears in the prefixes m >= q, and its gradient comes from G_q = sum_{m >= q} 2 (x_hat_m - x) / n."""
        n = x.shape[0]
        x_c_1 = with_ones_column(x - self.b_dec, torch.float32)
        pre = x_c_1.to(compute_dtype) @ with_bias_row(self.W_enc, self.b_enc, compute_dtype)
        tok, lat = self.batch_select(pre)
        vals = pre[tok, lat].float().relu_()
        self.update_threshold(vals)
        groups = self._groups(tok, lat, n)
        # Forward: x_hat_m - x for each prefix, one group's decoded part added at a time.
        errs, x_hat = [], self.b_dec.expand_as(x)
        for lo, hi, sel, active in groups:
            if active is not None:
                x_hat = x_hat + active.decode(vals[sel], self.W_dec[lo:hi])
            errs.append(x_hat - x)
        recons = torch.stack([e.pow(2).sum() / n for e in errs])
        err = errs[-1]
        # Backward, from the last group to the first, accumulating G_q.
        w_dec_grad = torch.zeros_like(self.W_dec)
        # [d_sae, d_in + 1]: W_enc's gradient (transposed) and, from the ones column, b_enc's.
        enc_grad_t = x.new_zeros(self.d_sae, self.d_in + 1)
        G = torch.zeros_like(x)
        for (lo, hi, sel, active), e in zip(reversed(groups), reversed(errs)):
            G = G + e * (2.0 / n)
            if active is None:
                continue
            v = vals[sel]
            w_dec_grad[lo:hi] = active.sum_over_tokens(v, G)
            d_vals = active.dot_rows(G, self.W_dec[lo:hi]).mul_(v > 0)  # through the ReLU
            enc_grad_t[lo:hi] = active.sum_over_tokens(d_vals, x_c_1)
        aux = self.aux_k_grads_(pre, dead_mask, err, x_c_1, w_dec_grad, enc_grad_t)
        # Every prefix adds b_dec, so its output-side gradient is G's (the sum over prefixes).
        add_linear_grads(self, w_dec_grad, enc_grad_t[:, :-1].T, enc_grad_t[:, -1], G.sum(0))
        kept = groups[0][3] if len(groups) == 1 else ActiveEntries(tok, lat, n, self.d_sae)
        total = recons.sum() + self.aux_coeff * aux
        return BatchTopKLoss(total, recons[-1], torch.zeros_like(total), aux, None, x_hat, d_sae=self.d_sae,
                             active=(vals, kept), fired_counts=kept.fired(vals), prefix_recon=recons)

    def _groups(self, tok: Tensor, lat: Tensor, n: int) -> list[tuple[int, int, Tensor | slice, ActiveEntries | None]]:
        """(lo, hi, which entries, their ActiveEntries in latents relative to lo) for each group [lo, hi) of latents
        between consecutive prefix sizes; None for a group with no kept entry."""
        if len(self.prefix_sizes) == 1:
            return [(0, self.d_sae, slice(None), ActiveEntries(tok, lat, n, self.d_sae))]
        groups = []
        for lo, hi in zip((0,) + self.prefix_sizes[:-1], self.prefix_sizes):
            sel = ((lat >= lo) & (lat < hi)).nonzero()[:, 0]  # keeps the row-major order
            active = ActiveEntries(tok[sel], lat[sel] - lo, n, hi - lo) if sel.numel() else None
            groups.append((lo, hi, sel, active))
        return groups

    def fold_activation_scale(self, c: float) -> None:
        with torch.no_grad():
            self.threshold.div_(c)  # z scales by 1/c, and theta with it: the same latents fire
        super().fold_activation_scale(c)
