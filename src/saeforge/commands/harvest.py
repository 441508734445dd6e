"""`saeforge harvest`: write an activation cache from a language model (data.harvest)."""

from __future__ import annotations

import sys
from typing import Literal

from saeforge.config import ConfigError
from saeforge.data.cache import remove_cache
from saeforge.data.harvest import finish_harvest, harvest, harvest_shards
from saeforge.data.sources import check_text_source
from saeforge.files import check_writable_dir
from saeforge.models import load_lm, site_width_before_loading
from saeforge.training.distributed import process_group


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
    Under torchrun, each process runs the model on its share of the contexts and one cache is written.

    Args:
        model: "embedded" (Gemma 3 270M), a hub id, a local model directory or a .gguf path.
        site: Canonical site name such as blocks.6.resid_post, or a raw module path.
        source: "embedded" (Wikipedia leads), a .txt/.jsonl/.parquet file, or hf:<dataset id>[:<config>].
        out: Output directory for the cache.
        tokens: Number of activation rows (tokens) to write (in all, over every rank under torchrun).
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

    # Everything that can be checked without the model is checked before it loads.
    for flag, value, least in (("--tokens", tokens, 1), ("--shard-tokens", shard_tokens, 1),
                               ("--batch-size", batch_size, 1), ("--context-len", context_len, 2)):
        if value < least:
            raise ConfigError(f"{flag}: must be at least {least}, got {value}")
    check_text_source(source, text_field)
    check_writable_dir(out, "--out")
    site_width_before_loading(model, site)  # a block the model does not have, from its config.json
    # Under torchrun (`torchrun --nproc-per-node N -m saeforge harvest ...`) each process harvests its share of the
    # contexts and rank 0 writes the one manifest (data/harvest.py); without it, dist is None and this is one process.
    with process_group(device) as dist:
        if dist is None:
            lm = load_lm(model, device=device, dtype=model_dtype)
            print(f"language model: {lm.precision.describe()}", file=sys.stderr)
            manifest = harvest(
                lm, site, source, out, tokens=tokens, context_len=context_len, dtype=dtype, grad=grad,
                lm_batch_size=batch_size, shard_tokens=shard_tokens, keep_bos=keep_bos, split=split,
                text_field=text_field, seed=seed, model_spec=model, progress=True,
            )
        else:
            manifest = _harvest_ranks(dist, model, site, source, out, tokens=tokens, context_len=context_len,
                                      dtype=dtype, grad=grad, batch_size=batch_size, shard_tokens=shard_tokens,
                                      keep_bos=keep_bos, split=split, text_field=text_field, seed=seed,
                                      device=device, model_dtype=model_dtype)
            if not dist.is_main:
                return
        ranks = f" from {dist.world_size} ranks" if dist is not None else ""
        print(
            f"wrote {manifest['tokens']} tokens x {manifest['d_in']} ({dtype}) in {len(manifest['shards'])} shards "
            f"to {out}{ranks}; activation scale c = {manifest['scale']:.6g}"
        )


def _harvest_ranks(dist, model, site, source, out, *, tokens, context_len, dtype, grad, batch_size, shard_tokens,
                   keep_bos, split, text_field, seed, device, model_dtype) -> dict:
    """This rank's share of a harvest of several ranks; rank 0 also writes the manifest (returned on every rank)."""
    lm = load_lm(model, device=str(dist.place(device)), dtype=model_dtype)
    if dist.is_main:
        print(f"language model: {lm.precision.describe()} (each of {dist.world_size} ranks)", file=sys.stderr)
        remove_cache(out)  # before any rank writes a shard
    dist.barrier()
    part = harvest_shards(lm, site, source, out, tokens=tokens, context_len=context_len, dtype=dtype, grad=grad,
                          lm_batch_size=batch_size, shard_tokens=shard_tokens, keep_bos=keep_bos, split=split,
                          text_field=text_field, seed=seed, rank=dist.rank, world_size=dist.world_size,
                          progress=dist.is_main)
    parts = dist.all_gather_json(part)
    manifest = None
    if dist.is_main:
        manifest = finish_harvest(lm, site, source, out, parts, context_len=context_len, keep_bos=keep_bos,
                                  split=split, text_field=text_field, seed=seed, model_spec=model)
    return dist.broadcast_json(manifest)  # every rank returns once the manifest is written
