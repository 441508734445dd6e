"""load_lm from memory, a local directory, and the refusals; the GGUF cache is never left half-written."""

from __future__ import annotations

import pytest
import torch

from saeforge.config import ModelConfig
from saeforge.models import LanguageModel, load_lm, tiny_lm


def test_load_from_memory_and_from_a_saved_directory(tmp_path):
    tiny = tiny_lm("qwen2", seed=3)
    tiny.model.save_pretrained(tmp_path / "m")
    tiny.tokenizer.save_pretrained(tmp_path / "m")
    tokens = torch.tensor([tiny.tokenizer("Saved and loaded again.").input_ids])

    tiny.model.requires_grad_(True)
    wrapped = load_lm(tiny.model, tokenizer=tiny.tokenizer, name="mine")
    assert isinstance(wrapped, LanguageModel) and wrapped.name == "mine" and wrapped.family == "qwen2"
    assert all(p.requires_grad for p in tiny.model.parameters())  # the caller's model is left as it was
    tiny.model.requires_grad_(False)

    loaded = load_lm(str(tmp_path / "m"))
    assert loaded.name == str((tmp_path / "m").resolve())
    assert loaded.tokenizer("Saved and loaded again.").input_ids == tokens[0].tolist()
    assert not any(p.requires_grad for p in loaded.model.parameters())
    with torch.no_grad():
        assert torch.equal(loaded.forward(tokens), tiny.forward(tokens))

    as_bf16 = load_lm(ModelConfig(name=str(tmp_path / "m"), dtype="bfloat16"))
    assert as_bf16.dtype == torch.bfloat16


def test_refusals(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        load_lm(tmp_path / "missing.gguf")
    with pytest.raises(FileNotFoundError, match="model path not found"):
        load_lm(str(tmp_path / "nowhere" / "model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_lm(tmp_path / "empty")
    with pytest.raises(ValueError, match="dtype must be"):
        load_lm(tmp_path / "empty", dtype="float33")


def test_hub_id_offline_error_says_why(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="only if it is already in the Hugging Face cache"):
        load_lm("saeforge-test/no-such-model")


def test_failed_gguf_conversion_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAEFORGE_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + bytes(64))  # a header and nothing else
    with pytest.raises(Exception):
        load_lm(bad)
    models = tmp_path / "cache" / "models"
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []
