"""Pareto figures of a sweep: one line per architecture through its SAEs, sorted by L0, with bootstrap CIs as
error bars where the rows carry them, and on every L0-vs-fidelity figure the PCA reference as a dashed line (the
rank-k reconstruction at x = k: an SAE at L0 k below it is suspect)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from saeforge.evaluation.compare import setting, variant_of
from saeforge.evaluation.metrics import finite_ci, is_finite_number
from saeforge.viz.eval_figures import save_figure

L0_LABEL = "L0 (mean active latents per token)"


def _by_architecture(rows: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r.get("ito_k") is None:
            groups[variant_of(r)].append(r)  # ablation variants get their own line
    return dict(groups)


def _error_bars(rows: list[dict], y_key: str):
    """[2, n] distances from each value to its CI ends, or None when any row lacks a finite CI."""
    cis = [finite_ci(r, y_key) for r in rows]
    if not all(cis):
        return None
    below = [max(0.0, r[y_key] - c[0]) for r, c in zip(rows, cis)]
    above = [max(0.0, c[1] - r[y_key]) for r, c in zip(rows, cis)]
    return [below, above]


def _line_plot(rows: list[dict], x_key: str, y_key: str, path: Path, *, xlabel: str, ylabel: str, title: str,
               log_x: bool | None = None, hline: float | None = None, annotate: bool = True,
               reference: list[dict] = ()) -> Path | None:
    """One line per architecture; each setting labelled once with its k, L0 target or sparsity coefficient (seeds
    are points of their own); CI error bars; the reference rows (PCA, x = rank) as a dashed line."""
    groups = _by_architecture(rows)
    points = {a: sorted([r for r in rs if is_finite_number(r.get(x_key)) and is_finite_number(r.get(y_key))], key=lambda r: r[x_key])
              for a, rs in groups.items()}
    points = {a: rs for a, rs in points.items() if rs}
    if not points:
        return None
    fig = Figure(figsize=(7, 4.8), layout="constrained")
    ax = fig.subplots()
    for arch, rs in sorted(points.items()):
        ax.errorbar([r[x_key] for r in rs], [r[y_key] for r in rs], yerr=_error_bars(rs, y_key), fmt="o-",
                    capsize=2, label=arch)
        if annotate:
            labelled = {}
            for r in rs:
                labelled.setdefault(setting(r), r)
            for (_, value), r in labelled.items():
                if is_finite_number(value):
                    ax.annotate(f"{value:g}", (r[x_key], r[y_key]), fontsize=7, xytext=(3, 3),
                                textcoords="offset points")
    xs = [r[x_key] for rs in points.values() for r in rs]
    ref = sorted([r for r in reference if is_finite_number(r.get(y_key))], key=lambda r: r["rank"])
    if ref:
        ax.errorbar([r["rank"] for r in ref], [r[y_key] for r in ref], yerr=_error_bars(ref, y_key), fmt="s--",
                    color="gray", ms=4, capsize=2, label="PCA rank k (x = k)")
        for r in ref:
            ax.annotate(f"{r['rank']}", (r["rank"], r[y_key]), fontsize=7, color="gray", xytext=(3, -9),
                        textcoords="offset points")
        xs += [r["rank"] for r in ref]
    if log_x is None:
        log_x = min(xs) > 0 and max(xs) / min(xs) > 8
    if log_x:
        ax.set_xscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)
    if x_key == "k":  # a few discrete values: tick exactly those
        ax.set_xticks(sorted(set(xs)), [f"{v:g}" for v in sorted(set(xs))])
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    if hline is not None:
        ax.axhline(hline, color="gray", lw=0.8, ls=":")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(title="architecture (points: k, L0 target or lambda)" if annotate else "architecture", fontsize=8)
    return save_figure(fig, path)


def pareto_figures(rows: list[dict], out_dir: Path, model: str, site: str,
                   pca_reference: list[dict] = ()) -> list[Path]:
    """L0 vs delta-CE, KL and loss recovered (each ablation), each with the PCA reference line; L0 vs gamma, L0 vs
    NMSE, and dead fraction vs k; returns the paths."""
    out_dir = Path(out_dir)
    where = f"{model} @ {site}"
    ci = " (bars: bootstrap CI over contexts)" if any(r.get("delta_ce_ci") for r in rows) else ""
    drawn = [
        _line_plot(rows, "l0", "delta_ce", out_dir / "pareto_l0_vs_delta_ce.png", xlabel=L0_LABEL,
                   ylabel="delta CE = CE spliced - CE clean (nats/token)", title=f"Sparsity vs delta CE{ci}\n{where}",
                   hline=0.0, reference=pca_reference),
        _line_plot(rows, "l0", "kl_div", out_dir / "pareto_l0_vs_kl.png", xlabel=L0_LABEL,
                   ylabel="KL(clean || spliced) (nats/token)", title=f"Sparsity vs KL{ci}\n{where}", hline=0.0,
                   reference=pca_reference),
    ]
    for kind in ("zero", "mean"):
        drawn.append(_line_plot(
            rows, "l0", f"loss_recovered_{kind}", out_dir / f"pareto_l0_vs_loss_recovered_{kind}.png",
            xlabel=L0_LABEL, ylabel=f"loss recovered vs {kind} ablation (1 = clean model)",
            title=f"Sparsity vs fidelity ({kind} ablation){ci}\n{where}", hline=1.0, reference=pca_reference))
    drawn.append(_line_plot(rows, "l0", "gamma", out_dir / "pareto_l0_vs_gamma.png", xlabel=L0_LABEL,
                            ylabel="relative reconstruction bias gamma (1 = unbiased, < 1 = shrinkage)",
                            title=f"Shrinkage (paper A eq. 9, corrected)\n{where}", hline=1.0))
    if any(is_finite_number(r.get("gamma_centered")) for r in rows):
        drawn.append(_line_plot(rows, "l0", "gamma_centered", out_dir / "pareto_l0_vs_gamma_centered.png",
                                xlabel=L0_LABEL, ylabel="gamma of x - b_dec and x_hat - b_dec (< 1 = shrinkage)",
                                title=f"Shrinkage of the part the latents reconstruct\n{where}", hline=1.0))
    drawn.append(_line_plot(rows, "l0", "nmse", out_dir / "pareto_l0_vs_nmse.png", xlabel=L0_LABEL,
                            ylabel="NMSE = mean ||x - x_hat|| / ||x||",
                            title=f"Sparsity vs reconstruction error\n{where}", reference=pca_reference))
    drawn.append(_line_plot(rows, "k", "dead_fraction", out_dir / "dead_fraction_vs_k.png",
                            xlabel="k (latents kept per token)", ylabel="dead fraction (never fire on eval tokens)",
                            title=f"Dead latents vs k\n{where}", log_x=True, annotate=False))
    drawn.append(_line_plot(rows, "l0", "dead_fraction", out_dir / "dead_fraction_vs_l0.png", xlabel=L0_LABEL,
                            ylabel="dead fraction (never fire on eval tokens)",
                            title=f"Dead latents vs sparsity, every architecture\n{where}"))
    return [p for p in drawn if p is not None]
