"""The on-disk activation cache: safetensors shards plus a manifest.

A cache is a directory holding `shard_NNNNN.safetensors` files (tensor `x` [n, d_in], and `grad` [n, d_in] when
harvested with gradients, in float32, bfloat16 or float16) and `manifest.json`:

    {"format": "saeforge-activation-cache", "version": 1, "model": ..., "model_spec": ..., "site": ...,
     "dtype": "bfloat16", "d_in": 640, "tokens": N, "scale": c, "context_len": 128, "keep_bos": false,
     "grad": false, "source": ..., "split": "train", "shards": [{"file": ..., "tokens": n, "sha256": ...}, ...],
     "manifest_sha256": ...}

`manifest_sha256` seals the manifest itself (the sha256 of its other fields as canonical JSON), so an edited token
count or scale is refused rather than used. Every file is written under a temporary name and renamed into place, and
the manifest is written last, after all its shards; an existing manifest is removed before a new harvest starts. So
a killed harvest leaves no manifest, never one pointing at partial shards. Opening a cache verifies all of it before
anything is trained on it: the manifest's seal, that its token count is the sum of its shards' and its scale a
positive number, and every shard's presence, exact size (bytes appended are refused too), dtype, shape and sha256.
It refuses, by name, whatever fails, and a manifest for another model, site or split. A shard is checked against its
sha256 again whenever it is read.

A harvest of several ranks (torchrun) writes one cache: each rank writes its own shards (`shard_rR_NNNNN`), and when
all have finished rank 0 writes the one manifest (`write_manifest`), its shards interleaved across the ranks and its
scale from every rank's rows; its `ranks` field records how many wrote it. It reads like any other cache.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import sys
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from saeforge.errors import UserError
from saeforge.files import file_sha256, read_json, write_atomic

MANIFEST = "manifest.json"
CACHE_FORMAT = "saeforge-activation-cache"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAFETENSORS_DTYPE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
# Rows of a cache (its first shards) on which the stream estimates mean, centred scale and outlier threshold: reading
# shards is cheap, so more than a live stream's sample (store.SCALE_SAMPLE_TOKENS), for a steadier threshold.
STATISTICS_SAMPLE_TOKENS = 65536


class CacheError(UserError, ValueError):
    """An activation cache is incomplete, corrupt, or not the one expected."""


def manifest_checksum(manifest: dict) -> str:
    """The sha256 of a manifest's fields other than its seal, as canonical JSON."""
    fields = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal_manifest(manifest: dict) -> dict:
    """The manifest with its seal (`manifest_sha256`) set."""
    return {**manifest, "manifest_sha256": manifest_checksum(manifest)}


