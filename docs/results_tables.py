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

import numpy as np
from scipy import stats

from saeforge.evaluation.bootstrap import context_bootstrap_ci
from saeforge.evaluation.compare import matched_l0_ratio

ROOT = Path(__file__).parent / "results"
RUNS = ("paper_a_resid", "paper_a_resid_ablations", "paper_a_mlp", "paper_b")
SEED = re.compile(r"_s(\d+)$")
PAPER_B_NAME = re.compile(r"^(topk|gsae)_k(\d+)(?:_beta([\d.]+))?_s(\d+)$")  # configs/results/paper_b.toml
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


# ---------------------------------------------------------------------------------------------------- paper B
def paper_b_groups(rows) -> dict[tuple, list[dict]]:
    """(family "topk"/"gsae", k, beta or None for the main beta) -> the rows of its seeds."""
    groups = defaultdict(list)
    for r in rows:
        family, k, beta, _ = PAPER_B_NAME.match(r["name"]).groups()
        groups[(family, int(k), float(beta) if beta else None)].append(r)
    return dict(groups)


def paper_b_point_table(groups) -> str:
    columns = [("l0", "L0", "{:.1f}"), ("l_added", "L_added", "{:.4f}"), ("delta_ce", "delta-CE (nats)", "{:.3f}"),
               ("kl_div", "KL", "{:.3f}"), ("loss_recovered_mean", "LR (mean abl.)", "{:.3f}"),
               ("nmse", "NMSE", "{:.3f}"), ("fvu", "FVU", "{:.3f}"), ("dead_fraction", "dead", "{:.3f}")]
    lines = ["| SAE | k | beta | seeds | " + " | ".join(h for _, h, _ in columns) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(columns)]
    for (family, k, beta), rs in sorted(groups.items(), key=lambda g: (g[0][0], g[0][1], g[0][2] or 1.0)):
        name = {"topk": "TopK", "gsae": "g-SAE"}[family]
        beta_cell = "-" if family == "topk" else f"{beta if beta is not None else 1.0:g}"
        cells = [spread([r[key] for r in rs], fmt) for key, _, fmt in columns]
        lines.append(f"| {name} | {k} | {beta_cell} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_l_added(groups) -> str:
    """g-SAE minus TopK at each k on the same held-out contexts (seeds averaged per context), with a paired BCa
    interval over contexts: the comparison paper B draws, with its uncertainty."""
    lines = ["| k | L_added TopK | L_added g-SAE | g-SAE - TopK [95% CI] | g-SAE / TopK [95% CI] |",
             "|---:|---:|---:|---:|---:|"]
    for k in sorted({k for (_, k, beta) in groups if beta is None}):
        topk, gsae = groups.get(("topk", k, None)), groups.get(("gsae", k, None))
        if not topk or not gsae:
            continue
        clean = np.asarray(topk[0]["per_context"]["ce_clean"])
        arrays = {"clean": clean,
                  "topk": np.mean([r["per_context"]["ce_spliced"] for r in topk], axis=0),
                  "gsae": np.mean([r["per_context"]["ce_spliced"] for r in gsae], axis=0)}

        def statistic(m):
            t, g = (m["topk"] - m["clean"]) / m["clean"], (m["gsae"] - m["clean"]) / m["clean"]
            return {"t": t, "g": g, "diff": g - t, "ratio": g / t}
        point = statistic({key: a.mean() for key, a in arrays.items()})
        ci = context_bootstrap_ci(arrays, statistic, resamples=2000)
        lines.append(f"| {k} | {point['t']:.4f} | {point['g']:.4f} | {point['diff']:+.4f} "
                     f"[{ci['diff'][0]:+.4f}, {ci['diff'][1]:+.4f}] | {point['ratio']:.3f} "
                     f"[{ci['ratio'][0]:.3f}, {ci['ratio'][1]:.3f}] |")
    return "\n".join(lines)


def mean_ci(values) -> str:
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        return f"{values.mean():.4f}"
    ci = stats.bootstrap((values,), np.mean, n_resamples=2000, method="BCa", rng=np.random.default_rng(0))
    return f"{values.mean():.4f} [{ci.confidence_interval.low:.4f}, {ci.confidence_interval.high:.4f}]"


def steering_table(groups) -> str:
    """Per family and push size: the per-latent changes pooled over every k and seed (latents sampled per SAE),
    with a BCa interval over latents."""
    pooled = defaultdict(lambda: defaultdict(lambda: ([], [])))
    unit = None
    for (family, k, beta), rs in groups.items():
        if beta is not None:
            continue
        for r in rs:
            steer = r.get("steering") or {}
            for scale, point in zip(steer.get("alpha_scales", []), steer.get("sweep", [])):
                on, off = pooled[family][scale]
                on.extend(point["on_target"])
                off.extend(point["off_target_added"])
                unit = steer["alpha_unit"]
    if not pooled:
        return "(no steering measurement in this run)"
    lines = [f"alpha in units of the RMS centred norm at the site ({unit:.1f}); per position, mean over latents "
             "[95% CI over latents]:\n",
             "| SAE | alpha | latents | on-target change | added to other tokens | on-target / added |",
             "|---|---:|---:|---:|---:|---:|"]
    for family in ("topk", "gsae"):
        for scale, (on, off) in sorted(pooled[family].items()):
            ratio = np.mean(on) / np.mean(off) if np.mean(off) > 0 else float("nan")
            lines.append(f"| {dict(topk='TopK', gsae='g-SAE')[family]} | {scale:g} | {len(on)} | {mean_ci(on)} | "
                         f"{mean_ci(off)} | {ratio:.3f} |")
    lines += ["", "g-SAE over TopK, ratio of the mean per-latent change [95% CI, latents resampled within each family]:",
              "", "| alpha | on-target g-SAE / TopK | added to other tokens g-SAE / TopK |", "|---:|---:|---:|"]
    for scale in sorted(set(pooled["topk"]) & set(pooled["gsae"])):
        cells = [ratio_ci(pooled["gsae"][scale][i], pooled["topk"][scale][i]) for i in (0, 1)]
        lines.append(f"| {scale:g} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def ratio_ci(a, b) -> str:
    """mean(a) / mean(b) with a BCa interval from resampling a and b independently (different latents)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ci = stats.bootstrap((a, b), lambda x, y, axis=-1: x.mean(axis=axis) / y.mean(axis=axis), n_resamples=2000,
                         method="BCa", vectorized=True, paired=False, rng=np.random.default_rng(0))
    return f"{a.mean() / b.mean():.3f} [{ci.confidence_interval.low:.3f}, {ci.confidence_interval.high:.3f}]"


def analyses_table(groups) -> str:
    """Paper B's decoder analyses at each k (seeds averaged): mean max cosine to another decoder row, and the mean
    |directional derivative| of the loss along decoder rows against random and covariance-matched directions."""
    lines = ["| SAE | k | decoder max cos (mean) | abs. dir. derivative: decoder | random | covariance-matched |",
             "|---|---:|---:|---:|---:|---:|"]
    for (family, k, beta), rs in sorted(groups.items(), key=lambda g: (g[0][0], g[0][1], g[0][2] or 1.0)):
        if beta is not None or "decoder_max_cos" not in rs[0]:
            continue
        dd = [r["directional_derivative"] for r in rs]
        lines.append(f"| {dict(topk='TopK', gsae='g-SAE')[family]} | {k} | "
                     f"{spread([r['decoder_max_cos']['mean'] for r in rs], '{:.3f}')} | "
                     + " | ".join(spread([d[key] for d in dd], "{:.3g}")
                                  for key in ("decoder", "random", "covariance_matched")) + " |")
    return "\n".join(lines)


def paper_b(sweep) -> None:
    groups = paper_b_groups(sweep["results"])
    print("Per point (mean over seeds, min-max across seeds in brackets; beta 1 is the main g-SAE setting):\n")
    print(paper_b_point_table(groups) + "\n")
    print("Paired over the same held-out contexts (seeds averaged per context):\n")
    print(paired_l_added(groups) + "\n")
    print("PCA reference (rank-k reconstruction spliced in at the same site):\n")
    print(pca_lines(sweep["pca_reference"]) + "\n")
    print("Steering with single latents (paper B §4.2):\n")
    print(steering_table(groups) + "\n")
    print("Decoder analyses (paper B §4.3-4.4):\n")
    print(analyses_table(groups) + "\n")


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
        if run == "paper_b":
            paper_b(sweep)
            print("Per SAE, with 95% bootstrap intervals over held-out contexts:\n")
            print(ci_table(rows) + "\n")
            continue
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
