"""Fixtures of the training tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny SAEs on a shared, loaded machine train far faster on one thread than fighting over several (a test of
    60 steps took 8 minutes with the default threads at load 8 on 2 cores, 4 s on one)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
