"""`saeforge demo`: the main job end to end on the embedded model, sized for a few minutes on 2 CPU cores.

Gemma 3 270M (embedded) -> Wikipedia leads (embedded) -> a mid-depth residual site -> a Gated SAE and a ReLU
baseline 1.5x wider (paper A's equal-compute comparison) trained from one activation stream -> evaluated on
held-out text -> a table of L0, loss recovered, gamma and dead fraction, and the paths of figures and SAEs.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from saeforge.config import DataConfig, EvalConfig, ModelConfig, RunConfig, SAESpec, TrainConfig, to_dict


def demo_config(out: Path, site: str, tokens: int, eval_tokens: int, d_sae: int, sparsity_coeff: float) -> RunConfig:
    return RunConfig(
        model=ModelConfig(name="embedded", site=site, dtype="bfloat16"),
        data=DataConfig(source="embedded", context_len=128, buffer_tokens=65536, lm_batch_size=16),
        train=TrainConfig(
            tokens=tokens, batch_size=4096, lr=1e-3, lr_warmup_steps=8, lr_decay="linear",
            sparsity_warmup_steps=16, resample_every=24, resample_until=72, dead_window_steps=24,
            resample_lr_warmup_steps=8, resample_sample_tokens=16384, checkpoint_every=32, log_every=4,
            autocast_bf16=True, out_dir=str(out / "saes"),
        ),
        eval=EvalConfig(tokens=eval_tokens, batch_size=4, ablation=("zero", "mean"), analyses=False,
                        out_dir=str(out / "eval")),
        sae=[
            SAESpec(architecture="gated", name="gated", d_sae=d_sae, sparsity_coeff=sparsity_coeff),
            SAESpec(architecture="relu", name="relu_baseline", d_sae=d_sae * 3 // 2, sparsity_coeff=sparsity_coeff),
        ],
    )


def demo_table(rows: list[dict]) -> str:
    head = ("| SAE | latents | L0 | loss recovered (zero abl.) | loss recovered (mean abl.) | gamma | "
            "gamma about b_dec | dead fraction |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['d_sae']} | {r['l0']:.1f} | {r['loss_recovered_zero']:.3f} | "
                     f"{r['loss_recovered_mean']:.3f} | {r['gamma']:.3f} | {r['gamma_centered']:.3f} | "
                     f"{r['dead_fraction']:.3f} |")
    return "\n".join(lines)


def demo_command(
    out: Path = Path("runs/demo"),
    site: str = "blocks.9.resid_post",
    tokens: int = 393_216,
    eval_tokens: int = 8_192,
    d_sae: int = 2048,
    sparsity_coeff: float = 0.5,
    progress: bool = True,
) -> None:
    """Train a Gated SAE and a 1.5x wider ReLU baseline on the embedded Gemma 3 270M, evaluate both, print a table.

    Args:
        out: where the SAEs, checkpoints, TensorBoard logs, eval JSON and figures go.
        site: the activation site (a mid-depth residual stream by default).
        tokens: training tokens (shared by both SAEs: one activation stream).
        eval_tokens: held-out tokens for evaluation.
        d_sae: latents of the Gated SAE; the baseline gets 1.5x as many (paper A's equal compute).
        sparsity_coeff: lambda of both SAEs (on activations scaled to E||x||^2 = d_in).
        progress: show progress bars.
    """
    from saeforge.evaluation.commands import evaluate_run, write_json
    from saeforge.models import load_lm
    from saeforge.training import Trainer

    t0 = time.time()
    cfg = demo_config(Path(out), site, tokens, eval_tokens, d_sae, sparsity_coeff)

    def say(msg: str) -> None:
        print(f"[demo {time.time() - t0:6.0f}s] {msg}", file=sys.stderr, flush=True)

    say("loading the embedded Gemma 3 270M (the first run converts the GGUF file once and caches it)")
    lm = load_lm(cfg.model)
    say(f"model {lm.name}: {lm.n_layers} layers, d_model {lm.d_model}; site {site}")
    say(f"training gated ({d_sae} latents) and relu_baseline ({d_sae * 3 // 2}) on {tokens:,} tokens of one stream")
    result = Trainer(cfg, lm=lm, progress=progress).run(overwrite=True)
    say(f"trained {result.steps} steps; evaluating on {eval_tokens:,} held-out tokens")
    eval_dir = Path(cfg.eval.out_dir)
    rows, figures = evaluate_run(lm, cfg, list(result.sae_dirs.values()), eval_dir, progress=progress)
    eval_dir.mkdir(parents=True, exist_ok=True)
    write_json(eval_dir / "eval.json", {"config": to_dict(cfg), "results": rows})
    say("done")

    print(f"\nsaeforge demo: {lm.name} @ {site}, {result.tokens_seen:,} training tokens, "
          f"{rows[0]['eval_tokens']:,} held-out tokens, {time.time() - t0:.0f} s\n")
    print(demo_table(rows))
    print(f"\nclean CE {rows[0]['ce_clean']:.3f} nats. gamma < 1 means shrunk reconstructions (paper A); this residual "
          "stream has a large mean that b_dec carries, so gamma about b_dec is the one that shows shrinkage.\n")
    print(f"results:     {eval_dir / 'eval.json'}")
    for p in figures:
        print(f"figure:      {p}")
    for name, path in result.sae_dirs.items():
        print(f"SAE {name + ':':<15} {path}")
    print(f"tensorboard: tensorboard --logdir {Path(cfg.train.out_dir) / 'tensorboard'}")
