"""Figures of one evaluation (rows from `saeforge.evaluation.evaluate_saes`), drawn with matplotlib's Agg canvas.

Each function draws what the rows carry and returns the PNG path, or None when no row has the data."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from saeforge.evaluation.compare import setting, variant_of


def save_figure(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _centers(edges: list[float]) -> np.ndarray:
    e = np.asarray(edges)
    return (e[:-1] + e[1:]) / 2


def firing_frequency_figure(rows: list[dict], path: Path, title: str) -> Path | None:
    """Histogram of log10 firing frequency (live latents) and its CDF over all latents."""
    rows = [r for r in rows if "firing_log10_hist" in r]
    if not rows:
        return None
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    hist_ax, cdf_ax = fig.subplots(1, 2)
    for r in rows:
        h = r["firing_log10_hist"]
        label = f"{r['name']} (dead {h['dead']}/{r['d_sae']})"
        hist_ax.step(_centers(h["edges"]), h["counts"], where="mid", label=label)
        cdf_ax.plot(h["edges"], h["cdf"], label=r["name"])
    hist_ax.set(xlabel="log10 firing frequency (fraction of eval tokens)", ylabel="live latents per bin",
                title="Firing frequency of live latents")
    cdf_ax.set(xlabel="log10 firing frequency (fraction of eval tokens)", ylabel="fraction of latents at or below",
               title="CDF of firing frequency (dead latents at the left)", ylim=(0, 1.02))
    # Start the frequency axis a little below the rarest live latent of any SAE.
    lowest = min((e for r in rows for e, c in zip(r["firing_log10_hist"]["edges"], r["firing_log10_hist"]["counts"])
                  if c), default=-7.0)
    for ax in (hist_ax, cdf_ax):
        ax.set_xlim(max(-7.0, lowest - 0.5), 0.05)
    hist_ax.legend(fontsize=8)
    cdf_ax.legend(fontsize=8)
    fig.suptitle(title)
    return save_figure(fig, path)


def decoder_similarity_figure(rows: list[dict], path: Path, title: str) -> Path | None:
    """Histogram of each decoder row's max cosine similarity to the other rows (feature-splitting proxy)."""
    rows = [r for r in rows if "decoder_max_cos" in r]
    if not rows:
        return None
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for r in rows:
        h = r["decoder_max_cos"]
        density = np.asarray(h["counts"]) / max(1, sum(h["counts"]))
        ax.step(_centers(h["edges"]), density, where="mid", label=f"{r['name']} (mean {h['mean']:.3f})")
    ax.set(xlabel="max cosine similarity of a decoder row to any other row", ylabel="fraction of latents",
           title=f"Decoder similarity (paper B Fig. 8)\n{title}")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def directional_derivative_figure(rows: list[dict], path: Path, title: str) -> Path | None:
    """Mean |dL/du| along decoder directions, next to isotropic and covariance-matched random directions."""
    rows = [r for r in rows if "directional_derivative" in r]
    if not rows:
        return None
    labels = [r["name"] for r in rows] + ["random (isotropic)", "random (covariance-matched)"]
    values = [r["directional_derivative"]["decoder"] for r in rows]
    values += [rows[0]["directional_derivative"]["random"], rows[0]["directional_derivative"]["covariance_matched"]]
    colors = ["tab:blue"] * len(rows) + ["tab:gray", "tab:olive"]
    fig = Figure(figsize=(max(6, 1.3 * len(labels)), 4.5), layout="constrained")
    ax = fig.subplots()
    ax.bar(range(len(labels)), values, color=colors)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="mean |grad CE . u| over tokens (unit u)",
           title=f"Loss sensitivity along unit directions (paper B §2.3)\n{title}")
    return save_figure(fig, path)


