"""Print the Markdown tables of docs/results.md from docs/results/<run>/sweep.json.

    .venv/bin/python docs/results_tables.py > /tmp/tables.md

Seeds: the results configs name each SAE <variant>_t<target>_s<seed>; SAEs that differ only in the seed are one
point. Per point: the mean over seeds and the spread (min-max) across them. Matched L0 (Gated / ReLU at equal
fidelity, saeforge.evaluation.compare): with every seed pooled, its 95% CI from resampling held-out contexts, and
again from each seed's SAEs alone, whose spread shows what the context bootstrap leaves out.
"""

import json
import math
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from saeforge.evaluation.compare import matched_l0_ratio

ROOT = Path(__file__).parent / "results"
RUNS = ("paper_a_resid", "paper_a_resid_ablations", "paper_a_mlp")
SEED = re.compile(r"_s(\d+)$")
POINT_COLUMNS = [("l0", "L0", "{:.1f}"), ("delta_ce", "delta-CE (nats)", "{:.3f}"), ("kl_div", "KL", "{:.3f}"),
                 ("loss_recovered_mean", "LR (mean abl.)", "{:.3f}"), ("loss_recovered_zero", "LR (zero abl.)", "{:.3f}"),
                 ("fvu", "FVU", "{:.3f}"), ("gamma_centered", "gamma (centred)", "{:.3f}"),
                 ("dead_fraction", "dead", "{:.3f}")]


def seed_of(row) -> int:
    found = SEED.search(row["name"])
    return int(found.group(1)) if found else 0


def variant(row) -> str:
    return row.get("variant") or row["architecture"]


