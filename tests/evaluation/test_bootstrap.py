"""Bootstrap CIs over contexts: coverage of known values on synthetic data (fixed seeds, so nothing flakes)."""

from __future__ import annotations

import numpy as np
import pytest

from saeforge.evaluation.bootstrap import context_bootstrap_ci, loss_metric_cis


def _coverage(draws: int, make, truth: float, key: str, statistic) -> float:
    covered = 0
    for i in range(draws):
        lo, hi = context_bootstrap_ci(make(np.random.default_rng(i)), statistic, resamples=999, seed=i)[key]
        covered += lo <= truth <= hi
    return covered / draws


def test_ci_of_a_mean_covers_the_true_mean_about_95_percent_of_the_time():
    # Skewed per-context values (exponential, mean 0.3), 80 contexts: the shape of per-context delta-CE.
    rate = _coverage(300, lambda rng: {"x": rng.exponential(0.3, size=80)}, 0.3, "mean", lambda m: {"mean": m["x"]})
    assert 0.90 <= rate <= 0.985, rate


def test_paired_ci_of_loss_recovered_covers_the_true_ratio():
    # Contexts differ a lot in difficulty (clean CE), the same context is hard for all three runs: the pairing is
    # what makes the ratio's interval honest. True loss recovered = (1.0 - 0.25) / 1.0 = 0.75.
    def make(rng):
        clean = rng.normal(3.0, 0.8, size=64)
        gap = rng.exponential(1.0, size=64)  # ablated - clean
        return {"ce_clean": clean, "ce_mean_ablation": clean + gap,
                "ce_spliced": clean + 0.25 * gap + rng.normal(0, 0.05, size=64), "kl": 0.1 * gap}

    def statistic(m):
        return {"lr": (m["ce_mean_ablation"] - m["ce_spliced"]) / (m["ce_mean_ablation"] - m["ce_clean"])}

    rate = _coverage(300, make, 0.75, "lr", statistic)
    assert 0.90 <= rate <= 0.985, rate


def test_loss_metric_cis_names_every_metric_and_brackets_the_estimate():
    rng = np.random.default_rng(0)
    clean = rng.normal(3.0, 0.5, size=50)
    per_context = {"ce_clean": clean, "ce_spliced": clean + 0.2 + rng.normal(0, 0.05, 50),
                   "kl": rng.exponential(0.1, 50), "ce_zero_ablation": clean + 4.0, "ce_mean_ablation": clean + 1.0}
    cis = loss_metric_cis(per_context, resamples=500)
    assert set(cis) == {"delta_ce_ci", "kl_div_ci", "l_added_ci", "loss_recovered_zero_ci", "loss_recovered_mean_ci"}
    delta = float(np.mean(per_context["ce_spliced"] - clean))
    lo, hi = cis["delta_ce_ci"]
    assert lo < delta < hi and hi - lo < 0.05
    lo, hi = cis["loss_recovered_mean_ci"]
    assert lo < 1 - delta / 1.0 < hi


def test_a_metric_constant_over_contexts_gets_a_zero_width_interval():
    clean = np.linspace(2.0, 4.0, 20)
    cis = loss_metric_cis({"ce_clean": clean, "ce_spliced": clean, "kl": np.zeros(20), "ce_zero_ablation": clean + 1},
                          resamples=200)
    assert cis["delta_ce_ci"] == pytest.approx([0.0, 0.0], abs=1e-12)
    assert cis["loss_recovered_zero_ci"] == pytest.approx([1.0, 1.0], abs=1e-12)