def remove_cache(directory: Union[str, Path]) -> None:
    """Remove the cache in `directory` (its manifest first, so there is never a manifest naming shards that a new
    harvest overwrites; then its shards)."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    if manifest.exists():
        manifest.unlink()
    for old in directory.glob("shard_*.safetensors*"):
        old.unlink()


class CacheWriter:
    """Accumulates activation rows and writes them as fixed-size shards; `finish` writes the manifest.

    prefix: the shards' file names begin with it (a rank of a harvest of several writes "shard_r{rank}_").
    clean: remove a previous cache in out_dir first (a rank of several leaves that to rank 0, before any writes)."""

    def __init__(self, out_dir: Union[str, Path], *, dtype: str, shard_tokens: int, grad: bool,
                 prefix: str = "shard_", clean: bool = True):
        if dtype not in DTYPES:
            raise ValueError(f"cache dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
        if not prefix.startswith("shard_"):
            raise ValueError(f"shard file names begin with 'shard_', got prefix {prefix!r}")
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dtype, self.shard_tokens, self.grad, self.prefix = dtype, shard_tokens, grad, prefix
        if clean:
            remove_cache(self.dir)
        self.shards: list[dict] = []
        self.tokens = 0
        self._pending: list[tuple[torch.Tensor, Optional[torch.Tensor]]] = []
        self._pending_tokens = 0

    def add(self, x: torch.Tensor, grad: Optional[torch.Tensor] = None) -> None:
        if self.grad and grad is None:
            raise ValueError("this cache stores gradients: pass grad with every batch")
        self._pending.append((x.detach().cpu(), grad.detach().cpu() if self.grad else None))
        self._pending_tokens += x.shape[0]
        while self._pending_tokens >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def _flush(self, n: int) -> None:
        x = torch.cat([p[0] for p in self._pending])
        g = torch.cat([p[1] for p in self._pending]) if self.grad else None
        rest_x, rest_g = x[n:], (g[n:] if g is not None else None)
        self._pending = [(rest_x, rest_g)] if rest_x.shape[0] else []
        self._pending_tokens = rest_x.shape[0]
        tensors = {"x": x[:n].to(DTYPES[self.dtype]).contiguous()}
        if g is not None:
            tensors["grad"] = g[:n].to(DTYPES[self.dtype]).contiguous()
        data = save_safetensors_bytes(tensors)
        name = f"{self.prefix}{len(self.shards):05d}.safetensors"
        write_atomic(self.dir / name, data)
        self.shards.append({"file": name, "tokens": n, "sha256": hashlib.sha256(data).hexdigest()})
        self.tokens += n

    def close(self) -> list[dict]:
        """Write what is left as a last shard; return the shards written ({"file", "tokens", "sha256"} each)."""
        if self._pending_tokens:
            self._flush(self._pending_tokens)
        return list(self.shards)

    def finish(self, **metadata: Any) -> dict:
        """Write what is left as a last shard, then the manifest (atomically); return the manifest."""
        shards = self.close()
        if not shards:
            raise ValueError("no activations were written: the text source produced no tokens")
        return write_manifest(self.dir, dtype=self.dtype, grad=self.grad, shards=shards, **metadata)


def write_manifest(directory: Union[str, Path], *, dtype: str, grad: bool, shards: list[dict],
                   **metadata: Any) -> dict:
    """Write (atomically) and return the sealed manifest of a cache whose shards are written."""
    manifest = seal_manifest({
        "format": CACHE_FORMAT, "version": 1, **metadata, "dtype": dtype, "grad": grad,
        "tokens": sum(s["tokens"] for s in shards), "shards": shards,
    })
    write_atomic(Path(directory) / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


def _read_header(path: Path) -> tuple[dict, int]:
    """The safetensors header of `path` and the file size it implies."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CacheError(f"shard {path.name} is truncated ({len(head)} bytes, not even a safetensors header)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > path.stat().st_size:
            raise CacheError(f"shard {path.name} is not a safetensors file (its header length {header_len} exceeds "
                             "the file)")
        raw = f.read(header_len)
    if len(raw) < header_len:
        raise CacheError(f"shard {path.name} is truncated inside its safetensors header")
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"shard {path.name} is not a safetensors file (unreadable header)") from e
    if not isinstance(header, dict):
        raise CacheError(f"shard {path.name} is not a safetensors file (its header is not a table)")
    data_end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    return header, 8 + header_len + data_end


