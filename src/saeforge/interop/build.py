"""Shared by the readers: the error type, checked tensors, exact rewrites of foreign SAEs into saeforge's form, and
the record of where an imported SAE came from.

Every rewrite here is an identity on the SAE's function (features and reconstructions), done in float64 and cast to
the SAE's dtype once at the end, so the only difference from the source is that final rounding:

- b_dec not subtracted at the input (Gemma Scope, dictionary_learning's JumpReLU, SAELens's
  apply_b_dec_to_input = False): x @ W_enc + b = (x - b_dec) @ W_enc + (b + b_dec @ W_enc); for a gated encoder the
  magnitude path's shift is scaled by exp(r_mag).
- activations scaled by s before the SAE (SAELens's expected_average_only_in): W_enc * s, W_dec / s, b_dec / s.
- an affine whitening z = (x - mean) @ M before the SAE: W_enc <- M @ W_enc, W_dec <- W_dec @ M^-1,
  b_dec <- b_dec @ M^-1 + mean.
- a per-latent decoder scale (a legacy finetuning scaling factor): folded into W_dec's rows.
- a JumpReLU written as ReLU(pre) * 1[pre > threshold] (SAELens, Gemma Scope, dictionary_learning) is saeforge's
  pre * 1[pre > max(threshold, 0)]: the same function for every threshold.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saeforge.saes.base import REGISTRY, SAE, SAELoadError
from saeforge.saes.metadata import SAEMetadata

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64,
           "torch.float32": torch.float32, "torch.bfloat16": torch.bfloat16, "torch.float16": torch.float16,
           "torch.float64": torch.float64}


class InteropError(SAELoadError):
    """A foreign SAE that cannot be read, or an SAE that cannot be written in a foreign format (the message says
    why, and what would make it work)."""


def dtype_of(name: Any, where: str) -> torch.dtype:
    if name is None:
        return torch.float32
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        known = sorted(k for k in _DTYPES if "." not in k)
        raise InteropError(f"{where}: unknown dtype {name!r}; saeforge reads {known}")
    return _DTYPES[name]


def float64(t: Tensor) -> Tensor:
    return t.detach().to(device="cpu", dtype=torch.float64)


def check_tensors(tensors: dict[str, Tensor], shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """Every expected tensor present with its shape and finite; `where` (a file) names the culprit."""
    missing = sorted(k for k in shapes if k not in tensors)
    if missing:
        raise InteropError(f"{where}: missing tensor(s) {missing}; found {sorted(tensors)}")
    for name, shape in shapes.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(shape):
            raise InteropError(f"{where}: tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise InteropError(f"{where}: tensor {name!r} holds {int((~torch.isfinite(t)).sum())} non-finite values")


def fold_input_bias(p: dict[str, Tensor], gated: bool = False) -> None:
    """In place: an encoder that reads x (not x - b_dec) rewritten for saeforge's x - b_dec."""
    shift = p["b_dec"] @ p["W_enc"]
    if gated:
        p["b_gate"] = p["b_gate"] + shift
        p["b_mag"] = p["b_mag"] + torch.exp(p["r_mag"]) * shift
    else:
        p["b_enc"] = p["b_enc"] + shift


def fold_input_scale(p: dict[str, Tensor], s: float) -> None:
    """In place: an SAE that reads s * x rewritten to read x (SAELens's fold_activation_norm_scaling_factor)."""
    p["W_enc"] = p["W_enc"] * s
    p["W_dec"] = p["W_dec"] / s
    p["b_dec"] = p["b_dec"] / s


def fold_whitening(p: dict[str, Tensor], mean: Tensor, matrix: Tensor, inverse: Tensor, b_dec_at_input: bool,
                   gated: bool = False) -> None:
    """In place: an SAE that reads z = (x - mean) @ matrix and writes x_hat = z_hat @ inverse + mean, rewritten to
    read and write x. With b_dec subtracted at the input the new b_dec absorbs the mean on both sides; otherwise
    the encoder biases take -mean @ (matrix @ W_enc)."""
    p["W_enc"] = matrix @ p["W_enc"]
    if not b_dec_at_input:
        shift = mean @ p["W_enc"]
        if gated:
            p["b_gate"] = p["b_gate"] - shift
            p["b_mag"] = p["b_mag"] - torch.exp(p["r_mag"]) * shift
        else:
            p["b_enc"] = p["b_enc"] - shift
    p["W_dec"] = p["W_dec"] @ inverse
    p["b_dec"] = p["b_dec"] @ inverse + mean


