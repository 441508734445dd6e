"""Checkpoints written atomically, without pickle.

A checkpoint is a directory `step_000001234/` holding `tensors.safetensors` (every tensor of the state),
`state.json` (everything else; a tensor appears there as {"__tensor__": key}) and `checksums.json` (the sha256 of
the other two). It is written under a temporary name and renamed into place, then the `latest` pointer file is
replaced atomically, so a kill at any moment leaves the previous checkpoint whole and pointed to. An I/O error
while writing (a full disk) removes the partial write and keeps the previous checkpoint.

Loading verifies the checksums; `load_newest_good_checkpoint` falls back from a corrupt or truncated newest
checkpoint (a flipped bit, a damaged disk) to the newest one that verifies, and says so.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from saeforge.errors import UserError
from saeforge.files import file_sha256, write_atomic

TENSORS = "tensors.safetensors"
STATE = "state.json"
CHECKSUMS = "checksums.json"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, incomplete or does not match the run."""


def split_state(tree: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Separate a nested state (dicts, lists, tensors, JSON values) into flat tensors and a JSON tree."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            tensors[path] = node.detach().cpu().contiguous().clone()
            return {"__tensor__": path}
        if isinstance(node, dict):
            for key in node:
                if not isinstance(key, str):
                    raise TypeError(f"state keys must be strings; {path or 'state'} has key {key!r}")
            return {key: walk(value, f"{path}/{key}" if path else key) for key, value in node.items()}
        if isinstance(node, (list, tuple)):
            return [walk(value, f"{path}/{i}") for i, value in enumerate(node)]
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise TypeError(f"state at {path or 'state'} holds a {type(node).__name__}, which is neither a tensor "
                        "nor a JSON value")

    return tensors, walk(tree, prefix)


def join_state(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of split_state."""
    if isinstance(tree, dict):
        if set(tree) == {"__tensor__"}:
            key = tree["__tensor__"]
            if key not in tensors:
                raise CheckpointError(f"checkpoint is missing tensor {key!r}")
            return tensors[key]
        return {key: join_state(value, tensors) for key, value in tree.items()}
    if isinstance(tree, list):
        return [join_state(value, tensors) for value in tree]
    return tree


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())


def step_dir_name(step: int) -> str:
    return f"step_{step:09d}"


def save_checkpoint(root: Path, step: int, state: dict, *, keep: int = 2) -> Path:
    """Write `state` as checkpoint `step` under `root` atomically; keep the newest `keep` checkpoints. An I/O error
    (e.g. a full disk) raises CheckpointError and leaves the previous checkpoint in place."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tensors, tree = split_state(state)
    try:
        tmp.mkdir()
        save_file(tensors, str(tmp / TENSORS))
        with open(tmp / TENSORS, "rb") as f:
            os.fsync(f.fileno())
        _write_json(tmp / STATE, {"step": step, "state": tree})
        _write_json(tmp / CHECKSUMS, {name: file_sha256(tmp / name) for name in (TENSORS, STATE)})
        _fsync_dir(tmp)
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(root)
        raise CheckpointError(f"could not write checkpoint {final} ({e}); "
                              + (f"the previous checkpoint {previous} is kept" if previous else
                                 "no earlier checkpoint exists")) from e
    old = None
    if final.exists():  # the same step written again (a resumed run that had already finished)
        old = root / f".tmp-old-{step_dir_name(step)}-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old)
    write_atomic(root / LATEST, (final.name + "\n").encode())
    _fsync_dir(root)
    _prune(root, keep)
    return final


def _complete_steps(root: Path) -> list[tuple[int, Path]]:
    found = []
    for child in root.iterdir() if root.exists() else []:
        m = _STEP_DIR.match(child.name)
        if m and (child / STATE).exists() and (child / TENSORS).exists():
            found.append((int(m.group(1)), child))
    return sorted(found)


def _prune(root: Path, keep: int) -> None:
    latest = root / (root / LATEST).read_text().strip()
    for _, path in _complete_steps(root)[: -max(1, keep)]:
        if path != latest:
            shutil.rmtree(path, ignore_errors=True)
    for child in root.iterdir():  # leftovers of writes that were killed
        if child.name.startswith(".tmp-") and not child.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(child, ignore_errors=True)


def latest_checkpoint(root: Path) -> Optional[Path]:
    """The directory the `latest` pointer names, else the newest complete one, else None."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.exists():
        path = root / pointer.read_text().strip()
        if (path / STATE).exists() and (path / TENSORS).exists():
            return path
    complete = _complete_steps(root)
    return complete[-1][1] if complete else None


def _verify_checksums(path: Path) -> None:
    checksums_file = path / CHECKSUMS
    if not checksums_file.exists():  # written before checkpoints carried checksums: readable, but unverified
        print(f"note: checkpoint {path} has no {CHECKSUMS} (an older saeforge wrote it), so it is not verified",
              file=sys.stderr)
        return
    checksums = json.loads(checksums_file.read_text())
    for name in (TENSORS, STATE):
        if not isinstance(checksums, dict) or name not in checksums:
            raise CheckpointError(f"cannot read checkpoint {path}: {CHECKSUMS} lists no checksum for {name}")
        if file_sha256(path / name) != checksums[name]:
            raise CheckpointError(f"cannot read checkpoint {path}: {name} fails its sha256 checksum (corrupt or "
                                  "modified)")


def load_checkpoint(path: Path) -> tuple[int, dict]:
    """(step, state) of a checkpoint directory, after verifying its checksums; tensors are on the CPU."""
    path = Path(path)
    try:
        _verify_checksums(path)
        meta = json.loads((path / STATE).read_text())
        tensors = load_file(str(path / TENSORS))
    except (OSError, ValueError, SafetensorError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int) or "state" not in meta:
        raise CheckpointError(f"cannot read checkpoint {path}: {STATE} lacks an integer 'step' and a 'state'")
    return meta["step"], join_state(meta["state"], tensors)


def load_newest_good_checkpoint(root: Path) -> tuple[Path, int, dict]:
    """(path, step, state) of the newest checkpoint under `root` that verifies: the one `latest` names, else the
    complete ones from the newest down. Each one skipped is named on stderr with the reason."""
    root = Path(root)
    newest = latest_checkpoint(root)
    candidates = [newest] if newest is not None else []
    candidates += [path for _, path in reversed(_complete_steps(root)) if path != newest]
    skipped = []
    for path in candidates:
        try:
            step, state = load_checkpoint(path)
        except CheckpointError as e:
            skipped.append(str(e))
            print(f"warning: {e}; falling back to an earlier checkpoint", file=sys.stderr)
            continue
        if skipped:
            print(f"note: resuming from {path}, the newest checkpoint that verifies", file=sys.stderr)
        return path, step, state
    raise CheckpointError(f"no checkpoint under {root} can be read: " + ("; ".join(skipped) or "there is none"))
