"""Peer libraries (sae-lens by default) in their own virtual environment, beside the CPU build of saeforge's torch:

    .venv/bin/python benchmarks/peer_venv.py [--venv benchmarks/.venv-peers] [--spec sae-lens ...] [--extra pytest]

Installing sae-lens (or dictionary_learning, through nnsight) next to the CPU torch pulls a CUDA torchvision wheel
whose import breaks `import sae_lens`, so torchvision is removed afterwards. Reused when every peer already imports.
Prints JSON (versions, install steps and times). Used by benchmarks/peer_quality.py, benchmarks/peers.py (sae-lens,
dictionary-learning and eai-sparsify) and by `make test` for the checks against the real sae-lens
(tests/interop/test_saelens_real.py)."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

# The module each peer's distribution installs, where it is not the distribution's name with "_" for "-".
MODULES = {"eai-sparsify": "sparsify"}


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


def module_of(spec: str) -> str:
    """The import name of a pip requirement ("dictionary-learning==0.1.0" -> "dictionary_learning")."""
    name = re.split(r"[<>=!~\[; ]", spec.strip(), maxsplit=1)[0].lower()
    return MODULES.get(name, name.replace("-", "_"))


def peer_imports(python: Path, modules: list[str]) -> dict | None:
    """Versions of each module (by its dist's metadata) and torch in the peer venv, and whether torchvision is
    there; None when one of the modules does not import."""
    code = ("import json, sys, importlib, importlib.util, importlib.metadata as md, torch\n"
            "out = {'torch': torch.__version__, 'torchvision': importlib.util.find_spec('torchvision') is not None}\n"
            "dists = md.packages_distributions()\n"
            "for m in sys.argv[1:]:\n"
            "    importlib.import_module(m)\n"
            "    out[m] = md.version(dists[m][0])\n"
            "print(json.dumps(out))")
    if not python.exists():
        return None
    done = subprocess.run([str(python), "-c", code, *modules], capture_output=True, text=True)
    if done.returncode != 0:
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def ensure_peer_venv(venv: Path, specs: str | tuple[str, ...] = ("sae-lens",), extra: tuple[str, ...] = ()) -> dict:
    """The peers' own venv with the CPU build of saeforge's torch version, then the peers (`specs`, pip
    requirements); torchvision removed (a CUDA torchvision wheel beside the CPU torch breaks `import sae_lens`).
    The result holds each peer's version under its module name (e.g. "sae_lens")."""
    specs = (specs,) if isinstance(specs, str) else tuple(specs)
    modules = [module_of(s) for s in specs]
    python = venv / "bin" / "python"
    found = peer_imports(python, modules)
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
    # torch pinned again, so that no peer's requirements move it.
    run_timed(pip + [torch_pin, *specs, *extra], steps, f"install {' '.join([*specs, *extra])}")
    found = peer_imports(python, modules)
    if found is None or found["torchvision"]:
        run_timed([str(python), "-m", "pip", "uninstall", "--yes", "torchvision"], steps, "remove torchvision")
        found = peer_imports(python, modules)
    if found is None:
        raise RuntimeError(f"importing {', '.join(modules)} fails in {venv} after installing {', '.join(specs)}")
    return {"created": True, "venv": str(venv), "steps": steps, "seconds": round(time.perf_counter() - t0, 1),
            **found}


def has_module(python: Path, module: str) -> bool:
    return subprocess.run([str(python), "-c", f"import {module}"], capture_output=True).returncode == 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--venv", type=Path, default=HERE / ".venv-peers")
    p.add_argument("--spec", nargs="+", default=["sae-lens"], help="pip requirements of the peers")
    p.add_argument("--extra", nargs="*", default=[], help="more packages for that venv (e.g. pytest)")
    args = p.parse_args()
    print(json.dumps(ensure_peer_venv(args.venv, tuple(args.spec), tuple(args.extra))))


if __name__ == "__main__":
    main()
