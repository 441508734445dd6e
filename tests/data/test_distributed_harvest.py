"""`torchrun -m saeforge harvest` and `torchrun -m saeforge train` as real subprocesses (2 CPU ranks, gloo), on a
tiny model saved to a local directory: one cache from two ranks, which one process trains on, and a 2-rank training
run from it that equals one process reading the same global batches."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from data_helpers import SITE, assert_same_rows, subprocess_env
from safetensors.torch import load_file

from saeforge.config import ModelConfig, RunConfig, load_config
from saeforge.data import ActivationCache, harvest, open_stream
from saeforge.training import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from ddp_helpers import GlobalBatches, max_abs_diff  # noqa: E402  (tests/training/ddp_helpers.py)

CONTEXT_LEN = 32
SHARD_TOKENS = 500
BATCH = 64  # the global batch


def torchrun(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "saeforge",
               *args]
    done = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-6000:]
    return done


RUN_TOML = """
[model]
name = "{model}"
site = "{site}"

[data]
cache_dir = "{cache}"
buffer_tokens = 1000
max_epochs = 1

[train]
tokens = 1_000_000          # more than the cache holds: the run ends when every rank's data has run out
batch_size = {batch}
lr = 0.01
compute_dtype = "float32"   # the same products on every CPU (bf16 would round a split batch differently)
lr_warmup_steps = 2
sparsity_warmup_steps = 2
resample_every = 8
resample_until = 100
dead_window_steps = 2
resample_sample_tokens = 128
checkpoint_every = 5
log_every = 2
tensorboard = false
heldout_tokens = 0
out_dir = "{out}"

[[sae]]
architecture = "relu"
d_sae = 128
sparsity_coeff = 3.0

[[sae]]
architecture = "gated"
d_sae = 96
target_l0 = 8

[[sae]]
architecture = "topk"
d_sae = 128
k = 4
"""


def test_two_rank_harvest_makes_one_cache_that_trains_alone_and_data_parallel(lm, corpus, tmp_path):
    model_dir = tmp_path / "tiny-model"
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)
    cache = tmp_path / "acts"
    # More tokens than the corpus holds: every rank harvests all of its contexts, so the cache must hold exactly the
    # rows one process harvests from the whole corpus.
    done = torchrun("harvest", "--model", str(model_dir), "--site", SITE, "--source", str(corpus), "--out", str(cache),
                    "--tokens", "1000000", "--context-len", str(CONTEXT_LEN), "--shard-tokens", str(SHARD_TOKENS),
                    "--batch-size", "4", "--model-dtype", "float32")
    assert "from 2 ranks" in done.stdout and done.stdout.count("wrote ") == 1  # rank 0 reports, once

    two = ActivationCache(cache, model=str(model_dir), site=SITE)
    assert two.manifest["ranks"] == 2
    files = [s["file"] for s in two.shards]
    assert files[0].startswith("shard_r0_") and files[1].startswith("shard_r1_")  # interleaved across the ranks
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the text source ran out": on purpose
        one = harvest(lm, SITE, corpus, tmp_path / "one", tokens=1_000_000, context_len=CONTEXT_LEN,
                      shard_tokens=SHARD_TOKENS, lm_batch_size=4)
    assert two.tokens == one["tokens"] > 5 * BATCH
    rows_two = torch.cat([two.load_shard(i)["x"] for i in range(len(two.shards))])
    rows_one = torch.cat([ActivationCache(tmp_path / "one").load_shard(i)["x"] for i in range(len(one["shards"]))])
    assert_same_rows(rows_two, rows_one)  # batched otherwise, so equal up to float32 rounding
    assert two.scale == pytest.approx(one["scale"], rel=1e-6)

    run_file = tmp_path / "run.toml"
    run_file.write_text(RUN_TOML.format(model=model_dir, site=SITE, cache=cache, batch=BATCH, out=tmp_path / "ddp"))
    cfg = load_config(run_file)

    # One process trains on the 2-rank cache like on any other.
    alone = Trainer(_with_out_dir(cfg, tmp_path / "alone"), progress=False).run()
    assert alone.data_exhausted and alone.steps > 100
    assert all((path / "cfg.json").exists() for path in alone.sae_dirs.values())

    # Two ranks train on it with the CLI; one process fed the same global batches ends with the same SAEs.
    done = torchrun("train", str(run_file))
    assert "on 2 ranks" in done.stdout
    streams = [open_stream(ModelConfig(name=str(model_dir), site=SITE), cfg.data, BATCH // 2, seed=cfg.train.seed,
                           rank=rank, world_size=2) for rank in range(2)]
    reference = Trainer(_with_out_dir(cfg, tmp_path / "reference"), stream=GlobalBatches(streams),
                        progress=False).run()
    assert reference.data_exhausted and reference.steps > 100
    worst = {}
    for name in reference.sae_dirs:
        a = load_file(str(tmp_path / "ddp" / name / "sae_weights.safetensors"))
        b = load_file(str(tmp_path / "reference" / name / "sae_weights.safetensors"))
        worst[name] = max(max_abs_diff(a, b).values())
        assert worst[name] < 1e-4, (name, max_abs_diff(a, b))
        counts = [load_file(str(run / name / "sparsity.safetensors"))["firing_counts"]
                  for run in (tmp_path / "ddp", tmp_path / "reference")]
        assert torch.equal(*counts), name
        records = [json.loads((run / name / "cfg.json").read_text())["training"]
                   for run in (tmp_path / "ddp", tmp_path / "reference")]
        assert records[0]["steps"] == reference.steps
        if records[1]["sparsity_coeff"] is not None:  # lambda: fixed, or steered by the global L0
            assert records[0]["sparsity_coeff"] == pytest.approx(records[1]["sparsity_coeff"], rel=1e-5)
    print("max |two ranks (CLI, cache) - one process| per SAE:", worst)


def _with_out_dir(cfg: RunConfig, out) -> RunConfig:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out_dir=str(out)))
