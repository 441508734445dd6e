"""Gemma Scope (Google DeepMind's JumpReLU SAEs): release 1 for Gemma 2, release 2 for Gemma 3 (Gemma 3 270M, the
model saeforge embeds, among them).

Both compute pre = x @ W_enc + b_enc (b_dec is NOT subtracted at the input), f = ReLU(pre) * 1[pre > threshold],
x_hat = f @ W_dec + b_dec. saeforge reads them as a JumpReLU SAE with b_enc + b_dec @ W_enc as its encoder bias
(it subtracts b_dec) and thresholds below 0 read as 0 (the same function); see build.py.

Gemma Scope 1: params.npz with W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc, b_dec, threshold, and no config.
The model, site, width and L0 live only in the path (google/gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82);
saeforge reads them from there when it can (res -> resid_post, mlp -> mlp_out, att -> attn_z: Gemma Scope's
attention SAEs read the heads' concatenated outputs before the output projection) and records what it cannot.
Read with numpy, allow_pickle=False.

Gemma Scope 2: params.safetensors with lowercase w_enc, w_dec, b_enc, b_dec, threshold, and config.json with
hf_hook_point_in (a Hugging Face module name, `model.layers.9.output`), width, l0, architecture ("jump_relu"),
affine_connection, model_name, type. Transcoders (type "transcoder", a hook_point_out other than the input, or an
affine skip connection) map one site to another and are refused: saeforge's SAEs reconstruct their input. Without
config.json the folder name (resid_post/layer_9_width_16k_l0_medium) gives the site, as SAELens infers it.
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from saeforge.interop import hooks
from saeforge.files import read_json
from saeforge.interop.build import InteropError, build_sae, check_tensors, float64, fold_input_bias, record
from saeforge.saes.base import SAE

GS1_FILE = "params.npz"
GS2_FILE = "params.safetensors"
GS2_CONFIG = "config.json"

_GS1_REPO = re.compile(r"gemma-scope-(\d+b)-(pt|it)-(res|mlp|att|transcoders?)")
_GS2_REPO = re.compile(r"gemma-scope-2-(\d+[mb])-(pt|it)")
_GS1_SITES = {"res": "resid_post", "mlp": "mlp_out", "att": "attn_z"}
# Gemma Scope 2's folder kinds -> the module it reads (as SAELens infers them when config.json is absent).
_GS2_FOLDERS = {"resid_post": "model.layers.{L}.output", "attn_out": "model.layers.{L}.self_attn.o_proj.input",
                "mlp_out": "model.layers.{L}.post_feedforward_layernorm.output"}


def _jumprelu(p: dict, conversions: list[str]) -> None:
    fold_input_bias(p)
    conversions.append("b_dec is not subtracted at the input: b_dec @ W_enc folded into b_enc")
    negative = int((p["threshold"] < 0).sum())
    if negative:
        p["threshold"] = p["threshold"].clamp(min=0)
        conversions.append(f"{negative} negative threshold(s) read as 0 (ReLU(pre) * 1[pre > t]: the same function)")


def read_gemma_scope_1(directory: str | os.PathLike, **_) -> SAE:
    directory = Path(directory)
    path = directory / GS1_FILE
    try:
        with np.load(path, allow_pickle=False) as data:
            raw = {k: torch.from_numpy(np.asarray(data[k]).copy()) for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise InteropError(f"{path}: not a readable numpy .npz file (or it holds pickled objects, which saeforge "
                           f"never loads): {e}") from e
    # Gemma Scope writes W_enc / W_dec; accept the lowercase spelling of release 2 too.
    raw = {("W_" + k[2:] if k.startswith("w_") else k): v for k, v in raw.items()}
    if "W_enc" not in raw or raw["W_enc"].ndim != 2:
        raise InteropError(f"{path}: no 2-d W_enc; found {sorted(raw)} (Gemma Scope 1 has W_enc, W_dec, b_enc, b_dec, "
                           "threshold)")
    d_in, d_sae = (int(n) for n in raw["W_enc"].shape)
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,),
              "threshold": (d_sae,)}
    check_tensors(raw, shapes, str(path))
    if set(raw) - set(shapes):
        raise InteropError(f"{path}: unexpected arrays {sorted(set(raw) - set(shapes))} for a Gemma Scope SAE")
    p = {k: float64(raw[k]) for k in shapes}
    conversions: list[str] = []
    _jumprelu(p, conversions)
    sae = build_sae("jumprelu", p, torch.float32, {}, str(path))
    found = _gs1_path_facts(directory)
    if found.get("kind", "").startswith("transcoder"):
        raise InteropError(f"{directory}: a Gemma Scope transcoder (it maps the MLP's input to its output); "
                           "saeforge's SAEs reconstruct their input")
    missing = [] if found else ["Gemma Scope 1 has no config: model, site, width and L0 were not in the path"]
    return record(sae, fmt="gemma_scope_1", path=directory, source_architecture="jumprelu",
                  model_name=found.get("model"), site=found.get("site"), context_size=found.get("context_size"),
                  conversions=conversions, missing=missing,
                  extra={k: found[k] for k in ("release", "width", "average_l0") if k in found})


def _gs1_path_facts(directory: Path) -> dict:
    text = str(directory.resolve()).replace("models--google--", "").replace("\\", "/")
    facts: dict = {}
    m = _GS1_REPO.search(text)
    layer = re.search(r"layer_(\d+)", text)
    if m:
        size, tuned, kind = m.groups()
        facts.update(release=m.group(0), kind=kind,
                     model=f"google/gemma-2-{size}" + ("-it" if tuned == "it" else ""),
                     context_size=1024)  # Gemma Scope's training context, as SAELens records it
        if layer and kind in _GS1_SITES:
            facts["site"] = f"blocks.{layer.group(1)}.{_GS1_SITES[kind]}"
    width = re.search(r"width_(\d+)([km])", text)
    if width:
        facts["width"] = int(width.group(1)) * (1024 if width.group(2) == "k" else 1024 * 1024)
    l0 = re.search(r"average_l0_(\d+)", text)
    if l0:
        facts["average_l0"] = int(l0.group(1))
    return facts


def read_gemma_scope_2(directory: str | os.PathLike, **_) -> SAE:
    directory = Path(directory)
    path, cfg_path = directory / GS2_FILE, directory / GS2_CONFIG
    config: dict = {}
    if cfg_path.is_file():
        config = read_json(cfg_path, InteropError)
    else:
        config = _gs2_infer_config(directory)
    arch = config.get("architecture", "jump_relu")
    if arch != "jump_relu":
        raise InteropError(f"{cfg_path}: Gemma Scope 2 architecture {arch!r}; saeforge reads 'jump_relu'")
    hook_in, hook_out = config.get("hf_hook_point_in"), config.get("hf_hook_point_out")
    if (config.get("type") == "transcoder" or config.get("affine_connection")
            or (hook_out is not None and hook_out != hook_in)):
        skip = ", with an affine skip connection" if config.get("affine_connection") else ""
        raise InteropError(f"{directory}: a Gemma Scope 2 transcoder (it reads {hook_in!r} and writes {hook_out!r}"
                           f"{skip}); saeforge's SAEs reconstruct their input")
    try:
        raw = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise InteropError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e
    if "affine_skip_connection" in raw:
        raise InteropError(f"{path}: has an affine skip connection (a skip transcoder); saeforge's SAEs have none")
    if "w_enc" not in raw or raw["w_enc"].ndim != 2:
        raise InteropError(f"{path}: no 2-d w_enc; found {sorted(raw)} (Gemma Scope 2 has w_enc, w_dec, b_enc, "
                           "b_dec, threshold)")
    d_in, d_sae = (int(n) for n in raw["w_enc"].shape)
    shapes = {"w_enc": (d_in, d_sae), "w_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,),
              "threshold": (d_sae,)}
    check_tensors(raw, shapes, str(path))
    if set(raw) - set(shapes):
        raise InteropError(f"{path}: unexpected tensors {sorted(set(raw) - set(shapes))} for a Gemma Scope 2 SAE")
    if config.get("width") not in (None, d_sae):
        raise InteropError(f"{cfg_path}: width {config['width']} but w_enc has {d_sae} latents")
    p = {"W_enc": float64(raw["w_enc"]), "W_dec": float64(raw["w_dec"]), "b_enc": float64(raw["b_enc"]),
         "b_dec": float64(raw["b_dec"]), "threshold": float64(raw["threshold"])}
    conversions: list[str] = []
    _jumprelu(p, conversions)
    dtype = raw["w_enc"].dtype if raw["w_enc"].dtype in (torch.float32, torch.bfloat16, torch.float16) \
        else torch.float32
    sae = build_sae("jumprelu", p, dtype, {}, str(path))
    model = _gs2_model_name(config.get("model_name"))
    site = hooks.site_from_hf(hook_in, model)
    extra = {k: config[k] for k in ("width", "l0") if k in config}
    if not cfg_path.is_file():
        conversions.append(f"no {GS2_CONFIG}: hook point inferred from the folder name")
    return record(sae, fmt="gemma_scope_2", path=directory, source_architecture="jump_relu", model_name=model,
                  site=site, source_hook=hook_in, conversions=conversions, extra=extra)


def _gs2_model_name(name) -> str | None:
    """Gemma Scope 2's model name as a hub id (SAELens's rules: google/ prefix, -v3 -> -3; the 270M base model's hub
    id has no -pt suffix)."""
    if not isinstance(name, str) or not name:
        return None
    if "/" not in name:
        name = "google/" + name
    name = name.replace("-v3", "-3")
    if "270m" in name:
        name = name.replace("-pt", "")
    return name


def _gs2_infer_config(directory: Path) -> dict:
    text = str(directory.resolve()).replace("models--google--", "").replace("\\", "/")
    if "transcoder" in text or "clt" in text:
        return {"type": "transcoder", "hf_hook_point_in": None, "hf_hook_point_out": "(a transcoder)"}
    layer = re.search(r"layer_(\d+)", directory.name) or re.search(r"layer_(\d+)", text)
    config: dict = {"architecture": "jump_relu"}
    for kind, template in _GS2_FOLDERS.items():
        if f"{kind}/" in text or f"{kind}_all/" in text:
            if layer:
                config["hf_hook_point_in"] = template.format(L=layer.group(1))
            break
    repo = _GS2_REPO.search(text)
    if repo:
        config["model_name"] = f"google/gemma-3-{repo.group(1)}-{repo.group(2)}"
    return config
