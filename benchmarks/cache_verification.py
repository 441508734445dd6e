"""Up-front activation-cache verification: how long opening a cache takes (`ActivationCache(...)`: the manifest's
seal, every shard's header, exact size and sha256), per GB of shards.

Prints JSON: the cache size, the median open time over the rounds, seconds per GB and GB/s, the CPU. The shards were
just written, so they are read from the page cache: the figure is the hashing cost; a cold read adds the disk's own
read time (about 1 s/GB at 1 GB/s).

Usage: PYTHONPATH=src python benchmarks/cache_verification.py [--mb 512] [--shard-tokens 16384] [--d-in 640]
       [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from saeforge.data import ActivationCache
from saeforge.data.cache import CacheWriter
from saeforge.models.precision import hardware_record


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=512, help="size of the cache's shards, in MiB")
    parser.add_argument("--shard-tokens", type=int, default=16384, help="harvest's default shard size")
    parser.add_argument("--d-in", type=int, default=640, help="Gemma 3 270M's width")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    tokens = args.mb * 2**20 // (4 * args.d_in)
    with tempfile.TemporaryDirectory() as tmp:
        writer = CacheWriter(tmp, dtype="float32", shard_tokens=args.shard_tokens, grad=False)
        generator = torch.Generator().manual_seed(0)
        for start in range(0, tokens, args.shard_tokens):
            writer.add(torch.randn(min(args.shard_tokens, tokens - start), args.d_in, generator=generator))
        writer.finish(model="benchmark", site="blocks.0.resid_post", d_in=args.d_in, scale=1.0, context_len=128,
                      keep_bos=False, split="train")
        size = sum(p.stat().st_size for p in Path(tmp).glob("shard_*.safetensors"))
        times = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            ActivationCache(tmp)
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    gb = size / 1e9
    print(json.dumps({"cache_bytes": size, "shards": -(-tokens // args.shard_tokens), "open_seconds": seconds,
                      "all_rounds_seconds": times, "seconds_per_gb": seconds / gb, "gb_per_second": gb / seconds,
                      "page_cache": "warm (shards just written)", "hardware": hardware_record()}, indent=1))


if __name__ == "__main__":
    main()
