"""A tiny saved model and a small text corpus on disk, so the commands can load them by path like a user would."""

from __future__ import annotations

import random

import pytest

from saeforge.models import tiny_lm

WORDS = ("the river city north old music early school small people light paper green stone king market house "
         "water field winter island language train bridge").split()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_model")
    lm = tiny_lm("gemma3", seed=0)
    lm.model.save_pretrained(directory)
    lm.tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def corpus_txt(tmp_path_factory):
    """600 short paragraphs (documents); the data package holds a fixed ~5% of them out for evaluation."""
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30))).capitalize() + "." for _ in range(600)]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(docs) + "\n")
    return path
