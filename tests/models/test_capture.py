"""Early stopping, padding, gradients and edits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from saeforge.models import TINY_FAMILIES, load_lm, tiny_lm

TEXTS = ["The cat sat on the mat.", "Sparse autoencoders find features in it!"]


def batch(lm, side="right"):
    lm.tokenizer.padding_side = side
    enc = lm.tokenizer(TEXTS, padding=True, return_tensors="pt")
    return enc.input_ids, enc.attention_mask


# ------------------------------------------------------------------------------------------------------------
# Early stop


@pytest.mark.parametrize("family", ["gemma3", "gpt2", "gpt_neox"])
def test_early_stop_skips_later_blocks_and_changes_no_value(tiny_lm_factory, family):
    lm = tiny_lm_factory(family)
    tokens, mask = batch(lm)
    layers = lm.model.get_submodule(lm.resolve("blocks.0.resid_pre").module_path.rsplit(".", 1)[0])
    ran, full = [], {}
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, layer in enumerate(layers)]
    # Full forward with an independent hook on block 0's MLP, for the value.
    mlp_out = layers[0].post_feedforward_layernorm if family == "gemma3" else layers[0].mlp
    handles.append(mlp_out.register_forward_hook(lambda m, a, o: full.__setitem__("mlp", o.detach().clone())))
    with torch.no_grad():
        lm.model(input_ids=tokens, attention_mask=mask)
    assert ran == [0, 1, 2]
    ran.clear()
    acts = lm.capture(tokens, ["blocks.0.mlp_out", "blocks.0.resid_pre"], attention_mask=mask)
    for h in handles:
        h.remove()
    assert ran == []  # stopped inside block 0, before it even returned
    assert torch.equal(acts["blocks.0.mlp_out"], full["mlp"])
    # Capturing with a later site too (a longer forward) gives the same values for the early site.
    longer = lm.capture(tokens, ["blocks.0.mlp_out", "blocks.2.resid_post"], attention_mask=mask)
    assert torch.equal(longer["blocks.0.mlp_out"], acts["blocks.0.mlp_out"])
    # Hooks are removed afterwards, also after the early stop.
    assert all(not layer._forward_hooks and not layer._forward_pre_hooks for layer in layers)


# ------------------------------------------------------------------------------------------------------------
# Padding


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_leaves_real_tokens_unchanged(tiny_lm_factory, family, side):
    lm = tiny_lm_factory(family)
    tokens, mask = batch(lm, side)
    sites = ["blocks.1.resid_post", "blocks.2.attn_z"]
    padded = lm.capture(tokens, sites, attention_mask=mask)
    short = mask[0].bool()  # the first text is the shorter one
    alone = lm.capture(tokens[:1, short], sites)
    for site in sites:
        assert torch.isfinite(padded[site]).all()
        torch.testing.assert_close(padded[site][0, short], alone[site][0], atol=1e-5, rtol=1e-5)
    loss_padded = lm.next_token_loss(tokens, attention_mask=mask)[0]
    loss_alone = lm.next_token_loss(tokens[:1, short])[0]
    valid = (mask[0, :-1] & mask[0, 1:]).bool()
    torch.testing.assert_close(loss_padded[valid], loss_alone, atol=1e-5, rtol=1e-5)
    assert (loss_padded[~valid] == 0).all()


# ------------------------------------------------------------------------------------------------------------
# Loss and gradients


def reference_loss_grads(lm, tokens, mask, sites):
    """d(summed valid next-token CE)/d(site) with zero perturbations added at each site through plain hooks, the
    loss taken from the model's own logits: an independent route to the same total derivatives."""
    deltas, handles = {}, []
    for site in sites:
        point = lm.resolve(site)
        module = lm.model.get_submodule(point.module_path)
        if point.where == "output":
            def on_out(_m, _a, out, site=site):
                x = out[0] if isinstance(out, tuple) else out
                deltas[site] = torch.zeros_like(x, requires_grad=True)
                return (x + deltas[site], *out[1:]) if isinstance(out, tuple) else x + deltas[site]
            handles.append(module.register_forward_hook(on_out))
        else:
            def on_in(_m, args, kwargs, site=site):
                deltas[site] = torch.zeros_like(args[0], requires_grad=True)
                return (args[0] + deltas[site], *args[1:]), kwargs
            handles.append(module.register_forward_pre_hook(on_in, with_kwargs=True))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.enable_grad():
        logits = lm.model(input_ids=tokens, attention_mask=mask, position_ids=positions).logits.float()
        ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")
        loss = (ce * (mask[:, :-1] * mask[:, 1:])).sum()
        grads = torch.autograd.grad(loss, [deltas[s] for s in sites])
    for h in handles:
        h.remove()
    return dict(zip(sites, grads))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_gradients_match_autograd_of_the_summed_loss(tiny_lm_factory, family):
    lm = tiny_lm_factory(family)
    tokens, mask = batch(lm)
    # Several sites at once, in and out of execution order: an earlier site's gradient must include the paths
    # through the later ones.
    sites = ["blocks.2.mlp_post", "blocks.0.resid_post", "blocks.1.attn_z", "blocks.1.resid_pre"]
    acts, grads = lm.capture(tokens, sites, attention_mask=mask, grad=True)
    expected = reference_loss_grads(lm, tokens, mask, sites)
    plain = lm.capture(tokens, sites, attention_mask=mask)
    for site in sites:
        assert torch.equal(acts[site], plain[site])
        assert not acts[site].requires_grad and not grads[site].requires_grad
        assert grads[site].shape == acts[site].shape
        assert grads[site].abs().sum() > 0
        torch.testing.assert_close(grads[site], expected[site], atol=1e-6, rtol=1e-4)
    # blocks.0.resid_post and blocks.1.resid_pre are the same tensor: the same total derivative.
    torch.testing.assert_close(grads["blocks.0.resid_post"], grads["blocks.1.resid_pre"])
    # Right padding: the last real token and the pads after it influence no valid loss term.
    pads = ~mask.bool()
    assert (grads["blocks.1.resid_pre"][pads] == 0).all()


