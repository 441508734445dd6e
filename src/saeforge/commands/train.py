"""`saeforge train`: train the SAEs of a TOML run file (training.Trainer)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from tyro.conf import Positional

from saeforge.config import ConfigError, load_config
from saeforge.training import Trainer
from saeforge.training.distributed import process_group


def train_command(
    config: Positional[Path],
    resume: bool = False,
    overwrite: bool = False,
    out_dir: Optional[str] = None,
    tokens: Optional[int] = None,
    device: Optional[str] = None,
    progress: bool = True,
) -> None:
    """Train the SAEs of a TOML run file on one activation stream. Under torchrun, data-parallel over its processes
    (train.batch_size is the global batch; README "Scaling out").

    Args:
        config: the run file ([model], [data], [train], [[sae]] tables).
        resume: continue from the newest checkpoint under the run's out_dir.
        overwrite: start again even though out_dir holds a checkpoint.
        out_dir: overrides train.out_dir.
        tokens: overrides train.tokens.
        device: overrides train.device (where the SAEs train).
        progress: show the progress bar and the summary table.
    """
    cfg = load_config(config)
    overrides = {k: v for k, v in (("out_dir", out_dir), ("tokens", tokens), ("device", device)) if v is not None}
    if overrides:
        try:
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **overrides))
        except ConfigError as e:
            raise ConfigError(f"command line (--out-dir, --tokens, --device): {e}") from e
    # Under torchrun (`torchrun --nproc-per-node N -m saeforge train RUN.toml`) each process is one rank of a
    # data-parallel run (training/distributed.py); without it, dist is None and this is one process.
    with process_group(cfg.train.device or cfg.model.device) as dist:
        result = Trainer(cfg, progress=progress, dist=dist).run(resume=resume, overwrite=overwrite)
        if dist is not None and not dist.is_main:
            return
        ranks = f" on {dist.world_size} ranks" if dist is not None else ""
        print(f"trained {result.steps} steps ({result.tokens_seen:,} tokens){ranks}; SAEs:")
        for name, path in result.sae_dirs.items():
            print(f"  {name}: {path}")
