"""Packing into BOS-led fixed-length contexts, and leaving BOS positions out of the training data."""

from __future__ import annotations

import torch
from data_helpers import CONTEXT_LEN, data_config, make_documents, model_config, reference_rows, sort_rows

from saeforge.data import context_batches, open_stream, pack_contexts, training_mask


def token_stream(lm, docs, separator):
    ids = lm.tokenizer(docs, add_special_tokens=False)["input_ids"]
    out = []
    for i, doc in enumerate(ids):
        out += ([separator] if i else []) + doc
    return out


def test_contexts_start_with_bos_and_carry_the_document_stream(lm):
    docs = make_documents(30)
    contexts = list(pack_contexts(docs, lm.tokenizer, CONTEXT_LEN))
    bos = lm.tokenizer.bos_token_id
    assert all(c.shape == (CONTEXT_LEN,) and c.dtype == torch.long and c[0] == bos for c in contexts)
    stream = token_stream(lm, docs, bos)
    body = CONTEXT_LEN - 1
    assert len(contexts) == len(stream) // body  # the trailing partial context is dropped, never padded
    assert torch.cat([c[1:] for c in contexts]).tolist() == stream[: len(contexts) * body]


def test_without_bos_contexts_are_plain_chunks_separated_by_eos(lm):
    docs = make_documents(30)
    contexts = list(pack_contexts(docs, lm.tokenizer, CONTEXT_LEN, bos=False))
    stream = token_stream(lm, docs, lm.tokenizer.eos_token_id)
    assert len(contexts) == len(stream) // CONTEXT_LEN
    assert torch.cat(contexts).tolist() == stream[: len(contexts) * CONTEXT_LEN]
    assert lm.tokenizer.bos_token_id not in torch.cat(contexts).tolist()


def test_context_batches_stack_contexts_of_the_split(lm, corpus):
    cfg = data_config(corpus)
    batches = list(context_batches(lm, cfg, "train", 5))
    assert all(b.shape[1] == CONTEXT_LEN for b in batches)
    assert all(b.shape[0] == 5 for b in batches[:-1]) and 1 <= batches[-1].shape[0] <= 5
    eval_batches = list(context_batches(lm, cfg, "eval", 5))
    train_rows = {tuple(r.tolist()) for b in batches for r in b}
    eval_rows = {tuple(r.tolist()) for b in eval_batches for r in b}
    assert eval_rows and not train_rows & eval_rows


def test_training_mask_drops_bos_and_padding_unless_keep_bos():
    tokens = torch.tensor([[1, 5, 6, 1, 7, 0, 0]])
    assert training_mask(tokens, 1, 0).tolist() == [[False, True, True, False, True, False, False]]
    assert training_mask(tokens, 1, 0, keep_bos=True).all()


def test_stream_leaves_out_bos_positions_by_default(lm, corpus):
    """All rows of the stream are exactly the activations at the non-BOS positions; keep_bos adds the BOS rows."""
    for keep_bos in (False, True):
        stream = open_stream(model_config(lm), data_config(corpus, keep_bos=keep_bos), 50, lm=lm)
        rows = torch.cat([batch["x"] for batch in stream])
        expected, _ = reference_rows(lm, corpus, keep_bos=keep_bos)
        assert rows.dtype == torch.float32 and rows.shape == expected.shape
        assert torch.equal(sort_rows(rows), sort_rows(expected))
        assert stream.tokens_seen == rows.shape[0]
        if not keep_bos:
            expected_without_bos = expected
    # The extra rows are the BOS positions: one per context plus one per document boundary inside a context.
    contexts = torch.cat(list(context_batches(lm, data_config(corpus), "train", 64, seed=0)))
    assert rows.shape[0] - expected_without_bos.shape[0] == int((contexts == lm.bos_token_id).sum())
    assert (contexts[:, 1:] == lm.bos_token_id).any()
