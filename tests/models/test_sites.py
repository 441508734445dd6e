"""Every canonical site of every family resolves and captures exactly what the model computes there."""

from __future__ import annotations

import pytest
import torch

from saeforge.models import SITE_KINDS, TINY_FAMILIES

TEXTS = ["The cat sat on the mat.", "Sparse autoencoders find features!"]

# Where each site lives, written out here independently of saeforge.models.sites: block path, then
# kind -> (sub-module, input/output).
LLAMA = {"attn_out": ("self_attn", "out"), "mlp_out": ("mlp", "out"),
         "attn_z": ("self_attn.o_proj", "in"), "mlp_post": ("mlp.down_proj", "in")}
GEMMA_SANDWICH = {"attn_out": ("post_attention_layernorm", "out"), "mlp_out": ("post_feedforward_layernorm", "out"),
                  "attn_z": ("self_attn.o_proj", "in"), "mlp_post": ("mlp.down_proj", "in")}
EXPECTED = {
    "gemma": ("model.layers", LLAMA), "llama": ("model.layers", LLAMA), "qwen2": ("model.layers", LLAMA),
    "mistral": ("model.layers", LLAMA), "gemma2": ("model.layers", GEMMA_SANDWICH),
    "gemma3": ("model.layers", GEMMA_SANDWICH),
    "gpt2": ("transformer.h", {"attn_out": ("attn", "out"), "mlp_out": ("mlp", "out"),
                               "attn_z": ("attn.c_proj", "in"), "mlp_post": ("mlp.c_proj", "in")}),
    "gpt_neox": ("gpt_neox.layers", {"attn_out": ("attention", "out"), "mlp_out": ("mlp", "out"),
                                     "attn_z": ("attention.dense", "in"), "mlp_post": ("mlp.dense_4h_to_h", "in")}),
}


def batch(lm):
    enc = lm.tokenizer(TEXTS, padding=True, return_tensors="pt")
    return enc.input_ids, enc.attention_mask


