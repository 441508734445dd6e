"""A peer library (sae-lens by default) in its own virtual environment, beside the CPU build of saeforge's torch:

    .venv/bin/python benchmarks/peer_venv.py [--venv benchmarks/.venv-peers] [--spec sae-lens] [--extra pytest]

Installing sae-lens next to the CPU torch pulls a CUDA torchvision wheel whose import breaks `import sae_lens`, so
torchvision is removed afterwards. Reused when it already imports. Prints JSON (versions, install steps and times).
Used by benchmarks/peer_quality.py and by `make test` for the checks against the real sae-lens
(tests/interop/test_saelens_real.py)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def log(message: str) -> None:
    print(f"[peer_venv] {message}", file=sys.stderr, flush=True)


def run_timed(cmd: list[str], steps: list[dict], what: str) -> None:
    log(f"{what}: {' '.join(cmd)}")
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    steps.append({"step": what, "command": " ".join(cmd), "seconds": round(time.perf_counter() - t0, 1),
                  "rc": done.returncode})
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed (rc {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def peer_imports(python: Path) -> dict | None:
    """Versions of sae_lens and torch in the peer venv, and whether torchvision is there; None when sae_lens does
    not import."""
    code = ("import json, importlib.util, torch, sae_lens; print(json.dumps({'sae_lens': sae_lens.__version__, "
            "'torch': torch.__version__, 'torchvision': importlib.util.find_spec('torchvision') is not None}))")
    if not python.exists():
        return None
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def ensure_peer_venv(venv: Path, peer_spec: str, extra: tuple[str, ...] = ()) -> dict:
    """The peer's own venv with the CPU build of saeforge's torch version, then the peer; torchvision removed
    (sae-lens can pull a CUDA torchvision wheel that breaks `import sae_lens` beside the CPU torch)."""
    python = venv / "bin" / "python"
    found = peer_imports(python)
    if found is not None and not found["torchvision"] and all(has_module(python, m) for m in extra):
        return {"created": False, "venv": str(venv), **found}
    steps: list[dict] = []
    t0 = time.perf_counter()
    if not python.exists():
        base = getattr(sys, "_base_executable", None) or sys.executable
        run_timed([base, "-m", "venv", str(venv)], steps, "create venv")
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"
    run_timed(pip + [torch_pin], steps, f"install {torch_pin} (CPU build first, so nothing pulls the CUDA one)")
    run_timed(pip + [peer_spec, *extra], steps, f"install {' '.join([peer_spec, *extra])}")
    found = peer_imports(python)
    if found is None or found["torchvision"]:
        run_timed([str(python), "-m", "pip", "uninstall", "--yes", "torchvision"], steps, "remove torchvision")
        found = peer_imports(python)
    if found is None:
        raise RuntimeError(f"`import sae_lens` fails in {venv} after installing {peer_spec}")
    return {"created": True, "venv": str(venv), "steps": steps, "seconds": round(time.perf_counter() - t0, 1),
            **found}


def has_module(python: Path, module: str) -> bool:
    return subprocess.run([str(python), "-c", f"import {module}"], capture_output=True).returncode == 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--venv", type=Path, default=HERE / ".venv-peers")
    p.add_argument("--spec", default="sae-lens", help="pip requirement of the peer")
    p.add_argument("--extra", nargs="*", default=[], help="more packages for that venv (e.g. pytest)")
    args = p.parse_args()
    print(json.dumps(ensure_peer_venv(args.venv, args.spec, tuple(args.extra))))


if __name__ == "__main__":
    main()
