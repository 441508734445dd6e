"""Checkpoints carry a checksum per file: a flipped bit or a truncated file is detected on resume, which falls back to
the newest checkpoint that verifies; an I/O error while writing keeps the previous checkpoint."""

from __future__ import annotations

import errno
import json

import pytest
import torch

from saeforge.config import RunConfig, SAESpec, TrainConfig
from saeforge.training import (CheckpointError, SyntheticStream, Trainer, latest_checkpoint, load_checkpoint,
                               load_newest_good_checkpoint, save_checkpoint)
from saeforge.training import checkpoint as checkpoint_module

STEPS, BATCH = 8, 32


def _state(step: int) -> dict:
    return {"step": step, "weights": {"w": torch.full((4, 3), float(step))}, "note": "x"}


def _flip_bit(path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_bit_flip_is_detected_and_the_previous_checkpoint_taken(tmp_path, capsys):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, _state(step), keep=3)
    newest = latest_checkpoint(tmp_path)
    _flip_bit(newest / "tensors.safetensors")
    with pytest.raises(CheckpointError, match="tensors.safetensors fails its sha256"):
        load_checkpoint(newest)
    path, step, state = load_newest_good_checkpoint(tmp_path)
    assert path.name == "step_000000002" and step == 2 and torch.equal(state["weights"]["w"], torch.full((4, 3), 2.0))
    err = capsys.readouterr().err
    assert "step_000000003" in err and "falling back" in err and "step_000000002" in err


def test_a_truncated_or_edited_newest_checkpoint_falls_back(tmp_path):
    for step in (1, 2):
        save_checkpoint(tmp_path, step, _state(step))
    newest = tmp_path / "step_000000002"
    (newest / "tensors.safetensors").write_bytes((newest / "tensors.safetensors").read_bytes()[:40])
    assert load_newest_good_checkpoint(tmp_path)[1] == 1
    save_checkpoint(tmp_path, 2, _state(2))
    (newest / "state.json").write_text((newest / "state.json").read_text().replace('"x"', '"y"'))
    assert load_newest_good_checkpoint(tmp_path)[1] == 1


def test_state_without_step_is_a_checkpoint_error(tmp_path):
    path = save_checkpoint(tmp_path, 1, _state(1))
    meta = json.loads((path / "state.json").read_text())
    del meta["step"]
    (path / "state.json").write_text(json.dumps(meta))
    sums = json.loads((path / "checksums.json").read_text())
    sums["state.json"] = checkpoint_module.file_sha256(path / "state.json")
    (path / "checksums.json").write_text(json.dumps(sums))
    with pytest.raises(CheckpointError, match="lacks an integer 'step'"):
        load_checkpoint(path)


def test_no_good_checkpoint_names_every_failure(tmp_path):
    path = save_checkpoint(tmp_path, 1, _state(1))
    _flip_bit(path / "tensors.safetensors")
    with pytest.raises(CheckpointError, match="no checkpoint under .* can be read: .*fails its sha256"):
        load_newest_good_checkpoint(tmp_path)


def test_a_full_disk_during_a_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, _state(1))

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "save_file", disk_full)
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*step_000000002.*No space left.*"
                                              r"previous checkpoint .*step_000000001 is kept"):
        save_checkpoint(tmp_path, 2, _state(2))
    assert latest_checkpoint(tmp_path).name == "step_000000001"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []
    assert load_checkpoint(tmp_path / "step_000000001")[0] == 1


def _run_config(out_dir) -> RunConfig:
    train = TrainConfig(tokens=STEPS * BATCH, batch_size=BATCH, out_dir=str(out_dir), checkpoint_every=2,
                        keep_checkpoints=3, log_every=4, tensorboard=False, lr=0.01, heldout_tokens=0)
    return RunConfig(train=train, sae=[SAESpec("relu", d_sae=32, sparsity_coeff=1.0)])


def test_resume_falls_back_past_a_corrupt_newest_checkpoint_and_says_so(tmp_path, capsys):
    whole = Trainer(_run_config(tmp_path / "whole"), stream=SyntheticStream(16, BATCH, seed=5), progress=False)
    whole.run()
    broken_dir = tmp_path / "broken"
    first = Trainer(_run_config(broken_dir), stream=SyntheticStream(16, BATCH, seed=5), progress=False)
    first.run()
    newest = latest_checkpoint(broken_dir / "checkpoints")
    assert newest.name == f"step_{STEPS:09d}"
    _flip_bit(newest / "tensors.safetensors")
    capsys.readouterr()
    resumed = Trainer(_run_config(broken_dir), stream=SyntheticStream(16, BATCH, seed=5), progress=False)
    resumed.run(resume=True)
    err = capsys.readouterr().err
    assert "fails its sha256" in err and "falling back" in err and f"(step {STEPS - 2})" in err
    # The two steps trained again end where the unbroken run ended.
    for key, value in whole.runs["relu_w32_l1"].sae.state_dict().items():
        assert torch.equal(value, resumed.runs["relu_w32_l1"].sae.state_dict()[key]), key
