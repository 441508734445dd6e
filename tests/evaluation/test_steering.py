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
    out = steering_effects(lm, W_dec, site, tokens, [0, 3, 5], alphas=[0.1, 1e4], top_tokens=5, batch_size=2)
    assert out["positions"] == 3 * 9  # BOS positions are not steered
    against = steering_effects(lm, -W_dec, site, tokens, [0, 3, 5], alphas=[1e4], top_tokens=5, batch_size=2)
    small, large = out["sweep"]
    assert [small["alpha"], large["alpha"]] == [0.1, 1e4]
    for j in range(3):
        # Pushing along d_i raises the probability of the top tokens of W_U^T d_i (by a little: this random model's
        # logits are flat), more for the larger push; so does pushing along -d_i for its own top tokens, which are
        # d_i's bottom ones.
        assert large["on_target"][j] > 1e-3 and large["on_target"][j] > small["on_target"][j]
        assert against["sweep"][0]["on_target"][j] > 1e-3
        assert set(against["latents"][j]["tokens"]).isdisjoint(out["latents"][j]["tokens"])
        assert large["off_target"][j] == pytest.approx(-large["on_target"][j], abs=1e-4)  # probabilities sum to 1
        assert large["off_target_added"][j] >= 0
    assert large["mean_on_target"] == pytest.approx(sum(large["on_target"]) / 3)
    # The top tokens are those of W_U^T d_i.
    expected = (W_dec[3] / W_dec[3].norm()) @ lm.unembed()
    assert set(out["latents"][1]["tokens"]) == set(expected.topk(5).indices.tolist())


def test_zero_push_changes_nothing_and_a_wrong_width_is_refused(lm):
    site = "blocks.0.resid_post"
    tokens = torch.randint(3, lm.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    out = steering_effects(lm, torch.randn(4, lm.d_model), site, tokens, [1], alphas=[0.0])
    assert out["sweep"][0]["mean_on_target"] == pytest.approx(0.0, abs=1e-6)
    assert out["sweep"][0]["mean_off_target_added"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="residual stream"):
        steering_effects(lm, torch.randn(4, lm.d_model + 1), site, tokens, [0], alphas=[1.0])
