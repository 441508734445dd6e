"""Data parallelism under torchrun: the process group, and the few collectives training and harvesting need.

Launch: `torchrun --nproc-per-node N -m saeforge train RUN.toml` (or `... -m saeforge harvest ...`). torchrun starts N
processes per node and sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in each. `process_group`, used
by the train and harvest commands, is the one place that reads them: it joins the group and hands the stages a
`Distributed` (rank, world size, device, collectives). Without torchrun, or with a world of one process, it hands them
None and nothing changes: the single-process path runs no collective and computes exactly what it computed before.

The backend follows the device: gloo when the tensors that are reduced live on the CPU; on CUDA, NCCL for CUDA
tensors (with gloo beside it for the few exchanges of CPU-side values: JSON states, generator states), each process
on the GPU of its local rank.

What a rank reads. `train.batch_size` is the GLOBAL batch B; it must divide by the world size N, and each rank takes
B / N rows a step from its own share of the data:
- a live LM: global context i (after the seeded document shuffle and packing) belongs to rank i mod N, so each rank
  runs the LM on its own contexts only (`store.LiveBlocks`);
- a cache: every rank visits the shards in the same seeded order, a block of shards at a time; of each block's rows
  rank r takes rows r, r + N, r + 2N, ... and shuffles its share with its own seed (seed, rank, block)
  (`cache.CacheBlocks`);
- a synthetic stream: batch b of rank r is generated from index b N + r (`training.SyntheticStream`).
Global batch t is the concatenation, in rank order, of batch t of every rank. One process fed those global batches
(tests/training/ddp_helpers.py, `GlobalBatches`) trains to the same weights up to float rounding. One process
reading the data itself sees another order, so N is part of a run: a checkpoint resumes only with the same N.

What stays identical on every rank, and how:
- the weights: the same seeded initialisation; every step one all-reduce per SAE (`ReplicaSync`) sums each rank's
  gradient (a mean over its rows) weighted by its share of the step's rows, so every rank applies the gradient of
  the global batch; the decoder-norm constraint and Adam then act identically on identical weights;
- firing counts and L0: the same all-reduce sums the step's per-latent firing counts, so the firing tracker, the
  dead masks (resampling, AuxK) and the L0 an L0 target steers lambda with are global;
- buffers that training updates (e.g. BatchTopK's threshold): rank 0's values, carried by the same all-reduce;
- b_dec's initialisation: computed by rank 0 on the gathered first global batch, broadcast;
- resampling: the fresh sample is gathered from every rank (in global batch order), rank 0 draws the inputs and
  broadcasts their indices and its generator state, and every rank applies them;
- the activation scale: rank 0's, broadcast; the rows of each step: one small all-reduce, so a rank whose data ran
  out contributes nothing to the step and the run ends when every rank's has;
- RNG: seeded identically; a checkpoint holds rank 0's generators and every rank restores them.
Not replicated: each rank's stream position (a checkpoint holds every rank's); checkpoints, logs, TensorBoard, W&B,
the summary and the saved SAEs (rank 0 only); the held-out MSE (rank 0). Every checkpoint verifies that the ranks
hold identical SAEs, tracker and lambda (`check_replicas`) and stops the run if they do not.
Batch-wide operations act on a rank's B / N rows, not on the global batch: BatchTopK / Matryoshka keep the top
k B / N entries of a rank's rows, and gradient TopK's "unit_rms" gradient normalisation uses a rank's rows.

Failures: torchrun watches its processes; when one exits with an error it stops the others (SIGTERM) and exits
non-zero, naming the failed rank; the error boundary (`commands.output.run_command`) prefixes every message with
the rank that printed it. A checkpoint is written by rank 0 atomically, so the last one stays loadable whenever the
job is stopped. Resuming: rank 0 reads the newest good checkpoint and broadcasts it, so only rank 0 needs to see
`train.out_dir` (every rank of a multi-node run must still be able to create it).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch

from saeforge.errors import UserError

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class DistributedError(UserError, RuntimeError):
    """The torchrun environment or the ranks' states do not fit together."""


class CollectiveError(RuntimeError):
    """A collective failed: another rank most likely died (its own message says why), or the network broke."""


@dataclass(frozen=True)
class Launch:
    """Where torchrun placed this process."""

    rank: int
    world_size: int
    local_rank: int


