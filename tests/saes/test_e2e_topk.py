"""E2E TopK (Braun et al. 2024) on a tiny real model: its loss is the KL of the next-token distributions with the
reconstruction spliced in, computed here independently with plain torch and a forward hook; its gradient reaches the
SAE through the blocks after the site and never the LM's weights."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from saeforge.config import TrainConfig
from saeforge.data import training_mask
from saeforge.models import tiny_lm
from saeforge.models.sites import SiteError
from saeforge.models.splice import SiteSplice
from saeforge.saes import E2ETopKSAE, create_sae, load_sae
from saeforge.training.sae_run import SAERun
from saeforge.training.schedules import StepPlan

SITE, BLOCK = "blocks.1.resid_post", 1  # the tiny model has blocks 0..2: one block after the site
SCALE = 1.7  # the trainer's activation scale c: the SAE sees c x and its x_hat / c goes into the model


@pytest.fixture(scope="module")
def batch(tiny_lm):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, tiny_lm.vocab_size, (2, 12), generator=g)
    tokens[:, 0] = tiny_lm.bos_token_id
    tokens[1, 6] = tiny_lm.bos_token_id  # a document boundary: not spliced
    mask = training_mask(tokens, tiny_lm.bos_token_id, tiny_lm.pad_token_id)
    return tokens, mask


def make_sae(d_in: int, **options) -> E2ETopKSAE:
    torch.manual_seed(1)
    sae = create_sae("e2e_topk", d_in=d_in, d_sae=96, k=6, **options)
    with torch.no_grad():  # non-trivial values in every tensor
        for p in sae.parameters():
            p.add_(0.3 * torch.randn_like(p))
        sae.normalize_decoder()
    return sae


def independent_loss(lm, tokens, mask, sae, ds_coeff):
    """KL(P_clean || P_spliced) averaged over predicted positions (+ ds_coeff x the downstream squared error), from
    the model's own forward and a hook on the site's block; the SAE as dense encode then decode."""
    layers = lm.model.model.layers
    clean_out = {}

    def record(i):
        def hook(_module, _args, output):
            clean_out[i] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [layers[i].register_forward_hook(record(i)) for i in range(BLOCK, len(layers))]
    with torch.no_grad():
        clean_logits = lm.model(input_ids=tokens).logits
    for h in handles:
        h.remove()
    x = clean_out[BLOCK][mask]
    x_hat = sae.decode(sae.encode(SCALE * x)) / SCALE
    spliced_out = {}

    def splice(_module, _args, output):
        act = output[0] if isinstance(output, tuple) else output
        new = act.clone()
        new[mask] = x_hat
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handles = [layers[BLOCK].register_forward_hook(splice)]
    handles += [layers[i].register_forward_hook(lambda _m, _a, out, i=i: spliced_out.__setitem__(
        i, out[0] if isinstance(out, tuple) else out)) for i in range(BLOCK + 1, len(layers))]
    spliced_logits = lm.model(input_ids=tokens).logits
    for h in handles:
        h.remove()
    logp_clean = F.log_softmax(clean_logits[:, :-1].double(), -1)
    logp_spliced = F.log_softmax(spliced_logits[:, :-1].double(), -1)
    kl = (logp_clean.exp() * (logp_clean - logp_spliced)).sum(-1).mean()
    later = range(BLOCK + 1, len(layers))
    ds = torch.stack([(SCALE * (spliced_out[i] - clean_out[i])).double().pow(2).mean() for i in later]).mean()
    return kl + ds_coeff * ds, kl, ds


@pytest.mark.parametrize("ds_coeff", [0.0, 0.5])
def test_loss_and_gradient_equal_an_independent_kl_computation(tiny_lm, batch, ds_coeff):
    tokens, mask = batch
    sae = make_sae(tiny_lm.d_model, ds_coeff=ds_coeff)
    splice = SiteSplice(tiny_lm, SITE, tokens, mask)
    out = sae.lm_loss(SCALE * splice.x.float(), functools.partial(splice.run, scale=SCALE))
    params = list(sae.parameters())
    ours = torch.autograd.grad(out.total, params)

    total, kl, ds = independent_loss(tiny_lm, tokens, mask, sae, ds_coeff)
    theirs = torch.autograd.grad(total, params)
    assert kl > 1e-4  # a real difference between the distributions, not a vacuous 0 = 0
    torch.testing.assert_close(out.kl.double(), kl.detach(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(out.total.double(), total.detach(), rtol=1e-4, atol=1e-7)
    if ds_coeff:
        torch.testing.assert_close(out.downstream.double(), ds.detach(), rtol=1e-4, atol=1e-7)
    else:
        assert out.downstream is None
    for p, a, b in zip(sae.parameters(), ours, theirs):
        assert b.abs().max() > 0
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-3, atol=1e-3 * float(b.abs().max()))
    assert all(p.grad is None for p in tiny_lm.model.parameters())


def test_the_gradient_reaches_the_sae_only_through_the_blocks_after_the_site(tiny_lm, batch):
    """With the downstream blocks cut out of the graph (their input detached), no gradient reaches the SAE: it came
    through them, not around them."""
    tokens, mask = batch
    sae = make_sae(tiny_lm.d_model)
    splice = SiteSplice(tiny_lm, SITE, tokens, mask)

    def detach_input(_module, args, kwargs):
        if args:
            return (args[0].detach(), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach()}

    detach_next = tiny_lm.model.model.layers[BLOCK + 1].register_forward_pre_hook(detach_input, with_kwargs=True)
    try:
        out = sae.lm_loss(SCALE * splice.x.float(), functools.partial(splice.run, scale=SCALE))
    finally:
        detach_next.remove()
    assert not out.total.requires_grad


def test_identity_splice_scores_zero(tiny_lm, batch):
    tokens, mask = batch
    splice = SiteSplice(tiny_lm, SITE, tokens, mask)
    kl, ds = splice.run(SCALE * splice.x, scale=SCALE, downstream=True)
    assert abs(float(kl)) < 1e-6 and float(ds) < 1e-10  # x / c * c rounds
    assert splice.x.shape[0] == int(mask.sum()) == tokens.numel() - 3


def test_training_step_leaves_the_lms_weights_without_gradients():
    """A model whose weights require gradients (one a caller built) still gets none: the step differentiates with
    respect to the SAE's parameters only."""
    lm = tiny_lm("gemma3", seed=0)
    lm.model.requires_grad_(True)
    tokens = torch.randint(3, lm.vocab_size, (2, 10), generator=torch.Generator().manual_seed(2))
    tokens[:, 0] = lm.bos_token_id
    splice = SiteSplice(lm, SITE, tokens, training_mask(tokens, lm.bos_token_id, lm.pad_token_id))
    sae = make_sae(lm.d_model)
    train = TrainConfig(batch_size=20, lr_warmup_steps=0, tensorboard=False)
    run = SAERun("e2e", sae, train, total_steps=10, plan=StepPlan.of(train, 10), lr=1e-3, betas=sae.adam_betas,
                 sparsity_coeff=None, resample=False, seed=0)
    before = sae.W_enc.detach().clone()
    run.step(SCALE * splice.x, None, 0, 20, through_lm=functools.partial(splice.run, scale=SCALE))
    assert all(p.grad is None for p in lm.model.parameters())
    assert not torch.equal(before, sae.W_enc)  # the SAE did take a step


