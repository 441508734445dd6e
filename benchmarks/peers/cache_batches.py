"""Training batches read from a saeforge activation cache, in an order both sides of the peer check reproduce.

Imported by `benchmarks/peer_quality.py` (saeforge's venv) and by `benchmarks/peers/saelens_train.py` (the peer's
venv), so it needs only torch, safetensors and the standard library; it does not import saeforge.

The cache's shards (`x` [n, d_in]) are read (each checked against the sha256 in manifest.json) and concatenated in
float32. Batches are consecutive slices of an endless sequence of row permutations: epoch e is
`torch.randperm(n, generator=manual_seed(seed + e))`, and a batch may straddle two epochs. The same torch version,
cache and seed give the same batches in both venvs, so the two SAEs train on the same rows in the same order.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load as load_safetensors_bytes


def read_manifest(cache_dir: str | Path) -> dict:
    path = Path(cache_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{cache_dir} has no manifest.json: not a saeforge activation cache")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != "saeforge-activation-cache":
        raise ValueError(f"{path} is not a saeforge activation cache manifest")
    return manifest


def load_cache_rows(cache_dir: str | Path) -> torch.Tensor:
    """Every cached activation row, [tokens, d_in] float32, shards in manifest order."""
    cache_dir = Path(cache_dir)
    manifest = read_manifest(cache_dir)
    parts = []
    for shard in manifest["shards"]:
        data = (cache_dir / shard["file"]).read_bytes()
        if hashlib.sha256(data).hexdigest() != shard["sha256"]:
            raise ValueError(f"shard {shard['file']} of {cache_dir} fails its sha256 checksum")
        parts.append(load_safetensors_bytes(data)["x"].float())
    rows = torch.cat(parts)
    if rows.shape != (manifest["tokens"], manifest["d_in"]):
        raise ValueError(f"{cache_dir}: rows {tuple(rows.shape)} do not match the manifest "
                         f"({manifest['tokens']} x {manifest['d_in']})")
    return rows


class EpochBatches:
    """Endless batches of `batch_size` rows: consecutive slices of per-epoch seeded permutations of `rows`."""

    def __init__(self, rows: torch.Tensor, batch_size: int, seed: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.epoch = 0
        self.tokens_served = 0
        self._order = self._permutation(0)
        self._offset = 0

    def _permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.rows.shape[0], generator=torch.Generator().manual_seed(self.seed + epoch))

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        picked, need = [], self.batch_size
        while need:
            if self._offset == self._order.numel():
                self.epoch += 1
                self._order, self._offset = self._permutation(self.epoch), 0
            take = min(need, self._order.numel() - self._offset)
            picked.append(self._order[self._offset : self._offset + take])
            self._offset += take
            need -= take
        self.tokens_served += self.batch_size
        return self.rows[torch.cat(picked)]

    def epochs_served(self) -> float:
        return self.tokens_served / self.rows.shape[0]


def sample_rows(rows: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """A fixed random sample of `n` rows (all of them when there are fewer)."""
    order = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed))
    return rows[order[:n]]
