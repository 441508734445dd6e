"""Matched-L0 comparison: how many latents per token architecture a needs, relative to b, at equal fidelity (paper A's
headline: about half the L0 at equal loss recovered).

Curves. Each architecture or variant (row "variant", e.g. "gated", "relu", "gated (tied=False)") gives points of a
fidelity metric against log L0. Seeds are pooled: rows of one variant with the same sparsity setting (target_l0 when
the row has one, else k, else sparsity_coeff) are one point, at the mean of their log L0 and the mean of their
metric. A curve is piecewise linear in log L0 through its points sorted by L0, made monotone (running best) so it
can be inverted: log L0_a(y) is the smallest log L0 at which curve a reaches fidelity y. Lower-is-better metrics
(delta_ce, kl_div) are negated first, so "reaches" always means "is at least as good as".

Ratio. Over the range of fidelity both curves reach (their overlap), at LEVELS evenly spaced values y:
    ratio = exp(mean_y [log L0_a(y) - log L0_b(y)])
the geometric-mean L0 ratio at equal fidelity (< 1: a needs fewer latents). Nothing is extrapolated.

CI. Contexts are resampled jointly for every row evaluated on the same evaluation set (row "eval_set"; each
evaluation set is resampled independently of the others, so rows gathered from several sweep.json files work);
each resample recomputes every row's metric from its per-context arrays, the pooled curves, their overlap and the
ratio; the interval is the percentile interval of the resampled ratios (resamples whose curves do not overlap are
dropped and counted). L0 is held at its full-set value (its sampling error is far below the metric's).

Entry point: python -m saeforge.evaluation.compare SWEEP.json [...] --a gated --b relu [--metric loss_recovered_mean]
prints the comparison as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from saeforge.evaluation.bootstrap import loss_metrics
from saeforge.evaluation.metrics import is_finite_number

LOWER_IS_BETTER = {"delta_ce", "kl_div", "l_added"}
METRICS = ("loss_recovered_mean", "loss_recovered_zero", "delta_ce", "kl_div", "l_added")
LEVELS = 50  # fidelity values the log L0 ratio is averaged over


def variant_of(row: dict) -> str:
    """The curve a row belongs to: its architecture, or the variant naming its non-default switches."""
    return row.get("variant") or row["architecture"]


def setting(row: dict):
    """What makes rows of one variant the same point: the L0 target, else k, else the sparsity coefficient."""
    for key in ("target_l0", "k", "sparsity_coeff"):
        if row.get(key) is not None:
            return (key, row[key])
    return ("name", row["name"])


def _curve_points(rows: list[dict], variant: str) -> dict[tuple, list[dict]]:
    """setting -> the rows (seeds) of that variant, ITO rows and rows without a finite L0 left out."""
    points: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if variant_of(r) == variant and r.get("ito_k") is None and is_finite_number(r.get("l0")) and r["l0"] > 0:
            points[setting(r)].append(r)
    return dict(points)


def _inverse(log_l0: np.ndarray, fidelity: np.ndarray):
    """(fidelity values, log L0) of the monotone curve, strictly increasing in both, for np.interp."""
    order = np.argsort(log_l0)
    x, y = log_l0[order], np.maximum.accumulate(fidelity[order])
    keep = np.concatenate([[True], np.diff(y) > 0])
    return y[keep], x[keep]


def log_ratio_curve(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], levels: int = LEVELS):
    """(levels y over the overlap, log L0_a(y) - log L0_b(y)) for curves given as (log L0, fidelity) point arrays
    (higher fidelity is better); None when the curves do not overlap."""
    ya, xa = _inverse(*a)
    yb, xb = _inverse(*b)
    lo, hi = max(ya[0], yb[0]), min(ya[-1], yb[-1])
    if len(ya) < 2 or len(yb) < 2 or not lo < hi:
        return None
    y = np.linspace(lo, hi, levels)
    return y, np.interp(y, ya, xa) - np.interp(y, yb, xb)


def _pooled(groups: dict[tuple, list[dict]], values: dict[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(log L0, fidelity) of the pooled points: the means over each point's rows (seeds); values: id(row) ->
    that row's fidelity."""
    log_l0 = np.array([np.mean([math.log(r["l0"]) for r in rs]) for rs in groups.values()])
    fidelity = np.array([np.mean([values[id(r)] for r in rs]) for rs in groups.values()])
    return log_l0, fidelity


def matched_l0_ratio(rows: list[dict], a: str = "gated", b: str = "relu", metric: str = "loss_recovered_mean", *,
                     level: float = 0.95, resamples: int = 2000, seed: int = 0) -> dict:
    """L0 of variant a over L0 of variant b at equal `metric`, with a bootstrap CI over contexts (module docstring).

    rows: evaluation rows (evaluate_saes / sweep.json "results"), from one or several evaluations. Returns a
    JSON-ready dict: a, b, metric, ratio, ratio_ci, ci_level, overlap ([lo, hi] in metric units), points_a/b
    (pooled points per curve), rows_a/b, at ([{level, ratio}] at 5 levels across the overlap), resamples_used,
    summary (one line, see `describe`), and note when no ratio exists."""
    result = _matched_l0_ratio(rows, a, b, metric, level, resamples, seed)
    result["summary"] = describe(result)
    return result


