"""The sweep run file over the tiny saved model and corpus (tests/conftest.py: tiny_model_dir, corpus_txt)."""

from __future__ import annotations

from pathlib import Path

import pytest

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
