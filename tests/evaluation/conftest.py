"""A tiny saved model and a small text corpus on disk, so the commands can load them by path like a user would."""

from __future__ import annotations

import random
from pathlib import Path

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


TINY_SITE = "blocks.1.resid_post"


@pytest.fixture
def sweep_config(tmp_path, tiny_model_dir, corpus_txt):
    """write(eval_table) -> a sweep run file over the tiny model and corpus: 2048 training tokens, 256 eval tokens,
    its [eval] table given (the grid), one template [[sae]] of expansion 2; SAEs go to tmp_path/run."""

    def write(eval_table: str) -> Path:
        path = tmp_path / "sweep.toml"
        path.write_text(f"""
[model]
name = "{tiny_model_dir}"
site = "{TINY_SITE}"

[data]
source = "{corpus_txt}"
context_len = 32
buffer_tokens = 1024
lm_batch_size = 8

[train]
tokens = 2048
batch_size = 128
lr_warmup_steps = 2
out_dir = "{tmp_path / 'run'}"
tensorboard = false
log_every = 4

[eval]
tokens = 256
batch_size = 4
analysis_batches = 1
{eval_table}

[[sae]]
expansion = 2.0
""")
        return path

    return write
