"""The statistics of a rating study (paper A §4.3), all from scipy.

Scores: No = 0, Maybe = 1, Yes = 2. The comparison is between two arms, A and B (A is the first SAE given to
`rate new`); differences are A - B, and the one-sided alternative "greater" says A's latents are rated higher.

- Pairs (`PAIRING`): within each rater and stratum (model and site), the i-th latent of A the rater labelled is
  paired with the i-th latent of B the rater labelled, both counted in the rater's own random order.
- Paired test: Wilcoxon signed-rank with Pratt's treatment of zero differences (zeros are ranked with the rest, then
  dropped from the sum; Pratt 1959, Cureton 1967), on the paired differences. Two p-values: the normal approximation
  (zero-adjusted and tie-corrected variance, no continuity correction), and where the pairs are few enough
  (2 <= n, 2^n <= EXACT_LIMIT) the exact p over every sign flip of the differences.
- The mean paired difference with its BCa bootstrap interval (90% by default) over pairs
  (`evaluation.bootstrap.context_bootstrap_ci`, i.e. scipy.stats.bootstrap with method="BCa").
- Unpaired: Mann-Whitney U between the arms' scores (all labels, and per stratum where there are several): normal
  approximation with tie and continuity corrections, and the exact p over every split where both arms have two or
  more labels and C(n_A + n_B, n_A) <= EXACT_LIMIT.
- Contingency tables of No / Maybe / Yes by arm, by rater and arm, and by stratum and arm.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections import defaultdict
from typing import Iterable, Literal

import numpy as np
from scipy import stats

from saeforge.evaluation.bootstrap import context_bootstrap_ci
from saeforge.study.db import LABELS, Rating

SCORES = {label: score for score, label in enumerate(LABELS)}  # no 0, maybe 1, yes 2
EXACT_LIMIT = 1 << 16  # largest number of sign flips / splits enumerated for an exact p
Alternative = Literal["greater", "less", "two-sided"]

PAIRING = ("Pairs are matched on rater and stratum (model and site): within each, the i-th latent of arm A that the "
           "rater labelled is paired with the i-th latent of arm B that the rater labelled, both counted in the "
           "rater's own order. Each rater's order is a uniform random permutation of all latents, so which A latent "
           "meets which B latent is random and independent of the labels, and the two latents of a pair were rated "
           "at about the same point of the rater's session (fatigue and learning affect both alike). Latents left "
           "over (a rater who stopped early) are not paired; they still count in the contingency tables and the "
           "Mann-Whitney U test.")


@dataclasses.dataclass(frozen=True)
class Pair:
    rater: str
    stratum: str
    index: int  # i: the i-th A latent and the i-th B latent of this rater and stratum
    score_a: int
    score_b: int


def make_pairs(ratings: Iterable[Rating], arm_a: str, arm_b: str) -> tuple[list[Pair], dict[str, int]]:
    """The pairs (see PAIRING) and how many labels of each arm were left unpaired."""
    by_cell: dict[tuple[str, str], dict[str, list[Rating]]] = defaultdict(lambda: {arm_a: [], arm_b: []})
    for r in ratings:
        if r.arm in (arm_a, arm_b):
            by_cell[r.rater, r.stratum][r.arm].append(r)
    pairs, unpaired = [], {arm_a: 0, arm_b: 0}
    for (rater, stratum), arms in by_cell.items():
        a = sorted(arms[arm_a], key=lambda r: r.position)
        b = sorted(arms[arm_b], key=lambda r: r.position)
        pairs += [Pair(rater, stratum, i, SCORES[ra.label], SCORES[rb.label]) for i, (ra, rb) in enumerate(zip(a, b))]
        unpaired[arm_a] += max(0, len(a) - len(b))
        unpaired[arm_b] += max(0, len(b) - len(a))
    return pairs, unpaired


def _finite(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def wilcoxon_pratt(differences: np.ndarray, alternative: Alternative) -> dict:
    """The Wilcoxon signed-rank test with Pratt's zero method on paired differences (see the module docstring)."""
    d = np.asarray(differences, dtype=np.float64)
    out = {"n_pairs": int(d.size), "n_zero_differences": int((d == 0).sum()), "zero_method": "pratt",
           "alternative": alternative, "statistic": None, "statistic_name": None, "z": None, "p_normal": None,
           "p_exact": None}
    if d.size == 0:
        return out
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        normal = stats.wilcoxon(d, zero_method="pratt", alternative=alternative, method="asymptotic")
        out["statistic"] = _finite(normal.statistic)
        out["statistic_name"] = ("min(T+, T-)" if alternative == "two-sided" else
                                 "T+ (the sum of the ranks of the positive differences)")
        out["z"], out["p_normal"] = _finite(normal.zstatistic), _finite(normal.pvalue)
        if 2 <= d.size and 2 ** d.size <= EXACT_LIMIT:
            exact = stats.wilcoxon(d, zero_method="pratt", alternative=alternative,
                                   method=stats.PermutationMethod(n_resamples=EXACT_LIMIT))
            out["p_exact"] = _finite(exact.pvalue)
    return out


