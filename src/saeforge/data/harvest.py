"""Harvesting: run a language model over a text source and write an activation cache (see cache.py).

One process writes the whole cache (`harvest`). A harvest of several ranks (torchrun; commands/harvest.py) splits the
LM pass: rank r of N runs the model on global contexts r, r + N, r + 2N, ... (after the seeded document shuffle and
packing, as a data-parallel training run reads them), writes `tokens` / N of the rows (the first tokens mod N ranks
one more) as its own shards (`harvest_shards`), and rank 0 then writes one manifest over every rank's shards
(`finish_harvest`). With whole contexts per rank the cache holds the rows a single process would harvest, in other
shards.
"""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import torch

from saeforge.data.cache import CacheWriter, write_manifest
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
    part = harvest_shards(lm, site, source, out_dir, tokens=tokens, context_len=context_len, dtype=dtype, grad=grad,
                          lm_batch_size=lm_batch_size, shard_tokens=shard_tokens, keep_bos=keep_bos, split=split,
                          text_field=text_field, seed=seed, progress=progress)
    return finish_harvest(lm, site, source, out_dir, [part], context_len=context_len, keep_bos=keep_bos,
                          split=split, text_field=text_field, seed=seed, model_spec=model_spec)


def harvest_shards(
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
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
) -> dict:
    """Write this rank's shards of a harvest of `tokens` rows over `world_size` ranks (see the module docstring);
    no manifest. Returns the part `finish_harvest` needs: {"rank", "dtype", "grad", "shards", "tokens",
    "sum_sq" (the sum of the squared norms of the rows, before rounding to dtype)}. One rank of one (the default)
    writes shard_NNNNN files after removing a previous cache in out_dir; a rank of several writes shard_rR_NNNNN
    and leaves that removal to the caller (rank 0, before any rank writes)."""
    if tokens < 1:
        raise ValueError(f"tokens must be positive, got {tokens}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    lm.site_dim(site)  # a site the model does not have fails before out_dir is touched
    share = tokens // world_size + (1 if rank < tokens % world_size else 0)
    prefix = "shard_" if world_size == 1 else f"shard_r{rank}_"
    writer = CacheWriter(out_dir, dtype=dtype, shard_tokens=shard_tokens, grad=grad, prefix=prefix,
                         clean=world_size == 1)
    contexts = source_contexts(lm, source, split, context_len, text_field=text_field, seed=seed)
    if world_size > 1:
        contexts = itertools.islice(contexts, rank, None, world_size)
    bar = _progress_bar(share, site) if progress else None
    sum_sq, written = 0.0, 0
    while written < share:
        batch = list(itertools.islice(contexts, lm_batch_size))
        if not batch:
            ranked = f" (rank {rank} of {world_size})" if world_size > 1 else ""
            warnings.warn(f"text source {source!r} ran out after {written} of {share} tokens{ranked}", stacklevel=2)
            break
        x, g = capture_training_tokens(
            lm, site, torch.stack(batch), keep_bos=keep_bos, grad=grad, lm_batch_size=lm_batch_size
        )
        x, g = x[: share - written], (g[: share - written] if g is not None else None)
        sum_sq += float(x.double().pow(2).sum())
        writer.add(x, g)
        written += x.shape[0]
        if bar is not None:
            bar.update(x.shape[0])
    if bar is not None:
        bar.close()
    return {"rank": rank, "dtype": dtype, "grad": grad, "shards": writer.close(), "tokens": written,
            "sum_sq": sum_sq}


def finish_harvest(
    lm: Any,
    site: str,
    source: Any,
    out_dir: Union[str, Path],
    parts: list[dict],
    *,
    context_len: int,
    keep_bos: bool,
    split: str,
    text_field: str,
    seed: int,
    model_spec: Optional[str] = None,
) -> dict:
    """Write the manifest over the shards of `parts` (from `harvest_shards`, one per rank, in rank order) and return
    it. Shards are listed interleaved across the ranks (rank 0's first, rank 1's first, ..., rank 0's second, ...), so
    the first rows of the cache (a training run's statistics sample) come from every rank's contexts."""
    parts = sorted(parts, key=lambda p: p["rank"])
    longest = max(len(p["shards"]) for p in parts)
    shards = [p["shards"][i] for i in range(longest) for p in parts if i < len(p["shards"])]
    if not shards:
        raise ValueError("no activations were written: the text source produced no tokens")
    written = sum(p["tokens"] for p in parts)
    d_in = lm.site_dim(site)
    ranks = {"ranks": len(parts)} if len(parts) > 1 else {}
    return write_manifest(
        out_dir, dtype=parts[0]["dtype"], grad=parts[0]["grad"], shards=shards,
        model=getattr(lm, "name", None), model_spec=model_spec, site=site, d_in=d_in,
        scale=activation_scale(sum(p["sum_sq"] for p in parts), written, d_in), context_len=context_len,
        keep_bos=keep_bos, source=str(source), split=split, text_field=text_field, seed=seed,
        lm_dtype=str(getattr(lm, "dtype", None)), **ranks,
    )


def _progress_bar(total: int, site: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="tok", unit_scale=True, desc=f"harvest {site}", dynamic_ncols=True)
