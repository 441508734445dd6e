"""File helpers shared by the activation cache, checkpoints and commands: atomic writes, checksums, output places."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Union

from saeforge.errors import UserError

_READ_BLOCK = 1 << 22


@contextlib.contextmanager
def atomic_target(path: Union[str, Path]) -> Iterator[Path]:
    """A temporary path beside `path` for a writer to fill (e.g. safetensors' save_file); when the block succeeds
    the file is flushed to disk and renamed into place, when it fails it is removed: neither a kill nor an error
    ever leaves a half-written `path`, and the previous `path` survives a failed write."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Union[str, Path], data: Union[bytes, str]) -> None:
    """Write bytes or text to `path` through `atomic_target`."""
    with atomic_target(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)


def file_sha256(path: Union[str, Path]) -> str:
    """The sha256 of a file's bytes, read in blocks (files may be larger than memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_READ_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def check_writable_dir(path: Union[str, Path], what: str) -> Path:
    """Create directory `path` if needed and prove it takes a file, so a command fails before its expensive work
    rather than at its first write. `what` names it in the error (e.g. "train.out_dir")."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what}: {path} is a file, but a directory was expected")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{what}: cannot write to {path} ({e.strerror or e})") from e
    return path


def read_json(path: Union[str, Path], error: type[Exception] = UserError, *, expect_object: bool = True) -> Any:
    """A JSON file's value; `error` (naming the file) when it is not valid JSON, or not an object where one is
    expected. Absent files are the caller's to explain."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON: {e}") from e
    if expect_object and not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object, got a {type(value).__name__}")
    return value
