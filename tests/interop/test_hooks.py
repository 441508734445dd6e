"""Names across libraries: saeforge sites, TransformerLens hooks, Hugging Face modules."""

from __future__ import annotations

import pytest

from saeforge.interop import hooks
from saeforge.models import sites


def test_family_layouts_are_saeforge_sites_own():
    for model_type, (family, layout) in sites.FAMILIES.items():
        assert hooks.FAMILY_LAYOUTS[family][1] == layout, model_type
    assert set(hooks.TL_HOOKS) == set(sites.SITE_KINDS)


@pytest.mark.parametrize("site", [f"blocks.7.{kind}" for kind in sites.SITE_KINDS])
def test_sites_survive_both_naming_schemes(site):
    assert hooks.site_from_tl(hooks.tl_hook_name(site)) == site
    for model in ("google/gemma-3-270m", "gemma-3-270m-q4_k_m", "google/gemma-2-2b", "meta-llama/Llama-3.2-1B",
                  "gpt2", "EleutherAI/pythia-70m"):
        assert hooks.site_from_hf(hooks.hf_hook_name(site, model), model) == site, model


def test_module_names_without_a_family_are_canonical_only_when_unambiguous():
    # The block's output and the attention projection's input mean the same in every family with model.layers...
    assert hooks.site_from_hf("model.layers.9.output") == "blocks.9.resid_post"
    assert hooks.site_from_hf("model.language_model.layers.9.output") == "blocks.9.resid_post"
    assert hooks.site_from_hf("model.layers.9.self_attn.o_proj.input") == "blocks.9.attn_z"
    assert hooks.site_from_hf("model.layers.9.post_feedforward_layernorm.output") == "blocks.9.mlp_out"
    # ... but an MLP's output is mlp_out in Llama and not in Gemma 2/3 (a post-norm follows): a raw module path.
    assert hooks.site_from_hf("model.layers.9.mlp.output") == "model.layers.9.mlp"
    assert hooks.site_from_hf("model.layers.9.mlp.output", "meta-llama/Llama-3.2-1B") == "blocks.9.mlp_out"
    assert hooks.site_from_hf("model.layers.9.pre_feedforward_layernorm.output", "google/gemma-3-270m") == \
        "model.layers.9.pre_feedforward_layernorm"
    assert hooks.site_from_hf("model.layers.9.mlp.up_proj.input") is None
    assert hooks.site_from_tl("blocks.9.hook_resid_mid") is None and hooks.tl_hook_name("model.layers.2") is None


def test_model_names():
    from saeforge.models import EMBEDDED_NAME

    assert EMBEDDED_NAME in hooks.EMBEDDED_NAMES
    assert hooks.saelens_model_name("gemma-3-270m-q4_k_m") == "google/gemma-3-270m"
    assert hooks.saelens_model_name("embedded") == "google/gemma-3-270m"
    assert hooks.saelens_model_name("gpt2") == "gpt2"
    assert hooks.model_family("google/gemma-3-270m-pt") == "gemma3"
    assert hooks.model_family("gemma-2-2b") == "gemma2" and hooks.model_family("Qwen/Qwen2.5-0.5B") == "qwen2"
    assert hooks.model_family("something-else") is None and hooks.hf_hook_name("blocks.1.mlp_out", None) is None
