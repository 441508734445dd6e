"""The activation cache: round trips per dtype, refusals by name, kill safety, and streaming from the cache."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from data_helpers import (
    CONTEXT_LEN, LM_BATCH, SITE, data_config, model_config, reference_rows, subprocess_env,
)
from safetensors.torch import load_file, save_file

from saeforge.config import ModelConfig
from saeforge.data import ActivationCache, CacheError, harvest, open_stream
from saeforge.data.cache import seal_manifest

TOKENS, SHARD = 1000, 300


def harvest_into(lm, corpus, out, **options):
    options = {"tokens": TOKENS, "shard_tokens": SHARD, **options}
    return harvest(lm, SITE, str(corpus), out, context_len=CONTEXT_LEN, lm_batch_size=LM_BATCH, **options)


def cache_rows(cache: ActivationCache, name="x"):
    return torch.cat([cache.load_shard(i)[name] for i in range(len(cache.shards))])


@pytest.fixture(scope="module")
def harvested(lm, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "fp32"
    harvest_into(lm, corpus, out)
    return out


@pytest.fixture
def cache_copy(harvested, tmp_path):
    """A private copy of the harvested cache, for tests that damage it."""
    return shutil.copytree(harvested, tmp_path / "cache")


def test_float32_round_trip_is_exact_and_manifest_describes_it(lm, corpus, harvested):
    cache = ActivationCache(harvested, model=lm.name, site=SITE, dtype="float32")
    expected, _ = reference_rows(lm, corpus)
    assert torch.equal(cache_rows(cache), expected[:TOKENS])
    m = cache.manifest
    assert (m["model"], m["site"], m["dtype"], m["d_in"], m["context_len"]) == (
        lm.name, SITE, "float32", lm.d_model, CONTEXT_LEN,
    )
    assert m["tokens"] == TOKENS and [s["tokens"] for s in m["shards"]] == [300, 300, 300, 100]
    for shard in m["shards"]:
        assert hashlib.sha256((harvested / shard["file"]).read_bytes()).hexdigest() == shard["sha256"]
    x = expected[:TOKENS].double()
    assert (cache.scale * x).pow(2).sum(-1).mean().item() == pytest.approx(lm.d_model, rel=1e-9)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_round_trip_is_within_rounding(lm, corpus, tmp_path, dtype):
    harvest_into(lm, corpus, tmp_path / dtype, dtype=dtype)
    stored = cache_rows(ActivationCache(tmp_path / dtype, dtype=dtype))
    expected = reference_rows(lm, corpus)[0][:TOKENS]
    assert stored.dtype == getattr(torch, dtype)
    assert torch.equal(stored, expected.to(stored.dtype))  # exactly the rounded fp32 values
    unit_roundoff = {"bfloat16": 2**-8, "float16": 2**-11}[dtype]
    assert torch.all((stored.float() - expected).abs() <= unit_roundoff * expected.abs() + 1e-6)


def test_gradients_are_stored_next_to_activations(lm, corpus, tmp_path):
    harvest_into(lm, corpus, tmp_path / "g", grad=True, tokens=400)
    cache = ActivationCache(tmp_path / "g", grad=True)
    x, g = reference_rows(lm, corpus, grad=True)
    assert torch.equal(cache_rows(cache, "x"), x[:400]) and torch.equal(cache_rows(cache, "grad"), g[:400])


def test_a_shard_failing_its_checksum_is_refused_by_name(lm, corpus, cache_copy):
    path = cache_copy / "shard_00001.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # one flipped bit in the tensor data: same size, valid header
    path.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"shard shard_00001\.safetensors fails its sha256"):
        ActivationCache(cache_copy)  # verified on open, before anything reads it
    with pytest.raises(CacheError, match=r"shard_00001\.safetensors fails its sha256"):
        open_stream(model_config(lm), data_config(corpus, cache_dir=str(cache_copy), buffer_tokens=600), 64)


def test_truncated_and_missing_shards_are_refused_by_name(cache_copy):
    path = cache_copy / "shard_00002.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CacheError, match=r"shard shard_00002\.safetensors is truncated"):
        ActivationCache(cache_copy)
    path.write_bytes(b"\x01")
    with pytest.raises(CacheError, match=r"shard shard_00002\.safetensors is truncated"):
        ActivationCache(cache_copy)
    path.unlink()
    with pytest.raises(CacheError, match=r"shard shard_00002\.safetensors listed in .* is missing"):
        ActivationCache(cache_copy)


def test_cache_of_another_model_or_site_is_refused(lm, corpus, harvested):
    with pytest.raises(CacheError, match=rf"harvested from model '{lm.name}', not \['other-model'\]"):
        open_stream(ModelConfig(name="other-model", site=SITE), data_config(corpus, cache_dir=str(harvested)), 64)
    with pytest.raises(CacheError, match=rf"has site '{SITE}', but 'blocks.0.resid_post' was expected"):
        open_stream(ModelConfig(name=lm.name, site="blocks.0.resid_post"),
                    data_config(corpus, cache_dir=str(harvested)), 64)
    with pytest.raises(CacheError, match="holds no gradients"):
        open_stream(model_config(lm), data_config(corpus, cache_dir=str(harvested)), 64, grad=True)
    with pytest.raises(CacheError, match="has keep_bos False, but True was expected"):
        open_stream(model_config(lm), data_config(corpus, cache_dir=str(harvested), keep_bos=True), 64)


def test_wrong_dtype_is_refused(cache_copy):
    with pytest.raises(CacheError, match="has dtype 'float32', but 'bfloat16' was expected"):
        ActivationCache(cache_copy, dtype="bfloat16")
    # A shard rewritten in float16 (and its checksum updated to match) still contradicts the manifest's dtype.
    path = cache_copy / "shard_00000.safetensors"
    save_file({"x": load_file(path)["x"].half()}, path)
    manifest = json.loads((cache_copy / "manifest.json").read_text())
    manifest["shards"][0]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (cache_copy / "manifest.json").write_text(json.dumps(seal_manifest(manifest)))
    with pytest.raises(CacheError, match=r"shard_00000\.safetensors stores 'x' as F16, but the manifest says float32"):
        ActivationCache(cache_copy)


def test_a_killed_harvest_leaves_no_manifest(cache_copy):
    """SIGKILL a real harvest over an old cache after it has written shards: no manifest is left, not even the old."""
    code = (
        "from saeforge.models import tiny_lm; from saeforge.data import harvest; "
        f"harvest(tiny_lm('gemma3'), {SITE!r}, 'embedded', {str(cache_copy)!r}, tokens=10**8, context_len=32, "
        "shard_tokens=64)"
    )
    child = subprocess.Popen([sys.executable, "-c", code], env=subprocess_env(), stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (cache_copy / "shard_00005.safetensors").exists():  # the old cache has shards 0-3 only
            assert child.poll() is None, child.stderr.read().decode()
            assert time.monotonic() < deadline, "the harvest wrote no shards in 120 s"
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert not (cache_copy / "manifest.json").exists()
    with pytest.raises(CacheError, match="has no manifest.json"):
        ActivationCache(cache_copy)


def test_stream_from_cache_shuffles_across_shards_and_covers_everything(lm, corpus, harvested):
    cache = ActivationCache(harvested)
    shards = [{r.numpy().tobytes() for r in cache.load_shard(i)["x"]} for i in range(len(cache.shards))]
    cfg = data_config(corpus, cache_dir=str(harvested), buffer_tokens=1200, max_epochs=1)  # 4 shards per block
    stream = open_stream(model_config(lm), cfg, 100)
    batches = list(stream)
    for batch in batches[:3]:
        rows = [r.numpy().tobytes() for r in batch["x"]]
        assert sum(any(r in s for r in rows) for s in shards) >= 3
    everything = torch.cat([b["x"] for b in batches])
    assert everything.dtype == torch.float32 and stream.tokens_seen == TOKENS
    assert torch.equal(torch.sort(everything, 0).values, torch.sort(cache_rows(cache), 0).values)
    assert stream.scale == cache.scale and stream.d_in == lm.d_model


def test_stream_from_cache_resumes_exactly_and_splits_by_rank(lm, corpus, harvested):
    cfg = data_config(corpus, cache_dir=str(harvested), buffer_tokens=600, max_epochs=1)
    full = list(open_stream(model_config(lm), cfg, 64, seed=3))
    first = open_stream(model_config(lm), cfg, 64, seed=3)
    for _ in range(6):
        next(first)
    resumed = open_stream(model_config(lm), cfg, 64, seed=3)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    rest = list(resumed)
    assert len(rest) == len(full) - 6 and all(torch.equal(a["x"], b["x"]) for a, b in zip(rest, full[6:]))

    shares = [torch.cat([b["x"] for b in open_stream(model_config(lm), cfg, 64, rank=r, world_size=2)])
              for r in range(2)]
    assert abs(shares[0].shape[0] - shares[1].shape[0]) <= 2  # at most one row per block apart
    everything = cache_rows(ActivationCache(harvested))
    assert torch.equal(torch.sort(torch.cat(shares), 0).values, torch.sort(everything, 0).values)
