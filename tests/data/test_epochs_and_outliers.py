"""Caches written with planted rows: outlier (attention-sink) exclusion, several epochs, the held-out split."""

from __future__ import annotations

import json

import pytest
import torch

from saeforge.config import DataConfig, ModelConfig
from saeforge.data import CacheError, open_stream
from saeforge.data.cache import CacheWriter
from saeforge.data.store import activation_stats

D, MODEL, SITE = 8, "planted-model", "blocks.0.resid_post"


def write_cache(path, x, *, split="train", grad=None, shard_tokens=100):
    """A real cache directory holding exactly the rows x [n, D] (and grad), in order."""
    writer = CacheWriter(path, dtype="float32", shard_tokens=shard_tokens, grad=grad is not None)
    for start in range(0, x.shape[0], 37):  # added in uneven pieces, as a harvest does
        writer.add(x[start : start + 37], None if grad is None else grad[start : start + 37])
    writer.finish(model=MODEL, site=SITE, d_in=D, scale=1.0, context_len=32, keep_bos=False, split=split)
    return path


def distinct_rows(n, seed=0):
    """n rows, each one recognisable by its first coordinate (its index), around a large common mean."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g) + 10.0
    x[:, 0] = torch.arange(n, dtype=torch.float32) / n + 10.0
    return x


def stream(cache_dir, batch=64, *, seed=0, grad=False, **data):
    cfg = DataConfig(cache_dir=str(cache_dir), buffer_tokens=300, **data)
    return open_stream(ModelConfig(name=MODEL, site=SITE), cfg, batch, seed=seed, grad=grad)


def ids(x):
    """The planted index of each row."""
    return torch.round((x[:, 0] - 10.0) * N).long()


N = 1000


def test_outlier_exclusion_removes_exactly_the_planted_rows(tmp_path):
    x = distinct_rows(N)
    planted = torch.tensor([3, 150, 151, 512, 999])
    x[planted, 1:] *= 25.0  # far above the median norm (about 28): ~700
    s = stream(write_cache(tmp_path / "c", x), max_epochs=1, max_norm_ratio=3.0)
    served = torch.cat([b["x"] for b in s])
    kept = torch.ones(N, dtype=torch.bool)
    kept[planted] = False
    assert sorted(ids(served).tolist()) == torch.arange(N)[kept].tolist()
    assert s.excluded_tokens == len(planted) and s.tokens_seen == N - len(planted)
    median = float(x.double().norm(dim=1).median())
    assert s.max_input_norm == pytest.approx(3.0 * median)  # raw units, from the statistics sample (all 1000 rows)
    # The statistics leave them out too: the mean is that of the ordinary rows.
    assert torch.allclose(torch.tensor(s.stats.mean, dtype=torch.float64), x[kept].double().mean(0))

    everything = stream(tmp_path / "c", max_epochs=1, keep_outliers=True)
    assert sorted(ids(torch.cat([b["x"] for b in everything])).tolist()) == list(range(N))
    assert everything.excluded_tokens == 0 and everything.max_input_norm is None


def test_statistics_give_the_centred_and_uncentred_scales():
    x = distinct_rows(N).double()
    stats = activation_stats(x, None)
    for normalize, centre in (("centered", x.mean(0)), ("uncentered", 0.0)):
        c = stats.scale(normalize)
        assert float((c * (x - centre)).pow(2).sum(1).mean()) == pytest.approx(D, rel=1e-9)
    assert stats.mean_norm == pytest.approx(float(x.mean(0).norm()))
    assert stats.excluded == 0 and stats.tokens == N


def test_every_epoch_visits_every_cached_token_once_reshuffled(tmp_path):
    x = distinct_rows(N)
    s = stream(write_cache(tmp_path / "c", x, grad=2 * x), grad=True, max_epochs=3)
    batches = list(s)
    served, grads = torch.cat([b["x"] for b in batches]), torch.cat([b["grad"] for b in batches])
    assert served.shape[0] == 3 * N and torch.equal(grads, 2 * served)  # gradients travel with their rows
    epochs = ids(served).split(N)
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(N))
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])
    assert s.epoch == 3


def test_a_resumed_stream_continues_mid_epoch_exactly(tmp_path):
    x = distinct_rows(N)
    write_cache(tmp_path / "c", x)
    x[[10, 20], 1:] *= 40.0
    write_cache(tmp_path / "o", x)  # with outliers, whose count must resume too
    for name in ("c", "o"):
        whole = stream(tmp_path / name, seed=4, max_epochs=3)
        full = [b["x"] for b in whole]
        first = stream(tmp_path / name, seed=4, max_epochs=3)
        for _ in range(23):  # into the second epoch (1000 tokens = 15.6 batches)
            next(first)
        assert first.epoch == 1
        state = json.loads(json.dumps(first.state_dict()))
        resumed = stream(tmp_path / name, seed=4, max_epochs=3)
        resumed.load_state_dict(state)
        rest = [b["x"] for b in resumed]
        assert len(rest) == len(full) - 23 and all(torch.equal(a, b) for a, b in zip(rest, full[23:]))
        assert resumed.excluded_tokens == whole.excluded_tokens == (6 if name == "o" else 0)


def test_without_an_epoch_limit_the_cache_is_read_again(tmp_path):
    s = stream(write_cache(tmp_path / "c", distinct_rows(N)))
    served = torch.cat([next(s)["x"] for _ in range(50)])  # 3.2 epochs
    assert s.epoch == 3 and sorted(ids(served[:N]).tolist()) == list(range(N))


def test_the_held_out_split_is_never_trained_on(tmp_path):
    held_out = write_cache(tmp_path / "eval", distinct_rows(200, seed=1), split="eval")
    with pytest.raises(CacheError, match="split 'eval', but 'train' was expected"):
        stream(held_out)
    train = write_cache(tmp_path / "train", distinct_rows(N))
    s = stream(train, heldout_cache_dir=str(held_out), max_epochs=2)
    sample = s.heldout_sample(150)
    assert torch.equal(sample, distinct_rows(200, seed=1)[:150])
    served = torch.cat([b["x"] for b in s])
    train_rows = {tuple(r) for r in distinct_rows(N).tolist()}
    assert all(tuple(r) in train_rows for r in served.tolist())
    with pytest.raises(CacheError, match="split 'train', but 'eval' was expected"):
        stream(train, heldout_cache_dir=str(train))
