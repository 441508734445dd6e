"""TopK SAE (Gao et al. 2024; the baseline of paper B), with the AuxK loss for dead latents.

    z = ReLU(W_enc (x - b_dec) + b_enc),   f = z restricted to its k largest entries
    AuxK: reconstruct the residual x - x_hat from the top k_aux pre-activations among dead latents, weight 1/32.

Decoding gathers the k active decoder rows (embedding_bag), which is much cheaper than the dense product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saeforge.saes.base import SAE, SAELoss, check_k, encoder_pre_acts, register, squared_error


@register("topk")
class TopKSAE(SAE):
    saelens_architecture = "topk"
    option_names = ("k", "k_aux", "aux_coeff")

    def __init__(self, d_in: int, d_sae: int, *, k: int = 32, k_aux: int | None = None, aux_coeff: float = 1 / 32,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__(d_in, d_sae, dtype=dtype, device=device)
        self.k = check_k(k, d_sae)
        self.k_aux = check_k(d_in // 2 if k_aux is None else k_aux, d_sae, "k_aux")
        self.aux_coeff = float(aux_coeff)
        self.W_enc = nn.Parameter(self.W_dec.detach().T.clone())
        self.b_enc = nn.Parameter(torch.zeros(d_sae, dtype=dtype, device=device))

    def saelens_fields(self) -> dict:
        return {"k": self.k}

    def pre_acts(self, x: Tensor) -> Tensor:
        """W_enc (x - b_dec) + b_enc, before the ReLU."""
        self.check_input(x)
        return encoder_pre_acts(x, self.W_enc, self.b_enc, self.b_dec)

    def select(self, pre: Tensor, grad: Tensor | None) -> Tensor:
        """Indices [..., k] of the active latents. The ReLU is monotone, so the top k of the pre-activations are the
        top k of z = ReLU(pre); it is applied to the k selected values only."""
        return pre.topk(self.k, dim=-1, sorted=False).indices

    def encode_sparse(self, x: Tensor, grad: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(values [..., k], indices [..., k], pre-activations [..., d_sae])."""
        pre = self.pre_acts(x)
        idx = self.select(pre, grad)
        return torch.relu(pre.gather(-1, idx)), idx, pre

    def encode(self, x: Tensor, grad: Tensor | None = None) -> Tensor:
        vals, idx, pre = self.encode_sparse(x, grad)
        return torch.zeros_like(pre).scatter_(-1, idx, vals)

    def decode_sparse(self, vals: Tensor, idx: Tensor, bias: bool = True) -> Tensor:
        """sum_j vals_j * W_dec[idx_j] (+ b_dec), touching only the k active rows."""
        lead = vals.shape[:-1]
        W = self.W_dec
        if torch.is_autocast_enabled(W.device.type):  # embedding_bag is not on autocast's list
            W = W.to(torch.get_autocast_dtype(W.device.type))
        out = F.embedding_bag(idx.reshape(-1, idx.shape[-1]), W, mode="sum",
                              per_sample_weights=vals.reshape(-1, vals.shape[-1]).to(W.dtype))
        out = out.reshape(*lead, self.d_in)
        return out + self.b_dec if bias else out

    def forward(self, x: Tensor, grad: Tensor | None = None) -> Tensor:
        vals, idx, _ = self.encode_sparse(x, grad)
        return self.decode_sparse(vals, idx)

    def loss(self, x, sparsity_coeff=None, grad=None, dead_mask=None) -> SAELoss:
        x = x.reshape(-1, self.d_in)
        if grad is not None:
            grad = grad.reshape(-1, self.d_in)
        vals, idx, pre = self.encode_sparse(x, grad)
        x_hat = self.decode_sparse(vals, idx)
        recon = squared_error(x, x_hat)
        aux = torch.zeros_like(recon)
        if dead_mask is not None and bool(dead_mask.any()):
            # AuxK: the residual is the target (no gradient through x_hat); only dead latents may fire.
            k_aux = min(self.k_aux, int(dead_mask.sum()))
            pre_dead = pre.masked_fill(~dead_mask.to(pre.device), float("-inf"))
            aux_idx = pre_dead.topk(k_aux, dim=-1, sorted=False).indices
            aux_vals = torch.relu(pre.gather(-1, aux_idx))
            residual = (x - x_hat).detach()
            aux = squared_error(residual, self.decode_sparse(aux_vals, aux_idx, bias=False))
        total = recon + self.aux_coeff * aux
        return SAELoss(total, recon, torch.zeros_like(recon), aux, None, x_hat, active=(vals, idx), d_sae=self.d_sae)

    def latent_params(self) -> dict[str, int]:
        return {"W_enc": 1, "b_enc": 0, "W_dec": 0}

    def fold_activation_scale(self, c: float) -> None:
        with torch.no_grad():
            self.b_enc.div_(c)  # z scales by 1/c uniformly, so the top-k set is unchanged
        super().fold_activation_scale(c)
