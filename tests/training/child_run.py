"""A training run in its own process, for the tests that kill one (SIGKILL) and resume it.

    python child_run.py OUT_DIR [--resume] [--slow-after STEP] [--kill-in-checkpoint STEP]

--slow-after: the data arrives slowly after STEP batches, so the parent has time to kill the run mid-training.
--kill-in-checkpoint: the process SIGKILLs itself while writing the checkpoint of STEP (after its tensors are on
disk, before it is renamed into place).
"""

from __future__ import annotations

import argparse
import os
import signal
import time

import torch

from saeforge.config import RunConfig, SAESpec, TrainConfig
from saeforge.training import SyntheticStream, Trainer
from saeforge.training import checkpoint as checkpoint_module

STEPS = 12
BATCH = 32


def run_config(out_dir: str) -> RunConfig:
    train = TrainConfig(tokens=STEPS * BATCH, batch_size=BATCH, out_dir=out_dir, checkpoint_every=2, log_every=3,
                        lr=0.1, lr_warmup_steps=3, lr_decay="cosine", sparsity_warmup_steps=4, resample_every=4,
                        resample_until=STEPS, dead_window_steps=2, resample_sample_tokens=64,
                        resample_lr_warmup_steps=3, aux_k_dead_tokens=2 * BATCH, tensorboard=False, seed=3,
                        l0_control_frac=1.0, l0_control_rate=0.2)  # lambda steered across the kill
    saes = [SAESpec("relu", d_sae=48, sparsity_coeff=3.0), SAESpec("gated", d_sae=32, sparsity_coeff=3.0),
            SAESpec("gated", d_sae=32, target_l0=4.0, sparsity_coeff=3.0),
            SAESpec("topk", d_sae=48, k=3), SAESpec("gradient_topk", d_sae=48, k=3, options={"beta": 3.0})]
    return RunConfig(train=train, sae=saes)


class SlowStream(SyntheticStream):
    def __init__(self, *args, slow_after: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.slow_after = slow_after

    def __next__(self):
        if self.batches >= self.slow_after:
            time.sleep(0.5)
        return super().__next__()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--slow-after", type=int, default=None)
    parser.add_argument("--kill-in-checkpoint", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the same reduction order in every process, for bitwise comparisons

    if args.kill_in_checkpoint is not None:
        write_json = checkpoint_module._write_json

        def write_json_then_die(path, obj):
            if obj.get("step") == args.kill_in_checkpoint:
                os.kill(os.getpid(), signal.SIGKILL)
            write_json(path, obj)

        checkpoint_module._write_json = write_json_then_die

    kwargs = dict(grad=True, seed=5)
    if args.slow_after is not None:
        stream = SlowStream(16, BATCH, slow_after=args.slow_after, **kwargs)
    else:
        stream = SyntheticStream(16, BATCH, **kwargs)
    Trainer(run_config(args.out_dir), stream=stream, progress=False).run(resume=args.resume)


if __name__ == "__main__":
    main()
