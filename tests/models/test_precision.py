"""dtype = "auto": bf16 only where the hardware runs it fast; explicit values obeyed; the choice recorded."""

from __future__ import annotations

import json
import math

import pytest
import torch

from saeforge.config import ModelConfig, RunConfig, SAESpec, TrainConfig
from saeforge.models import load_lm, precision, tiny_lm
from saeforge.models.precision import choose_precision
from saeforge.models.precision import measure_bf16_speedup as real_probe
from saeforge.training import SyntheticStream, Trainer


def never_called() -> float:
    raise AssertionError("an explicit dtype must not run the probe")


@pytest.mark.parametrize("requested, dtype", [("float32", torch.float32), ("bfloat16", torch.bfloat16),
                                              ("float16", torch.float16), (torch.bfloat16, torch.bfloat16)])
def test_explicit_values_are_obeyed_without_probing(requested, dtype):
    chosen = choose_precision(requested, "cpu", probe=never_called)
    assert chosen.dtype == dtype and chosen.reason == "set explicitly"


def test_auto_follows_the_probe_on_cpu():
    slow = choose_precision("auto", "cpu", probe=lambda: 0.05)  # AVX2: bf16 products 20x slower
    assert slow.dtype == torch.float32
    assert "no fast native bf16" in slow.reason and "0.05x" in slow.reason
    assert torch.backends.cpu.get_cpu_capability() in slow.describe()
    fast = choose_precision(None, "cpu", probe=lambda: 3.6)  # AMX
    assert fast.dtype == torch.bfloat16 and "runs bf16 natively" in fast.reason
    # Merely as fast as fp32 is not enough: the casts and elementwise work around the products do not speed up.
    assert choose_precision("auto", "cpu", probe=lambda: 1.05).dtype == torch.float32


def test_unknown_dtype_is_refused_by_name():
    with pytest.raises(ValueError, match="float33"):
        choose_precision("float33", "cpu")


def test_the_probe_runs_once_per_machine_and_is_cached(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(precision, "_cache_file", lambda: tmp_path / "precision.json")
    monkeypatch.setattr(precision, "measure_bf16_speedup", lambda: calls.append(1) or 2.5)
    first, second = choose_precision("auto", "cpu"), choose_precision("auto", "cpu")
    assert first.dtype == second.dtype == torch.bfloat16 and len(calls) == 1
    assert "cached" in second.reason and "cached" not in first.reason
    stored = json.loads((tmp_path / "precision.json").read_text())
    assert list(stored.values()) == [2.5] and torch.__version__ in next(iter(stored))


def test_the_real_probe_measures_a_positive_ratio():
    ratio = real_probe(shape=(64, 64, 64), repeats=2)  # bound at import, before the autouse fixture replaced it
    assert math.isfinite(ratio) and ratio > 0


def test_load_lm_auto_records_its_choice(tmp_path, monkeypatch):
    tiny = tiny_lm("gemma3", seed=1)
    tiny.model.save_pretrained(tmp_path / "m")
    tiny.tokenizer.save_pretrained(tmp_path / "m")
    monkeypatch.setattr(precision, "measure_bf16_speedup", lambda *a, **k: 0.05)
    lm = load_lm(ModelConfig(name=str(tmp_path / "m"), dtype="auto"))
    assert lm.dtype == torch.float32 and lm.precision.dtype == torch.float32
    monkeypatch.setattr(precision, "_cache_file", lambda: tmp_path / "other.json")
    monkeypatch.setattr(precision, "measure_bf16_speedup", lambda *a, **k: 3.0)
    lm = load_lm(str(tmp_path / "m"), dtype="auto")
    assert lm.dtype == torch.bfloat16 and "natively" in lm.precision.reason
    assert load_lm(str(tmp_path / "m")).precision.dtype == torch.float32  # the library call's default


@pytest.mark.parametrize("speedup, expected", [(0.05, "float32"), (3.0, "bfloat16")])
def test_the_choice_lands_in_cfg_json(tmp_path, monkeypatch, speedup, expected):
    monkeypatch.setattr(precision, "measure_bf16_speedup", lambda *a, **k: speedup)
    cfg = RunConfig(train=TrainConfig(tokens=64, batch_size=32, out_dir=str(tmp_path / "run"), tensorboard=False,
                                      lr_warmup_steps=0),
                    sae=[SAESpec("relu", d_sae=32, sparsity_coeff=0.1, name="relu")])
    assert cfg.train.compute_dtype == "auto" and cfg.model.dtype == "auto"  # the defaults
    result = Trainer(cfg, stream=SyntheticStream(16, 32, seed=0), progress=False).run()
    saved = json.loads((result.sae_dirs["relu"] / "cfg.json").read_text())
    assert saved["precision"]["sae_compute"]["dtype"] == expected
    assert saved["precision"]["sae_compute"]["reason"].startswith("this CPU")
    forced = RunConfig(train=TrainConfig(**{**cfg.train.__dict__, "compute_dtype": "float32",
                                            "out_dir": str(tmp_path / "forced")}), sae=cfg.sae)
    result = Trainer(forced, stream=SyntheticStream(16, 32, seed=0), progress=False).run()
    saved = json.loads((result.sae_dirs["relu"] / "cfg.json").read_text())
    assert saved["precision"]["sae_compute"] == {"dtype": "float32", "reason": "set explicitly"}