def launched() -> Optional[Launch]:
    """This process's place in a torchrun job (RANK, WORLD_SIZE, LOCAL_RANK), or None when torchrun did not start
    it."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError as e:
        raise DistributedError(f"the torchrun environment is malformed ({e}): RANK, WORLD_SIZE and LOCAL_RANK "
                               "must be integers") from e
    if not (world >= 1 and 0 <= rank < world and local >= 0):
        raise DistributedError(f"the torchrun environment is inconsistent: RANK={rank}, WORLD_SIZE={world}, "
                               f"LOCAL_RANK={local}")
    return Launch(rank, world, local)


def backend_for(device: Any) -> str:
    """The process-group backend for SAEs (or an LM) on `device`: NCCL for CUDA tensors (gloo beside it for the CPU
    tensors of the small exchanges), gloo alone on CPUs."""
    return "cpu:gloo,cuda:nccl" if torch.device(device).type == "cuda" else "gloo"


def local_device(device: Any, local_rank: int) -> torch.device:
    """`device` for the process of `local_rank`: any CUDA device becomes the GPU of the local rank (torchrun starts
    one process per GPU); other devices are kept."""
    device = torch.device(device)
    return torch.device("cuda", local_rank) if device.type == "cuda" else device


def rank_label() -> str:
    """" (rank R of N)" inside a torchrun job of several processes, else "" (for messages)."""
    try:
        launch = launched()
    except DistributedError:
        return ""
    if launch is None or launch.world_size == 1:
        return ""
    return f" (rank {launch.rank} of {launch.world_size})"


@contextmanager
def process_group(device: Any) -> Iterator[Optional["Distributed"]]:
    """Join the torchrun job this process belongs to, for work on `device`; yields a `Distributed`, or None when
    there is no job of several processes (then nothing is initialised). The group is destroyed on a normal exit;
    after an error it is left to the process's exit, so a rank that fails never waits on the others."""
    launch = launched()
    if launch is None or launch.world_size == 1:
        yield None
        return
    import torch.distributed as dist

    if not dist.is_available():
        raise DistributedError("this build of torch has no torch.distributed, so it cannot run under torchrun")
    placed = local_device(device, launch.local_rank)
    if placed.type == "cuda":
        if not torch.cuda.is_available() or launch.local_rank >= torch.cuda.device_count():
            raise DistributedError(f"local rank {launch.local_rank} needs GPU {launch.local_rank}, but "
                                   f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} are visible; "
                                   "start at most one process per GPU (--nproc-per-node)")
        torch.cuda.set_device(placed)
    backend = backend_for(placed)
    options = {}
    if placed.type == "cuda" and "device_id" in inspect.signature(dist.init_process_group).parameters:
        options["device_id"] = placed  # NCCL bound to this rank's GPU from the start (torch >= 2.3)
    dist.init_process_group(backend=backend, **options)
    group = Distributed(launch.rank, launch.world_size, launch.local_rank, placed, backend)
    yield group  # an exception propagates from here without the teardown below
    dist.destroy_process_group()