def test_gradients_leave_weights_untouched():
    lm = tiny_lm("llama", seed=1)
    lm.model.requires_grad_(True)  # a model whose weights require grad, as a user might pass one
    tokens, mask = batch(lm)
    _, grads = lm.capture(tokens, ["blocks.1.resid_post"], attention_mask=mask, grad=True)
    assert all(p.grad is None and p.requires_grad for p in lm.model.parameters())
    expected = reference_loss_grads(lm, tokens, mask, ["blocks.1.resid_post"])
    torch.testing.assert_close(grads["blocks.1.resid_post"], expected["blocks.1.resid_post"], atol=1e-6, rtol=1e-4)
    frozen = tiny_lm("llama", seed=1)
    frozen.capture(tokens, ["blocks.1.resid_post"], attention_mask=mask, grad=True)
    assert not any(p.requires_grad for p in frozen.model.parameters())


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_next_token_loss_matches_model_logits(tiny_lm_factory, family):
    lm = tiny_lm_factory(family)
    tokens, mask = batch(lm)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = lm.model(input_ids=tokens, attention_mask=mask, position_ids=positions).logits.float()
        loss = lm.next_token_loss(tokens, attention_mask=mask)
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none") * mask[:, 1:] * mask[:, :-1]
    assert loss.dtype == torch.float32 and loss.shape == (2, tokens.shape[1] - 1)
    torch.testing.assert_close(loss, ce, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# Edits


@pytest.mark.parametrize("family", ["gemma2", "llama", "gpt2", "gpt_neox"])
def test_edits_replace_the_activation(tiny_lm_factory, family):
    lm = tiny_lm_factory(family)
    tokens, mask = batch(lm)
    with torch.no_grad():
        base = lm.forward(tokens, attention_mask=mask)
        for site in ["blocks.1.resid_post", "blocks.1.attn_z", "blocks.0.mlp_out", "blocks.2.mlp_post"]:
            same = lm.forward(tokens, attention_mask=mask, edits={site: lambda x: x})
            assert torch.equal(same, base), site
            zeroed = lm.forward(tokens, attention_mask=mask, edits={site: torch.zeros_like})
            assert not torch.allclose(zeroed, base), site
        # Editing a tensor at its two names has the same effect; its value reaches the later site unchanged.
        double = lambda x: 2 * x  # noqa: E731
        a = lm.forward(tokens, attention_mask=mask, edits={"blocks.0.resid_post": double})
        b = lm.forward(tokens, attention_mask=mask, edits={"blocks.1.resid_pre": double})
        assert torch.equal(a, b) and not torch.allclose(a, base)
        seen = {}
        lm.forward(tokens, attention_mask=mask,
                   edits={"blocks.0.resid_post": double, "blocks.1.resid_pre": lambda x: seen.setdefault("x", x)})
        plain = lm.capture(tokens, ["blocks.0.resid_post"], attention_mask=mask)["blocks.0.resid_post"]
        assert torch.equal(seen["x"], 2 * plain)
        # next_token_loss applies the edits too.
        loss = lm.next_token_loss(tokens, attention_mask=mask, edits={"blocks.0.resid_post": double})
        ce = F.cross_entropy(a[:, :-1].float().transpose(1, 2), tokens[:, 1:], reduction="none")
        torch.testing.assert_close(loss, ce * mask[:, 1:] * mask[:, :-1], atol=1e-5, rtol=1e-5)


def test_edit_with_wrong_shape_is_refused(tiny_lm_factory):
    lm = tiny_lm_factory("gemma3")
    tokens, _ = batch(lm)
    with pytest.raises(ValueError, match=r"edit at blocks.0.resid_post returned shape"):
        lm.forward(tokens, edits={"blocks.0.resid_post": lambda x: x[..., :3]})


# ------------------------------------------------------------------------------------------------------------
# dtype


def test_bfloat16_capture_and_grad():
    lm = load_lm(tiny_lm("gemma3", seed=2).model, dtype=torch.bfloat16, tokenizer=tiny_lm("gemma3").tokenizer)
    assert lm.dtype == torch.bfloat16
    tokens, mask = batch(lm)
    acts, grads = lm.capture(tokens, ["blocks.1.resid_post"], attention_mask=mask, grad=True)
    assert acts["blocks.1.resid_post"].dtype == torch.bfloat16
    assert torch.isfinite(grads["blocks.1.resid_post"]).all() and grads["blocks.1.resid_post"].abs().sum() > 0
    reference = tiny_lm("gemma3", seed=2).capture(tokens, ["blocks.1.resid_post"], attention_mask=mask)
    torch.testing.assert_close(acts["blocks.1.resid_post"].float(), reference["blocks.1.resid_post"], atol=0.1, rtol=0.05)
