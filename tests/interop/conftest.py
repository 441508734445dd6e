"""The interop tests' inputs: activations at a language model's scale (interop_helpers.activations)."""

from __future__ import annotations

import pytest

from interop_helpers import activations


@pytest.fixture
def x():
    return activations()
