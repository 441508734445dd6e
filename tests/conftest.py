"""Shared fixtures: tiny randomly initialised language models (no download, about a second to build)."""

from __future__ import annotations

import pytest

from saeforge.models import tiny_lm as _tiny_lm


@pytest.fixture(scope="session")
def tiny_lm():
    """A tiny Gemma 3 model with a byte-level tokenizer, shared by the session (it is frozen; do not mutate it)."""
    return _tiny_lm("gemma3", seed=0)


@pytest.fixture(scope="session")
def tiny_lm_factory():
    """tiny_lm_factory(family, seed=0) -> a tiny model of that family, built once per (family, seed)."""
    built = {}

    def make(family: str = "gemma3", seed: int = 0):
        if (family, seed) not in built:
            built[family, seed] = _tiny_lm(family, seed)
        return built[family, seed]

    return make


@pytest.fixture(autouse=True)
def _fp32_when_auto(monkeypatch, tmp_path_factory):
    """`dtype = "auto"` resolves to float32 in every test, whatever this CPU's bf16 speed, so results do not depend
    on the machine; the per-machine probe cache is a temporary file. Tests of the choice inject their own probe."""
    from saeforge.models import precision

    cache = tmp_path_factory.mktemp("precision") / "precision.json"
    monkeypatch.setattr(precision, "_cache_file", lambda: cache)
    monkeypatch.setattr(precision, "measure_bf16_speedup", lambda *a, **k: 0.0)
