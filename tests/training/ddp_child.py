"""One rank of a data-parallel training run, started by torchrun, for the tests that kill a rank, make one fail, or
compare the ranks' states.

    python -m torch.distributed.run --standalone --nproc-per-node 2 ddp_child.py OUT_DIR [--resume]
        [--slow-after STEP] [--fail-rank R --fail-at STEP] [--dump]

Each rank reads its own synthetic stream (batch b of rank r is generated from index b * world_size + r) of
BATCH / world_size rows, and runs through the same error boundary as `saeforge train`.
--slow-after: batches arrive slowly after STEP, so the parent can kill a rank mid-training.
--fail-rank/--fail-at: that rank's batch of step STEP (1-based) holds a NaN, a real TrainingError; it writes the time
    of the failure to OUT_DIR/failed_at first.
--dump: every rank writes its whole final state (SAEs, Adam moments, firing trackers, generators, lambda) to
    OUT_DIR/rank_state_R.safetensors and its resampling events to OUT_DIR/rank_events_R.json.
--check-collectives: before training, every rank checks the collective helpers' edge cases (uneven batch counts, a
    rank without rows, a state of mixed dtypes) and writes what it found to OUT_DIR/collectives_R.json.
Every rank writes its pid to OUT_DIR/pid_R.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from saeforge.commands.output import run_command
from saeforge.config import RunConfig, SAESpec, TrainConfig
from saeforge.saes import REGISTRY
from saeforge.training import SyntheticStream, Trainer
from saeforge.training.distributed import process_group

STEPS = 12
BATCH = 32  # the global batch
D_IN = 16


def saes() -> list[SAESpec]:
    specs = [SAESpec("relu", d_sae=48, sparsity_coeff=3.0), SAESpec("gated", d_sae=32, sparsity_coeff=3.0),
             SAESpec("relu", d_sae=64, sparsity_coeff=12.0, name="relu_sparse"),  # many dead latents: resampled
             SAESpec("gated", d_sae=32, target_l0=4.0, sparsity_coeff=3.0),
             SAESpec("topk", d_sae=48, k=3), SAESpec("gradient_topk", d_sae=48, k=3, options={"beta": 3.0})]
    if "batchtopk" in REGISTRY:  # a buffer (its threshold) that training updates: rank 0's is kept everywhere
        specs.append(SAESpec("batchtopk", d_sae=48, k=3))
    return specs


def run_config(out_dir: str) -> RunConfig:
    train = TrainConfig(tokens=STEPS * BATCH, batch_size=BATCH, out_dir=out_dir, checkpoint_every=2, log_every=3,
                        lr=0.1, lr_warmup_steps=3, lr_decay="cosine", sparsity_warmup_steps=4, resample_every=4,
                        resample_until=STEPS, dead_window_steps=2, resample_sample_tokens=64,
                        resample_lr_warmup_steps=3, aux_k_dead_tokens=2 * BATCH, tensorboard=False, seed=3,
                        l0_control_frac=1.0, l0_control_rate=0.2, heldout_tokens=64, heldout_every=4,
                        compute_dtype="float32")  # the same products whatever the CPU (bf16 would round differently)
    return RunConfig(train=train, sae=saes())


def rank_stream(rank: int, world_size: int) -> SyntheticStream:
    return SyntheticStream(D_IN, BATCH // world_size, grad=True, seed=5, rank=rank, world_size=world_size)


class FaultyStream(SyntheticStream):
    def __init__(self, *args, slow_after=None, fail_at=None, failed_file=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.slow_after, self.fail_at, self.failed_file = slow_after, fail_at, failed_file

    def __next__(self):
        if self.slow_after is not None and self.batches >= self.slow_after:
            time.sleep(0.5)
        batch = super().__next__()
        if self.fail_at is not None and self.batches == self.fail_at:
            Path(self.failed_file).write_text(repr(time.time()))
            batch["x"][0, 0] = float("nan")
        return batch


def dump(trainer: Trainer, out_dir: Path, rank: int) -> None:
    tensors = {}
    for name, run in trainer.runs.items():
        state = run.state_dict()
        for key, value in state["weights"].items():
            tensors[f"{name}.weights.{key}"] = value
        for key, value in state["optimizer"].items():
            tensors[f"{name}.adam.{key}"] = torch.as_tensor(value)
        for key, value in state["tracker"].items():
            tensors[f"{name}.tracker.{key}"] = value
        tensors[f"{name}.generator"] = run.generator.get_state()
        tensors[f"{name}.lambda"] = torch.tensor([run.sparsity_coeff or 0.0], dtype=torch.float64)
        tensors[f"{name}.dead_resample"] = run.tracker.dead_mask(trainer.step * BATCH, 2 * BATCH).to(torch.uint8)
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()},
              str(out_dir / f"rank_state_{rank}.safetensors"))
    (out_dir / f"rank_events_{rank}.json").write_text(json.dumps(trainer.resamples))


def check_collectives(dist, out_dir: Path) -> None:
    from saeforge.saes import ReluSAE
    from saeforge.training.distributed import ReplicaSync

    rank, found = dist.rank, {}
    # gather_batches: rank r has r + 1 of the 2 batches asked for (rank 0's data ran out), rows tagged (rank, batch).
    batches = [torch.full((2 + b, 3), 10.0 * rank + b) for b in range(rank + 1)]
    gathered = dist.gather_batches(batches, 3, count=2)
    found["gather_order"] = [float(v) for v in gathered[:, 0].unique_consecutive()] == [0.0, 10.0, 11.0]
    found["gather_rows"] = gathered.shape[0] == 2 + 2 + 3
    # broadcast_state: rank 0's tensors of every dtype and shape, and its JSON values, reach every rank unchanged.
    state = {"f": torch.arange(6.0).reshape(2, 3), "bf": torch.tensor([1.5, -2.25], dtype=torch.bfloat16),
             "mask": torch.tensor([True, False, True]), "n": torch.tensor(7), "empty": torch.zeros(0, 4),
             "nested": [{"g": torch.Generator().manual_seed(3).get_state()}, None, 2.5, "text"]}
    got = dist.broadcast_state(state if rank == 0 else None)
    found["broadcast_state"] = (all(torch.equal(got[k], state[k]) and got[k].dtype == state[k].dtype
                                    for k in ("f", "bf", "mask", "n", "empty"))
                                and torch.equal(got["nested"][0]["g"], state["nested"][0]["g"])
                                and got["nested"][1:] == [None, 2.5, "text"])
    found["all_gather_json"] = dist.all_gather_json({"rank": rank, "s": "x" * (3 * rank)}) == [
        {"rank": 0, "s": ""}, {"rank": 1, "s": "xxx"}]
    # ReplicaSync: rank 1 has no rows this step; every rank ends with rank 0's gradient and firing counts.
    torch.manual_seed(0)
    sae = ReluSAE(4, 8)
    params = [p for p in sae.parameters() if p.requires_grad]
    x = torch.randn(5, 4)
    fired = None
    if rank == 0:
        fired = sae.loss_and_grads(x, sparsity_coeff=0.1).fired()
    expected = {n: p.grad.clone() for n, p in sae.named_parameters()} if rank == 0 else None
    total = ReplicaSync(dist, sae, params).reduce(fired, 5 if rank == 0 else 0, 5)
    grads = dist.broadcast_state({n: p.grad for n, p in sae.named_parameters()})
    found["sync_grads"] = all(torch.equal(p.grad, grads[n]) for n, p in sae.named_parameters())
    if rank == 0:
        found["sync_grads"] &= all(torch.equal(expected[n], p.grad) for n, p in sae.named_parameters())
    found["sync_fired"] = int(total.sum()) == int(dist.broadcast_state({"t": total})["t"].sum()) > 0
    (out_dir / f"collectives_{rank}.json").write_text(json.dumps(found))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--slow-after", type=int, default=None)
    parser.add_argument("--fail-rank", type=int, default=None)
    parser.add_argument("--fail-at", type=int, default=None)
    parser.add_argument("--dump", action="store_true")
    parser.add_argument("--check-collectives", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the same reduction order in every process, for bitwise comparisons
    out_dir = Path(args.out_dir)

    def body():
        with process_group("cpu") as dist:
            rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / f"pid_{rank}").write_text(str(os.getpid()))
            if args.check_collectives:
                check_collectives(dist, out_dir)
            fail_at = args.fail_at if rank == args.fail_rank else None
            stream = FaultyStream(D_IN, BATCH // world, grad=True, seed=5, rank=rank, world_size=world,
                                slow_after=args.slow_after, fail_at=fail_at, failed_file=out_dir / "failed_at")
            trainer = Trainer(run_config(str(out_dir)), stream=stream, progress=False, dist=dist)
            trainer.run(resume=args.resume)
            if args.dump:
                dump(trainer, out_dir, rank)

    run_command("train", body)


if __name__ == "__main__":
    main()
