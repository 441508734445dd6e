"""The live activation stream: exact resume, rank sharding, shuffling, scale, non-finite activations."""

from __future__ import annotations

import json

import pytest
import torch
from data_helpers import (
    CONTEXT_LEN, LM_BATCH, SITE, assert_same_rows, data_config, model_config, reference_rows, sort_rows,
)

from saeforge.data import NonFiniteActivationsError, context_batches, open_stream, training_mask


def take(stream, n):
    return [next(stream) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), key


@pytest.mark.parametrize("keep_bos", [False, True])  # with keep_bos every block is 256 tokens: cuts hit boundaries
def test_resumed_stream_yields_bitwise_the_uninterrupted_batches(lm, corpus, keep_bos):
    cfg, batch = data_config(corpus, keep_bos=keep_bos), 64
    uninterrupted = take(open_stream(model_config(lm), cfg, batch, lm=lm, seed=7), 14)
    offsets = set()
    for cut in range(0, 13, 3):
        first = open_stream(model_config(lm), cfg, batch, lm=lm, seed=7)
        take(first, cut)
        state = json.loads(json.dumps(first.state_dict()))  # the state is plain JSON
        offsets.add(state["offset"])
        resumed = open_stream(model_config(lm), cfg, batch, lm=lm, seed=7)
        resumed.load_state_dict(state)
        assert resumed.tokens_seen == cut * batch
        assert_same_batches(take(resumed, 14 - cut), uninterrupted[cut:])
    assert 0 in offsets and len(offsets) > 1  # resumed both at a block start and inside a block


def test_resume_with_gradients(lm, corpus):
    cfg = data_config(corpus)
    stream = open_stream(model_config(lm), cfg, 40, lm=lm, grad=True)
    take(stream, 3)
    state = stream.state_dict()
    expected = take(stream, 4)
    assert all(b["grad"].shape == b["x"].shape == (40, lm.d_model) for b in expected)
    resumed = open_stream(model_config(lm), cfg, 40, lm=lm, grad=True)
    resumed.load_state_dict(state)
    assert_same_batches(take(resumed, 4), expected)


def test_gradients_are_the_lm_loss_gradients(lm, corpus):
    stream = open_stream(model_config(lm), data_config(corpus), 1000, lm=lm, grad=True)
    batches = list(stream)
    x, g = torch.cat([b["x"] for b in batches]), torch.cat([b["grad"] for b in batches])
    ref_x, ref_g = reference_rows(lm, corpus, grad=True)
    # Rows with the same prefix share x but not grad (it depends on later tokens): order by both.
    order, ref_order = _row_order(torch.cat([x, g], 1)), _row_order(torch.cat([ref_x, ref_g], 1))
    assert torch.equal(x[order], ref_x[ref_order]) and torch.equal(g[order], ref_g[ref_order])
    assert g.abs().sum() > 0


def _row_order(x):
    # a canonical order of distinct rows: sort by a fixed random projection
    proj = x.double() @ torch.randn(x.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.double)
    return torch.argsort(proj)


def test_token_order_does_not_depend_on_batch_size(lm, corpus):
    cfg = data_config(corpus)
    a = torch.cat([b["x"] for b in open_stream(model_config(lm), cfg, 50, lm=lm)])
    b = torch.cat([b["x"] for b in open_stream(model_config(lm), cfg, 37, lm=lm)])
    assert torch.equal(a, b)


def test_resume_refuses_a_differently_opened_stream(lm, corpus):
    state = open_stream(model_config(lm), data_config(corpus), 32, lm=lm, seed=0).state_dict()
    other = open_stream(model_config(lm), data_config(corpus), 32, lm=lm, seed=1)
    with pytest.raises(ValueError, match="seed: saved 0 vs now 1"):
        other.load_state_dict(state)


def test_ranks_read_disjoint_shares_that_cover_the_data(lm, corpus):
    """The ranks' rows together are exactly the single-process rows: a partition, so no context is read twice."""
    cfg = data_config(corpus)
    everything = torch.cat([b["x"] for b in open_stream(model_config(lm), cfg, 64, lm=lm)])
    shares = [
        torch.cat([b["x"] for b in open_stream(model_config(lm), cfg, 64, lm=lm, rank=r, world_size=3)])
        for r in range(3)
    ]
    assert all(s.shape[0] > everything.shape[0] // 4 for s in shares)
    assert sum(s.shape[0] for s in shares) == everything.shape[0]
    assert_same_rows(torch.cat(shares), everything)  # batched otherwise, so equal up to float32 rounding
    with pytest.raises(ValueError, match="rank must be in"):
        open_stream(model_config(lm), cfg, 64, lm=lm, rank=3, world_size=3)


def test_batches_mix_many_contexts(lm, corpus):
    """Each batch draws from the whole buffer: a 64-token batch spans many contexts, not the 2-3 it would unshuffled."""
    cfg = data_config(corpus, buffer_tokens=CONTEXT_LEN * 32)
    contexts = torch.cat(list(context_batches(lm, cfg, "train", LM_BATCH, seed=0)))
    context_of = {}
    for start in range(0, contexts.shape[0], LM_BATCH):
        chunk = contexts[start : start + LM_BATCH]
        acts = lm.capture(chunk, [SITE])[SITE]
        mask = training_mask(chunk, lm.bos_token_id, lm.pad_token_id)
        for i in range(chunk.shape[0]):
            for row in acts[i][mask[i]]:
                context_of[row.numpy().tobytes()] = start + i
    stream = open_stream(model_config(lm), cfg, 64, lm=lm)
    for batch in take(stream, 6):
        used = {context_of[row.numpy().tobytes()] for row in batch["x"]}
        assert len(used) >= 20, used


def test_scale_normalises_the_mean_squared_norm(lm, corpus):
    stream = open_stream(model_config(lm), data_config(corpus), 256, lm=lm)
    x = torch.cat([b["x"] for b in stream])
    mean_sq = float((stream.scale * x.double()).pow(2).sum(-1).mean())
    assert stream.d_in == x.shape[1] == lm.d_model
    assert abs(mean_sq / stream.d_in - 1) < 0.25  # estimated on a sample, applied to all


def test_eval_split_stream_reads_the_held_out_documents(lm, corpus):
    stream = open_stream(model_config(lm), data_config(corpus), 256, lm=lm, split="eval")
    rows = torch.cat([b["x"] for b in stream])
    expected, _ = reference_rows(lm, corpus, split="eval")
    assert rows.shape[0] > 0 and torch.equal(sort_rows(rows), sort_rows(expected))


def test_non_finite_activations_are_an_error_naming_the_site(corpus):
    from saeforge.models import tiny_lm

    broken = tiny_lm("llama", seed=123)
    broken.model.get_input_embeddings().weight.fill_(float("nan"))
    stream = open_stream(model_config(broken), data_config(corpus), 16, lm=broken)
    with pytest.raises(NonFiniteActivationsError, match=rf"non-finite activations \(NaN/Inf\) at site '{SITE}'"):
        next(stream)
