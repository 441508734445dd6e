"""The report's statistics against values computed here by hand on a small table: the pairs by the stated rule,
the Wilcoxon-Pratt statistic with its normal and exact p (every sign flip enumerated), the Mann-Whitney U with its
normal and exact p (every split enumerated), the BCa interval from the exact bootstrap distribution (every resample
enumerated), and the contingency tables. None of these calls scipy."""

from __future__ import annotations

import itertools
import json
import math
import os
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest

from saeforge.study.db import Rating, Study
from saeforge.study.stats import EXACT_LIMIT, make_pairs, mann_whitney, study_statistics

from study_helpers import ARMS, make_study

A, B = "gated", "relu"
SCORE = {"no": 0, "maybe": 1, "yes": 2}
# Each rater's labels in the order they saw the latents: (arm, label).
TABLE = {
    "alice": [(A, "yes"), (B, "no"), (B, "maybe"), (A, "yes"), (A, "maybe"), (B, "maybe"), (A, "no"), (B, "no"),
              (A, "yes"), (A, "yes"), (B, "no")],
    "bob": [(B, "yes"), (A, "yes"), (A, "maybe"), (B, "no"), (A, "no"), (B, "maybe"), (B, "yes"), (A, "yes"),
            (A, "maybe")],
}
# The i-th A label of a rater paired with the i-th B label of the same rater, as (score A, score B).
PAIRS = {"alice": [(2, 0), (2, 1), (1, 1), (0, 0), (2, 0)], "bob": [(2, 2), (1, 0), (0, 1), (2, 2)]}
UNPAIRED = {A: 2, B: 0}  # alice's 6th A; bob's 5th A


def ratings() -> list[Rating]:
    return [Rating(rater, position, arm, "m @ s", 1000 + position, label, "", "", "")
            for rater, rows in TABLE.items() for position, (arm, label) in enumerate(rows)]


