"""Data-parallel training throughput from an activation cache: one process against N torchrun ranks.

    PYTHONPATH=src python benchmarks/ddp.py [--ranks 2] [--device cpu] [--steps 24] [--quick]

It writes a synthetic activation cache (rows of `training.SyntheticStream`, bfloat16 shards), then trains the same
SAEs (a ReLU and a TopK SAE) from it, each run in its own processes:
  one_rank_one_thread:  one process, one thread;
  one_rank_all_threads: one process with as many threads as the N ranks use together;
  ranks:                N processes started by `python -m torch.distributed.run --standalone`, one thread each
                        (gloo on CPU; on CUDA, NCCL and one GPU per rank).
Tokens/s is measured over the steps after a warm-up, from the time rank 0 fetches batch `warmup` to the time it
fetches the last one (every step in between: loading its share, the SAE steps and their collectives). For the
N-rank run it also gives the seconds rank 0 spent inside collectives over those steps (the all-reduces of gradients
and firing counts and the agreement on each step's rows, waiting for the slower rank included) and their share of
the time. Prints one JSON object with the machine (CPU capability), the settings and the ratios
ranks / one_rank_one_thread and ranks / one_rank_all_threads. On a machine with N cores or fewer the ranks share
the cores with each other and with the data loading: read the ratio and the communication share, not the tokens/s.
--quick: a tiny configuration that only checks that everything runs (seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def write_cache(directory: Path, d_in: int, tokens: int, shard_tokens: int) -> None:
    from saeforge.data.cache import CacheWriter
    from saeforge.data.store import activation_scale
    from saeforge.training import SyntheticStream

    stream = SyntheticStream(d_in, shard_tokens, seed=0)
    writer = CacheWriter(directory, dtype="bfloat16", shard_tokens=shard_tokens, grad=False)
    sum_sq, written = 0.0, 0
    while written < tokens:
        x = next(stream)["x"]
        sum_sq += float(x.double().pow(2).sum())
        writer.add(x)
        written += x.shape[0]
    writer.finish(model="synthetic", model_spec="synthetic", site="synthetic", d_in=d_in,
                  scale=activation_scale(sum_sq, written, d_in), context_len=128, keep_bos=False,
                  source="benchmarks/ddp.py", split="train", text_field="text", seed=0, lm_dtype="none")


def run_config(args, out_dir: Path):
    from saeforge.config import DataConfig, ModelConfig, RunConfig, SAESpec, TrainConfig

    train = TrainConfig(tokens=args.steps * args.batch, batch_size=args.batch, lr=1e-3, out_dir=str(out_dir),
                        device=args.device, compute_dtype=args.compute_dtype, checkpoint_every=10**9,
                        log_every=10**9, tensorboard=False, heldout_tokens=0, resample=False,
                        keep_freed_memory=True)
    data = DataConfig(cache_dir=str(args.cache), buffer_tokens=4 * args.shard_tokens)
    saes = [SAESpec("relu", d_sae=args.d_sae, sparsity_coeff=1.0), SAESpec("topk", d_sae=args.d_sae, k=args.k)]
    return RunConfig(model=ModelConfig(name="synthetic", site="synthetic", device=args.device), data=data,
                     train=train, sae=saes)


class TimedStream:
    """This rank's stream, noting the time (and the time in collectives) at which batch `warmup` and the last batch
    are fetched."""

    def __init__(self, stream, warmup: int, last: int, dist):
        self.stream, self.warmup, self.last, self.dist = stream, warmup, last, dist
        self.fetched = 0
        self.marks: dict[str, tuple[float, float]] = {}

    def __getattr__(self, name):
        return getattr(self.stream, name)

    def __iter__(self):
        return self

    def __next__(self):
        if self.fetched in (self.warmup, self.last):
            if self.dist is not None and self.dist.device.type == "cuda":
                torch.cuda.synchronize()
            comm = self.dist.comm_seconds if self.dist is not None else 0.0
            self.marks["start" if self.fetched == self.warmup else "end"] = (time.perf_counter(), comm)
        self.fetched += 1
        return next(self.stream)


def worker(args) -> None:
    """One process (or one rank) of a measured run; rank 0 writes the result to args.result."""
    torch.set_num_threads(args.threads)
    from saeforge.data import open_stream
    from saeforge.training import Trainer
    from saeforge.training.distributed import process_group

    with process_group(args.device) as dist:
        rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
        cfg = run_config(args, Path(args.out) / f"rank{rank}")
        stream = open_stream(cfg.model, cfg.data, args.batch // world, seed=cfg.train.seed, rank=rank,
                             world_size=world)
        timed = TimedStream(stream, args.warmup, args.steps - 1, dist)
        trainer = Trainer(cfg, stream=timed, progress=False, dist=dist)
        trainer.run()
        if rank == 0:
            (t0, c0), (t1, c1) = timed.marks["start"], timed.marks["end"]
            steps = args.steps - 1 - args.warmup
            seconds = t1 - t0
            result = {"processes": world, "threads_per_process": args.threads, "steps_timed": steps,
                      "seconds": seconds, "tokens_per_s": steps * args.batch / seconds,
                      "sae_products": trainer.compute_precision.describe()}
            if dist is not None:
                result.update(comm_seconds=c1 - c0, comm_fraction=(c1 - c0) / seconds,
                              backend=dist.backend)
            Path(args.result).write_text(json.dumps(result))


def launch(args, *, ranks: int, threads: int, tag: str) -> dict:
    result = Path(args.workdir) / f"{tag}.json"
    common = [str(Path(__file__).resolve()), "--worker", "--result", str(result), "--out",
              str(Path(args.workdir) / tag), "--threads", str(threads), *args.passthrough]
    if ranks == 1:
        command = [sys.executable, *common]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                   *common]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{tag} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--d-in", type=int, default=512)
    parser.add_argument("--d-sae", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096, help="the global batch")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--shard-tokens", type=int, default=16384)
    parser.add_argument("--cache-tokens", type=int, default=8 * 16384, help="read for several epochs if needed")
    parser.add_argument("--compute-dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--quick", action="store_true", help="a tiny configuration that checks everything runs")
    # worker-side arguments
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.d_in, args.d_sae, args.k, args.batch, args.steps, args.warmup = 32, 128, 4, 256, 8, 2
        args.shard_tokens, args.cache_tokens = 512, 4096
    if args.worker:
        worker(args)
        return
    if args.batch % args.ranks or args.steps <= args.warmup + 1:
        raise SystemExit("--batch must divide by --ranks, and --steps must exceed --warmup + 1")
    from saeforge.models.precision import hardware_record

    with tempfile.TemporaryDirectory(prefix="saeforge-ddp-bench-") as workdir:
        args.workdir = workdir
        cache = Path(workdir) / "cache"
        write_cache(cache, args.d_in, args.cache_tokens, args.shard_tokens)
        args.passthrough = [f"--cache={cache}", f"--device={args.device}", f"--d-in={args.d_in}",
                            f"--d-sae={args.d_sae}", f"--k={args.k}", f"--batch={args.batch}",
                            f"--steps={args.steps}", f"--warmup={args.warmup}", f"--shard-tokens={args.shard_tokens}",
                            f"--compute-dtype={args.compute_dtype}"]
        one = launch(args, ranks=1, threads=1, tag="one_rank_one_thread")
        one_all = launch(args, ranks=1, threads=args.ranks, tag="one_rank_all_threads")
        many = launch(args, ranks=args.ranks, threads=1, tag="ranks")
    print(json.dumps({
        "benchmark": "ddp", "machine": hardware_record(args.device), "cpu_count": os.cpu_count(),
        "settings": {"d_in": args.d_in, "d_sae": args.d_sae, "k": args.k, "saes": ["relu", "topk"],
                     "global_batch": args.batch, "steps": args.steps, "warmup": args.warmup,
                     "cache": "synthetic, bfloat16", "quick": args.quick},
        "one_rank_one_thread": one, "one_rank_all_threads": one_all, f"{args.ranks}_ranks": many,
        "ratio_vs_one_thread": many["tokens_per_s"] / one["tokens_per_s"],
        "ratio_vs_all_threads": many["tokens_per_s"] / one_all["tokens_per_s"],
    }, indent=1))


if __name__ == "__main__":
    main()
