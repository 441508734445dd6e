"""Gradient TopK SAE, "g-SAE" (paper B §3).

    a = |W_dec grad_x L(x)|                 the LM-loss gradient at the site, projected onto each decoder row
    K = TopK(z + beta * z * a)              selection score (a mask: computed under no_grad)
    f_i = z_i if i in K else 0
The loss is plain reconstruction (plus AuxK); gradients are needed at inference too.

The paper does not say how grad_x L is normalised; beta = 1e5 fits raw gradients of order 1e-5. `grad_norm`
chooses "raw" (the gradient of the summed per-token losses as given) or "unit_rms" (rescaled to unit RMS over
the batch, which makes beta independent of the loss's scale).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from saeforge.saes.base import register
from saeforge.saes.topk import TopKSAE, top_k_indices


@register("gradient_topk")
class GradientTopKSAE(TopKSAE):
    saelens_architecture = "topk"  # the nearest; saelens_refusal keeps it from being exported as one
    needs_grad = True
    option_names = ("k", "k_aux", "aux_coeff", "beta", "grad_norm")

    def __init__(self, d_in: int, d_sae: int, *, k: int = 32, beta: float = 1e5,
                 grad_norm: Literal["raw", "unit_rms"] = "raw", k_aux: int | None = None,
                 aux_coeff: float = 1 / 32, dtype: torch.dtype = torch.float32, device=None):
        super().__init__(d_in, d_sae, k=k, k_aux=k_aux, aux_coeff=aux_coeff, dtype=dtype, device=device)
        if grad_norm not in ("raw", "unit_rms"):
            raise ValueError(f"GradientTopKSAE: unknown grad_norm {grad_norm!r}; use 'raw' or 'unit_rms'")
        if not beta >= 0:
            raise ValueError(f"GradientTopKSAE: beta must be >= 0, got {beta!r}")
        self.beta, self.grad_norm = float(beta), grad_norm

    def saelens_refusal(self) -> str | None:
        return ("its selection reads the LM's loss gradient at the site (TopK of z + beta * z * |W_dec grad|); "
                "SAELens's TopK selects on z alone and has no input for a gradient, so it would load as a different "
                "SAE (a plain TopK on the same weights)")

    @torch.no_grad()
    def selection_score(self, pre: Tensor, grad: Tensor) -> Tensor:
        """z + beta * z * a with z = ReLU(pre). Written as pre * (1 + beta * a): for pre > 0 it is the same, and for
        pre <= 0 (z = 0) it stays <= 0, so the top k (and the values kept, ReLU(pre)) are unchanged."""
        g = grad.float()
        if self.grad_norm == "unit_rms":
            g = g / g.pow(2).mean().sqrt().clamp_min(1e-30)
        a = (g.to(pre.dtype) @ self.W_dec.to(pre.dtype).T).abs()  # |W_dec grad|, one entry per latent, in pre's dtype
        return pre * (1 + self.beta * a)

    def select(self, pre: Tensor, grad: Tensor | None) -> Tensor:
        if grad is None:
            raise ValueError("GradientTopKSAE needs grad= (the LM loss gradient at the site, same shape as x); "
                             "lm.capture(tokens, sites, grad=True) provides it")
        if grad.shape != pre.shape[:-1] + (self.d_in,):
            raise ValueError(f"GradientTopKSAE: grad has shape {tuple(grad.shape)}, expected "
                             f"{tuple(pre.shape[:-1]) + (self.d_in,)} (the shape of x)")
        if not torch.isfinite(grad).all():
            raise ValueError("GradientTopKSAE: grad contains non-finite values")
        return top_k_indices(self.selection_score(pre.detach(), grad), self.k)

    def fold_activation_scale(self, c: float) -> None:
        # Trained on x' = c x with grad' = grad / c: a scales by c and z by 1/c, so beta * a keeps its meaning
        # with beta / c. Unit-RMS normalisation is scale-free already.
        if self.grad_norm == "raw":
            self.beta = self.beta / c
        super().fold_activation_scale(c)
