"""Matched-L0 comparison on synthetic rows where the answer is known."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from saeforge.evaluation.compare import log_ratio_curve, main, matched_l0_ratio, matched_l0_table

N_CONTEXTS = 40
CLEAN = np.random.default_rng(0).normal(3.0, 0.5, N_CONTEXTS)
ABLATED = CLEAN + np.random.default_rng(1).exponential(1.0, N_CONTEXTS)


def _row(variant: str, l0: float, recovered: float, setting: float, seed: int, eval_set: str = "e0") -> dict:
    """A row whose per-context CEs give loss recovered (mean ablation) `recovered` plus context noise."""
    noise = np.random.default_rng(seed).normal(0.0, 0.02, N_CONTEXTS)
    spliced = CLEAN + (1 - recovered) * (ABLATED - CLEAN) + noise
    per_context = {"ce_clean": CLEAN.tolist(), "ce_spliced": spliced.tolist(), "kl": (spliced - CLEAN).tolist(),
                   "ce_mean_ablation": ABLATED.tolist()}
    ce_s, ce_c, ce_a = spliced.mean(), CLEAN.mean(), ABLATED.mean()
    return {"name": f"{variant}_{setting}_{seed}", "architecture": variant, "variant": variant, "l0": l0,
            "target_l0": setting, "eval_set": eval_set, "loss_recovered_mean": (ce_a - ce_s) / (ce_a - ce_c),
            "delta_ce": ce_s - ce_c, "per_context": per_context}


def _curves(shift: float = 2.0, seeds=(0, 1)) -> list[dict]:
    """relu needs `shift` times gated's L0 for the same fidelity; same context noise for both, per seed."""
    rows = []
    for i, (l0, recovered) in enumerate([(10, 0.55), (20, 0.7), (40, 0.8), (80, 0.88), (160, 0.93)]):
        for seed in seeds:
            rows.append(_row("gated", l0 * (1 + 0.01 * seed), recovered, l0, seed=100 * i + seed))
            rows.append(_row("relu", shift * l0 * (1 + 0.01 * seed), recovered, shift * l0, seed=100 * i + seed))
    return rows


def test_a_curve_shifted_by_2_in_l0_gives_ratio_one_half_with_seeds_pooled():
    rows = _curves()
    for metric in ("loss_recovered_mean", "delta_ce"):
        result = matched_l0_ratio(rows, "gated", "relu", metric, resamples=300)
        assert result["ratio"] == pytest.approx(0.5, rel=1e-9), metric
        # The two curves are the same per-context data at different L0, so every resample gives 0.5 too.
        assert result["ratio_ci"] == pytest.approx([0.5, 0.5], rel=1e-9)
        assert result["points_a"] == result["points_b"] == 5 and result["rows_a"] == 10
        assert result["resamples_used"] == 300 and "0.5" in result["summary"]
    flipped = matched_l0_ratio(rows, "relu", "gated", resamples=0)
    assert flipped["ratio"] == pytest.approx(2.0) and flipped["ratio_ci"] is None


def test_independent_noise_gives_an_interval_around_the_estimate():
    rows = [r for r in _curves() if r["variant"] == "gated"]
    rows += [_row("relu", 2 * l0, rec, 2 * l0, seed=999 + i) for i, (l0, rec) in
             enumerate([(10, 0.55), (20, 0.7), (40, 0.8), (80, 0.88), (160, 0.93)])]
    result = matched_l0_ratio(rows, "gated", "relu", resamples=500)
    lo, hi = result["ratio_ci"]
    assert lo < result["ratio"] < hi and 0.3 < lo and hi < 0.8
    assert result["overlap"][0] < result["overlap"][1]


def test_rows_from_several_files_and_the_entry_point(tmp_path, capsys):
    rows = _curves()
    files = []
    for i, part in enumerate((rows[::2], rows[1::2])):
        files.append(tmp_path / f"sweep{i}.json")
        files[-1].write_text(json.dumps({"results": part}))
    main([str(f) for f in files] + ["--a", "gated", "--b", "relu", "--resamples", "100"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["ratio"] == pytest.approx(0.5) and printed["rows_a"] + printed["rows_b"] == len(rows)


def test_no_overlap_and_too_few_points_give_no_ratio():
    rows = [_row("gated", l0, rec, l0, seed=i) for i, (l0, rec) in enumerate([(10, 0.5), (20, 0.6)])]
    rows += [_row("relu", l0, rec, l0, seed=9 + i) for i, (l0, rec) in enumerate([(10, 0.8), (20, 0.9)])]
    result = matched_l0_ratio(rows, "gated", "relu", resamples=50)
    assert result["ratio"] is None and "overlap" in result["note"]
    result = matched_l0_ratio(rows[:3], "gated", "relu", resamples=50)
    assert result["ratio"] is None and ">= 2" in result["note"]
    # The sweep's table: one comparison per pair and metric present.
    table = matched_l0_table(_curves(), resamples=20)
    assert [(t["a"], t["b"], t["metric"]) for t in table] == [("gated", "relu", "loss_recovered_mean"),
                                                              ("gated", "relu", "delta_ce")]


def test_a_non_monotone_curve_is_inverted_at_its_first_crossing():
    log_l0 = np.log(np.array([10.0, 20.0, 40.0, 80.0]))
    a = (log_l0, np.array([0.5, 0.7, 0.65, 0.9]))  # a dip at 40: 0.7 is first reached at L0 20
    b = (log_l0 + math.log(3.0), np.array([0.5, 0.7, 0.8, 0.9]))
    y, log_ratio = log_ratio_curve(a, b)
    at_07 = np.interp(0.7, y, log_ratio)
    assert np.exp(at_07) == pytest.approx(1 / 3, rel=1e-6)
