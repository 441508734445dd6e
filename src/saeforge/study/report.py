"""The study report, unblinded: `study_report` gathers the statistics (stats.study_statistics) and what the study
file says about its SAEs and ratings; `report_markdown` and `report_figure` present them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from saeforge.study.db import LABELS, Study, StudyError
from saeforge.study.stats import Alternative, study_statistics
from saeforge.viz.eval_figures import save_figure

LABEL_COLORS = {"no": "#c0504d", "maybe": "#f2c14e", "yes": "#4f9a52"}
SIDES = {"greater": ">", "less": "<", "two-sided": "!="}


def study_report(study: Study, *, alternative: Alternative = "greater", level: float = 0.9,
                 resamples: int = 10_000, seed: int = 0) -> dict:
    """The report's content as a JSON-ready dict: the study's SAEs, settings, raters, every rating (with its
    explanation) and the statistics."""
    saes = study.saes()
    arms = list(dict.fromkeys(s.arm for s in saes))
    if len(arms) != 2:
        raise StudyError(f"{study.path}: a report compares two arms; this study has {arms}")
    ratings = study.ratings()
    return {
        "study": str(study.path),
        "settings": study.settings,
        "saes": [dataclasses.asdict(s) for s in saes],
        "n_items": study.n_items(),
        "registered_raters": study.raters(),
        "statistics": study_statistics(ratings, (arms[0], arms[1]), alternative=alternative, level=level,
                                       resamples=resamples, seed=seed),
        "ratings": [dataclasses.asdict(r) for r in ratings],
    }


def _p(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def _num(value, fmt: str = "{:.3f}") -> str:
    return "-" if value is None else fmt.format(value)


def _counts_row(first: list[str], c: dict) -> str:
    return "| " + " | ".join(first + [str(c[k]) for k in LABELS] + [str(c["n"]), _num(c["mean_score"])]) + " |"


def report_markdown(report: dict, figure: str | None = None) -> str:
    st = report["statistics"]
    a, b = st["arms"]["a"], st["arms"]["b"]
    w, ci = st["wilcoxon"], st["mean_difference_ci"]
    head = ["No", "Maybe", "Yes", "n", "mean score"]
    lines = [
        f"# Blind rating study: {a} vs {b}", "",
        f"Study file `{report['study']}`: {report['n_items']} latents, raters {', '.join(st['raters']) or '(none)'} "
        f"({st['n_labels']} labels). Scores: No = 0, Maybe = 1, Yes = 2. Arm A = {a}, arm B = {b}.", "",
        "## SAEs", "", "| arm | stratum (model @ site) | directory | details |", "|---|---|---|---|",
    ]
    for s in report["saes"]:
        details = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in s["info"].items() if k != "name")
        lines.append(f"| {s['arm']} | {s['stratum']} | `{s['path']}` | {details} |")
    lines += ["", "## Labels by SAE", "", "| SAE | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    lines += [_counts_row([arm], c) for arm, c in st["counts"].items()]
    lines += ["", "## Labels by rater", "", "| rater | SAE | " + " | ".join(head) + " |",
              "|---|---|" + "---:|" * len(head)]
    lines += [_counts_row([rater, arm], c) for rater, by_arm in st["by_rater"].items() for arm, c in by_arm.items()]
    if len(st["strata"]) > 1:
        lines += ["", "## Labels by stratum", "", "| stratum | SAE | " + " | ".join(head) + " |",
                  "|---|---|" + "---:|" * len(head)]
        lines += [_counts_row([s, arm], c) for s, by_arm in st["by_stratum"].items() for arm, c in by_arm.items()]
    side = SIDES[w["alternative"]]
    lines += [
        "", "## Paired comparison (A - B)", "", st["pairing"], "",
        f"- pairs: {st['pairs']['n']} (unpaired labels: {a} {st['pairs']['unpaired'][a]}, "
        f"{b} {st['pairs']['unpaired'][b]})",
        f"- mean paired difference: {_num(st['mean_difference'])}, {st['ci_level']:.0%} CI "
        f"[{_num(ci[0])}, {_num(ci[1])}] ({st['ci_method']})",
        f"- Wilcoxon signed-rank, zero_method = pratt, alternative: A {side} B: {w['statistic_name']} = "
        f"{_num(w['statistic'], '{:g}')}, {w['n_zero_differences']} zero differences; normal approximation z = "
        f"{_num(w['z'])}, p = {_p(w['p_normal'])}; exact p (all sign flips) = {_p(w['p_exact'])}",
        "", "## Unpaired comparison: Mann-Whitney U", "",
        f"U counts the (A, B) pairs of labels where A scores higher, ties one half; alternative: A {side} B; "
        "p from the normal approximation (tie and continuity corrected) and exact over all splits.", "",
        "| labels | n A | n B | U | p (normal) | p (exact) |", "|---|---:|---:|---:|---:|---:|",
    ]
    for group, mw in st["mann_whitney"].items():
        lines.append(f"| {group} | {mw['n_a']} | {mw['n_b']} | {_num(mw['u'], '{:g}')} | {_p(mw['p_normal'])} | "
                     f"{_p(mw['p_exact'])} |")
    if figure:
        lines += ["", f"![labels and paired differences]({figure})"]
    lines += ["", "## Ratings", "", "| rater | # | SAE | latent | label | explanation |", "|---|---:|---|---:|---|---|"]
    for r in report["ratings"]:
        text = " ".join(r["explanation"].split()).replace("|", "\\|")
        lines.append(f"| {r['rater']} | {r['position'] + 1} | {r['arm']} | {r['latent']} | {r['label']} | {text} |")
    return "\n".join(lines) + "\n"


def report_figure(report: dict, path: Path) -> Path:
    """Left: the share of No / Maybe / Yes per SAE and per rater. Right: the paired differences A - B, with their
    mean and its interval."""
    st = report["statistics"]
    a, b = st["arms"]["a"], st["arms"]["b"]
    rows = [(arm, st["counts"][arm]) for arm in (a, b)]
    rows += [(f"{rater}: {arm}", by_arm[arm]) for rater, by_arm in st["by_rater"].items() for arm in (a, b)]
    fig = Figure(figsize=(12, max(3.6, 1.4 + 0.4 * len(rows))))
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    y = np.arange(len(rows))[::-1]
    start = np.zeros(len(rows))
    for label in LABELS:
        share = np.array([c[label] / c["n"] if c["n"] else 0.0 for _, c in rows])
        left.barh(y, share, left=start, color=LABEL_COLORS[label], label=label.capitalize())
        start += share
    left.set_yticks(y, [f"{name} (n={c['n']})" for name, c in rows])
    left.set_xlim(0, 1)
    left.set_xlabel("share of labels, by SAE and by rater")
    left.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False)
    diffs = [p["score_a"] - p["score_b"] for p in st["pairs"]["list"]]
    values = np.arange(-2, 3)
    right.bar(values, [diffs.count(v) for v in values], color="#7a8fb5")
    right.set_xticks(values)
    right.yaxis.get_major_locator().set_params(integer=True)
    right.margins(y=0.3)
    right.set_xlabel(f"paired difference of scores, A - B\n(A = {a}, B = {b}; No 0, Maybe 1, Yes 2)")
    right.set_ylabel("pairs")
    if st["mean_difference"] is not None:
        right.axvline(st["mean_difference"], color="k", label=f"mean {st['mean_difference']:.2f}")
        lo, hi = st["mean_difference_ci"]
        if lo is not None and hi is not None:
            right.axvspan(lo, hi, color="k", alpha=0.12, label=f"{st['ci_level']:.0%} BCa CI")
        right.legend(fontsize="small", loc="upper left")
    w = st["wilcoxon"]
    p = w["p_exact"] if w["p_exact"] is not None else w["p_normal"]
    right.set_title(f"{len(diffs)} pairs; Wilcoxon-Pratt one-sided p = {_p(p)}", fontsize="medium")
    fig.tight_layout()
    return save_figure(fig, path)