class ActivationCache:
    """A harvested cache directory, checked against its manifest and against what the caller expects.

    model: an expected model name, or several accepted names (matched against the manifest's `model` and
    `model_spec`); site, split, dtype, keep_bos: expected values; grad=True requires stored gradients.
    The whole cache is verified on open (see the module's docstring), so a damaged one is refused before step 1.
    """

    def __init__(
        self,
        directory: Union[str, Path],
        *,
        model: Union[str, Iterable[str], None] = None,
        site: Optional[str] = None,
        split: Optional[str] = None,
        dtype: Optional[str] = None,
        keep_bos: Optional[bool] = None,
        grad: bool = False,
    ):
        self.dir = Path(directory)
        path = self.dir / MANIFEST
        if not path.exists():
            raise CacheError(f"{self.dir} has no {MANIFEST}: not an activation cache, or its harvest did not finish")
        self.manifest = read_json(path, CacheError, expect_object=False)
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != CACHE_FORMAT:
            raise CacheError(f"{path} is not a saeforge activation cache manifest")
        self._check_seal(path)
        self._check_expected(model, site, split, dtype, keep_bos, grad)
        self._check_totals(path)
        for shard in self.manifest["shards"]:
            self._check_shard_file(shard)
            if file_sha256(self.dir / shard["file"]) != shard["sha256"]:
                raise CacheError(f"shard {shard['file']} fails its sha256 checksum: the file is corrupt or was "
                                 "modified")

    def _check_seal(self, path: Path) -> None:
        seal = self.manifest.get("manifest_sha256")
        if seal is None:  # harvested before manifests were sealed: still readable, but edits go unnoticed
            print(f"note: {path} carries no manifest_sha256 (an older saeforge wrote it), so its own fields are not "
                  "verified; harvest it again to seal it", file=sys.stderr)
        elif seal != manifest_checksum(self.manifest):
            raise CacheError(f"{path} fails its own checksum (manifest_sha256): the manifest was edited or is "
                             "corrupt; harvest the cache again")

    def _check_totals(self, path: Path) -> None:
        """The manifest's shard list, token count, width and scale: present and consistent with each other."""
        m = self.manifest
        shards = m.get("shards")
        if not isinstance(shards, list) or not shards:
            raise CacheError(f"{path}: 'shards' must be a non-empty list of shards, got {shards!r}")
        for i, shard in enumerate(shards):
            if not (isinstance(shard, dict) and isinstance(shard.get("file"), str)
                    and isinstance(shard.get("sha256"), str) and isinstance(shard.get("tokens"), int)
                    and shard["tokens"] > 0):
                raise CacheError(f"{path}: shards[{i}] must have a 'file', a positive 'tokens' and a 'sha256', got "
                                 f"{shard!r}")
        for key in ("tokens", "d_in"):
            if not isinstance(m.get(key), int) or isinstance(m.get(key), bool) or m[key] < 1:
                raise CacheError(f"{path}: '{key}' must be a positive integer, got {m.get(key)!r}")
        listed = sum(s["tokens"] for s in shards)
        if listed != m["tokens"]:
            raise CacheError(f"{path}: 'tokens' is {m['tokens']}, but its shards hold {listed}")
        scale = m.get("scale")
        if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale) and scale > 0):
            raise CacheError(f"{path}: 'scale' must be a finite positive number, got {scale!r}")

    def _check_expected(self, model, site, split, dtype, keep_bos, grad) -> None:
        m = self.manifest
        if model is not None:
            accepted = {model} if isinstance(model, str) else set(model)
            recorded = {m.get("model"), m.get("model_spec")} - {None}
            if not accepted & recorded:
                raise CacheError(
                    f"cache {self.dir} was harvested from model {m.get('model')!r}, not {sorted(accepted)}"
                )
        for key, want in (("site", site), ("split", split), ("dtype", dtype), ("keep_bos", keep_bos)):
            if want is not None and m.get(key) != want:
                raise CacheError(f"cache {self.dir} has {key} {m.get(key)!r}, but {want!r} was expected")
        if grad and not m.get("grad"):
            raise CacheError(f"cache {self.dir} holds no gradients; harvest it with grad=True")
        if m.get("dtype") not in DTYPES:
            raise CacheError(f"cache {self.dir}: unknown dtype {m.get('dtype')!r} in manifest")

    def _check_shard_file(self, shard: dict) -> None:
        path = self.dir / shard["file"]
        if not path.exists():
            raise CacheError(f"shard {shard['file']} listed in {self.dir / MANIFEST} is missing")
        header, expected_size = _read_header(path)
        size = path.stat().st_size
        if size < expected_size:
            raise CacheError(f"shard {shard['file']} is truncated: {size} bytes, its header needs {expected_size}")
        if size > expected_size:
            raise CacheError(f"shard {shard['file']} has {size - expected_size} bytes appended after its data "
                             f"({size} bytes, its header describes {expected_size})")
        names = ["x", "grad"] if self.manifest.get("grad") else ["x"]
        for name in names:
            if name not in header:
                raise CacheError(f"shard {shard['file']} has no tensor {name!r}")
            info = header[name]
            want = _SAFETENSORS_DTYPE[self.manifest["dtype"]]
            if info["dtype"] != want:
                raise CacheError(
                    f"shard {shard['file']} stores {name!r} as {info['dtype']}, but the manifest says "
                    f"{self.manifest['dtype']} ({want})"
                )
            if info["shape"] != [shard["tokens"], self.d_in]:
                raise CacheError(
                    f"shard {shard['file']} has {name!r} of shape {info['shape']}, manifest says "
                    f"[{shard['tokens']}, {self.d_in}]"
                )

    @property
    def shards(self) -> list[dict]:
        return self.manifest["shards"]

    @property
    def scale(self) -> float:
        return float(self.manifest["scale"])

    @property
    def d_in(self) -> int:
        return int(self.manifest["d_in"])

    @property
    def tokens(self) -> int:
        return int(self.manifest["tokens"])

    @property
    def has_grad(self) -> bool:
        return bool(self.manifest.get("grad"))

    def first_rows(self, n_tokens: int) -> torch.Tensor:
        """The first n_tokens rows of `x` (shards in manifest order; a harvest shuffles documents, so they are a
        sample of the whole), in the cache dtype."""
        xs, have = [], 0
        for index in range(len(self.shards)):
            if have >= n_tokens:
                break
            x = self.load_shard(index)["x"][: n_tokens - have]
            xs.append(x)
            have += x.shape[0]
        return torch.cat(xs)

    def load_shard(self, index: int) -> dict[str, torch.Tensor]:
        """Read shard `index` after checking its sha256; tensors keep the cache dtype."""
        shard = self.shards[index]
        data = (self.dir / shard["file"]).read_bytes()
        if hashlib.sha256(data).hexdigest() != shard["sha256"]:
            raise CacheError(f"shard {shard['file']} fails its sha256 checksum: the file is corrupt or was modified")
        return load_safetensors_bytes(data)


