"""Steering with single latents (paper B §4.2), swept over the size of the push.

For latent i with decoder row d_i: L = the n tokens with the largest entries of W_U^T d_i. Add alpha * d_i / ||d_i||
to the site activation (at every spliced position) and measure, averaged over positions,
  on_target        = sum_{j in L} (p_steered_j - p_j)
  off_target       = sum_{j not in L} (p_steered_j - p_j)        (= -on_target, since probabilities sum to 1)
  off_target_added = sum_{j not in L} max(p_steered_j - p_j, 0)  (probability added to all other tokens, the
                     non-trivial specificity measure paper B plots: "lower is better")
The paper does not give alpha; one push size can saturate every latent (or move none), so alpha is swept.
"""

from __future__ import annotations

import math
import sys
from typing import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saeforge.evaluation.splice import splice_mask
from saeforge.models.lm import position_chunks
from saeforge.models.splice import replace_at


@torch.no_grad()
def steering_effects(lm, W_dec: Tensor, site: str, contexts: Tensor, latents: list[int], *,
                     alphas: Sequence[float], top_tokens: int = 10, keep_bos: bool = False, batch_size: int = 4,
                     progress: bool = False) -> dict:
    """Per-latent and averaged probability changes at each push size in `alphas` (norms in the site's units);
    W_dec [M, d_model] must live in the residual space."""
    W_U = lm.unembed()
    if W_dec.shape[1] != W_U.shape[0]:
        raise ValueError(
            f"steering needs a site in the residual stream (d_model={W_U.shape[0]}); this SAE's d_in is "
            f"{W_dec.shape[1]} at {site!r}"
        )
    alphas = [float(a) for a in alphas]
    directions = W_dec[latents].float()
    directions = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-12)
    targets = (directions.to(W_U.device) @ W_U.float()).topk(top_tokens, dim=1).indices  # [n_latents, n]
    shape = (len(alphas), len(latents))
    on, off, off_added = (torch.zeros(shape, dtype=torch.float64) for _ in range(3))
    n_positions = 0
    bar = tqdm(total=len(alphas) * len(latents) * math.ceil(contexts.shape[0] / batch_size), desc="steering",
               disable=not progress, file=sys.stderr)
    for start in range(0, contexts.shape[0], batch_size):
        tokens = contexts[start : start + batch_size]
        mask = splice_mask(lm, tokens, keep_bos)
        p_clean = torch.softmax(lm.forward(tokens)[mask].float(), dim=-1)
        n_positions += p_clean.shape[0]
        for a, alpha in enumerate(alphas):
            for j, direction in enumerate(directions):
                shift = alpha * direction
                edit = replace_at(mask, lambda x, s=shift: x + s.to(device=x.device, dtype=x.dtype))
                logits = lm.forward(tokens, edits={site: edit})[mask]
                on_ids = targets[j].to(logits.device)
                for rows in position_chunks(*logits.shape):
                    delta = torch.softmax(logits[rows].float(), dim=-1) - p_clean[rows]
                    on_target = delta[:, on_ids]
                    on[a, j] += float(on_target.sum(dtype=torch.float64))
                    off[a, j] += float(delta.sum(dtype=torch.float64) - on_target.sum(dtype=torch.float64))
                    off_added[a, j] += float(delta.clamp_min(0).sum(dtype=torch.float64)
                                             - on_target.clamp_min(0).sum(dtype=torch.float64))
                del logits
                bar.update(1)
    bar.close()
    on, off, off_added = on / n_positions, off / n_positions, off_added / n_positions
    sweep = [  # per-latent lists follow the order of "latents"
        {"alpha": alpha, "mean_on_target": float(on[a].mean()), "mean_off_target": float(off[a].mean()),
         "mean_off_target_added": float(off_added[a].mean()), "on_target": on[a].tolist(),
         "off_target": off[a].tolist(), "off_target_added": off_added[a].tolist()}
        for a, alpha in enumerate(alphas)
    ]
    return {
        "top_tokens": top_tokens,
        "positions": n_positions,
        "latents": [{"latent": int(i), "tokens": [int(t) for t in targets[j]]} for j, i in enumerate(latents)],
        "sweep": sweep,
    }