def test_downstream_term_needs_a_later_residual_stream(tiny_lm, batch):
    tokens, mask = batch
    splice = SiteSplice(tiny_lm, "blocks.2.resid_post", tokens, mask)  # the last block
    sae = make_sae(tiny_lm.d_model, ds_coeff=1.0)
    with pytest.raises(SiteError, match="feeds no later residual stream"):
        sae.lm_loss(splice.x, splice.run)


@pytest.mark.parametrize("options, message", [
    ({"kl_coeff": -1.0}, "kl_coeff must be a finite number >= 0"),
    ({"ds_coeff": float("nan")}, "ds_coeff must be a finite number >= 0"),
    ({"kl_coeff": 0.0}, "nothing to train on"),
])
def test_bad_coefficients_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        create_sae("e2e_topk", d_in=8, d_sae=16, k=2, **options)


def test_the_reconstruction_loss_is_refused():
    sae = create_sae("e2e_topk", d_in=8, d_sae=16, k=2)
    with pytest.raises(NotImplementedError, match="lm_loss"):
        sae.loss_and_grads(torch.randn(4, 8))


def test_saves_loads_and_infers_as_topk(tmp_path):
    sae = make_sae(16, ds_coeff=0.25)
    sae.save(tmp_path / "e2e")
    back = load_sae(tmp_path / "e2e")
    assert isinstance(back, E2ETopKSAE) and back.options() == {"k": 6, "kl_coeff": 1.0, "ds_coeff": 0.25}
    topk = create_sae("topk", d_in=16, d_sae=96, k=6)
    topk.load_state_dict(sae.state_dict())
    x = torch.randn(7, 16)
    assert torch.equal(back.encode(x), topk.encode(x)) and torch.equal(back(x), topk(x))