def fold_decoder_norm(p: dict[str, Tensor], architecture: str) -> Tensor:
    """In place: unit-norm decoder rows, each latent's norm n moved into its encoder (features scale by n,
    reconstructions unchanged). Exact for ReLU, JumpReLU and gated encoders (positively homogeneous in each latent);
    for TopK only where every n is equal (the caller checks). Rows of norm 0 are left alone. Returns the norms."""
    norms = p["W_dec"].norm(dim=1)
    n = torch.where(norms > 0, norms, torch.ones_like(norms))
    p["W_dec"] = p["W_dec"] / n[:, None]
    p["W_enc"] = p["W_enc"] * n[None, :]
    for name in ("b_enc", "threshold", "b_gate", "b_mag"):
        if name in p and p[name] is not None:
            p[name] = p[name] * n
    return norms


def build_sae(architecture: str, p: dict[str, Tensor], dtype: torch.dtype, options: dict | None = None,
              where: str = "") -> SAE:
    """A saeforge SAE of `architecture` holding the (float64) parameters p, cast to dtype."""
    W_enc = p["W_enc"]
    d_in, d_sae = int(W_enc.shape[0]), int(W_enc.shape[1])
    try:
        sae = REGISTRY[architecture](d_in=d_in, d_sae=d_sae, dtype=dtype, **(options or {}))
    except (TypeError, ValueError) as e:
        raise InteropError(f"{where}: not a valid {architecture} SAE: {e}") from e
    state = sae.state_dict()
    extra = sorted(set(p) - set(state))
    missing = sorted(set(state) - set(p))
    if extra or missing:  # a reader's bug, not the user's: say so plainly
        raise InteropError(f"{where}: internal error, parameters do not match a {architecture} SAE: missing "
                           f"{missing}, unexpected {extra}")
    for name, value in p.items():
        if tuple(value.shape) != tuple(state[name].shape):
            raise InteropError(f"{where}: tensor {name!r} has shape {tuple(value.shape)}, expected "
                               f"{tuple(state[name].shape)} (d_in={d_in}, d_sae={d_sae})")
        if not torch.isfinite(value).all():
            raise InteropError(f"{where}: tensor {name!r} holds non-finite values after conversion")
    sae.load_state_dict({k: v.to(dtype) for k, v in p.items()})
    return sae


def record(sae: SAE, *, fmt: str, path: str | os.PathLike, source_architecture: str, model_name: str | None,
           site: str | None, source_hook: str | None = None, context_size: int | None = None,
           dataset: str | None = None, conversions: list[str] | None = None, missing: list[str] | None = None,
           extra: dict | None = None, scale_known: bool = False) -> SAE:
    """Fill sae.meta: model, site, context and dataset as the source records them, and `imported`: the source
    format, path and architecture, each rewrite applied, and what the source does not record."""
    missing = list(missing or [])
    if not model_name:
        missing.append("model name (pass --model to eval, or convert with --model)")
    if not site:
        missing.append("saeforge site" + (f" (the source's hook {source_hook!r} has none in saeforge)"
                                          if source_hook else "") + " (pass --site to eval, or convert with --site)")
    if context_size is None:
        missing.append("context size")
    if not scale_known:
        missing.append("activation scale and outlier threshold of training (not part of this format; eval splices "
                       "every non-BOS position)")
    imported = {"format": fmt, "path": str(Path(path)), "source_architecture": source_architecture,
                "conversions": list(conversions or []), "missing": missing}
    if source_hook is not None:
        imported["source_hook"] = source_hook
    if extra:
        imported.update(extra)
    sae.meta = SAEMetadata(model_name=model_name, site=site, context_size=context_size, dataset=dataset,
                           imported=imported)
    return sae
