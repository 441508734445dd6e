"""What a run shows while it trains: a progress bar, TensorBoard (default) and W&B (when asked), a summary table."""

from __future__ import annotations

import secrets
import sys
import time
from pathlib import Path
from typing import Optional

from tqdm import tqdm


class Monitor:
    def __init__(
        self,
        *,
        total_steps: int,
        start_step: int,
        batch_size: int,
        log_dir: Optional[Path],
        out_dir: Path,
        wandb_project: Optional[str],
        run_name: str,
        config: dict,
        progress: bool = True,
    ):
        self.batch_size = batch_size
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                        disable=not progress, file=sys.stderr, mininterval=0.1 if sys.stderr.isatty() else 10.0)
        self.writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # slow to import; only when logging

            # purge_step drops events a killed run wrote after its last checkpoint.
            self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=start_step or None)
        self.wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise RuntimeError("train.wandb_project is set but wandb is not installed (pip install wandb)") from e
            # The W&B run's id lives in the out_dir, so that a resumed training run continues the same W&B run.
            id_file = out_dir / "wandb_run_id"
            if start_step == 0 or not id_file.exists():
                id_file.write_text(secrets.token_hex(4))
            self.wandb = wandb.init(project=wandb_project, name=run_name, config=config, id=id_file.read_text(),
                                    resume="allow", dir=str(out_dir))
        self._t0, self._step0 = time.perf_counter(), start_step

    def advance(self, steps: int = 1) -> None:
        self.bar.update(steps)

    def log(self, step: int, metrics: dict[str, dict[str, float]]) -> None:
        now = time.perf_counter()
        tokens_per_s = (step - self._step0) * self.batch_size / max(now - self._t0, 1e-9)
        self._t0, self._step0 = now, step
        parts = [f"{tokens_per_s / 1e3:.1f}k tok/s"]
        for name, m in list(metrics.items())[:2]:
            parts.append(f"{name}: loss {m['loss']:.4g} L0 {m['l0']:.1f} dead {100 * m['dead_frac']:.1f}%")
        if len(metrics) > 2:
            parts.append(f"(+{len(metrics) - 2} SAEs)")
        self.bar.set_postfix_str(" | ".join(parts), refresh=False)
        flat = {f"{name}/{key}": value for name, m in metrics.items() for key, value in m.items()}
        flat["tokens_per_s"] = tokens_per_s
        if self.writer is not None:
            for key, value in flat.items():
                self.writer.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(flat, step=step)

    def event(self, step: int, text: str) -> None:
        self.bar.write(f"step {step}: {text}", file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def summary_table(rows: list[dict]) -> str:
    """Fixed-width text table of the final metrics, one row per SAE."""
    columns = [("name", "SAE"), ("architecture", "arch"), ("d_sae", "d_sae"), ("setting", "lambda / k"),
               ("loss", "loss"), ("recon", "recon"), ("train_mse", "train MSE"), ("heldout_mse", "held-out MSE"),
               ("l0", "L0"), ("dead_pct", "dead %")]

    def fmt(value) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    cells = [[title for _, title in columns]] + [[fmt(row.get(key, "")) for key, _ in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)) for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
