"""Canonical site names -> (module, input or output) per model family.

A site is one tensor inside the forward pass. Canonical names are `blocks.L.<kind>`:

- `resid_pre`  : the residual stream entering block L (input of the decoder layer)
- `resid_post` : the residual stream leaving block L (output of the decoder layer)
- `attn_out`   : what the attention sub-block adds to the residual stream. For Gemma 2/3 this is after the
                 post-attention norm, because that normed tensor is what is added.
- `mlp_out`    : what the MLP sub-block adds (Gemma 2/3: after the post-feedforward norm)
- `attn_z`     : the input of the attention output projection (heads concatenated, paper A's "attention output
                 pre-linear"), width n_heads * head_dim
- `mlp_post`   : the input of the MLP down projection (the MLP neurons), width d_mlp

Any other string is taken as a raw module path (as in `model.named_modules()`), meaning that module's output.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch.nn as nn

from ..errors import UserError

SITE_KINDS = ("resid_pre", "resid_post", "attn_out", "mlp_out", "attn_z", "mlp_post")

# Where the decoder layers live, relative to the root (CausalLM) module.
_LAYER_PATHS = ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers")

# Per family: sub-module path inside a block, and whether the site is that module's input or output.
_LLAMA = {
    "attn_out": ("self_attn", "output"),
    "mlp_out": ("mlp", "output"),
    "attn_z": ("self_attn.o_proj", "input"),
    "mlp_post": ("mlp.down_proj", "input"),
}
# Gemma 2/3 normalise each sub-block's output before adding it to the residual stream.
_GEMMA_SANDWICH = {
    "attn_out": ("post_attention_layernorm", "output"),
    "mlp_out": ("post_feedforward_layernorm", "output"),
    "attn_z": ("self_attn.o_proj", "input"),
    "mlp_post": ("mlp.down_proj", "input"),
}
_GPT2 = {
    "attn_out": ("attn", "output"),
    "mlp_out": ("mlp", "output"),
    "attn_z": ("attn.c_proj", "input"),
    "mlp_post": ("mlp.c_proj", "input"),
}
_NEOX = {
    "attn_out": ("attention", "output"),
    "mlp_out": ("mlp", "output"),
    "attn_z": ("attention.dense", "input"),
    "mlp_post": ("mlp.dense_4h_to_h", "input"),
}

# config.model_type -> (family, block layout)
FAMILIES: dict[str, tuple[str, dict]] = {
    "gemma": ("gemma", _LLAMA),
    "gemma2": ("gemma2", _GEMMA_SANDWICH),
    "gemma3": ("gemma3", _GEMMA_SANDWICH),
    "gemma3_text": ("gemma3", _GEMMA_SANDWICH),
    "llama": ("llama", _LLAMA),
    "qwen2": ("qwen2", _LLAMA),
    "mistral": ("mistral", _LLAMA),
    "gpt2": ("gpt2", _GPT2),
    "gpt_neox": ("gpt_neox", _NEOX),
}

_CANONICAL = re.compile(r"^blocks\.(\d+)\.(" + "|".join(SITE_KINDS) + r")$")


class SiteError(UserError, ValueError):
    """A site name that does not resolve on this model, or a model whose decoder layers cannot be found."""


@dataclass(frozen=True)
class HookPoint:
    """A site made concrete: the module to hook and whether the site is its (first) input or its (first) output."""

    site: str
    module_path: str
    where: Literal["input", "output"]
    block: int | None  # block index for canonical sites; None for raw module paths


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder layers of a causal LM and their path, or an error naming the paths tried."""
    for path in _LAYER_PATHS:
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList):
            return path, layers
    raise SiteError(
        f"cannot find the decoder layers of {type(model).__name__}; looked for {list(_LAYER_PATHS)}"
    )


def site_width_from_config(config, site: str) -> int | None:
    """The width of a canonical site read from a transformers config alone (no weights), or None when only the
    loaded model can tell (a raw module path, an unfamiliar config). A block past the model's last is a SiteError."""
    m = _CANONICAL.match(site)
    if m is None:
        return None
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    layer, kind = int(m.group(1)), m.group(2)
    if isinstance(n_layers, int) and layer >= n_layers:
        raise SiteError(f"site {site!r}: block {layer} does not exist; the model has blocks 0..{n_layers - 1}")
    d_model = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if kind in ("resid_pre", "resid_post", "attn_out", "mlp_out"):
        return d_model
    if kind == "attn_z":
        heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
        head_dim = getattr(config, "head_dim", None) or (d_model // heads if d_model and heads else None)
        return heads * head_dim if heads and head_dim else None
    d_mlp = getattr(config, "intermediate_size", None)
    if d_mlp is None and getattr(config, "model_type", None) == "gpt2":
        d_mlp = getattr(config, "n_inner", None) or 4 * d_model
    return d_mlp


class SiteResolver:
    """Maps site names to hook points for one model."""

    def __init__(self, model: nn.Module, model_type: str):
        self.model = model
        self.family, self._layout = FAMILIES.get(model_type, (model_type, None))
        self.layers_path, self.layers = find_layers(model)
        self.n_layers = len(self.layers)
        self._modules = dict(model.named_modules())
        if self._layout is None:
            # Unknown model type: accept a known layout only if every one of its modules exists in block 0.
            for _, layout in FAMILIES.values():
                if all(f"{self.layers_path}.0.{sub}" in self._modules for sub, _ in layout.values()):
                    self._layout = layout
                    break

    def sites(self) -> list[str]:
        if self._layout is None:
            return []
        return [f"blocks.{layer}.{kind}" for layer in range(self.n_layers) for kind in SITE_KINDS]

    def resolve(self, site: str) -> HookPoint:
        m = _CANONICAL.match(site)
        if m and self._layout is not None:
            layer, kind = int(m.group(1)), m.group(2)
            if layer >= self.n_layers:
                raise SiteError(
                    f"site {site!r}: block {layer} does not exist; the model has blocks 0..{self.n_layers - 1}"
                )
            block = f"{self.layers_path}.{layer}"
            if kind == "resid_pre":
                return HookPoint(site, block, "input", layer)
            if kind == "resid_post":
                return HookPoint(site, block, "output", layer)
            sub, where = self._layout[kind]
            return HookPoint(site, f"{block}.{sub}", where, layer)
        if site in self._modules and site != "":
            return HookPoint(site, site, "output", None)
        valid = self.sites()
        shown = ", ".join(valid) if valid else "(no canonical sites for this family)"
        raise SiteError(
            f"unknown site {site!r} for {self.family} model. Valid canonical sites: {shown}; "
            f"or a raw module path such as {self.layers_path}.0"
        )

    def module(self, point: HookPoint) -> nn.Module:
        return self._modules[point.module_path]
