"""`saeforge demo`: the main job end to end on the embedded model, sized for minutes on 2 CPU cores.

Gemma 3 270M (embedded) -> Wikipedia leads (embedded) -> a residual site -> an activation cache (harvested once,
kept under the output directory) -> Gated SAEs and ReLU baselines 1.5x wider (paper A's equal compute), trained
together from the cache for several epochs at L0 targets -> evaluated on held-out text against a PCA reference ->
a table of delta-CE, KL, loss recovered (with bootstrap CIs), L0, shrinkage and dead latents, the matched-L0
comparison, and the paths of figures and SAEs.

The precision follows the hardware (bf16 only where it is fast), so the same demo fits its time budget on CPUs with
and without native bf16.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from saeforge.config import DataConfig, EvalConfig, ModelConfig, RunConfig, SAESpec, TrainConfig, to_dict
from saeforge.commands.evaluate import evaluate_run
from saeforge.commands.output import ci_cell, write_json
from saeforge.data import harvest
from saeforge.evaluation.compare import matched_l0_ratio
from saeforge.models import load_lm
from saeforge.training import Trainer

DEMO_SITE = "blocks.6.resid_post"


def demo_config(out: Path, site: str, harvest_tokens: int, epochs: int, eval_tokens: int, d_sae: int,
                gated_l0: tuple[float, ...], relu_l0: tuple[float, ...]) -> RunConfig:
    """The demo's run: Gated SAEs of d_sae latents and ReLU baselines of 1.5 d_sae, one per L0 target each."""
    batch_size = 512
    return RunConfig(
        model=ModelConfig(name="embedded", site=site, dtype="auto"),
        data=DataConfig(source="embedded", context_len=128, cache_dir=str(out / "activations"),
                        buffer_tokens=harvest_tokens),
        train=TrainConfig(
            tokens=epochs * harvest_tokens, batch_size=batch_size, lr=1e-3, lr_decay="linear",
            checkpoint_every=10**9, log_every=50, compute_dtype="auto", out_dir=str(out / "saes"),
        ),
        eval=EvalConfig(tokens=eval_tokens, batch_size=8, ablation=("zero", "mean"), analyses=False,
                        pca_ranks=(16, 64), out_dir=str(out / "eval")),
        sae=[SAESpec(architecture="gated", name=f"gated_l0_{t:g}", d_sae=d_sae, target_l0=t) for t in gated_l0]
        + [SAESpec(architecture="relu", name=f"relu_l0_{t:g}", d_sae=d_sae * 3 // 2, target_l0=t) for t in relu_l0],
    )


def demo_table(rows: list[dict], pca: list[dict] = ()) -> str:
    """Markdown: one line per SAE (CIs in brackets), then the PCA reference lines."""
    head = ("| SAE | latents | L0 | delta-CE (nats) | KL | loss recovered (mean abl.) | loss recovered (zero abl.) "
            "| gamma about b_dec | dead fraction |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['d_sae']} | {r['l0']:.1f} | {ci_cell(r, 'delta_ce', '{:.3f}')} | "
                     f"{ci_cell(r, 'kl_div', '{:.3f}')} | {ci_cell(r, 'loss_recovered_mean', '{:.3f}')} | "
                     f"{ci_cell(r, 'loss_recovered_zero', '{:.3f}')} | {r['gamma_centered']:.3f} | "
                     f"{r['dead_fraction']:.3f} |")
    for p in pca:
        lines.append(f"| PCA rank {p['rank']} | - | {p['rank']} | {ci_cell(p, 'delta_ce', '{:.3f}')} | "
                     f"{ci_cell(p, 'kl_div', '{:.3f}')} | {ci_cell(p, 'loss_recovered_mean', '{:.3f}')} | "
                     f"{ci_cell(p, 'loss_recovered_zero', '{:.3f}')} | - | - |")
    return "\n".join(lines)


def _cache_ready(cache_dir: Path, lm_name: str, site: str, tokens: int, context_len: int) -> bool:
    """A finished harvest of this model, site and size is already there (its shards are verified when read)."""
    try:
        manifest = json.loads((cache_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return (manifest.get("model") == lm_name and manifest.get("site") == site and manifest.get("tokens") == tokens
            and manifest.get("context_len") == context_len and manifest.get("split") == "train")


def demo_command(
    out: Path = Path("runs/demo"),
    site: str = DEMO_SITE,
    harvest_tokens: int = 131_072,
    epochs: int = 8,
    eval_tokens: int = 4_096,
    d_sae: int = 1024,
    gated_l0: tuple[float, ...] = (25.0, 60.0),
    relu_l0: tuple[float, ...] = (40.0, 100.0),
    progress: bool = True,
) -> None:
    """Train Gated SAEs and 1.5x wider ReLU baselines on the embedded Gemma 3 270M at L0 targets, evaluate them
    on held-out text against a PCA reference, and print a table.

    Args:
        out: where the activation cache, SAEs, TensorBoard logs, eval JSON and figures go (the cache is reused by
            a later demo with the same site and size).
        site: the activation site.
        harvest_tokens: training tokens harvested from the LM into the cache, once.
        epochs: passes over the cache (reshuffled each time).
        eval_tokens: held-out tokens for evaluation.
        d_sae: latents of each Gated SAE; each baseline gets 1.5x as many (paper A's equal compute).
        gated_l0: L0 targets of the Gated SAEs (one SAE each).
        relu_l0: L0 targets of the ReLU baselines (one SAE each).
        progress: show progress bars.
    """

    t0 = time.time()
    out = Path(out)
    cfg = demo_config(out, site, harvest_tokens, epochs, eval_tokens, d_sae, tuple(gated_l0), tuple(relu_l0))

    def say(msg: str) -> None:
        print(f"[demo {time.time() - t0:6.0f}s] {msg}", file=sys.stderr, flush=True)

    say("loading the embedded Gemma 3 270M (the first run converts the GGUF file once and caches it)")
    lm = load_lm(cfg.model)
    say(f"model {lm.name}: {lm.n_layers} layers, d_model {lm.d_model}; site {site}")
    say(f"language model: {lm.precision.describe()}")
    cache_dir = Path(cfg.data.cache_dir)
    if _cache_ready(cache_dir, lm.name, site, harvest_tokens, cfg.data.context_len):
        say(f"reusing the activation cache {cache_dir}")
    else:
        say(f"harvesting {harvest_tokens:,} training tokens at {site} into {cache_dir}")
        harvest(lm, site, cfg.data.source, cache_dir, tokens=harvest_tokens, context_len=cfg.data.context_len,
                dtype="float32", model_spec=cfg.model.name, progress=progress)
    names = ", ".join(s.name for s in cfg.sae)
    say(f"training {names} for {epochs} epochs of the cache ({cfg.train.tokens:,} tokens)")
    result = Trainer(cfg, lm=lm, progress=progress).run(overwrite=True)
    say(f"trained {result.steps} steps; evaluating on {eval_tokens:,} held-out tokens")
    eval_dir = Path(cfg.eval.out_dir)
    rows, pca, figures = evaluate_run(lm, cfg, list(result.sae_dirs.values()), eval_dir, progress=progress)
    comparison = matched_l0_ratio(rows, "gated", "relu", metric="loss_recovered_mean")
    write_json(eval_dir / "eval.json", {"config": to_dict(cfg), "precision": lm.precision.record(), "results": rows,
                                        "pca_reference": pca, "matched_l0": comparison})
    say("done")

    print(f"\nsaeforge demo: {lm.name} @ {site}, {result.tokens_seen:,} training tokens ({epochs} epochs of "
          f"{harvest_tokens:,}), {rows[0]['eval_tokens']:,} held-out tokens, {time.time() - t0:.0f} s\n"
          f"{lm.precision.describe()}\n")
    print(demo_table(rows, pca))
    print(f"\nclean CE {rows[0]['ce_clean']:.3f} nats; [lo, hi]: 95% bootstrap intervals over held-out contexts. "
          "gamma < 1 means shrunk reconstructions (paper A), measured about b_dec (the residual mean it carries).")
    print(f"matched L0 (gated / relu at equal loss recovered): {comparison.get('summary', comparison)}\n")
    print(f"results:     {eval_dir / 'eval.json'}")
    for p in figures:
        print(f"figure:      {p}")
    for name, path in result.sae_dirs.items():
        print(f"SAE {name + ':':<15} {path}")
    print(f"tensorboard: tensorboard --logdir {Path(cfg.train.out_dir) / 'tensorboard'}")
