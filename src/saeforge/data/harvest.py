"""Harvesting: run a language model over a text source and write an activation cache (see cache.py)."""

from __future__ import annotations

import itertools
import sys
import warnings
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch

from saeforge.data.cache import CacheWriter
from saeforge.data.packing import source_contexts
from saeforge.config import ConfigError
from saeforge.data.sources import check_text_source
from saeforge.data.store import activation_scale, capture_training_tokens
from saeforge.files import check_writable_dir


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


def harvest_command(
    model: str = "embedded",
    site: str = "blocks.9.resid_post",
    source: str = "embedded",
    out: str = "activations",
    tokens: int = 1_000_000,
    context_len: int = 128,
    dtype: Literal["float32", "bfloat16", "float16"] = "float32",
    grad: bool = False,
    batch_size: int = 16,
    shard_tokens: int = 16384,
    keep_bos: bool = False,
    split: Literal["train", "eval"] = "train",
    text_field: str = "text",
    seed: int = 0,
    device: str = "cpu",
    model_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
) -> None:
    """Run a language model over a text source and write an activation cache (safetensors shards + manifest.json).

    Args:
        model: "embedded" (Gemma 3 270M), a hub id, a local model directory or a .gguf path.
        site: Canonical site name such as blocks.6.resid_post, or a raw module path.
        source: "embedded" (Wikipedia leads), a .txt/.jsonl/.parquet file, or hf:<dataset id>[:<config>].
        out: Output directory for the cache.
        tokens: Number of activation rows (tokens) to write.
        context_len: Tokens per packed context, BOS included.
        dtype: Storage dtype of the cached activations.
        grad: Also store the gradient of the next-token loss at the site (for gradient TopK SAEs).
        batch_size: Contexts per language-model forward pass.
        shard_tokens: Tokens per shard file.
        keep_bos: Keep BOS positions (left out by default).
        split: Which side of the fixed held-out split of the source to read.
        text_field: Field (JSONL, Hugging Face) or column (Parquet) holding the text.
        seed: Seed of the document shuffle.
        device: Device to run the model on.
        model_dtype: Dtype to run the model in ("auto": bf16 where this hardware runs it fast, else float32).
    """
    from saeforge.models import load_lm, site_width_before_loading

    # Everything that can be checked without the model is checked before it loads.
    for flag, value, least in (("--tokens", tokens, 1), ("--shard-tokens", shard_tokens, 1),
                               ("--batch-size", batch_size, 1), ("--context-len", context_len, 2)):
        if value < least:
            raise ConfigError(f"{flag}: must be at least {least}, got {value}")
    check_text_source(source, text_field)
    check_writable_dir(out, "--out")
    site_width_before_loading(model, site)  # a block the model does not have, from its config.json
    lm = load_lm(model, device=device, dtype=model_dtype)
    print(f"language model: {lm.precision.describe()}", file=sys.stderr)
    manifest = harvest(
        lm, site, source, out, tokens=tokens, context_len=context_len, dtype=dtype, grad=grad,
        lm_batch_size=batch_size, shard_tokens=shard_tokens, keep_bos=keep_bos, split=split,
        text_field=text_field, seed=seed, model_spec=model, progress=True,
    )
    print(
        f"wrote {manifest['tokens']} tokens x {manifest['d_in']} ({dtype}) in {len(manifest['shards'])} shards "
        f"to {out}; activation scale c = {manifest['scale']:.6g}"
    )
