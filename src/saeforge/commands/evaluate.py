"""`saeforge eval`: held-out evaluation of saved SAEs.

Output: a JSON file whose "results" list holds one row per SAE (see `evaluation.evaluate_saes` for the keys), whose
"pca_reference" list holds the PCA reference rows and whose "matched_l0" list holds the matched-L0 comparisons
(evaluation.compare), a Markdown table on the terminal (delta-CE, KL and loss recovered first, with bootstrap CIs in
brackets), and PNG figures. `evaluate_run` is the same for the SAEs of a finished run (sweep, demo).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path
from typing import Literal, Optional

from tyro.conf import Positional

from saeforge.commands.output import print_report, write_json
from saeforge.config import ConfigError, DataConfig, EvalConfig, RunConfig, to_dict
from saeforge.data import eval_contexts
from saeforge.evaluation.compare import matched_l0_table
from saeforge.evaluation.evaluate import evaluate
from saeforge.files import check_writable_dir
from saeforge.models import load_lm, site_width_before_loading
from saeforge.saes import load_sae
from saeforge.viz.eval_figures import eval_figures
from saeforge.viz.pareto import pareto_figures


def load_for_command(d: Path, model: str | None, site: str | None, context_len: int | None):
    """A saved SAE and the (model, site, context length) a command runs it at: the flags where given, else its
    cfg.json's model_name, hook_name and context_size (else 128). Returns (sae, model, site, context_len)."""
    sae = load_sae(d)
    return (sae, *sae.meta.where_it_runs(model, site, context_len, f"{d}/cfg.json"))


def check_widths(entries: list[tuple[Path, int]], site: str, model_name: str, d_site: int | None) -> None:
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
        sae, m, s, ctx = load_for_command(d, model, site, context_len)
        groups[(m, s, ctx)].append((d, sae.d_in))
    check_writable_dir(out, "--out")
    for (model_name, site_name, _), entries in groups.items():  # from config.json, before any weights load
        check_widths(entries, site_name, model_name, site_width_before_loading(model_name, site_name))

    rows, pca, figures = [], [], []
    for gi, ((model_name, site_name, ctx), entries) in enumerate(groups.items()):
        lm = load_lm(model_name, device=device, dtype=dtype)
        print(f"language model: {lm.precision.describe()}", file=sys.stderr)
        check_widths(entries, site_name, lm.name, lm.site_dim(site_name))
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


def _pca_fit_contexts(lm, data_cfg: DataConfig, cfg: EvalConfig):
    """The training-split sample the PCA reference is fitted on, or None (fit on the eval set; no reference)."""
    if not cfg.pca_ranks or cfg.pca_fit_tokens == 0:
        return None
    return eval_contexts(lm, data_cfg, cfg.pca_fit_tokens, cfg.batch_size, split="train")


def evaluate_run(lm, cfg: RunConfig, sae_dirs: list[Path], out: Path, *, progress: bool = True):
    """Evaluate a run's SAEs on held-out tokens of its model, site and corpus, with the PCA reference, and draw the
    Pareto and evaluation figures into `out`. Returns (rows, PCA reference rows, figure paths)."""

    contexts = eval_contexts(lm, cfg.data, cfg.eval.tokens, cfg.eval.batch_size)
    result = evaluate(lm, sae_dirs, cfg.model.site, contexts, cfg.eval, keep_bos=cfg.data.keep_bos,
                      seed=cfg.train.seed, progress=progress,
                      pca_fit_contexts=_pca_fit_contexts(lm, cfg.data, cfg.eval))
    rows, pca = result.rows, result.pca_reference
    figures = pareto_figures(rows, out, lm.name, cfg.model.site, pca_reference=pca)
    figures += eval_figures(rows, out, f"{lm.name} @ {cfg.model.site}", pca_reference=pca)
    return rows, pca, figures
