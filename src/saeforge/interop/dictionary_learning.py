"""dictionary_learning (saprmarks/dictionary_learning): ae.pt (a state dict, read with torch.load(weights_only=True):
tensors only, never a pickle of code) + config.json ({"trainer": {...}, "buffer": {...}}).

Layouts, told apart by the state dict's keys (nn.Linear weights are [out, in], so encoder.weight is W_enc^T and
decoder.weight is W_dec^T):

    class                   keys                                                   saeforge
    AutoEncoder             bias, encoder.weight, encoder.bias, decoder.weight     relu (bias is b_dec, subtracted)
    AutoEncoderNew          encoder.weight/.bias, decoder.weight/.bias             relu (b_dec not subtracted: folded)
    GatedAutoEncoder        decoder_bias, encoder.weight, r_mag, gate_bias,        gated (tied)
                            mag_bias, decoder.weight
    JumpReluAutoEncoder     W_enc, b_enc, W_dec, b_dec, threshold [d_sae]          jumprelu (b_dec not subtracted:
                                                                                   folded; ReLU first: t < 0 -> 0)
    AutoEncoderTopK         encoder.weight/.bias, decoder.weight, b_dec, k,        topk (per-token k)
                            threshold (scalar, unused by its default encode)
    BatchTopKSAE            the same keys as AutoEncoderTopK                       jumprelu, uniform threshold
                                                                                   (its default encode thresholds)
    MatryoshkaBatchTopKSAE  W_enc, b_enc, W_dec, b_dec, k, threshold, group_sizes  jumprelu, uniform threshold

AutoEncoderTopK and BatchTopKSAE share their keys; config.json's trainer.dict_class tells them apart (without it
the directory is refused as ambiguous). A BatchTopK threshold never set (-1) keeps every positive activation: a
JumpReLU at 0. The model is trainer.lm_name, the site trainer.submodule_name (resid_post_layer_9 and the like) or,
failing that, trainer.layer's residual stream output (the assumption SAELens makes; recorded as such), the context
buffer.ctx_len.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch

from saeforge.files import read_json
from saeforge.interop.build import InteropError, build_sae, check_tensors, float64, fold_input_bias, record
from saeforge.saes.base import SAE

AE_FILE = "ae.pt"
CONFIG_FILE = "config.json"

_LAYOUTS = {
    "AutoEncoder": {"bias", "encoder.weight", "encoder.bias", "decoder.weight"},
    "AutoEncoderNew": {"encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"},
    "GatedAutoEncoder": {"decoder_bias", "encoder.weight", "r_mag", "gate_bias", "mag_bias", "decoder.weight"},
    "JumpReluAutoEncoder": {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"},
    "AutoEncoderTopK": {"encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k", "threshold"},
    "MatryoshkaBatchTopKSAE": {"W_enc", "b_enc", "W_dec", "b_dec", "k", "threshold", "group_sizes"},
}
_SUBMODULE = re.compile(r"^(resid_post|resid_pre|mlp_out|attn_out)_layer_(\d+)$")


def read_dictionary_learning(directory: str | os.PathLike, **_) -> SAE:
    directory = Path(directory)
    path, cfg_path = directory / AE_FILE, directory / CONFIG_FILE
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as e:
        raise InteropError(f"{path}: not a state dict torch.load(weights_only=True) accepts (saeforge never "
                           f"unpickles code): {e}") from e
    if not isinstance(loaded, dict):
        raise InteropError(f"{path}: expected a state dict, got a {type(loaded).__name__}")
    state = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}  # e.g. _hub_mixin_config: not weights
    config: dict = {}
    if cfg_path.is_file():
        config = read_json(cfg_path, InteropError)
    trainer = config.get("trainer") if isinstance(config.get("trainer"), dict) else {}
    buffer = config.get("buffer") if isinstance(config.get("buffer"), dict) else {}
    dict_class = trainer.get("dict_class")

    keys = set(state)
    layout = next((name for name, needed in _LAYOUTS.items() if keys == needed), None)
    if layout is None:
        raise InteropError(f"{path}: tensors {sorted(keys)} match no dictionary_learning layout saeforge reads "
                           f"({', '.join(f'{n}: {sorted(k)}' for n, k in _LAYOUTS.items())})")
    if layout == "AutoEncoderTopK":
        if dict_class in ("BatchTopKSAE", "BatchTopKAutoEncoder"):
            layout = "BatchTopKSAE"
        elif dict_class != "AutoEncoderTopK":
            raise InteropError(f"{path}: AutoEncoderTopK and BatchTopKSAE store the same tensors; "
                               f"{cfg_path.name}'s trainer.dict_class must say which "
                               f"({'missing' if not cfg_path.is_file() else repr(dict_class)})")
    conversions: list[str] = []
    options: dict = {}
    architecture = "relu"
    if "encoder.weight" in state:
        n, d = (int(s) for s in state["encoder.weight"].shape)
    else:
        d, n = (int(s) for s in state["W_enc"].shape)
    if layout in ("AutoEncoder", "AutoEncoderNew", "AutoEncoderTopK", "BatchTopKSAE"):
        shapes = {"encoder.weight": (n, d), "encoder.bias": (n,), "decoder.weight": (d, n)}
        shapes["bias" if layout == "AutoEncoder" else "decoder.bias" if layout == "AutoEncoderNew" else "b_dec"] = (d,)
        check_tensors(state, shapes, str(path))
        b_dec = state.get("bias", state.get("decoder.bias", state.get("b_dec")))
        p = {"W_enc": float64(state["encoder.weight"]).T.contiguous(), "b_enc": float64(state["encoder.bias"]),
             "W_dec": float64(state["decoder.weight"]).T.contiguous(), "b_dec": float64(b_dec)}
        if layout == "AutoEncoderNew":
            fold_input_bias(p)
            conversions.append("AutoEncoderNew does not subtract its decoder bias at the input: b_dec @ W_enc folded "
                               "into b_enc")
        if layout == "AutoEncoderTopK":
            architecture, options["k"] = "topk", int(state["k"])
        if layout == "BatchTopKSAE":
            architecture = "jumprelu"
            _uniform_threshold(p, state, n, conversions)
    elif layout == "GatedAutoEncoder":
        check_tensors(state, {"encoder.weight": (n, d), "decoder.weight": (d, n), "decoder_bias": (d,),
                              "r_mag": (n,), "gate_bias": (n,), "mag_bias": (n,)}, str(path))
        architecture = "gated"
        p = {"W_enc": float64(state["encoder.weight"]).T.contiguous(), "b_gate": float64(state["gate_bias"]),
             "b_mag": float64(state["mag_bias"]), "r_mag": float64(state["r_mag"]),
             "W_dec": float64(state["decoder.weight"]).T.contiguous(), "b_dec": float64(state["decoder_bias"])}
    else:  # JumpReluAutoEncoder, MatryoshkaBatchTopKSAE: W_enc [d, n]
        shapes = {"W_enc": (d, n), "b_enc": (n,), "W_dec": (n, d), "b_dec": (d,)}
        if layout == "JumpReluAutoEncoder":
            shapes["threshold"] = (n,)
        check_tensors(state, shapes, str(path))
        p = {k: float64(state[k]) for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
        architecture = "jumprelu"
        if layout == "JumpReluAutoEncoder":
            p["threshold"] = float64(state["threshold"])
            fold_input_bias(p)
            conversions.append("JumpReluAutoEncoder does not subtract b_dec at the input (apply_b_dec_to_input = "
                               "False): b_dec @ W_enc folded into b_enc")
            negative = int((p["threshold"] < 0).sum())
            if negative:
                p["threshold"] = p["threshold"].clamp(min=0)
                conversions.append(f"{negative} negative threshold(s) read as 0 (ReLU first: the same function)")
        else:
            groups = [int(g) for g in state["group_sizes"].reshape(-1)]
            if sum(groups) != n:
                raise InteropError(f"{path}: group_sizes {groups} do not add up to the {n} latents")
            _uniform_threshold(p, state, n, conversions)
            conversions.append(f"Matryoshka groups {groups} (all active at inference)")
    sae = build_sae(architecture, p, torch.float32, options, str(path))
    site, assumed = _site(trainer)
    missing = [] if cfg_path.is_file() else [f"{CONFIG_FILE} (model, site, context): not found"]
    if assumed:
        conversions.append(assumed)
    ctx = buffer.get("ctx_len")
    return record(sae, fmt="dictionary_learning", path=directory, source_architecture=layout,
                  model_name=trainer.get("lm_name"), site=site, source_hook=trainer.get("submodule_name"),
                  context_size=ctx if isinstance(ctx, int) else None, conversions=conversions, missing=missing)


def _uniform_threshold(p: dict, state: dict, n: int, conversions: list[str]) -> None:
    theta = float(state["threshold"].reshape(-1)[0]) if state["threshold"].numel() == 1 else None
    if theta is None:
        raise InteropError(f"a BatchTopK threshold must be one number, got shape {tuple(state['threshold'].shape)}")
    p["threshold"] = torch.full((n,), max(theta, 0.0), dtype=torch.float64)
    conversions.append(f"BatchTopK inference (its default encode): ReLU(pre) * 1[ReLU(pre) > {theta:.6g}] = a "
                       f"JumpReLU with threshold {max(theta, 0.0):.6g} for every latent (k = {int(state['k'])} was "
                       "the training batch average)")


def _site(trainer: dict) -> tuple[str | None, str | None]:
    m = _SUBMODULE.match(str(trainer.get("submodule_name") or ""))
    if m:
        return f"blocks.{m.group(2)}.{m.group(1)}", None
    layer = trainer.get("layer")
    if isinstance(layer, int) and not isinstance(layer, bool) and not trainer.get("submodule_name"):
        return (f"blocks.{layer}.resid_post",
                f"site assumed to be blocks.{layer}.resid_post: dictionary_learning records trainer.layer, not which "
                "module of it (SAELens assumes the residual stream too)")
    return None, None