class CacheBlocks:
    """Stream blocks read from a cache: shards in a seeded random order, `buffer_tokens` worth per block; each rank
    takes every world_size-th row of a block (disjoint, balanced shares).

    Epochs: block indices run on past the end of the cache, `blocks_per_epoch` to an epoch, each epoch visiting
    every shard once in its own order (seeded by (seed, epoch)); the stream's per-block row shuffle is seeded by
    the block index, so each epoch is reshuffled. `max_epochs` (None = no limit) ends the data."""

    def __init__(self, cache: ActivationCache, *, buffer_tokens: int, seed: int, rank: int, world_size: int,
                 grad: bool, max_epochs: Optional[int] = None):
        self.cache, self.seed, self.rank, self.world_size, self.grad = cache, seed, rank, world_size, grad
        self.max_epochs = max_epochs
        self.d_in = cache.d_in
        largest = max(s["tokens"] for s in cache.shards)
        self.shards_per_block = max(1, buffer_tokens // largest)
        self.blocks_per_epoch = -(-len(cache.shards) // self.shards_per_block)
        self.fingerprint = {
            "kind": "cache", "shards": hashlib.sha256("".join(s["sha256"] for s in cache.shards).encode()).hexdigest(),
            "site": cache.manifest.get("site"), "buffer_tokens": buffer_tokens, "seed": seed, "rank": rank,
            "world_size": world_size, "grad": grad,
        }

    def shard_order(self, epoch: int) -> list[int]:
        """The order in which epoch `epoch` visits the shards (epoch 0: the seed's own permutation)."""
        seed = self.seed if epoch == 0 else self.seed * 1_000_003 + epoch
        return torch.randperm(len(self.cache.shards), generator=torch.Generator().manual_seed(seed)).tolist()

    def epoch_of(self, index: int) -> int:
        return index // self.blocks_per_epoch

    def load(self, index):
        epoch, within = divmod(index, self.blocks_per_epoch)
        if self.max_epochs is not None and epoch >= self.max_epochs:
            return None
        picked = self.shard_order(epoch)[within * self.shards_per_block : (within + 1) * self.shards_per_block]
        shards = [self.cache.load_shard(i) for i in picked]
        x = torch.cat([s["x"] for s in shards])[self.rank :: self.world_size]
        g = torch.cat([s["grad"] for s in shards])[self.rank :: self.world_size] if self.grad else None
        return x, g

    def statistics_sample(self) -> torch.Tensor:
        return self.cache.first_rows(STATISTICS_SAMPLE_TOKENS)