def average_ranks(values: list[float]) -> list[float]:
    """Ranks 1..n of values, tied values sharing the mean of their ranks."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def wilcoxon_pratt_by_hand(d: list[int]) -> tuple[float, float, float]:
    """(T+, one-sided normal p, one-sided exact p) for H1: differences > 0. Pratt: rank |d| with the zeros, then
    drop the zeros' ranks; the null flips each non-zero difference's sign with probability 1/2."""
    ranks = average_ranks([abs(x) for x in d])
    nonzero = [(r, x) for r, x in zip(ranks, d) if x != 0]
    t_plus = sum(r for r, x in nonzero if x > 0)
    mean = sum(r for r, _ in nonzero) / 2
    sd = math.sqrt(sum(r * r for r, _ in nonzero) / 4)
    p_normal = 1 - NormalDist().cdf((t_plus - mean) / sd)
    totals = [sum(r for (r, _), s in zip(nonzero, signs) if s) for signs in
              itertools.product((False, True), repeat=len(nonzero))]
    p_exact = sum(t >= t_plus - 1e-9 for t in totals) / len(totals)
    return t_plus, p_normal, p_exact


def mann_whitney_by_hand(a: list[int], b: list[int], exact: bool = True) -> tuple[float, float, float | None]:
    """(U of a, one-sided normal p with tie and continuity corrections, one-sided exact p) for H1: a > b."""
    def u_of(x, y):
        return sum(1.0 if xi > yi else 0.5 if xi == yi else 0.0 for xi in x for yi in y)

    u = u_of(a, b)
    n1, n2 = len(a), len(b)
    n = n1 + n2
    ties = sum(t ** 3 - t for t in Counter(a + b).values())
    sd = math.sqrt(n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1))))
    p_normal = 1 - NormalDist().cdf((u - n1 * n2 / 2 - 0.5) / sd)
    if not exact:
        return u, p_normal, None
    pooled = a + b
    splits = [u_of([pooled[i] for i in group], [pooled[i] for i in range(n) if i not in group])
              for group in map(set, itertools.combinations(range(n), n1))]
    p_exact = sum(s >= u - 1e-9 for s in splits) / len(splits)
    return u, p_normal, p_exact


def bca_by_hand(d: list[int], level: float) -> tuple[float, float]:
    """The BCa interval of the mean from the exact bootstrap distribution (every multiset of n draws, weighted by
    its multinomial probability) and the jackknife acceleration (Efron & Tibshirani 1993, §14.3)."""
    n = len(d)
    mean = sum(d) / n
    dist: dict[float, float] = Counter()
    for draw in itertools.combinations_with_replacement(range(n), n):
        counts = Counter(draw).values()
        weight = math.factorial(n) / math.prod(math.factorial(c) for c in counts) / n ** n
        dist[round(sum(d[i] for i in draw) / n, 12)] += weight
    values = sorted(dist)
    normal = NormalDist()
    # Bias correction from the share of resampled means below the observed one; the bootstrap distribution of a mean
    # of a few integers has an atom at the observed mean, counted one half (mid-rank).
    below = sum(dist[v] for v in values if v < mean - 1e-12)
    z0 = normal.inv_cdf(below + dist[round(mean, 12)] / 2)
    jack = [(sum(d) - x) / (n - 1) for x in d]
    jm = sum(jack) / n
    acc = sum((jm - j) ** 3 for j in jack) / (6 * sum((jm - j) ** 2 for j in jack) ** 1.5)

    def quantile(alpha: float) -> float:
        z = normal.inv_cdf(alpha)
        q = normal.cdf(z0 + (z0 + z) / (1 - acc * (z0 + z)))
        cumulative = 0.0
        for v in values:
            cumulative += dist[v]
            if cumulative >= q - 1e-12:
                return v
        return values[-1]

    return quantile((1 - level) / 2), quantile((1 + level) / 2)


def test_pairs_follow_the_stated_rule():
    pairs, unpaired = make_pairs(ratings(), A, B)
    assert {r: [(p.score_a, p.score_b) for p in pairs if p.rater == r] for r in TABLE} == PAIRS
    assert [p.index for p in pairs if p.rater == "alice"] == list(range(5))
    assert unpaired == UNPAIRED


def test_statistics_match_a_hand_computation():
    st = study_statistics(ratings(), (A, B), level=0.9, resamples=20_000, seed=1)
    diffs = [a - b for rater in TABLE for a, b in PAIRS[rater]]
    assert st["pairs"]["n"] == len(diffs) == 9 and st["mean_difference"] == pytest.approx(sum(diffs) / 9)

    t_plus, p_normal, p_exact = wilcoxon_pratt_by_hand(diffs)
    w = st["wilcoxon"]
    assert (w["zero_method"], w["alternative"], w["n_zero_differences"]) == ("pratt", "greater", diffs.count(0))
    assert w["statistic"] == pytest.approx(t_plus)
    assert w["p_normal"] == pytest.approx(p_normal, rel=1e-9)
    assert w["p_exact"] == pytest.approx(p_exact, rel=1e-9)

    a = [SCORE[label] for rows in TABLE.values() for arm, label in rows if arm == A]
    b = [SCORE[label] for rows in TABLE.values() for arm, label in rows if arm == B]
    u, p_normal, _ = mann_whitney_by_hand(a, b, exact=False)
    mw = st["mann_whitney"]["all"]
    assert (mw["n_a"], mw["n_b"], mw["u"]) == (len(a), len(b), u)
    assert mw["p_normal"] == pytest.approx(p_normal, rel=1e-9)
    assert mw["p_exact"] is None and math.comb(len(a) + len(b), len(a)) > EXACT_LIMIT  # too many splits

    # scipy's BCa resamples at random (20,000 times) and interpolates between resampled means; the exact
    # distribution's quantiles lie on the grid of possible means (steps of 1/9): within one step.
    lo, hi = bca_by_hand(diffs, 0.9)
    assert st["mean_difference_ci"] == pytest.approx([lo, hi], abs=1 / 9 + 1e-9)
    assert lo <= st["mean_difference"] <= hi

    for rater, rows in TABLE.items():
        for arm in (A, B):
            counts = Counter(label for r_arm, label in rows if r_arm == arm)
            got = st["by_rater"][rater][arm]
            assert {k: got[k] for k in ("no", "maybe", "yes")} == {k: counts[k] for k in ("no", "maybe", "yes")}
            assert got["mean_score"] == pytest.approx(sum(SCORE[k] * v for k, v in counts.items()) / len(
                [1 for r_arm, _ in rows if r_arm == arm]))
    assert st["counts"][A]["n"] == len(a) and st["counts"][B]["yes"] == b.count(2)


def test_mann_whitney_exact_p_on_few_labels():
    a = [SCORE[label] for arm, label in TABLE["bob"] if arm == A]
    b = [SCORE[label] for arm, label in TABLE["bob"] if arm == B]
    u, p_normal, p_exact = mann_whitney_by_hand(a, b)
    for alternative, sign in (("greater", 1), ("less", -1)):
        got = mann_whitney(np.array(a), np.array(b), alternative)
        want = (u, p_normal, p_exact) if sign > 0 else mann_whitney_by_hand(b, a)
        assert got["u"] == u and got["p_normal"] == pytest.approx(want[1], rel=1e-9)
        assert got["p_exact"] == pytest.approx(want[2], rel=1e-9)


def test_two_strata_are_paired_and_tested_apart():
    """Pairs never cross a stratum (model and site); Mann-Whitney U is also given per stratum."""
    rows = ratings() + [Rating("alice", 100 + i, arm, "m @ other", i, label, "", "", "")
                        for i, (arm, label) in enumerate([(B, "yes"), (A, "no"), (A, "yes")])]
    st = study_statistics(rows, (A, B), resamples=200)
    assert st["strata"] == ["m @ other", "m @ s"] and st["pairs"]["n"] == 10
    assert [(p["score_a"], p["score_b"]) for p in st["pairs"]["list"] if p["stratum"] == "m @ other"] == [(0, 2)]
    assert st["pairs"]["unpaired"] == {A: 3, B: 0}
    assert set(st["mann_whitney"]) == {"all", "m @ other", "m @ s"}
    assert st["mann_whitney"]["m @ other"]["u"] == mann_whitney_by_hand([0, 2], [2])[0]


def test_rate_report_cli_writes_markdown_json_and_figure(tmp_path):
    path = make_study(tmp_path / "study.sqlite")
    with Study(path) as study:
        for rater, n in (("alice", 6), ("bob", 4)):
            for k in range(n):
                current = study.show_current(rater)
                study.submit(rater, current.token, ("yes", "maybe", "no")[(k + len(rater)) % 3], f"why {k}")
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "saeforge", "rate", "report", str(path), "--out", str(out),
                           "--resamples", "2000"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    st = report["statistics"]
    assert st["arms"] == {"a": ARMS[0], "b": ARMS[1]} and st["n_labels"] == 10 and len(report["ratings"]) == 10

    # Pairs formed here from the raw tables, by the rule, and the test statistics recomputed by hand.
    con = sqlite3.connect(path)
    raw = con.execute("SELECT r.name, s.arm, l.label FROM labels l JOIN raters r USING (rater_id) JOIN orders o "
                      "USING (rater_id, item_id) JOIN items i USING (item_id) JOIN saes s USING (sae_id) "
                      "ORDER BY r.rater_id, o.position").fetchall()
    con.close()
    diffs = []
    for rater in ("alice", "bob"):
        a = [SCORE[lab] for name, arm, lab in raw if name == rater and arm == ARMS[0]]
        b = [SCORE[lab] for name, arm, lab in raw if name == rater and arm == ARMS[1]]
        diffs += [x - y for x, y in zip(a, b)]
    assert [p["score_a"] - p["score_b"] for p in st["pairs"]["list"]] == diffs
    if any(diffs):
        t_plus, p_normal, p_exact = wilcoxon_pratt_by_hand(diffs)
        assert st["wilcoxon"]["statistic"] == pytest.approx(t_plus)
        assert st["wilcoxon"]["p_exact"] == pytest.approx(p_exact)
    u = mann_whitney_by_hand([SCORE[lab] for _, arm, lab in raw if arm == ARMS[0]],
                             [SCORE[lab] for _, arm, lab in raw if arm == ARMS[1]])[0]
    assert st["mann_whitney"]["all"]["u"] == u

    markdown = (out / "report.md").read_text()
    assert markdown == proc.stdout.split("\nwrote: ")[0] + "\n" or markdown in proc.stdout
    for text in ("# Blind rating study: alpha_arm vs beta_arm", "zero_method = pratt", "BCa", "Mann-Whitney U",
                 "## Labels by rater", "![labels and paired differences](report.png)", "why 3"):
        assert text in markdown, text
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
