"""Tokenise documents and pack them into fixed-length contexts.

Documents are tokenised without special tokens and concatenated into one token stream with the BOS token between
documents; the stream is cut into contexts of `context_len` tokens, each starting with BOS followed by the next
`context_len - 1` stream tokens (a long document continues in the next context). The trailing partial context is
dropped, so packing never pads. BOS positions (context starts and document boundaries) carry the model's
attention-sink activations, which are not representative; `training_mask` leaves them (and any padding) out unless
`keep_bos` is set.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Iterator
from typing import Any, Optional

import torch

_TOKENIZE_CHUNK = 64  # documents per tokenizer call (fast tokenizers batch internally)


def bos_id_of(tokenizer: Any) -> int:
    """The BOS id used for packing: the tokenizer's BOS token, or its EOS token for tokenizers without one."""
    for name in ("bos_token_id", "eos_token_id"):
        token_id = getattr(tokenizer, name, None)
        if token_id is not None:
            return int(token_id)
    raise ValueError("the tokenizer has neither a BOS nor an EOS token; pack with bos=False")


def pack_contexts(
    texts: Iterable[str],
    tokenizer: Any,
    context_len: int,
    *,
    bos: bool = True,
    bos_token_id: Optional[int] = None,
) -> Iterator[torch.Tensor]:
    """Yield LongTensor [context_len] contexts packed from `texts` (see the module docstring).

    With bos=False contexts are plain consecutive chunks of the stream, documents separated by EOS when the
    tokenizer has one. `bos_token_id` overrides the tokenizer's BOS.
    """
    if context_len < 2:
        raise ValueError(f"context_len must be at least 2, got {context_len}")
    if bos:
        separator = bos_token_id if bos_token_id is not None else bos_id_of(tokenizer)
        body = context_len - 1
    else:
        separator = getattr(tokenizer, "eos_token_id", None)
        body = context_len
    pending: list[int] = []
    for n_docs, ids in enumerate(_token_lists(texts, tokenizer)):
        if separator is not None and n_docs:
            pending.append(separator)
        pending.extend(ids)
        start = 0
        while len(pending) - start >= body:
            chunk = pending[start : start + body]
            start += body
            yield torch.tensor([separator] + chunk if bos else chunk, dtype=torch.long)
        del pending[:start]


def _token_lists(texts: Iterable[str], tokenizer: Any) -> Iterator[list[int]]:
    chunk: list[str] = []
    for text in texts:
        chunk.append(text)
        if len(chunk) == _TOKENIZE_CHUNK:
            yield from tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
            chunk = []
    if chunk:
        yield from tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]


def training_mask(
    tokens: torch.Tensor, bos_token_id: Optional[int], pad_token_id: Optional[int], keep_bos: bool = False
) -> torch.Tensor:
    """Bool mask of the positions whose activations are SAE training data: all but BOS and padding tokens."""
    keep = torch.ones_like(tokens, dtype=torch.bool)
    if keep_bos:
        return keep
    for token_id in (bos_token_id, pad_token_id):
        if token_id is not None:
            keep &= tokens != token_id
    return keep


def source_contexts(lm: Any, source: Any, split: str, context_len: int, *, text_field: str = "text",
                    seed: Optional[int] = None) -> Iterator[torch.Tensor]:
    """The text -> contexts chain, in one place: the documents of `source`'s split, shuffled with `seed` (None
    keeps the source's order), tokenized with the LM's tokenizer and packed into BOS-led contexts of context_len."""
    from saeforge.data.sources import shuffle_documents, text_source

    texts = text_source(source, split, text_field)
    if seed is not None:
        texts = shuffle_documents(texts, seed)
    return pack_contexts(texts, lm.tokenizer, context_len, bos_token_id=lm.bos_token_id)


def context_batches(lm: Any, data_cfg: Any, split: str, batch_size: int, *, seed: Optional[int] = None):
    """Yield LongTensor [B, context_len] batches of `source_contexts` of data_cfg (the last may be smaller)."""
    contexts = source_contexts(lm, data_cfg.source, split, data_cfg.context_len, text_field=data_cfg.text_field,
                               seed=seed)
    batch: list[torch.Tensor] = []
    for context in contexts:
        batch.append(context)
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)


def eval_contexts(lm, data_cfg: Any, tokens: int, batch_size: int = 4, split: str = "eval") -> torch.Tensor:
    """Held-out contexts (split="eval") of data_cfg.source: enough [context_len] contexts to hold `tokens` tokens,
    or all of them when the split is smaller. split="train": the first contexts of the training split (the PCA
    reference's fit sample)."""
    n_contexts = max(1, math.ceil(tokens / data_cfg.context_len))
    picked: list[torch.Tensor] = []
    for batch in context_batches(lm, data_cfg, split, batch_size):
        picked.extend(batch)
        if len(picked) >= n_contexts:
            break
    if not picked:
        raise ValueError(f"the {split} split of {data_cfg.source!r} holds no full context of "
                         f"{data_cfg.context_len} tokens")
    if len(picked) < n_contexts:
        print(f"note: the {split} split of {data_cfg.source!r} holds only "
              f"{len(picked) * data_cfg.context_len:,} tokens of the {tokens:,} asked for; using all of them",
              file=sys.stderr)
    return torch.stack(picked[:n_contexts])
