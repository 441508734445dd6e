"""`saeforge eval` and `saeforge sweep`: held-out evaluation of saved SAEs, and a trained-and-evaluated grid.

Output of both: a JSON file whose "results" list holds one row per SAE (see `evaluate_saes` for the keys), whose
"pca_reference" list holds the PCA reference rows (see `evaluate`) and whose "matched_l0" list holds the matched-L0
comparisons (compare.py), a Markdown table on the terminal (delta-CE, KL and loss recovered first, with bootstrap
CIs in brackets), and PNG figures; the sweep also writes a CSV and the Pareto figures (with the PCA line).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Literal, Optional

import torch
from tyro.conf import Positional

from saeforge.config import ConfigError, DataConfig, EvalConfig, RunConfig, load_config, to_dict
from saeforge.evaluation.compare import matched_l0_table
from saeforge.evaluation.evaluate import evaluate, sae_max_input_norm
from saeforge.evaluation.metrics import finite_ci, is_finite_number
from saeforge.files import check_writable_dir, write_atomic
from saeforge.saes import REGISTRY

# Loss-based metrics, in the order they lead the table and the CSV; each has a bootstrap CI (`<key>_ci`).
LOSS_COLUMNS = ["delta_ce", "kl_div", "loss_recovered_mean", "loss_recovered_zero", "l_added"]
# Scalar columns of the CSV, in order (the JSON rows hold these, the histograms and the per-context arrays); a CI
# [lo, hi] is written as <key>_ci_lo and <key>_ci_hi.
CSV_COLUMNS = [
    "name", "architecture", "variant", "model", "site", "d_in", "d_sae", "k", "sparsity_coeff", "target_l0", "ito_k",
    "l0", *[c for key in LOSS_COLUMNS for c in (key, f"{key}_ci_lo", f"{key}_ci_hi")],
    "ce_clean", "ce_spliced", "ce_zero_ablation", "ce_mean_ablation", "mse", "nmse", "fvu", "cosine", "gamma",
    "gamma_centered", "dead_fraction", "dense_fraction", "eval_contexts", "eval_tokens", "eval_excluded_positions",
    "max_input_norm", "path",
]
# (column, header, format) of the terminal table; a row's `<column>_ci` is shown in brackets after the value.
TABLE_COLUMNS = [
    ("l0", "L0", "{:.1f}"), ("delta_ce", "delta CE (nats)", "{:.4f}"), ("kl_div", "KL", "{:.4f}"),
    ("loss_recovered_mean", "loss rec. (mean)", "{:.2%}"), ("loss_recovered_zero", "loss rec. (zero)", "{:.2%}"),
    ("l_added", "L_added", "{:.2%}"), ("nmse", "NMSE", "{:.3f}"), ("fvu", "FVU", "{:.3f}"), ("cosine", "cos", "{:.3f}"),
    ("gamma", "gamma", "{:.3f}"), ("dead_fraction", "dead", "{:.1%}"), ("dense_fraction", "dense", "{:.1%}"),
]


def eval_contexts(lm, data_cfg: DataConfig, tokens: int, batch_size: int = 4, split: str = "eval") -> torch.Tensor:
    """Held-out contexts (split="eval") of data_cfg.source: enough [context_len] contexts to hold `tokens` tokens,
    or all of them when the split is smaller. split="train": the first contexts of the training split (the PCA
    reference's fit sample)."""
    from saeforge.data import context_batches

    n_contexts = max(1, math.ceil(tokens / data_cfg.context_len))
    picked: list[torch.Tensor] = []
    for batch in context_batches(lm, data_cfg, split, batch_size):
        picked.extend(batch)
        if len(picked) >= n_contexts:
            break
    if not picked:
        raise ValueError(f"the {split} split of {data_cfg.source!r} holds no full context of "
                         f"{data_cfg.context_len} tokens")
    if len(picked) < n_contexts:
        print(f"note: the {split} split of {data_cfg.source!r} holds only "
              f"{len(picked) * data_cfg.context_len:,} tokens of the {tokens:,} asked for; using all of them",
              file=sys.stderr)
    return torch.stack(picked[:n_contexts])


def ci_cell(row: dict, key: str, fmt: str) -> str:
    """A table cell: the value, its interval in brackets when it has one, "-" when it has no finite value."""
    value, ci = row.get(key), finite_ci(row, key)
    if not is_finite_number(value):
        return "-"
    return fmt.format(value) + (f" [{fmt.format(ci[0])}, {fmt.format(ci[1])}]" if ci else "")


def markdown_table(rows: list[dict]) -> str:
    """A short Markdown table of the headline metrics, one line per SAE; CIs in brackets."""
    cols = [c for c in TABLE_COLUMNS if any(c[0] in r for r in rows)]
    lines = ["| SAE | arch | " + " | ".join(h for _, h, _ in cols) + " |",
             "|---|---|" + "---:|" * len(cols)]
    for r in rows:
        cells = [ci_cell(r, key, fmt) for key, _, fmt in cols]
        lines.append(f"| {r['name']} | {r['architecture']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pca_table(reference: list[dict]) -> str:
    """The PCA reference as a Markdown table (the L0 column holds the rank)."""
    return markdown_table([{**r, "l0": r["rank"]} for r in reference])


def write_csv(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            flat = dict(r)
            for key in LOSS_COLUMNS:
                ci = r.get(f"{key}_ci")
                if isinstance(ci, (list, tuple)) and len(ci) == 2:
                    flat[f"{key}_ci_lo"], flat[f"{key}_ci_hi"] = ci
            writer.writerow({k: ("" if flat.get(k) is None else flat.get(k)) for k in CSV_COLUMNS})
    return path


def print_report(rows: list[dict], pca: list[dict], matched: list[dict]) -> None:
    """The terminal report of eval and sweep: the SAE table, the PCA reference, the matched-L0 lines."""
    print(markdown_table(rows))
    if pca:
        print(f"\nPCA reference (rank-k reconstruction spliced in; principal directions from {pca[0]['fit']}; "
              "L0 column = rank):")
        print(pca_table(pca))
    if any(r.get("delta_ce_ci") for r in rows):
        print("\n[lo, hi]: bootstrap confidence intervals over held-out contexts.")
    for m in matched:
        print(m["summary"])


def finite_or_null(value):
    """The payload with NaN and infinities as None, so the file is JSON that strict parsers read (a metric that
    could not be computed, e.g. gamma with no active latents, is null)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def write_json(path: Path, payload: dict) -> Path:
    """Strict JSON (NaN as null), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(finite_or_null(payload), indent=1, allow_nan=False))
    return path


def _check_widths(entries: list[tuple[Path, int]], site: str, model_name: str, d_site: int | None) -> None:
    for d, d_in in entries:
        if d_site is not None and d_in != d_site:
            raise ConfigError(f"SAE {d} has d_in = {d_in}, but site {site!r} of {model_name} has width {d_site}: "
                              "the SAE was trained on another site or model (pass --site/--model?)")


def eval_command(
    sae_dirs: Positional[list[Path]],
    out: Path = Path("eval_out"),
    tokens: int = 32768,
    ito: tuple[int, ...] = (),
    steering: bool = False,
    steering_latents: int = 16,
    steering_alphas: tuple[float, ...] = EvalConfig.steering_alphas,
    model: Optional[str] = None,
    site: Optional[str] = None,
    source: str = "embedded",
    context_len: Optional[int] = None,
    batch_size: int = 4,
    device: str = "cpu",
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
    keep_bos: bool = False,
    analyses: bool = True,
    pca_ranks: tuple[int, ...] = EvalConfig.pca_ranks,
    pca_fit_tokens: int = EvalConfig.pca_fit_tokens,
    ci_level: float = EvalConfig.ci_level,
    bootstrap_resamples: int = EvalConfig.bootstrap_resamples,
    seed: int = 0,
    progress: bool = True,
) -> None:
    """Evaluate saved SAEs on held-out tokens of their model, site and corpus.

    Writes OUT/eval.json (one row of metrics per SAE, the PCA reference, matched-L0 comparisons), PNG figures in
    OUT, and prints a Markdown table.

    Args:
        sae_dirs: saved SAE directories (cfg.json + sae_weights.safetensors).
        out: output directory.
        tokens: held-out tokens to evaluate on (whole contexts; BOS positions are not spliced).
        ito: L0 targets for inference-time optimisation by gradient pursuit with each SAE's decoder.
        steering: run paper B's steering measurement on a sample of latents.
        steering_latents: alive latents sampled per SAE for steering.
        steering_alphas: push sizes, as multiples of the site's RMS centred activation norm.
        model: the language model (else each SAE's cfg.json model_name).
        site: the site (else each SAE's cfg.json hook_name).
        source: text source of the held-out split ("embedded", a .txt/.jsonl/.parquet path, "hf:<id>").
        context_len: context length (else the SAE's context_size, else 128).
        batch_size: contexts per LM forward pass.
        device: where the LM and SAEs run.
        dtype: the LM's dtype ("auto": bf16 where this hardware runs it fast, else float32).
        keep_bos: also splice and score BOS positions (use when the SAE was trained with keep_bos).
        analyses: paper B's decoder-similarity and directional-derivative analyses.
        pca_ranks: ranks of the PCA reference (rank-k reconstruction spliced in); none: no reference.
        pca_fit_tokens: training-split tokens the principal directions are fitted on (0: the held-out tokens).
        ci_level: confidence level of the bootstrap intervals over held-out contexts.
        bootstrap_resamples: context resamples per interval (0: no intervals).
        seed: seed for sampled latents, random directions and bootstrap resamples.
        progress: show progress bars.
    """
    from saeforge.models import load_lm, site_width_before_loading
    from saeforge.saes import load_sae
    from saeforge.viz.eval_figures import eval_figures

    # Everything that can be checked without the language model is checked before it loads.
    if not sae_dirs:
        raise ConfigError("no SAE directories given (saeforge eval SAE_DIR [SAE_DIR ...])")
    try:
        cfg = EvalConfig(tokens=tokens, batch_size=batch_size, ito=tuple(ito), steering=steering, analyses=analyses,
                         steering_latents=steering_latents, steering_alphas=tuple(steering_alphas), pca_ranks=tuple(pca_ranks),
                         pca_fit_tokens=pca_fit_tokens, ci_level=ci_level, bootstrap_resamples=bootstrap_resamples)
        if context_len is not None:
            DataConfig(source=source, context_len=context_len)
    except ConfigError as e:
        raise ConfigError(f"command line: {e}") from e
    groups: dict[tuple[str, str, int], list[tuple[Path, int]]] = defaultdict(list)
    for d in map(Path, sae_dirs):
        sae = load_sae(d)
        sae_max_input_norm(sae, d.name)
        m, s = model or sae.cfg.get("model_name"), site or sae.cfg.get("hook_name")
        if not isinstance(m, str) or not m or not isinstance(s, str) or not s:
            raise ConfigError(f"{d}/cfg.json records no model_name/hook_name; pass --model and --site")
        ctx = context_len or sae.cfg.get("context_size") or 128
        if isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 2:
            raise ConfigError(f"{d}/cfg.json: context_size must be an integer of at least 2, got {ctx!r}; "
                              "pass --context-len")
        groups[(m, s, ctx)].append((d, sae.d_in))
    check_writable_dir(out, "--out")
    for (model_name, site_name, _), entries in groups.items():  # from config.json, before any weights load
        _check_widths(entries, site_name, model_name, site_width_before_loading(model_name, site_name))

    rows, pca, figures = [], [], []
    for gi, ((model_name, site_name, ctx), entries) in enumerate(groups.items()):
        lm = load_lm(model_name, device=device, dtype=dtype)
        print(f"language model: {lm.precision.describe()}", file=sys.stderr)
        _check_widths(entries, site_name, lm.name, lm.site_dim(site_name))
        dirs = [d for d, _ in entries]
        precision = lm.precision.record()
        data_cfg = DataConfig(source=source, context_len=ctx)
        contexts = eval_contexts(lm, data_cfg, tokens, batch_size)
        result = evaluate(lm, dirs, site_name, contexts, cfg, keep_bos=keep_bos, seed=seed, progress=progress,
                          pca_fit_contexts=_pca_fit_contexts(lm, data_cfg, cfg))
        prefix = "" if len(groups) == 1 else f"group{gi}_"
        figures += eval_figures(result.rows, out, f"{lm.name} @ {site_name}", prefix=prefix,
                                pca_reference=result.pca_reference)
        rows += result.rows
        pca += result.pca_reference
    matched = matched_l0_table(rows, level=cfg.ci_level, resamples=cfg.bootstrap_resamples, seed=seed)
    settings = {"tokens": tokens, "source": source, "keep_bos": keep_bos, "device": device, "dtype": dtype,
                "precision": precision,
                "seed": seed, **{k: v for k, v in to_dict(cfg).items() if not k.startswith("grid_")}}
    write_json(out / "eval.json", {"settings": settings, "results": rows, "pca_reference": pca,
                                   "matched_l0": matched, "figures": [str(p) for p in figures]})
    print_report(rows, pca, matched)
    print(f"\nresults: {out / 'eval.json'}")
    for p in figures:
        print(f"figure:  {p}")


# ------------------------------------------------------------------------------------------------------ sweep

def expand_grid(cfg: RunConfig) -> RunConfig:
    """Replace cfg.sae by the grid of cfg.eval.grid_* when grid_architectures is set (see EvalConfig)."""
    e = cfg.eval
    if not e.grid_architectures:
        return cfg
    template = cfg.sae[0]
    specs = []
    for arch in e.grid_architectures:
        cls = REGISTRY.get(arch)
        if cls is None or not cls.trainable:
            sweepable = sorted(name for name, c in REGISTRY.items() if c.trainable)
            raise ConfigError(f"eval.grid_architectures: {arch!r} cannot be swept; use one of {sweepable}")
        # Settings: relu/gated an L0 target each (grid_target_l0) or a lambda each (grid_sparsity_coeffs); topk
        # families a k each (grid_k, else the L0 targets rounded: k is their L0).
        if cls.sparsity == "coefficient":
            if e.grid_target_l0 and e.grid_sparsity_coeffs:
                raise ConfigError("eval.grid_target_l0: give L0 targets or eval.grid_sparsity_coeffs, not both")
            settings = ([{"target_l0": t, "sparsity_coeff": None, "k": None} for t in e.grid_target_l0]
                        or [{"sparsity_coeff": c, "target_l0": None, "k": None} for c in e.grid_sparsity_coeffs])
        else:
            ks = e.grid_k or tuple(max(1, round(t)) for t in e.grid_target_l0)
            settings = [{"k": k, "sparsity_coeff": None, "target_l0": None} for k in ks]
        if not settings:
            field_name = "grid_target_l0 (or grid_sparsity_coeffs)" if cls.sparsity == "coefficient" else \
                "grid_k (or grid_target_l0)"
            raise ConfigError(f"eval.{field_name}: needed to sweep {arch!r} (eval.grid_architectures)")
        # Architecture options (e.g. beta, tied) belong to the template's own architecture only.
        options = dict(template.options) if arch == template.architecture else {}
        for setting in settings:
            specs.append(dataclasses.replace(template, architecture=arch, name=None, options=options, **setting))
    return dataclasses.replace(cfg, sae=specs)


def _pca_fit_contexts(lm, data_cfg: DataConfig, cfg: EvalConfig):
    """The training-split sample the PCA reference is fitted on, or None (fit on the eval set; no reference)."""
    if not cfg.pca_ranks or cfg.pca_fit_tokens == 0:
        return None
    return eval_contexts(lm, data_cfg, cfg.pca_fit_tokens, cfg.batch_size, split="train")


def evaluate_run(lm, cfg: RunConfig, sae_dirs: list[Path], out: Path, *, progress: bool = True):
    """Evaluate a run's SAEs on held-out tokens of its model, site and corpus, with the PCA reference, and draw the
    Pareto and evaluation figures into `out`. Returns (rows, PCA reference rows, figure paths)."""
    from saeforge.viz.eval_figures import eval_figures
    from saeforge.viz.pareto import pareto_figures

    contexts = eval_contexts(lm, cfg.data, cfg.eval.tokens, cfg.eval.batch_size)
    result = evaluate(lm, sae_dirs, cfg.model.site, contexts, cfg.eval, keep_bos=cfg.data.keep_bos,
                      seed=cfg.train.seed, progress=progress,
                      pca_fit_contexts=_pca_fit_contexts(lm, cfg.data, cfg.eval))
    rows, pca = result.rows, result.pca_reference
    figures = pareto_figures(rows, out, lm.name, cfg.model.site, pca_reference=pca)
    figures += eval_figures(rows, out, f"{lm.name} @ {cfg.model.site}", pca_reference=pca)
    return rows, pca, figures


def sweep_command(
    config: Positional[Path],
    out: Optional[Path] = None,
    train: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    eval_tokens: Optional[int] = None,
    progress: bool = True,
) -> None:
    """Train a grid of SAEs from one activation stream, evaluate every SAE, write a CSV and Pareto figures.

    The grid is the config's [[sae]] list, or the compact eval.grid_* fields (see EvalConfig). Writes
    OUT/sweep.csv, OUT/sweep.json (rows, PCA reference, matched-L0 comparisons) and PNG figures (L0 vs delta-CE,
    KL and loss recovered with the PCA reference line, L0 vs gamma, L0 vs NMSE, dead fraction vs k, firing
    frequencies, ...).

    Args:
        config: the run file ([model], [data], [train], [eval], [[sae]]).
        out: output directory (else eval.out_dir, else <train.out_dir>/eval).
        train: train first; with --no-train, evaluate the SAEs a finished run saved under train.out_dir.
        resume: continue an interrupted training run.
        overwrite: retrain even though train.out_dir holds a checkpoint.
        eval_tokens: overrides eval.tokens.
        progress: show progress bars.
    """
    from saeforge.models import load_lm
    from saeforge.training import Trainer
    from saeforge.training.trainer import sae_name, sae_width

    cfg = expand_grid(load_config(config))
    if eval_tokens is not None:
        try:
            cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, tokens=eval_tokens))
        except ConfigError as e:
            raise ConfigError(f"command line (--eval-tokens): {e}") from e
    out = Path(out or cfg.eval.out_dir or Path(cfg.train.out_dir) / "eval")
    check_writable_dir(out, "the sweep's output directory (--out, eval.out_dir)")
    if train:
        check_writable_dir(cfg.train.out_dir, "train.out_dir")
    lm = load_lm(cfg.model)
    print(f"language model: {lm.precision.describe()}", file=sys.stderr)
    if train:
        sae_dirs = list(Trainer(cfg, lm=lm, progress=progress).run(resume=resume, overwrite=overwrite)
                        .sae_dirs.values())
    else:
        d_in = lm.site_dim(cfg.model.site)
        sae_dirs = [Path(cfg.train.out_dir) / sae_name(s, sae_width(s, d_in)) for s in cfg.sae]
        missing = [str(d) for d in sae_dirs if not (d / "cfg.json").is_file()]
        if missing:
            raise ConfigError(f"--no-train: these SAEs were not found: {missing}")

    rows, pca, figures = evaluate_run(lm, cfg, sae_dirs, out, progress=progress)
    matched = matched_l0_table(rows, level=cfg.eval.ci_level, resamples=cfg.eval.bootstrap_resamples,
                               seed=cfg.train.seed)
    csv_path = write_csv(rows, out / "sweep.csv")
    write_json(out / "sweep.json", {"config": to_dict(cfg), "precision": lm.precision.record(), "results": rows,
                                    "pca_reference": pca, "matched_l0": matched,
                                    "figures": [str(p) for p in figures]})
    print_report(rows, pca, matched)
    print(f"\ncsv:     {csv_path}\nresults: {out / 'sweep.json'}")
    for p in figures:
        print(f"figure:  {p}")