def spread(values, fmt) -> str:
    """mean (min-max over seeds), or the single value."""
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.fmean(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def point_table(rows) -> str:
    points = defaultdict(list)
    for r in rows:
        points[(variant(r), r.get("target_l0") or r.get("k") or r.get("sparsity_coeff"), r["d_sae"])].append(r)
    head = "| SAE | latents | target L0 | seeds | " + " | ".join(h for _, h, _ in POINT_COLUMNS) + " |"
    lines = [head, "|---|---:|---:|---:|" + "---:|" * len(POINT_COLUMNS)]
    for (name, target, d_sae), rs in sorted(points.items(), key=lambda p: (p[0][0], p[0][1])):
        cells = [spread([r[key] for r in rs], fmt) for key, _, fmt in POINT_COLUMNS]
        lines.append(f"| {name} | {d_sae} | {target:g} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ci_table(rows) -> str:
    lines = ["| SAE | L0 | delta-CE [95% CI] | KL [95% CI] | LR (mean abl.) [95% CI] |", "|---|---:|---:|---:|---:|"]

    def ci(r, key):
        lo, hi = r[f"{key}_ci"]
        return f"{r[key]:.3f} [{lo:.3f}, {hi:.3f}]"
    for r in sorted(rows, key=lambda r: (variant(r), r["l0"])):
        lines.append(f"| {r['name']} | {r['l0']:.1f} | {ci(r, 'delta_ce')} | {ci(r, 'kl_div')} | "
                     f"{ci(r, 'loss_recovered_mean')} |")
    return "\n".join(lines)


def pca_lines(pca) -> str:
    lines = ["| PCA rank | delta-CE [95% CI] | LR (mean abl.) | FVU |", "|---:|---:|---:|---:|"]
    for p in pca:
        lo, hi = p["delta_ce_ci"]
        lines.append(f"| {p['rank']} | {p['delta_ce']:.3f} [{lo:.3f}, {hi:.3f}] | {p['loss_recovered_mean']:.3f} | "
                     f"{p['fvu']:.3f} |")
    return "\n".join(lines)


def matched(rows, a="gated", b="relu") -> str:
    lines = ["| rows | metric | L0 ratio gated / relu [95% CI over contexts] | over the range |", "|---|---|---:|---|"]
    # Per-seed curves only for seeds trained at every setting (seed 2 covers the middle targets only).
    settings = {(variant(r), r.get("target_l0")) for r in rows}
    seeds = sorted(s for s in {seed_of(r) for r in rows}
                   if {(variant(r), r.get("target_l0")) for r in rows if seed_of(r) == s} == settings)
    for metric in ("loss_recovered_mean", "kl_div"):  # delta-CE gives the LR ratio (LR is affine in it)
        for label, subset in [("all seeds pooled", rows)] + [(f"seed {s} only", [r for r in rows if seed_of(r) == s])
                                                              for s in seeds]:
            m = matched_l0_ratio(subset, a, b, metric, resamples=1000)
            if m["ratio"] is None:
                lines.append(f"| {label} | {metric} | - ({m.get('note', '')}) | - |")
                continue
            ci = f" [{m['ratio_ci'][0]:.3f}, {m['ratio_ci'][1]:.3f}]" if m["ratio_ci"] else ""
            lines.append(f"| {label} | {metric} | {m['ratio']:.3f}{ci} | {m['overlap'][0]:.3f} to "
                         f"{m['overlap'][1]:.3f} ({m['points_a']} vs {m['points_b']} points) |")
    return "\n".join(lines)


def at_l0(rows, name: str, l0: float, key: str) -> float:
    """Variant `name`'s curve (seeds averaged per target, linear in log L0) at `l0`; nan outside its range."""
    points = defaultdict(list)
    for r in rows:
        if variant(r) == name:
            points[r.get("target_l0")].append(r)
    xs = sorted((statistics.fmean(math.log(r["l0"]) for r in rs), statistics.fmean(r[key] for r in rs))
                for rs in points.values())
    x = math.log(l0)
    for (x0, y0), (x1, y1) in zip(xs, xs[1:]):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return float("nan")


def ablation_table(rows, reference) -> str:
    """Each ablation (seeds averaged) against the Gated and ReLU curves of the main run at the same L0."""
    lines = ["| variant | seeds | L0 | LR (mean abl.) | Gated curve at that L0 | ReLU curve at that L0 | gamma (centred) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    groups = defaultdict(list)
    for r in rows:
        groups[variant(r)].append(r)
    for name, rs in groups.items():
        l0 = statistics.fmean(r["l0"] for r in rs)
        lines.append(f"| {name} | {len(rs)} | {spread([r['l0'] for r in rs], '{:.1f}')} | "
                     f"{spread([r['loss_recovered_mean'] for r in rs], '{:.3f}')} | "
                     f"{at_l0(reference, 'gated', l0, 'loss_recovered_mean'):.3f} | "
                     f"{at_l0(reference, 'relu', l0, 'loss_recovered_mean'):.3f} | "
                     f"{spread([r['gamma_centered'] for r in rs], '{:.3f}')} |")
    return "\n".join(lines)


def main() -> None:
    for run in RUNS:
        path = ROOT / run / "sweep.json"
        if not path.exists():
            print(f"### {run}: not run\n")
            continue
        sweep = json.loads(path.read_text())
        rows, r0 = sweep["results"], sweep["results"][0]
        print(f"### {run}: {r0['model']} @ {r0['site']}, {r0['eval_tokens']:,} held-out tokens "
              f"({sweep['precision']['dtype']}); "
              f"clean CE {r0['ce_clean']:.3f}, zero-ablation CE {r0['ce_zero_ablation']:.3f}, mean-ablation CE "
              f"{r0['ce_mean_ablation']:.3f}\n")
        print("Per point (mean over seeds, min-max across seeds in brackets):\n")
        print(point_table(rows) + "\n")
        print("Per SAE, with 95% bootstrap intervals over held-out contexts:\n")
        print(ci_table(rows) + "\n")
        if run.endswith("_ablations"):
            reference = json.loads((ROOT / run.removesuffix("_ablations") / "sweep.json").read_text())["results"]
            print("Against the main run's curves (same cache, steps and evaluation set):\n")
            print(ablation_table(rows, reference) + "\n")
            continue
        print("PCA reference (rank-k reconstruction spliced in at the same site):\n")
        print(pca_lines(sweep["pca_reference"]) + "\n")
        print("Matched L0:\n")
        print(matched(rows) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
