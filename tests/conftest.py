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
