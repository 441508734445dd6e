"""Harvesting: run a language model over a text source and write an activation cache (see cache.py)."""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import torch

from saeforge.data.cache import CacheWriter
from saeforge.data.packing import source_contexts
from saeforge.data.store import activation_scale, capture_training_tokens


def harvest(
    lm: Any,
    site: str,
    source: Any,
    out_dir: Union[str, Path],
    *,
    tokens: int,
    context_len: int = 128,
    dtype: str = "float32",
    grad: bool = False,
    lm_batch_size: int = 16,
    shard_tokens: int = 16384,
    keep_bos: bool = False,
    split: str = "train",
    text_field: str = "text",
    seed: int = 0,
    model_spec: Optional[str] = None,
    progress: bool = False,
) -> dict:
    """Write `tokens` training tokens of activations at `site` (and gradients when `grad`) to `out_dir`.

    Documents of `source` are shuffled with `seed` and packed into BOS-led contexts of `context_len`; BOS positions
    are left out unless `keep_bos`. The activation scale in the manifest is estimated on every harvested token,
    before rounding to `dtype`. `model_spec` (what `load_lm` was given) is recorded next to `lm.name`, so a run
    config naming the model either way finds the cache. Returns the manifest.
    """
    if tokens < 1:
        raise ValueError(f"tokens must be positive, got {tokens}")
    d_in = lm.site_dim(site)
    writer = CacheWriter(out_dir, dtype=dtype, shard_tokens=shard_tokens, grad=grad)
    contexts = source_contexts(lm, source, split, context_len, text_field=text_field, seed=seed)
    bar = _progress_bar(tokens, site) if progress else None
    sum_sq, written = 0.0, 0
    while written < tokens:
        batch = list(itertools.islice(contexts, lm_batch_size))
        if not batch:
            warnings.warn(f"text source {source!r} ran out after {written} of {tokens} tokens", stacklevel=2)
            break
        x, g = capture_training_tokens(
            lm, site, torch.stack(batch), keep_bos=keep_bos, grad=grad, lm_batch_size=lm_batch_size
        )
        x, g = x[: tokens - written], (g[: tokens - written] if g is not None else None)
        sum_sq += float(x.double().pow(2).sum())
        writer.add(x, g)
        written += x.shape[0]
        if bar is not None:
            bar.update(x.shape[0])
    if bar is not None:
        bar.close()
    return writer.finish(
        model=getattr(lm, "name", None), model_spec=model_spec, site=site, d_in=d_in,
        scale=activation_scale(sum_sq, written, d_in), context_len=context_len, keep_bos=keep_bos,
        source=str(source), split=split, text_field=text_field, seed=seed, lm_dtype=str(getattr(lm, "dtype", None)),
    )


def _progress_bar(total: int, site: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="tok", unit_scale=True, desc=f"harvest {site}", dynamic_ncols=True)
