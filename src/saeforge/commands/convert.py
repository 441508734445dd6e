"""`saeforge convert SRC DST [--to saeforge|saelens|jumprelu]`: an SAE in any format saeforge reads (saeforge,
SAELens, Gemma Scope 1 and 2, dictionary_learning, sparsify) written as a saeforge directory, a SAELens directory or
its JumpReLU form (saeforge.interop)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal, Optional

from tyro.conf import Positional

from saeforge.interop.convert import convert


def convert_command(
    src: Positional[Path],
    dst: Positional[Path],
    to: Literal["saeforge", "saelens", "jumprelu"] = "saeforge",
    format: Optional[Literal["saeforge", "saelens", "sparsify", "dictionary_learning", "gemma_scope_2",
                             "gemma_scope_1"]] = None,
    model: Optional[str] = None,
    site: Optional[str] = None,
    activation_scale: Optional[float] = None,
    fold_decoder_norm: bool = False,
    overwrite: bool = False,
) -> None:
    """Convert an SAE between formats: saeforge, SAELens, Gemma Scope 1 and 2, dictionary_learning, sparsify in;
    saeforge, SAELens or a JumpReLU out.

    Args:
        src: the SAE's directory (or a weights file in it: params.npz, ae.pt, ...).
        dst: the output directory.
        to: saeforge (a directory eval and load_sae read, SAELens-compatible), saelens (a SAELens 6 directory), or
            jumprelu (the SAE's exact JumpReLU form, as a saeforge directory).
        format: the input's format (else detected from its files).
        model: the language model the SAE belongs to, where the input does not record it.
        site: the saeforge site (e.g. blocks.9.resid_post), where the input does not record it.
        activation_scale: the input scaling a SAELens SAE with normalize_activations = expected_average_only_in
            expects, when its directory has no activation_scaler.json.
        fold_decoder_norm: make decoder rows unit norm (each norm moved into the encoder; features scale by it).
        overwrite: replace the SAE files of a non-empty output directory.
    """
    sae, out = convert(src, dst, to, format=format, model=model, site=site, activation_scale=activation_scale,
                       fold_decoder_norm=fold_decoder_norm, overwrite=overwrite)
    imported = sae.meta.imported or {}
    source = f"{imported.get('format', 'saeforge')}, {imported.get('source_architecture', sae.architecture)}"
    print(f"read:   {src} ({source})")
    print(f"wrote:  {out} ({to}: {sae.variant()}, d_in={sae.d_in}, d_sae={sae.d_sae})")
    print(f"model:  {sae.meta.model_name}   site: {sae.meta.site}")
    for line in imported.get("conversions", []):
        print(f"  converted: {line}")
    for line in imported.get("missing", []):
        print(f"  not recorded: {line}", file=sys.stderr)
