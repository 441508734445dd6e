"""Paper B's steering measurement on a tiny real model."""

from __future__ import annotations

import pytest
import torch

from saeforge.evaluation.steering import steering_effects
from saeforge.models import tiny_lm


@pytest.fixture(scope="module")
def lm():
    return tiny_lm("llama", seed=0)


def test_a_large_push_along_a_direction_raises_its_top_tokens(lm):
    site = f"blocks.{lm.n_layers - 1}.resid_post"
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, lm.vocab_size, (3, 10), generator=g)
    tokens[:, 0] = lm.bos_token_id
    W_dec = torch.randn(6, lm.d_model, generator=g)
    out = steering_effects(lm, W_dec, site, tokens, [0, 3, 5], alpha=1e4, top_tokens=5, batch_size=2)
    assert out["positions"] == 3 * 9  # BOS positions are not steered
    against = steering_effects(lm, -W_dec, site, tokens, [0, 3, 5], alpha=1e4, top_tokens=5, batch_size=2)
    for row, opposite in zip(out["latents"], against["latents"]):
        # Pushing along d_i raises the probability of the top tokens of W_U^T d_i (by a little: this random model's
        # logits are flat); so does pushing along -d_i for its own top tokens, which are d_i's bottom ones.
        assert row["on_target"] > 1e-3
        assert opposite["on_target"] > 1e-3 and set(opposite["tokens"]).isdisjoint(row["tokens"])
        assert row["off_target"] == pytest.approx(-row["on_target"], abs=1e-4)  # probabilities still sum to 1
        assert row["off_target_added"] >= 0
    assert out["mean_on_target"] == pytest.approx(sum(r["on_target"] for r in out["latents"]) / 3)
    # The top tokens are those of W_U^T d_i.
    expected = (W_dec[3] / W_dec[3].norm()) @ lm.unembed()
    assert set(out["latents"][1]["tokens"]) == set(expected.topk(5).indices.tolist())


def test_zero_push_changes_nothing_and_a_wrong_width_is_refused(lm):
    site = "blocks.0.resid_post"
    tokens = torch.randint(3, lm.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    out = steering_effects(lm, torch.randn(4, lm.d_model), site, tokens, [1], alpha=0.0)
    assert out["mean_on_target"] == pytest.approx(0.0, abs=1e-6)
    assert out["mean_off_target_added"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="residual stream"):
        steering_effects(lm, torch.randn(4, lm.d_model + 1), site, tokens, [0], alpha=1.0)
