"""Names across libraries: saeforge sites <-> TransformerLens hook names (SAELens's `hook_name`) <-> Hugging Face
module names (SAELens's `hf_hook_name`, Gemma Scope 2's `hf_hook_point_in`), and model names.

Naming only: nothing here loads a model. The per-family layouts mirror `saeforge.models.sites` (which imports
transformers; a save must not), and tests/interop/test_hooks.py holds the two together.

    saeforge site         TransformerLens hook          Hugging Face module (Gemma 2/3)
    blocks.L.resid_pre    blocks.L.hook_resid_pre       model.layers.L.input
    blocks.L.resid_post   blocks.L.hook_resid_post      model.layers.L.output
    blocks.L.attn_out     blocks.L.hook_attn_out        model.layers.L.post_attention_layernorm.output
    blocks.L.mlp_out      blocks.L.hook_mlp_out         model.layers.L.post_feedforward_layernorm.output
    blocks.L.attn_z       blocks.L.attn.hook_z (*)      model.layers.L.self_attn.o_proj.input
    blocks.L.mlp_post     blocks.L.mlp.hook_post        model.layers.L.mlp.down_proj.input
(*) TransformerLens's hook_z is [..., n_heads, d_head]; SAELens flattens it (reshape_activations = "hook_z") to the
heads-concatenated vector that saeforge's attn_z site is. Gemma 2/3's attention and MLP outputs are taken after
their post-norms in both TransformerLens and saeforge (what is added to the residual stream).
"""

from __future__ import annotations

import re

# saeforge site kind -> TransformerLens hook name inside block L
TL_HOOKS = {
    "resid_pre": "hook_resid_pre",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "attn_z": "attn.hook_z",
    "mlp_post": "mlp.hook_post",
}
_TL_TO_KIND = {v: k for k, v in TL_HOOKS.items()}

# Per family: (layers path, {site kind: (sub-module inside a block, "input" | "output")}); the same layouts as
# saeforge.models.sites (resid_pre / resid_post are the block's own input / output).
_LLAMA = {"attn_out": ("self_attn", "output"), "mlp_out": ("mlp", "output"),
          "attn_z": ("self_attn.o_proj", "input"), "mlp_post": ("mlp.down_proj", "input")}
_GEMMA_SANDWICH = {"attn_out": ("post_attention_layernorm", "output"),
                   "mlp_out": ("post_feedforward_layernorm", "output"),
                   "attn_z": ("self_attn.o_proj", "input"), "mlp_post": ("mlp.down_proj", "input")}
_GPT2 = {"attn_out": ("attn", "output"), "mlp_out": ("mlp", "output"),
         "attn_z": ("attn.c_proj", "input"), "mlp_post": ("mlp.c_proj", "input")}
_NEOX = {"attn_out": ("attention", "output"), "mlp_out": ("mlp", "output"),
         "attn_z": ("attention.dense", "input"), "mlp_post": ("mlp.dense_4h_to_h", "input")}
FAMILY_LAYOUTS: dict[str, tuple[str, dict]] = {
    "gemma": ("model.layers", _LLAMA),
    "gemma2": ("model.layers", _GEMMA_SANDWICH),
    "gemma3": ("model.layers", _GEMMA_SANDWICH),
    "llama": ("model.layers", _LLAMA),
    "qwen2": ("model.layers", _LLAMA),
    "mistral": ("model.layers", _LLAMA),
    "gpt2": ("transformer.h", _GPT2),
    "gpt_neox": ("gpt_neox.layers", _NEOX),
}

# The name saeforge records for its embedded model (models.loading.EMBEDDED_NAME; not imported: it pulls in
# transformers) and the original it was quantised from, the name TransformerLens and SAELens know.
EMBEDDED_NAMES = ("embedded", "gemma-3-270m-q4_k_m")
EMBEDDED_ORIGINAL = "google/gemma-3-270m"

_SITE = re.compile(r"^blocks\.(\d+)\.([a-z_]+)$")
_TL = re.compile(r"^blocks\.(\d+)\.(.+)$")
_HF = re.compile(r"^(?P<layers>model\.language_model\.layers|model\.layers|transformer\.h|gpt_neox\.layers)"
                 r"\.(?P<block>\d+)(?:\.(?P<sub>.+?))?\.(?P<where>input|output)$")


