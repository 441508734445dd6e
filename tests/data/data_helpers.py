"""Helpers of the data tests: a synthetic corpus, configs, and activations computed directly from the LM."""

from __future__ import annotations

import random

import torch
from scipy.optimize import linear_sum_assignment

from saeforge.config import DataConfig, ModelConfig
from saeforge.data import pack_contexts, training_mask
from saeforge.data.sources import shuffle_documents, text_source

SITE = "blocks.1.resid_post"
CONTEXT_LEN = 32
LM_BATCH = 4

_WORDS = (
    "river mountain quartz violin harbour engine lantern orbit meadow copper falcon glacier sonnet prism canyon "
    "ember tundra beacon marble cipher velvet summit anchor nebula thistle"
).split()


def make_documents(n: int, seed: int = 0) -> list[str]:
    """`n` distinct documents of 3-40 words each (the first word is the document number, so none repeat)."""
    rng = random.Random(seed)
    return [f"doc{i} " + " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 40))) for i in range(n)]


def data_config(corpus, **overrides) -> DataConfig:
    options = dict(source=str(corpus), context_len=CONTEXT_LEN, buffer_tokens=CONTEXT_LEN * 8, lm_batch_size=LM_BATCH)
    options.update(overrides)
    return DataConfig(**options)


def model_config(lm) -> ModelConfig:
    return ModelConfig(name=lm.name, site=SITE)


def reference_rows(lm, source, *, seed=0, keep_bos=False, split="train", grad=False):
    """Activations (and gradients) at SITE of every training position, computed here directly from lm.capture, in the
    order of the seeded document shuffle, LM_BATCH contexts per forward pass (as the library runs them)."""
    texts = shuffle_documents(text_source(str(source), split), seed)
    contexts = torch.stack(list(pack_contexts(texts, lm.tokenizer, CONTEXT_LEN)))
    xs, gs = [], []
    for chunk in contexts.split(LM_BATCH):
        mask = training_mask(chunk, lm.bos_token_id, lm.pad_token_id, keep_bos)
        if grad:
            acts, grads = lm.capture(chunk, [SITE], grad=True)
            gs.append(grads[SITE][mask])
        else:
            acts = lm.capture(chunk, [SITE])
        xs.append(acts[SITE][mask])
    return torch.cat(xs), (torch.cat(gs) if grad else None)


def sort_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows in a canonical order (lexicographic), to compare multisets of activation vectors."""
    order = torch.arange(x.shape[0])
    for col in reversed(range(x.shape[1])):
        order = order[torch.sort(x[order, col], stable=True).indices]
    return x[order]


def assert_same_rows(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> None:
    """a and b hold the same multiset of rows up to float32 rounding (relative to each row's size): the pairing of
    their rows that minimises the total distance pairs every row with a near-equal one. Sorting both would not do:
    rounding can swap rows whose first entries nearly tie, and repeated rows make nearest neighbours ambiguous."""
    assert a.shape == b.shape, (a.shape, b.shape)
    distance = torch.cdist(a.double(), b.double())
    rows, cols = linear_sum_assignment(distance.numpy())
    paired = distance[torch.as_tensor(rows), torch.as_tensor(cols)]
    assert bool((paired <= tol * (1 + a.double().norm(dim=1)[torch.as_tensor(rows)])).all()), float(paired.max())


def subprocess_env() -> dict:
    """The environment for a child Python that imports this checkout's saeforge (installed or not)."""
    import os
    from pathlib import Path

    import saeforge

    src = str(Path(saeforge.__file__).resolve().parents[1])
    # One thread: tiny models on a shared machine are far faster without thread contention.
    path = os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
