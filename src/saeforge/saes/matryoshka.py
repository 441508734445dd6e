"""Matryoshka BatchTopK SAE (Bussmann, Nabeshima, Karvonen & Nanda 2025, "Learning Multi-Level Features with
Matryoshka Sparse Autoencoders"; the idea first in Nabeshima 2024, "Matryoshka Sparse Autoencoders").

The dictionary's latents are ordered, and nested prefixes s_1 < s_2 < ... < s_M = d_sae of it must each reconstruct
on their own. With F = BatchTopK(Z) chosen once over all d_sae latents (batchtopk.py), the loss is the paper's sum
over prefixes
    L = sum_m ||x - (F[:, :s_m] W_dec[:s_m] + b_dec)||^2 + aux_coeff * AuxK
(each term a mean over tokens; AuxK on the whole dictionary's residual, as in TopK). The early latents must serve
every prefix, so they learn general features, and later latents add detail instead of absorbing earlier ones.
This is the paper's fixed-prefix form; Nabeshima's version samples the prefix sizes at random every batch.

Prefix sizes are the option `prefixes`: latent counts (ints, e.g. [128, 512, 2048]) or fractions of d_sae (floats
in (0, 1], e.g. [0.0625, 0.25, 1.0]); d_sae itself is always the last prefix (added when missing). The default
nests by factors of 4 (1/64, 1/16, 1/4 and all of d_sae), so it fits any width, e.g. a sweep's.

Inference is BatchTopK's: one threshold theta, f = z * 1[z > theta], exported by `to_jumprelu`. `loss(...)`
returns each prefix's reconstruction loss in `.prefix_recon`; `.recon` is the whole dictionary's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from saeforge.saes.base import register
from saeforge.saes.batchtopk import BatchTopKSAE

DEFAULT_PREFIXES = (1 / 64, 1 / 16, 1 / 4, 1.0)


def prefix_sizes(prefixes: Sequence[int | float], d_sae: int) -> tuple[int, ...]:
    """The sorted, distinct prefix sizes (latent counts) of `prefixes` (ints: counts; floats: fractions of d_sae,
    rounded, at least 1), ending at d_sae."""
    if isinstance(prefixes, (str, bytes)) or not isinstance(prefixes, Sequence) or not prefixes:
        raise ValueError(f"prefixes must be a non-empty list of latent counts or fractions of d_sae, "
                         f"got {prefixes!r}")
    sizes = {d_sae}
    for p in prefixes:
        if isinstance(p, bool) or not isinstance(p, (int, float)):
            raise ValueError(f"prefixes: {p!r} is neither a latent count (int) nor a fraction of d_sae (float)")
        if isinstance(p, int):
            if not 1 <= p <= d_sae:
                raise ValueError(f"prefixes: a prefix of {p} latents is outside 1..d_sae={d_sae}")
            sizes.add(p)
        else:
            if not 0 < p <= 1:
                raise ValueError(f"prefixes: the fraction {p!r} of d_sae is outside (0, 1]")
            sizes.add(max(1, round(p * d_sae)))
    return tuple(sorted(sizes))


@register("matryoshka_batchtopk")
class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    saelens_architecture = "matryoshka_batchtopk"  # SAELens's name for its training SAE; to_jumprelu() for inference
    option_names = BatchTopKSAE.option_names + ("prefixes",)

    def __init__(self, d_in: int, d_sae: int, *, k: int = 32, prefixes: Sequence[int | float] = DEFAULT_PREFIXES,
                 k_aux: int | None = None, aux_coeff: float = 1 / 32, threshold_rate: float = 0.01,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__(d_in, d_sae, k=k, k_aux=k_aux, aux_coeff=aux_coeff, threshold_rate=threshold_rate,
                         dtype=dtype, device=device)
        try:
            self.prefix_sizes = prefix_sizes(prefixes, d_sae)
        except ValueError as e:
            raise ValueError(f"{type(self).__name__}: {e}") from None
        self.prefixes = tuple(prefixes)  # as given (saved in cfg.json)
