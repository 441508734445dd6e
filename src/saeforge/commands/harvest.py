"""`saeforge harvest`: write an activation cache from a language model (data.harvest)."""

from __future__ import annotations

import sys
from typing import Literal

from saeforge.config import ConfigError
from saeforge.data.harvest import harvest
from saeforge.data.sources import check_text_source
from saeforge.files import check_writable_dir
from saeforge.models import load_lm, site_width_before_loading


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
