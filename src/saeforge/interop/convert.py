"""Conversion between formats (the `saeforge convert` command is commands/convert.py): read an SAE in any format
saeforge reads and write it.

    --to saeforge   a saeforge directory (its cfg.json is SAELens 6's too, plus saeforge's block): what `eval`,
                    `sweep` and `load_sae` read natively, with the source's provenance kept in cfg.json
    --to saelens    a SAELens 6 directory (SAE.load_from_disk), refused for what SAELens cannot hold
    --to jumprelu   the SAE's JumpReLU form as a saeforge directory (also a SAELens jumprelu): exact for a tied
                    Gated SAE (JumpReLUSAE.from_gated), a ReLU SAE (threshold 0), a JumpReLU, and any SAE with its own
                    to_jumprelu() (BatchTopK, Matryoshka); refused for a per-token TopK (its k is no threshold) and an
                    untied Gated SAE
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from saeforge.interop import FORMATS, read_sae
from saeforge.interop.build import InteropError
from saeforge.interop.saelens import export_saelens
from saeforge.saes.base import SAE


def as_jumprelu(sae: SAE) -> SAE:
    """The JumpReLU SAE with this SAE's features and reconstructions; InteropError where there is none."""
    from saeforge.saes.jumprelu import JumpReLUSAE

    if sae.architecture == "jumprelu":
        return sae
    if callable(getattr(sae, "to_jumprelu", None)):
        jr = sae.to_jumprelu()
    elif sae.architecture == "gated":
        if not sae.tied:
            raise InteropError("an untied Gated SAE (tied=False) is no JumpReLU: its magnitude path has its own "
                               "W_mag, so the gate and the magnitude are not one pre-activation and a threshold")
        jr = JumpReLUSAE.from_gated(sae)
    elif sae.architecture == "relu":
        jr = JumpReLUSAE(sae.d_in, sae.d_sae, dtype=sae.W_dec.dtype, device=sae.W_dec.device)
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                getattr(jr, name).copy_(getattr(sae, name))
            jr.threshold.zero_()  # pre * 1[pre > 0] = ReLU(pre)
    else:
        raise InteropError(f"a {sae.architecture} SAE has no JumpReLU form: "
                           + ("its selection keeps each token's k largest latents, a rank, not a threshold"
                              if sae.sparsity == "k" else "saeforge knows no exact conversion"))
    jr.meta = copy.deepcopy(sae.meta)
    jr.meta.converted_from = sae.variant()
    return jr


def convert(src: str | Path, dst: str | Path, to: str = "saeforge", *, format: str | None = None,
            model: str | None = None, site: str | None = None, activation_scale: float | None = None,
            fold_decoder_norm: bool = False, overwrite: bool = False) -> tuple[SAE, Path]:
    """Read `src` (any format of FORMATS), write `dst` in the format `to`; returns the SAE written and its path."""
    src, dst = Path(src), Path(dst)
    if to not in ("saeforge", "saelens", "jumprelu"):
        raise InteropError(f"--to must be saeforge, saelens or jumprelu, got {to!r}")
    if dst.exists() and not dst.is_dir():
        raise InteropError(f"{dst} is a file; the output is a directory")
    if dst.resolve() == (src.parent if src.is_file() else src).resolve():
        raise InteropError(f"the output {dst} is the input directory; write elsewhere")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise InteropError(f"{dst} exists and is not empty; pass --overwrite to replace its SAE files")
    sae = read_sae(src, format=format, model=model, site=site, activation_scale=activation_scale,
                   fold_decoder_norm=fold_decoder_norm)
    if to == "jumprelu":
        sae = as_jumprelu(sae)
    if to == "saelens":
        return sae, export_saelens(sae, dst)
    return sae, sae.save(dst)


__all__ = ["convert", "as_jumprelu", "FORMATS"]
