"""The SAE formats researchers already use, in and out: SAELens (both ways), Gemma Scope 1 and 2, dictionary_learning
and EleutherAI sparsify (read). `saeforge.load_sae` reads any of them through `read_sae`; `saeforge convert` writes
what it read as a saeforge directory, a SAELens directory, or a JumpReLU.

    from saeforge.interop import read_sae, export_saelens, detect_format
    sae = read_sae("gemma-scope-2-270m-pt/resid_post/layer_9_width_16k_l0_medium")   # a saeforge SAE
    export_saelens(sae, "out/")                                                        # opens in SAELens

Each reader gives an SAE with the same features and reconstructions as the source, up to float rounding (rewrites
are listed in sae.meta.imported["conversions"]), or refuses with the reason; what a format does not
record (model, site, context, activation scale) is listed under "missing". Foreign files are read without pickle:
safetensors, JSON, numpy with allow_pickle=False, torch.load(weights_only=True).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from saeforge.files import read_json
from saeforge.interop.build import InteropError
from saeforge.saes.base import SAE

# name -> (what identifies it, reader). Order matters only where two could match; their files differ.
FORMATS: dict[str, str] = {
    "saeforge": "cfg.json with a \"saeforge\" block + sae_weights.safetensors",
    "saelens": "cfg.json (d_in, d_sae, architecture) + sae_weights.safetensors",
    "sparsify": "cfg.json (d_in, k, num_latents or expansion_factor) + sae.safetensors",
    "dictionary_learning": "ae.pt (+ config.json)",
    "gemma_scope_2": "params.safetensors (+ config.json)",
    "gemma_scope_1": "params.npz",
}


def _why_not(directory: Path) -> dict[str, str]:
    """For each format, why `directory` is not one ("" where it is)."""
    cfg_path = directory / "cfg.json"
    cfg = read_json(cfg_path, InteropError, expect_object=False) if cfg_path.is_file() else None
    has = {name: (directory / name).is_file() for name in
           ("cfg.json", "sae_weights.safetensors", "sae.safetensors", "ae.pt", "params.safetensors", "params.npz")}
    native = isinstance(cfg, dict) and isinstance(cfg.get("saeforge"), dict) and "architecture" in cfg["saeforge"]
    why = {}
    why["saeforge"] = ("no cfg.json" if not has["cfg.json"] else "cfg.json has no saeforge block" if not native
                       else "no sae_weights.safetensors" if not has["sae_weights.safetensors"] else "")
    why["saelens"] = ("no cfg.json" if not has["cfg.json"]
                      else "cfg.json is not a SAELens config (needs d_in and d_sae)" if not (
                          isinstance(cfg, dict) and "d_in" in cfg and "d_sae" in cfg)
                      else "no sae_weights.safetensors" if not has["sae_weights.safetensors"] else "")
    why["sparsify"] = ("no cfg.json" if not has["cfg.json"]
                       else "no sae.safetensors" if not has["sae.safetensors"]
                       else "cfg.json is not a sparsify config (needs d_in and k)" if not (
                           isinstance(cfg, dict) and "d_in" in cfg and "k" in cfg) else "")
    why["dictionary_learning"] = "" if has["ae.pt"] else "no ae.pt"
    why["gemma_scope_2"] = "" if has["params.safetensors"] else "no params.safetensors"
    why["gemma_scope_1"] = "" if has["params.npz"] else "no params.npz"
    return why


def detect_format(path: str | os.PathLike) -> str:
    """The format of an SAE directory (or of the directory holding a given weights file); InteropError listing every
    format tried and what it lacked, and the SAE directories inside when `path` holds several (a sparsify run, a
    release)."""
    directory = Path(path)
    if directory.is_file():
        directory = directory.parent
    if not directory.is_dir():
        raise InteropError(f"{directory} is not a saved SAE (no cfg.json: the directory does not exist)")
    why = _why_not(directory)
    found = [name for name, reason in why.items() if not reason]
    if found:
        return found[0]
    inside = sorted(p.name for p in directory.iterdir() if p.is_dir() and not all(_why_not(p).values()))
    lines = [f"{directory} is not a saved SAE in any format saeforge reads; tried:"]
    lines += [f"  {name} ({FORMATS[name]}): {why[name]}" for name in FORMATS]
    if inside:
        shown = ", ".join(inside[:12]) + (f", ... ({len(inside)} in all)" if len(inside) > 12 else "")
        lines.append(f"it holds SAE directories: {shown}; pass one of them")
    raise InteropError("\n".join(lines))


def _readers() -> dict[str, Callable[..., SAE]]:
    from saeforge.interop.dictionary_learning import read_dictionary_learning
    from saeforge.interop.gemma_scope import read_gemma_scope_1, read_gemma_scope_2
    from saeforge.interop.saelens import read_saelens
    from saeforge.interop.sparsify import read_sparsify

    return {"saelens": read_saelens, "sparsify": read_sparsify, "dictionary_learning": read_dictionary_learning,
            "gemma_scope_2": read_gemma_scope_2, "gemma_scope_1": read_gemma_scope_1}


def read_sae(path: str | os.PathLike, *, format: str | None = None, model: str | None = None,
             site: str | None = None, activation_scale: float | None = None,
             fold_decoder_norm: bool = False) -> SAE:
    """Read an SAE in any format of FORMATS (detected unless `format` is given) as a saeforge SAE.

    model, site: the LM and saeforge site it belongs to, where the format does not record them (or to correct
    them). activation_scale: the factor a SAELens SAE with normalize_activations = "expected_average_only_in"
    expects its inputs multiplied by, when its directory lacks activation_scaler.json. fold_decoder_norm: make the
    decoder rows unit norm, moving each norm into the encoder (features then scale by the norms; exact except for
    a TopK with unequal norms, which is refused)."""
    directory = Path(path)
    if directory.is_file():
        directory = directory.parent
    fmt = format or detect_format(directory)
    if fmt == "saeforge":
        from saeforge.saes.base import load_sae

        sae = load_sae(directory)
        if fold_decoder_norm:
            _fold_norms_in_place(sae)
    else:
        readers = _readers()
        if fmt not in readers:
            raise InteropError(f"unknown format {fmt!r}; saeforge reads {list(FORMATS)}")
        if not directory.is_dir():
            raise InteropError(f"{directory} is not a directory")
        kwargs: dict[str, Any] = {"activation_scale": activation_scale}
        if fmt == "saelens":
            kwargs["fold_decoder_norms"] = fold_decoder_norm
        try:
            sae = readers[fmt](directory, **kwargs)
        except InteropError:
            raise
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InteropError(f"{directory}: cannot read it as {fmt}: {e}") from e
        if fold_decoder_norm and fmt != "saelens":
            _fold_norms_in_place(sae)
    imported = sae.meta.imported
    for key, value, label in (("model_name", model, "model name"), ("site", site, "saeforge site")):
        if value is not None:
            setattr(sae.meta, key, value)
            if imported is not None:
                imported["missing"] = [m for m in imported["missing"] if not m.startswith(label)]
                imported.setdefault("given", {})[key] = value
    return sae


def _fold_norms_in_place(sae: SAE) -> None:
    import torch

    from saeforge.interop.build import float64, fold_decoder_norm

    p = {k: float64(v) for k, v in sae.state_dict().items()}
    norms = p["W_dec"].norm(dim=1)
    if sae.sparsity == "k" and float(norms.max() - norms.min()) > 1e-6 * float(norms.max()):
        raise InteropError(f"fold_decoder_norm on a {sae.architecture} SAE with unequal decoder norms would change "
                           "which latents are selected")
    if sae.architecture not in ("relu", "gated", "jumprelu", "topk"):
        raise InteropError(f"fold_decoder_norm is defined for relu, gated, jumprelu and topk SAEs, not "
                           f"{sae.architecture}")
    fold_decoder_norm(p, sae.architecture)
    dtype = sae.W_dec.dtype
    with torch.no_grad():
        sae.load_state_dict({k: v.to(dtype) for k, v in p.items()})
    imported = sae.meta.imported
    if imported is not None:
        imported["conversions"].append("decoder norms folded into the encoder (unit-norm rows; features scale by "
                                       "the norms)")


def export_saelens(sae: SAE, directory: str | os.PathLike) -> Path:
    """Write an SAE as a SAELens 6 directory; InteropError when SAELens has none with the same features."""
    from saeforge.interop.saelens import export_saelens as export

    return export(sae, directory)


def as_jumprelu(sae: SAE) -> SAE:
    from saeforge.interop.convert import as_jumprelu as convert

    return convert(sae)


__all__ = ["FORMATS", "InteropError", "detect_format", "read_sae", "export_saelens", "as_jumprelu"]
