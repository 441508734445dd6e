"""End-to-end TopK SAE, "E2E TopK" (Braun et al. 2024, "Identifying functionally important features with end-to-end
sparse dictionary learning"; paper B's third baseline).

    f = TopK(ReLU(W_enc (x - b_dec) + b_enc)),   x_hat = W_dec^T f + b_dec          TopK's encoder and decoder
    L_e2e    = kl_coeff * KL(P(. | x) || P(. | x_hat))                              Braun et al.'s L_e2e
    L_e2e+ds = L_e2e + ds_coeff * (1/|D|) sum_{a in D} mean_dims (a - a_hat)^2      their L_e2e+ds
P(. | x_hat) is the LM's next-token distribution with x_hat spliced in at the site in place of x, the KL averaged
over the batch's predicted positions; D are the residual streams after the site (a_hat: with the splice), their
error in x's units (the trainer's scaled activations) averaged over positions and dimensions. There is no
reconstruction term: x_hat only has to do downstream what x does. Braun et al. set sparsity with an L1 penalty; as
in paper B's E2E baseline, k fixes it here.

The loss needs the live LM from the site to the logits in every step (needs_lm; `lm_loss`), so it has no `loss` of
its own. No AuxK: its target is the residual x - x_hat, which this loss never asks to be small (dead_latents =
"none"). Inference is TopK's, so the SAE evaluates, saves and exports as a TopK SAE; cfg.json records the
architecture and its coefficients.
"""

from __future__ import annotations

import math

import torch

from saeforge.saes.base import SAE, SAELoss, register, squared_error
from saeforge.saes.topk import TopKSAE


class E2ELoss(SAELoss):
    """SAELoss with the terms of the end-to-end loss: `kl` and `downstream` (None without e2e+ds), detached.
    `recon` is the squared error at the site, logged but not trained on."""

    def __init__(self, *args, kl, downstream, **kwargs):
        super().__init__(*args, **kwargs)
        self.kl, self.downstream = kl, downstream


@register("e2e_topk")
class E2ETopKSAE(TopKSAE):
    needs_lm = True
    dead_latents = "none"
    option_names = ("k", "kl_coeff", "ds_coeff")

    def __init__(self, d_in: int, d_sae: int, *, k: int = 32, kl_coeff: float = 1.0, ds_coeff: float = 0.0,
                 dtype: torch.dtype = torch.float32, device=None):
        # TopK's AuxK size is unused (no AuxK); k keeps it valid for any d_sae.
        super().__init__(d_in, d_sae, k=k, k_aux=k, dtype=dtype, device=device)
        for name, value in (("kl_coeff", kl_coeff), ("ds_coeff", ds_coeff)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value)
                                                                                     and value >= 0):
                raise ValueError(f"E2ETopKSAE: {name} must be a finite number >= 0, got {value!r}")
        if kl_coeff == 0 and ds_coeff == 0:
            raise ValueError("E2ETopKSAE: kl_coeff and ds_coeff are both 0, so there is nothing to train on")
        self.kl_coeff, self.ds_coeff = float(kl_coeff), float(ds_coeff)

    def lm_loss(self, x, through_lm, dead_mask=None) -> E2ELoss:
        x = x.reshape(-1, self.d_in)
        vals, idx, _ = self.encode_sparse(x)
        x_hat = self.decode_sparse(vals, idx)
        kl, downstream = through_lm(x_hat, downstream=self.ds_coeff > 0)
        total = self.kl_coeff * kl
        if downstream is not None:
            total = total + self.ds_coeff * downstream
        with torch.no_grad():
            recon = squared_error(x, x_hat)
        zero = torch.zeros_like(recon)
        return E2ELoss(total, recon, zero, zero, None, x_hat.detach(), active=(vals.detach(), idx), d_sae=self.d_sae,
                       kl=kl.detach(), downstream=None if downstream is None else downstream.detach())

    def loss(self, x, sparsity_coeff=None, grad=None, dead_mask=None) -> SAELoss:
        raise NotImplementedError("E2ETopKSAE's loss runs through the language model: use lm_loss (the trainer "
                                  "does), or train a 'topk' SAE for the reconstruction loss")

    grads_by_hand = SAE.grads_by_hand  # none: loss_and_grads reaches `loss`, which says why