def mann_whitney(a: np.ndarray, b: np.ndarray, alternative: Alternative) -> dict:
    """Mann-Whitney U of the scores of arm A against arm B (unpaired). U is A's: the number of (A, B) pairs with
    A's score higher, ties counting one half."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    out = {"n_a": int(a.size), "n_b": int(b.size), "alternative": alternative, "u": None, "p_normal": None,
           "p_exact": None}
    if a.size == 0 or b.size == 0:
        return out
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        normal = stats.mannwhitneyu(a, b, alternative=alternative, method="asymptotic", use_continuity=True)
        out["u"], out["p_normal"] = _finite(normal.statistic), _finite(normal.pvalue)
        if min(a.size, b.size) >= 2 and math.comb(a.size + b.size, a.size) <= EXACT_LIMIT:
            exact = stats.mannwhitneyu(a, b, alternative=alternative,
                                       method=stats.PermutationMethod(n_resamples=EXACT_LIMIT))
            out["p_exact"] = _finite(exact.pvalue)
    return out


def label_counts(ratings: Iterable[Rating]) -> dict:
    """{no, maybe, yes, n, mean_score} of some labels (mean_score None when there are none)."""
    counts = {label: 0 for label in LABELS}
    for r in ratings:
        counts[r.label] += 1
    n = sum(counts.values())
    return {**counts, "n": n, "mean_score": sum(SCORES[k] * v for k, v in counts.items()) / n if n else None}


def _table(ratings: list[Rating], key, arms: list[str]) -> dict:
    """key(rating) -> arm -> label_counts."""
    groups: dict[str, list[Rating]] = defaultdict(list)
    for r in ratings:
        groups[key(r)].append(r)
    return {g: {arm: label_counts(r for r in rs if r.arm == arm) for arm in arms} for g, rs in groups.items()}


def study_statistics(ratings: list[Rating], arms: tuple[str, str], *, alternative: Alternative = "greater",
                     level: float = 0.9, resamples: int = 10_000, seed: int = 0) -> dict:
    """Everything the report shows, as a JSON-ready dict (see the module docstring)."""
    arm_a, arm_b = arms
    strata = sorted({r.stratum for r in ratings})
    pairs, unpaired = make_pairs(ratings, arm_a, arm_b)
    diffs = np.array([p.score_a - p.score_b for p in pairs], dtype=np.float64)
    if diffs.size:
        ci = context_bootstrap_ci({"difference": diffs}, lambda m: {"mean": m["difference"]}, level=level,
                                  resamples=resamples, seed=seed)["mean"]
    else:
        ci = [None, None]
    scores = {arm: np.array([SCORES[r.label] for r in ratings if r.arm == arm]) for arm in arms}
    out = {
        "arms": {"a": arm_a, "b": arm_b},
        "scores": {label: SCORES[label] for label in LABELS},
        "n_labels": len(ratings),
        "raters": sorted({r.rater for r in ratings}),
        "strata": strata,
        "counts": {arm: label_counts(r for r in ratings if r.arm == arm) for arm in arms},
        "by_rater": _table(ratings, lambda r: r.rater, list(arms)),
        "by_stratum": _table(ratings, lambda r: r.stratum, list(arms)),
        "pairing": PAIRING,
        "pairs": {"n": len(pairs), "unpaired": unpaired, "list": [dataclasses.asdict(p) for p in pairs]},
        "mean_difference": float(diffs.mean()) if diffs.size else None,
        "mean_difference_ci": [_finite(c) if c is not None else None for c in ci],
        "ci_level": level,
        "ci_method": f"BCa bootstrap over pairs ({resamples} resamples, seed {seed})",
        "wilcoxon": wilcoxon_pratt(diffs, alternative),
        "mann_whitney": {"all": mann_whitney(scores[arm_a], scores[arm_b], alternative)},
    }
    if len(strata) > 1:
        for s in strata:
            out["mann_whitney"][s] = mann_whitney(
                *[np.array([SCORES[r.label] for r in ratings if r.arm == arm and r.stratum == s]) for arm in arms],
                alternative)
    return out
