"""Checkpoint files: tensors and JSON split apart and joined back, atomic replacement, pruning."""

from __future__ import annotations

import pytest
import torch

from saeforge.training import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from saeforge.training.checkpoint import join_state, split_state


def sample_state(step: int) -> dict:
    return {"step": step, "weights": {"W": torch.full((3, 2), float(step)), "b": torch.zeros(())},
            "rng": torch.get_rng_state(), "history": [{"sae": "a", "n": 2}], "lr": 0.5, "name": None,
            "pairs": [[1, 2], torch.arange(3)]}


def test_split_and_join_round_trip():
    state = sample_state(3)
    tensors, tree = split_state(state)
    assert all(isinstance(v, torch.Tensor) for v in tensors.values())
    back = join_state(tree, tensors)
    assert back["history"] == state["history"] and back["lr"] == 0.5 and back["name"] is None
    assert torch.equal(back["weights"]["W"], state["weights"]["W"]) and torch.equal(back["pairs"][1], torch.arange(3))
    with pytest.raises(TypeError, match="holds a set"):
        split_state({"bad": {1, 2}})
    with pytest.raises(TypeError, match="keys must be strings"):
        split_state({"opt": {0: torch.zeros(1)}})


def test_save_load_latest_and_prune(tmp_path):
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, sample_state(step), keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000000004", "step_000000006"]
    step, state = load_checkpoint(latest_checkpoint(tmp_path))
    assert step == 6 and torch.equal(state["weights"]["W"], torch.full((3, 2), 6.0))
    assert state["rng"].dtype == torch.uint8 and state["weights"]["b"].shape == ()
    # Writing the same step again replaces it whole.
    save_checkpoint(tmp_path, 6, sample_state(7), keep=2)
    assert torch.equal(load_checkpoint(latest_checkpoint(tmp_path))[1]["weights"]["W"], torch.full((3, 2), 7.0))


def test_missing_pointer_falls_back_to_newest_complete(tmp_path):
    save_checkpoint(tmp_path, 1, sample_state(1))
    save_checkpoint(tmp_path, 2, sample_state(2))
    (tmp_path / "latest").unlink()
    (tmp_path / ".tmp-step_000000003-999").mkdir()  # a write that was killed
    assert latest_checkpoint(tmp_path).name == "step_000000002"
    assert latest_checkpoint(tmp_path / "nothing") is None


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    path = save_checkpoint(tmp_path, 1, sample_state(1))
    (path / "tensors.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(path)