def ito_figure(rows: list[dict], path: Path, title: str, pca_reference: list[dict] = ()) -> Path | None:
    """L0 vs loss recovered: each SAE's encoder, gradient pursuit with its decoder at each L0 target, and the PCA
    reference (rank k at x = k, dashed)."""
    ito_rows = [r for r in rows if r.get("ito_k") is not None]
    if not ito_rows:
        return None
    metric = "loss_recovered_zero" if "loss_recovered_zero" in ito_rows[0] else "loss_recovered_mean"
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for base in [r for r in rows if r.get("ito_k") is None]:
        mine = sorted((r for r in ito_rows if r["name"].startswith(base["name"] + "@ito")), key=lambda r: r["l0"])
        line = ax.plot([r["l0"] for r in mine], [r[metric] for r in mine], "o--", label=f"{base['name']}: ITO")[0]
        ax.plot([base["l0"]], [base[metric]], "*", ms=14, color=line.get_color(), label=f"{base['name']}: encoder")
    ref = sorted([r for r in pca_reference if r.get(metric) is not None], key=lambda r: r["rank"])
    if ref:
        ax.plot([r["rank"] for r in ref], [r[metric] for r in ref], "s--", color="gray", ms=4,
                label="PCA rank k (x = k)")
    ax.set(xlabel="L0 (mean active latents per token)", ylabel=f"loss recovered ({metric.split('_')[-1]} ablation)",
           title=f"Inference-time optimisation (gradient pursuit)\n{title}")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def steering_figure(rows: list[dict], path: Path, title: str) -> Path | None:
    """On-target probability change and probability added to all other tokens against the push size, one line per
    variant and setting (the mean over its seeds and sampled latents)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if isinstance(r.get("steering"), dict) and "sweep" in r["steering"]:
            groups[(variant_of(r), setting(r))].append(r["steering"])
    if not groups:
        return None
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    on_ax, off_ax = fig.subplots(1, 2)
    for (name, (key, value)), runs in sorted(groups.items(), key=lambda g: (g[0][0], str(g[0][1]))):
        scales = runs[0]["alpha_scales"]
        on = np.mean([[point["mean_on_target"] for point in run["sweep"]] for run in runs], axis=0)
        off = np.mean([[point["mean_off_target_added"] for point in run["sweep"]] for run in runs], axis=0)
        label = f"{name} {key}={value:g} (n={len(runs)})" if isinstance(value, (int, float)) else f"{name} {value}"
        on_ax.plot(scales, on, "o-", label=label)
        off_ax.plot(scales, off, "o-", label=label)
    unit = next(iter(groups.values()))[0]["alpha_unit"]
    for ax, what in ((on_ax, "on-target change (top-n tokens)"), (off_ax, "probability added to all other tokens")):
        ax.set(xscale="log", xlabel=f"alpha / RMS centred norm ({unit:.3g})", ylabel=f"{what} per position")
    on_ax.set_title("Steering with single latents (paper B §4.2): higher is stronger", fontsize=9)
    off_ax.set_title("Specificity: lower is better", fontsize=9)
    fig.suptitle(title, fontsize=9)
    on_ax.legend(fontsize=7)
    return save_figure(fig, path)


def eval_figures(rows: list[dict], out_dir: Path, title: str, prefix: str = "",
                 pca_reference: list[dict] = ()) -> list[Path]:
    """Every figure the rows support, written to out_dir; returns their paths."""
    out_dir = Path(out_dir)
    drawn = [
        firing_frequency_figure(rows, out_dir / f"{prefix}firing_frequency.png", title),
        decoder_similarity_figure(rows, out_dir / f"{prefix}decoder_max_cosine.png", title),
        directional_derivative_figure(rows, out_dir / f"{prefix}directional_derivatives.png", title),
        ito_figure(rows, out_dir / f"{prefix}ito_l0_vs_loss_recovered.png", title, pca_reference),
        steering_figure(rows, out_dir / f"{prefix}steering.png", title),
    ]
    return [p for p in drawn if p is not None]
