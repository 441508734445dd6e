"""`python -m saeforge harvest` as a real subprocess, on a tiny model saved to a local directory."""

from __future__ import annotations

import subprocess
import sys

import torch
from data_helpers import SITE, data_config, subprocess_env

from saeforge.config import ModelConfig
from saeforge.data import ActivationCache, open_stream


def test_harvest_command_writes_a_cache_that_training_can_read(lm, corpus, tmp_path):
    model_dir = tmp_path / "tiny-model"
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)
    out = tmp_path / "acts"
    command = [
        sys.executable, "-m", "saeforge", "harvest", "--model", str(model_dir), "--site", SITE,
        "--source", str(corpus), "--out", str(out), "--tokens", "500", "--context-len", "32",
        "--dtype", "bfloat16", "--shard-tokens", "200", "--batch-size", "4",
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    assert "tok/s" in done.stderr  # the tqdm progress bar reports throughput
    assert "wrote 500 tokens x 64 (bfloat16) in 3 shards" in done.stdout

    cache = ActivationCache(out, model=str(model_dir), site=SITE, dtype="bfloat16")
    assert cache.tokens == 500 and [s["tokens"] for s in cache.shards] == [200, 200, 100]
    # A run config naming the model by its directory reads the cache without loading the model.
    stream = open_stream(ModelConfig(name=str(model_dir), site=SITE), data_config(corpus, cache_dir=str(out), max_epochs=1), 128)
    rows = torch.cat([b["x"] for b in stream])
    assert rows.shape == (500, lm.d_model) and torch.isfinite(rows).all()