class Distributed:
    """This process's rank in a torchrun job, and the collectives the stages use (blocking, in the same order on
    every rank). `comm_seconds` adds up the time spent in them (waiting for the slowest rank included)."""

    def __init__(self, rank: int, world_size: int, local_rank: int, device: torch.device, backend: str):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.device, self.backend = device, backend
        self.comm_seconds = 0.0

    def __repr__(self) -> str:
        return f"Distributed(rank={self.rank}, world_size={self.world_size}, device={self.device}, {self.backend})"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def place(self, device: Any) -> torch.device:
        """`device` for this process (a CUDA device becomes the GPU of its local rank)."""
        return local_device(device, self.local_rank)

    # ------------------------------------------------------------------------------------------- tensors
    def _timed(self, fn, *args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        except RuntimeError as e:  # gloo and NCCL report a peer that died as a RuntimeError (or DistError)
            raise CollectiveError(f"rank {self.rank}: {getattr(fn, '__name__', 'a collective')} with the other ranks "
                                  f"failed ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
        finally:
            self.comm_seconds += time.perf_counter() - start

    def all_reduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place: the element-wise sum (op="sum"), max or min of `tensor` over the ranks."""
        import torch.distributed as dist

        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        self._timed(dist.all_reduce, tensor, op=ops[op])
        return tensor

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """In place: `tensor` becomes rank `src`'s."""
        import torch.distributed as dist

        self._timed(dist.broadcast, tensor, src=src)
        return tensor

    def barrier(self) -> None:
        import torch.distributed as dist

        self._timed(dist.barrier)

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `tensor` (the same shape and dtype on every rank), in rank order."""
        import torch.distributed as dist

        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self._timed(dist.all_gather, out, tensor.contiguous())
        return out

    def sum_int(self, value: int) -> int:
        """The sum over the ranks of an integer."""
        t = torch.tensor([int(value)], dtype=torch.int64, device=self.device)
        return int(self.all_reduce_(t).item())

    def broadcast_float(self, value: float, src: int = 0) -> float:
        """Rank `src`'s float, exactly (float64)."""
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        return float(self.broadcast_(t, src).item())

    def gather_batches(self, batches: Sequence[torch.Tensor], d: int, count: Optional[int] = None) -> torch.Tensor:
        """Every rank's `batches` (rows of width d, any row counts) as one tensor in global batch order: batch 0 of
        rank 0, batch 0 of rank 1, ..., batch 1 of rank 0, ... (the order in which one process reading the global
        batches would see them). count: the number of batches asked of every rank (the same on every rank); a rank
        whose data ran out passes fewer. Default: len(batches)."""
        k = len(batches) if count is None else count
        if len(batches) > k:
            raise ValueError(f"gather_batches: {len(batches)} batches, more than count={k}")
        device = batches[0].device if batches else self.device
        sizes = torch.tensor([b.shape[0] for b in batches] + [0] * (k - len(batches)), dtype=torch.int64,
                             device=device)
        all_sizes = torch.stack(self.all_gather(sizes)).cpu()  # [world, k]
        longest = int(all_sizes.sum(1).max())
        local = torch.cat(list(batches)) if batches else torch.empty(0, d, device=device)
        padded = local.new_zeros(longest, d)
        padded[: local.shape[0]] = local
        gathered = self.all_gather(padded)
        starts = torch.cat([torch.zeros(self.world_size, 1, dtype=torch.int64), all_sizes.cumsum(1)], 1)
        parts = [gathered[r][int(starts[r, j]) : int(starts[r, j + 1])]
                 for j in range(k) for r in range(self.world_size)]
        return torch.cat(parts) if parts else padded[:0]

    # ------------------------------------------------------------------------------------------- CPU-side values
    # Bytes travel as uint8 tensors (JSON for structured values): nothing crosses between ranks through pickle.
    def broadcast_bytes(self, data: Optional[bytes], src: int = 0) -> bytes:
        """Rank `src`'s bytes (other ranks pass None)."""
        length = torch.tensor([len(data) if self.rank == src else 0], dtype=torch.int64)
        self.broadcast_(length, src)
        buf = (torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.rank == src and len(data)
               else torch.empty(int(length), dtype=torch.uint8))
        if int(length):
            self.broadcast_(buf, src)
        return bytes(buf.numpy().tobytes())

    def broadcast_json(self, obj: Any = None, src: int = 0) -> Any:
        """Rank `src`'s JSON value (other ranks pass anything; it is ignored)."""
        data = json.dumps(obj).encode() if self.rank == src else None
        return json.loads(self.broadcast_bytes(data, src).decode())

    def all_gather_json(self, obj: Any) -> list[Any]:
        """Every rank's JSON value, in rank order."""
        data = json.dumps(obj).encode()
        lengths = self.all_gather(torch.tensor([len(data)], dtype=torch.int64))
        longest = max(int(n) for n in lengths)
        buf = torch.zeros(longest, dtype=torch.uint8)
        if data:
            buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        parts = self.all_gather(buf)
        return [json.loads(bytes(p[: int(n)].numpy().tobytes()).decode()) for p, n in zip(parts, lengths)]

    def broadcast_state(self, state: Any, src: int = 0) -> Any:
        """Rank `src`'s nested state (dicts, lists, tensors, JSON values; a checkpoint's), tensors on the CPU."""
        from saeforge.training.checkpoint import join_state, split_state

        if self.rank == src:
            tensors, tree = split_state(state)
            layout = [[key, str(t.dtype).removeprefix("torch."), list(t.shape)] for key, t in tensors.items()]
            meta = self.broadcast_json({"tree": tree, "layout": layout}, src)
            flat = [t.reshape(-1).view(torch.uint8) for t in tensors.values()]
            buf = torch.cat(flat) if flat else torch.empty(0, dtype=torch.uint8)
        else:
            meta = self.broadcast_json(None, src)
            total = sum(_nbytes(dtype, shape) for _, dtype, shape in meta["layout"])
            buf = torch.empty(total, dtype=torch.uint8)
        if buf.numel():
            self.broadcast_(buf, src)
        tensors, offset = {}, 0
        for key, dtype, shape in meta["layout"]:
            n = _nbytes(dtype, shape)
            tensors[key] = buf[offset : offset + n].clone().view(getattr(torch, dtype)).reshape(shape)
            offset += n
        return join_state(meta["tree"], tensors)


def _nbytes(dtype: str, shape: list[int]) -> int:
    return math.prod(shape) * torch.empty((), dtype=getattr(torch, dtype)).element_size()


class ReplicaSync:
    """Keeps one SAE's replicas identical across the ranks, one all-reduce a step (see the module docstring).

    The flat buffer, laid out once, holds: each trainable parameter's gradient weighted by this rank's share of the
    step's rows; one presence flag per parameter (a rank without rows, or an architecture that leaves a gradient
    unset, contributes zero); the step's per-latent firing counts; and the floating-point buffers of the SAE (rank 0's
    values, zeros elsewhere). After the sum every rank holds the global batch's gradient, the global firing counts
    and rank 0's buffers. Counts are carried as floats: exact up to 2^24 rows a step (2^53 with float64 weights).
    """

    def __init__(self, dist: Distributed, sae, params: list[torch.nn.Parameter]):
        self.dist, self.sae, self.params = dist, sae, list(params)
        self.buffer_names = [name for name, b in sae.named_buffers() if b.is_floating_point()]
        buffers = dict(sae.named_buffers())
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in self.params) else torch.float32
        self.sizes = ([p.numel() for p in self.params] + [len(self.params), sae.d_sae]
                      + [buffers[n].numel() for n in self.buffer_names])
        self.flat = torch.empty(sum(self.sizes), dtype=dtype, device=sae.W_dec.device)

    @torch.no_grad()
    def reduce(self, fired: Optional[torch.Tensor], rows: int, global_rows: int) -> torch.Tensor:
        """Sum the step across the ranks: afterwards each parameter's .grad is the global batch's, and the return
        value is the global per-latent firing count (int64 [d_sae]). `rows`: this rank's rows in the step (0: none,
        and `fired` may be None); `global_rows`: the step's rows over all ranks."""
        n = len(self.params)
        views = list(self.flat.split(self.sizes))
        grads, flags, fired_slot, buffer_slots = views[:n], views[n], views[n + 1], views[n + 2 :]
        weight = rows / global_rows
        for p, slot, i in zip(self.params, grads, range(n)):
            if p.grad is None:
                slot.zero_()
                flags[i] = 0
            else:
                slot.copy_(p.grad.reshape(-1))
                if weight != 1.0:
                    slot.mul_(weight)
                flags[i] = 1
        if fired is None:
            fired_slot.zero_()
        else:
            fired_slot.copy_(fired)
        buffers = dict(self.sae.named_buffers())
        for name, slot in zip(self.buffer_names, buffer_slots):
            if self.dist.is_main:
                slot.copy_(buffers[name].reshape(-1))
            else:
                slot.zero_()
        self.dist.all_reduce_(self.flat)
        present = flags.tolist()
        for p, slot, count in zip(self.params, grads, present):
            if count == 0:
                p.grad = None
            elif p.grad is None:
                p.grad = slot.view_as(p).to(p.dtype, copy=True)
            else:
                p.grad.copy_(slot.view_as(p))
        for name, slot in zip(self.buffer_names, buffer_slots):
            buffers[name].copy_(slot.view_as(buffers[name]))
        return fired_slot.round().to(torch.int64)


def replica_fingerprint(run) -> torch.Tensor:
    """float64 sums of everything an SAE's replicas must share: weights and buffers, Adam moments, firing tracker,
    lambda (L0 controller), learning-rate schedule, resampling generator."""
    values: list[torch.Tensor] = []
    for t in list(run.sae.state_dict().values()) + list(run.tracker.state_dict().values()):
        values.append(t.detach().double().sum())
    for state in run.optimizer.state.values():
        for t in state.values():
            values.append(t.detach().double().sum())
    last_resample = run.lr_schedule.last_resample_step
    extra = [float(run.sparsity_coeff or 0.0), float(-1 if last_resample is None else last_resample),
             float(run.generator.get_state().double().sum())]
    device = run.sae.W_dec.device
    return torch.cat([torch.stack(values).to(device) if values else torch.zeros(0, dtype=torch.float64, device=device),
                      torch.tensor(extra, dtype=torch.float64, device=device)])


def check_replicas(dist: Distributed, runs: dict, step: int) -> None:
    """Stop with an error naming the SAE when the ranks' replicas differ (a bug, or GPUs that compute differently)."""
    for name, run in runs.items():
        mine = replica_fingerprint(run)
        theirs = dist.all_gather(mine)
        differ = [r for r, t in enumerate(theirs) if not torch.equal(t, theirs[0])]
        if differ:
            raise DistributedError(f"step {step}: the replicas of SAE {name!r} on ranks {differ} differ from rank 0's "
                                   "(weights, optimizer state, firing tracker or lambda); the ranks no longer train "
                                   "the same SAE, so training stopped")
