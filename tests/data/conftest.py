"""Fixtures of the data tests: the session's tiny LM (tests/conftest.py) and a small text corpus on disk."""

from __future__ import annotations

import pytest
from data_helpers import make_documents


@pytest.fixture(scope="session")
def lm(tiny_lm):
    return tiny_lm


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A .txt corpus of 60 blank-line-separated documents."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(make_documents(60)) + "\n")
    return path


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models on a shared, loaded machine run ~50x faster on one thread than fighting over several."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