def model_family(model_name: str | None) -> str | None:
    """The family of a model name (a hub id, a TransformerLens name, saeforge's embedded name), or None."""
    if not model_name:
        return None
    name = str(model_name).lower().rsplit("/", 1)[-1]
    if name in EMBEDDED_NAMES or re.search(r"gemma-?3", name):
        return "gemma3"
    if re.search(r"gemma-?2", name):
        return "gemma2"
    if "gemma" in name:
        return "gemma"
    if "gpt2" in name or name.startswith("gpt-2"):
        return "gpt2"
    if "pythia" in name or "neox" in name:
        return "gpt_neox"
    for family in ("llama", "qwen2", "mistral"):
        if family.rstrip("2") in name:
            return family
    return None


def saelens_model_name(model_name: str | None) -> str | None:
    """The model name to write for SAELens / TransformerLens: saeforge's embedded model (a Q4_K_M GGUF of Gemma 3
    270M, dequantised) becomes the original's hub id; any other name is kept."""
    if model_name in EMBEDDED_NAMES:
        return EMBEDDED_ORIGINAL
    return model_name


def split_site(site: str | None) -> tuple[int, str] | None:
    m = _SITE.match(site or "")
    if m and m.group(2) in TL_HOOKS:
        return int(m.group(1)), m.group(2)
    return None


def tl_hook_name(site: str | None) -> str | None:
    """TransformerLens's hook name for a canonical saeforge site; None for a raw module path or no site."""
    parts = split_site(site)
    return None if parts is None else f"blocks.{parts[0]}.{TL_HOOKS[parts[1]]}"


def site_from_tl(hook: str | None) -> str | None:
    """The saeforge site of a TransformerLens hook name, or None when saeforge has no such site."""
    m = _TL.match(hook or "")
    if m is None or m.group(2) not in _TL_TO_KIND:
        return None
    return f"blocks.{m.group(1)}.{_TL_TO_KIND[m.group(2)]}"


def hf_hook_name(site: str | None, model_name: str | None) -> str | None:
    """The Hugging Face module name of a site in the form SAELens's `hf_hook_name` and Gemma Scope 2 use
    (`model.layers.9.output`); a raw module path (saeforge: that module's output) gets `.output`. None when the
    model family is unknown."""
    if not site:
        return None
    parts = split_site(site)
    if parts is None:
        return None if _SITE.match(site) else f"{site}.output"
    family = model_family(model_name)
    if family is None:
        return None
    layers, layout = FAMILY_LAYOUTS[family]
    block, kind = parts
    if kind == "resid_pre":
        return f"{layers}.{block}.input"
    if kind == "resid_post":
        return f"{layers}.{block}.output"
    sub, where = layout[kind]
    return f"{layers}.{block}.{sub}.{where}"


def site_from_hf(name: str | None, model_name: str | None = None) -> str | None:
    """The saeforge site of a Hugging Face module name (`model.layers.9.output`, `...self_attn.o_proj.input`):
    a canonical site where the family's layout (or, with no family, every layout that has the sub-module) agrees,
    else the raw module path for a module's output; None for an input that is no canonical site."""
    m = _HF.match(name or "")
    if m is None:
        if name and name.endswith(".output"):
            return name[: -len(".output")]
        return None
    block, sub, where = int(m.group("block")), m.group("sub"), m.group("where")
    if sub is None:
        return f"blocks.{block}.{'resid_pre' if where == 'input' else 'resid_post'}"
    family = model_family(model_name)
    layers = "model.layers" if m.group("layers").startswith("model.") else m.group("layers")
    if family is not None:
        candidates = [FAMILY_LAYOUTS[family][1]]
    else:
        candidates = [layout for path, layout in FAMILY_LAYOUTS.values() if path == layers]
    kinds = {kind for layout in candidates for kind, point in layout.items() if point == (sub, where)}
    # With no family, a point is canonical only if no candidate family has that module as something else (an
    # MLP's output is mlp_out in Llama, but in Gemma 2/3 a post-norm follows it and mlp_out is the norm's output).
    ambiguous = any((sub, where) not in layout.values()
                    and any(s == sub or s.startswith(sub + ".") for s, _ in layout.values())
                    for layout in candidates)
    if len(kinds) == 1 and not ambiguous:
        return f"blocks.{block}.{kinds.pop()}"
    return name[: -len(".output")] if where == "output" else None
