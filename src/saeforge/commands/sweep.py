"""`saeforge sweep`: train a grid of SAEs from one activation stream and evaluate every one (CSV, JSON, Pareto
figures with the PCA line)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Optional

from tyro.conf import Positional

from saeforge.commands.evaluate import evaluate_run
from saeforge.commands.output import print_report, write_csv, write_json
from saeforge.config import ConfigError, RunConfig, load_config, to_dict
from saeforge.evaluation.compare import matched_l0_table
from saeforge.files import check_writable_dir
from saeforge.models import load_lm
from saeforge.saes import REGISTRY
from saeforge.training import Trainer
from saeforge.training.trainer import sae_name, sae_width


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