def _matched_l0_ratio(rows: list[dict], a: str, b: str, metric: str, level: float, resamples: int,
                      seed: int) -> dict:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {list(METRICS)}, got {metric!r}")
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    groups = {v: _curve_points(rows, v) for v in (a, b)}
    groups = {v: {s: [r for r in rs if is_finite_number(r.get(metric))] for s, rs in g.items()} for v, g in groups.items()}
    groups = {v: {s: rs for s, rs in g.items() if rs} for v, g in groups.items()}
    out = {"a": a, "b": b, "metric": metric, "ratio": None, "ratio_ci": None, "ci_level": level, "overlap": None,
           "points_a": len(groups[a]), "points_b": len(groups[b]),
           "rows_a": sum(map(len, groups[a].values())), "rows_b": sum(map(len, groups[b].values())),
           "at": [], "resamples_used": 0}
    if min(len(groups[a]), len(groups[b])) < 2:
        out["note"] = f"each curve needs >= 2 sparsity settings; {a}: {len(groups[a])}, {b}: {len(groups[b])}"
        return out
    point = {id(r): sign * r[metric] for g in groups.values() for rs in g.values() for r in rs}
    curve = log_ratio_curve(_pooled(groups[a], point), _pooled(groups[b], point))
    if curve is None:
        out["note"] = f"the {metric} ranges of {a} and {b} do not overlap"
        return out
    y, log_ratio = curve
    out.update(ratio=float(np.exp(log_ratio.mean())), overlap=sorted([float(sign * y[0]), float(sign * y[-1])]),
               at=[{"level": float(sign * y[i]), "ratio": float(np.exp(log_ratio[i]))}
                   for i in np.linspace(0, len(y) - 1, 5).round().astype(int)])

    members = [r for g in groups.values() for rs in g.values() for r in rs]
    if resamples < 1 or any("per_context" not in r for r in members):
        out["note"] = "no CI: " + ("resamples = 0" if resamples < 1 else "rows without per_context arrays")
        return out
    resampled = _resampled_metric(members, metric, resamples, seed)
    draws = []
    for i in range(resamples):
        values = {key: sign * v[i] for key, v in resampled.items()}
        c = log_ratio_curve(_pooled(groups[a], values), _pooled(groups[b], values))
        if c is not None:
            draws.append(float(np.exp(c[1].mean())))
    out["resamples_used"] = len(draws)
    if draws:
        out["ratio_ci"] = [float(np.quantile(draws, (1 - level) / 2)), float(np.quantile(draws, (1 + level) / 2))]
    return out


def _resampled_metric(rows: list[dict], metric: str, resamples: int, seed: int) -> dict[int, np.ndarray]:
    """id(row) -> [resamples] metric values, contexts resampled with one index matrix per evaluation set."""
    rng = np.random.default_rng(seed)
    indices: dict[tuple, np.ndarray] = {}
    out = {}
    for r in rows:
        arrays = {k: np.asarray(v, dtype=np.float64) for k, v in r["per_context"].items()}
        n = len(arrays["ce_spliced"])
        key = (r.get("eval_set"), n)
        if key not in indices:
            indices[key] = rng.integers(0, n, size=(resamples, n))
        idx = indices[key]
        means = {k: v[idx].mean(axis=1) for k, v in arrays.items()}
        out[id(r)] = np.asarray(loss_metrics(means)[metric], dtype=np.float64)
    return out


def matched_l0_table(rows: list[dict], metrics: tuple[str, ...] = ("loss_recovered_mean", "delta_ce"), *,
                     level: float = 0.95, resamples: int = 2000, seed: int = 0) -> list[dict]:
    """matched_l0_ratio for every pair of variants with >= 2 sparsity settings (in order of first appearance: a
    sweep over gated then relu gives gated / relu), for each metric the rows carry."""
    variants = []
    for r in rows:
        v = variant_of(r)
        if r.get("ito_k") is None and v not in variants and len(_curve_points(rows, v)) >= 2:
            variants.append(v)
    present = [m for m in metrics if any(is_finite_number(r.get(m)) for r in rows)]
    return [matched_l0_ratio(rows, a, b, m, level=level, resamples=resamples, seed=seed)
            for i, a in enumerate(variants) for b in variants[i + 1:] for m in present]


def describe(result: dict) -> str:
    """One terminal line, e.g. 'matched L0, gated / relu at equal loss_recovered_mean: 0.52 [0.45, 0.60] ...'."""
    head = f"matched L0, {result['a']} / {result['b']} at equal {result['metric']}"
    if result["ratio"] is None:
        return f"{head}: - ({result.get('note', 'no overlap')})"
    ci = (f" [{result['ratio_ci'][0]:.3g}, {result['ratio_ci'][1]:.3g}] ({result['ci_level']:.0%} CI)"
          if result["ratio_ci"] else "")
    lo, hi = result["overlap"]
    return (f"{head}: {result['ratio']:.3g}{ci} over {result['metric']} {lo:.4g} to {hi:.4g} "
            f"({result['points_a']} vs {result['points_b']} points)")


def load_rows(paths: list[Path]) -> list[dict]:
    """The "results" rows of eval.json / sweep.json files, concatenated."""
    rows = []
    for p in paths:
        rows += json.loads(Path(p).read_text())["results"]
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m saeforge.evaluation.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="eval.json / sweep.json files (rows are pooled)")
    parser.add_argument("--a", default="gated", help="variant in the numerator (row 'variant')")
    parser.add_argument("--b", default="relu", help="variant in the denominator")
    parser.add_argument("--metric", default="loss_recovered_mean", choices=METRICS)
    parser.add_argument("--ci-level", type=float, default=0.95)
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = matched_l0_ratio(load_rows(args.files), args.a, args.b, args.metric, level=args.ci_level,
                              resamples=args.resamples, seed=args.seed)
    print(json.dumps(result, indent=1))
    print(result["summary"], file=sys.stderr)


if __name__ == "__main__":
    main()
