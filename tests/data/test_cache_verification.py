"""An activation cache is verified in full when it is opened: damage anywhere (the last shard, bytes appended, the
manifest itself) is refused by name before the first training step."""

from __future__ import annotations

import json

import pytest
import torch

from saeforge.config import DataConfig, ModelConfig, RunConfig, SAESpec, TrainConfig
from saeforge.data import ActivationCache, CacheError
from saeforge.data.cache import CacheWriter, seal_manifest
from saeforge.training import Trainer

SITE, D, SHARD, SHARDS = "blocks.0.resid_post", 16, 128, 4


def _write_cache(directory):
    writer = CacheWriter(directory, dtype="float32", shard_tokens=SHARD, grad=False)
    writer.add(torch.randn(SHARD * SHARDS, D, generator=torch.Generator().manual_seed(0)))
    writer.finish(model="m", site=SITE, d_in=D, scale=0.25, context_len=32, keep_bos=False, split="train")
    return directory


def _flip_bit(path) -> None:
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x04
    path.write_bytes(bytes(data))


def _append(path) -> None:
    with open(path, "ab") as f:
        f.write(b"\x00")


def _edit_manifest(cache, edit, seal=False) -> None:
    manifest = json.loads((cache / "manifest.json").read_text())
    edit(manifest)
    (cache / "manifest.json").write_text(json.dumps(seal_manifest(manifest) if seal else manifest))


LAST = f"shard_{SHARDS - 1:05d}.safetensors"
DAMAGE = {
    "last shard bit flip": (lambda c: _flip_bit(c / LAST), f"{LAST} fails its sha256"),
    "first shard bit flip": (lambda c: _flip_bit(c / "shard_00000.safetensors"), "shard_00000.safetensors fails"),
    "byte appended to the last shard": (lambda c: _append(c / LAST), f"{LAST} has 1 bytes appended"),
    "last shard truncated": (lambda c: (c / LAST).write_bytes((c / LAST).read_bytes()[:-1]), f"{LAST} is truncated"),
    "last shard missing": (lambda c: (c / LAST).unlink(), f"{LAST} listed in"),
    "scale edited": (lambda c: _edit_manifest(c, lambda m: m.update(scale=1.0)), "fails its own checksum"),
    "tokens edited": (lambda c: _edit_manifest(c, lambda m: m.update(tokens=1)), "fails its own checksum"),
    "tokens inconsistent (resealed)": (lambda c: _edit_manifest(c, lambda m: m.update(tokens=1), seal=True),
                                       f"'tokens' is 1, but its shards hold {SHARD * SHARDS}"),
    "scale not finite (resealed)": (lambda c: _edit_manifest(c, lambda m: m.update(scale=float("inf")), seal=True),
                                    "'scale' must be a finite positive number"),
    "no shards": (lambda c: _edit_manifest(c, lambda m: m.pop("shards"), seal=True), "'shards' must be a non-empty"),
    "empty shard list": (lambda c: _edit_manifest(c, lambda m: m.update(shards=[]), seal=True),
                         "'shards' must be a non-empty"),
}


def _trainer(cache, out_dir) -> Trainer:
    cfg = RunConfig(model=ModelConfig(name="m", site=SITE),
                    data=DataConfig(cache_dir=str(cache), context_len=32, buffer_tokens=SHARD),
                    train=TrainConfig(tokens=SHARD * SHARDS, batch_size=64, out_dir=str(out_dir), tensorboard=False,
                                      checkpoint_every=1, heldout_tokens=0),
                    sae=[SAESpec("relu", d_sae=32, sparsity_coeff=1.0)])
    return Trainer(cfg, progress=False)


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damage_anywhere_is_refused_before_the_first_step(tmp_path, damage):
    cache = _write_cache(tmp_path / "cache")
    damage_fn, message = DAMAGE[damage]
    damage_fn(cache)
    trainer = _trainer(cache, tmp_path / "run")
    with pytest.raises(CacheError, match=message.replace("[", r"\[").replace("(", r"\(")):
        trainer.run()
    assert trainer.step == 0 and not (tmp_path / "run" / "checkpoints").exists()


def test_an_intact_cache_trains(tmp_path):
    cache = _write_cache(tmp_path / "cache")
    assert ActivationCache(cache).manifest["manifest_sha256"]
    result = _trainer(cache, tmp_path / "run").run()
    assert result.steps == SHARD * SHARDS // 64


def test_an_unsealed_manifest_of_an_older_harvest_is_read_with_a_note(tmp_path, capsys):
    cache = _write_cache(tmp_path / "cache")
    _edit_manifest(cache, lambda m: m.pop("manifest_sha256"))
    assert ActivationCache(cache).tokens == SHARD * SHARDS
    assert "carries no manifest_sha256" in capsys.readouterr().err