def reference(lm, tokens, mask):
    """One full forward pass recording every site with plain hooks, plus output_hidden_states."""
    blocks_path, layout = EXPECTED[lm.family]
    seen, handles = {}, []

    def keep(name, where):
        def on_out(_m, _a, out):
            seen[name] = (out[0] if isinstance(out, tuple) else out).detach().clone()

        def on_in(_m, args, kwargs):
            seen[name] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

        return on_out if where == "out" else on_in

    for layer in range(lm.n_layers):
        block = lm.model.get_submodule(f"{blocks_path}.{layer}")
        handles.append(block.register_forward_pre_hook(keep(f"blocks.{layer}.resid_pre", "in"), with_kwargs=True))
        handles.append(block.register_forward_hook(keep(f"blocks.{layer}.resid_post", "out")))
        for kind, (sub, where) in layout.items():
            module = block.get_submodule(sub)
            if where == "in":
                handles.append(module.register_forward_pre_hook(keep(f"blocks.{layer}.{kind}", "in"), with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(keep(f"blocks.{layer}.{kind}", "out")))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = lm.model(input_ids=tokens, attention_mask=mask, position_ids=positions, output_hidden_states=True)
    for h in handles:
        h.remove()
    return seen, out.hidden_states


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_site_resolves_and_matches_the_model(tiny_lm_factory, family):
    lm = tiny_lm_factory(family)
    tokens, mask = batch(lm)
    sites = lm.sites()
    assert len(sites) == lm.n_layers * len(SITE_KINDS) == 3 * 6
    acts = lm.capture(tokens, sites, attention_mask=mask)
    seen, hidden = reference(lm, tokens, mask)
    for site in sites:
        assert acts[site].shape == (*tokens.shape, lm.site_dim(site)), site
        assert torch.equal(acts[site], seen[site]), site
    # The residual stream against output_hidden_states (its last entry is after the final norm, so not resid_post).
    for layer in range(lm.n_layers):
        assert torch.equal(acts[f"blocks.{layer}.resid_pre"], hidden[layer])
        if layer < lm.n_layers - 1:
            assert torch.equal(acts[f"blocks.{layer}.resid_post"], hidden[layer + 1])


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_site_semantics(tiny_lm_factory, family):
    """attn_out and mlp_out are what the block adds to the residual stream; attn_z / mlp_post feed the out projections."""
    lm = tiny_lm_factory(family)
    tokens, mask = batch(lm)
    acts = lm.capture(tokens, lm.sites(), attention_mask=mask)
    blocks_path, layout = EXPECTED[family]
    for layer in range(lm.n_layers):
        a = {kind: acts[f"blocks.{layer}.{kind}"] for kind in SITE_KINDS}
        torch.testing.assert_close(a["resid_post"], a["resid_pre"] + a["attn_out"] + a["mlp_out"], atol=1e-5, rtol=1e-5)
        block = lm.model.get_submodule(f"{blocks_path}.{layer}")
        with torch.no_grad():
            attn = block.get_submodule(layout["attn_z"][0])(a["attn_z"])
            mlp = block.get_submodule(layout["mlp_post"][0])(a["mlp_post"])
            if layout is GEMMA_SANDWICH:
                attn, mlp = block.post_attention_layernorm(attn), block.post_feedforward_layernorm(mlp)
        torch.testing.assert_close(attn, a["attn_out"], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(mlp, a["mlp_out"], atol=1e-6, rtol=1e-6)


def test_widths(tiny_lm_factory):
    lm = tiny_lm_factory("gemma3")
    assert lm.site_dim("blocks.0.resid_post") == lm.d_model == 64
    assert lm.site_dim("blocks.0.attn_z") == 4 * 16
    assert lm.site_dim("blocks.0.mlp_post") == 128
    assert lm.site_dim("model.layers.0.mlp.act_fn") == 128  # raw path: measured by a probe


def test_raw_module_path_is_that_modules_output(tiny_lm_factory):
    lm = tiny_lm_factory("llama")
    tokens, mask = batch(lm)
    acts = lm.capture(tokens, ["model.layers.1.mlp", "blocks.1.mlp_out"], attention_mask=mask)
    assert torch.equal(acts["model.layers.1.mlp"], acts["blocks.1.mlp_out"])


def test_unknown_site_lists_valid_ones(tiny_lm_factory):
    lm = tiny_lm_factory("gpt2")
    tokens, _ = batch(lm)
    with pytest.raises(ValueError, match="unknown site 'blocks.0.resid_middle'") as err:
        lm.capture(tokens, ["blocks.0.resid_middle"])
    for site in ("blocks.0.resid_pre", "blocks.2.mlp_post", "blocks.1.attn_z"):
        assert site in str(err.value)
    with pytest.raises(ValueError, match="block 7 does not exist"):
        lm.site_dim("blocks.7.resid_post")


def test_family_metadata(tiny_lm_factory):
    for family in TINY_FAMILIES:
        lm = tiny_lm_factory(family)
        assert lm.family == family
        assert (lm.n_layers, lm.d_model, lm.vocab_size) == (3, 64, len(lm.tokenizer))
        assert lm.bos_token_id == lm.tokenizer.bos_token_id
        assert lm.tokenizer("hi").input_ids[0] == lm.bos_token_id
        assert lm.unembed().shape == (64, lm.vocab_size) and lm.unembed().dtype == torch.float32


def test_raw_path_outside_the_blocks(tiny_lm_factory):
    lm = tiny_lm_factory("gpt2")
    tokens, mask = batch(lm)
    acts = lm.capture(tokens, ["lm_head"], attention_mask=mask)
    with torch.no_grad():
        torch.testing.assert_close(acts["lm_head"], lm.forward(tokens, attention_mask=mask))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_site_widths_from_the_config_alone_match_the_loaded_model(family, tmp_path):
    from saeforge.models import site_width_before_loading, tiny_lm
    from saeforge.models.sites import SiteError

    lm = tiny_lm(family, seed=0)
    lm.model.config.save_pretrained(tmp_path)  # config.json only: no weights to load
    for kind in SITE_KINDS:
        site = f"blocks.{lm.n_layers - 1}.{kind}"
        assert site_width_before_loading(tmp_path, site) == lm.site_dim(site), site
    assert site_width_before_loading(tmp_path, lm.resolve("blocks.0.resid_post").module_path) is None
    with pytest.raises(SiteError, match=f"block {lm.n_layers} does not exist"):
        site_width_before_loading(tmp_path, f"blocks.{lm.n_layers}.mlp_out")
    assert site_width_before_loading(tmp_path / "elsewhere", "blocks.0.resid_post") is None
