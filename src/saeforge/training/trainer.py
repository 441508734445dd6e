"""The trainer: many SAEs from one activation stream, with checkpoints that resume exactly.

Every batch of the stream goes to every SAE (each with its own optimizer, schedules and dead-latent state), so a
sweep over architectures and sparsity settings costs one pass over the data. The stream yields raw activations;
the SAEs train on c * x (c from the stream's statistics sample: E||c (x - mu)||^2 = d_in, or E||c x||^2 = d_in with
train.normalize = "uncentered") and are saved with c folded in. Outlier tokens the stream leaves out are counted;
the threshold (raw units) is saved as cfg.json's saeforge.max_input_norm. Lambda is fixed, or steered to an L0
target (l0_target.py); every few hundred steps each SAE's MSE on fixed training and held-out samples is logged.

Data parallelism (torchrun; training/distributed.py says what each rank reads and what is kept identical): given a
`Distributed`, the stream reads this rank's share (train.batch_size / world_size rows a step), each `SAERun` sums
gradients, firing counts and buffers across the ranks before its optimizer step, b_dec's initialisation and
resampling are decided on rank 0 and broadcast, and only rank 0 writes checkpoints (holding every rank's stream
position), logs and SAEs. Without one, nothing of this runs.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from saeforge.config import ConfigError, RunConfig, SAESpec, to_dict
from saeforge.data.sources import check_text_source
from saeforge.errors import UserError
from saeforge.files import check_writable_dir
from saeforge.models.precision import choose_precision
from saeforge.saes import REGISTRY, architecture_class
from saeforge.saes.metadata import Normalization, SAEMetadata, TrainingRecord
from saeforge.training.checkpoint import (CheckpointError, latest_checkpoint, load_newest_good_checkpoint,
                                         save_checkpoint, step_dir_name)
from saeforge.training.distributed import Distributed, ReplicaSync, check_replicas
from saeforge.training.memory import keep_freed_memory
from saeforge.training.monitor import Monitor, summary_table
from saeforge.training.resample import per_token_loss
from saeforge.training.sae_run import SAERun
from saeforge.training.schedules import StepPlan

CHECKPOINT_FORMAT = 1


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (a non-finite loss, bad data, a checkpoint that does not fit the config)."""


@dataclass
class TrainResult:
    sae_dirs: dict[str, Path]  # name -> saved SAE directory (scale folded in, works on raw activations)
    tokens_seen: int  # tokens trained on
    steps: int
    data_exhausted: bool = False  # the stream ran out before train.tokens
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> last logged metrics
    resamples: list[dict] = field(default_factory=list)  # {"step", "sae", "n_resampled", "ess"} per resampling event
    excluded_tokens: int = 0  # outlier tokens the stream left out of training


def sae_name(spec: SAESpec, d_sae: int) -> str:
    """The directory name of an SAE: the spec's name, else architecture, width and L0 target, lambda or k."""
    if spec.name:
        return spec.name
    if spec.k is not None:
        return f"{spec.architecture}_w{d_sae}_k{spec.k}"
    if spec.target_l0 is not None:
        return f"{spec.architecture}_w{d_sae}_t{spec.target_l0:g}"
    return f"{spec.architecture}_w{d_sae}_l{spec.sparsity_coeff:g}"


def sae_width(spec: SAESpec, d_in: int) -> int:
    return spec.d_sae if spec.d_sae is not None else max(1, round(spec.expansion * d_in))


def _check_fits_in_memory(index: int, name: str, d_in: int, d_sae: int) -> None:
    """Refuse, before allocating, an SAE whose float32 weights, gradients and two Adam moments (four copies of its
    two d_in x d_sae matrices) exceed this machine's memory, e.g. a d_sae typed with three zeros too many."""
    try:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: nothing to compare against
        return
    needed = 4 * 2 * d_in * d_sae * 4
    if needed > available:
        raise ConfigError(f"sae[{index}] ({name!r}): d_sae = {d_sae:,} at d_in = {d_in} needs about "
                          f"{needed / 2**30:,.0f} GiB for weights and optimizer state; this machine has "
                          f"{available / 2**30:,.0f} GiB")


def _seed_for(seed: int, name: str) -> int:
    """A per-SAE seed that depends only on the run seed and the SAE's name, so an SAE trains the same alone
    as next to others."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63


def _fingerprint(cfg: RunConfig) -> dict:
    """The parts of a config a resumed run must share with the checkpoint (tokens, logging may change)."""
    train = {k: v for k, v in to_dict(cfg.train).items()
             if k not in ("tokens", "checkpoint_every", "keep_checkpoints", "log_every", "tensorboard",
                          "wandb_project", "out_dir", "device", "keep_freed_memory", "heldout_every",
                          "heldout_tokens")}
    return {"model": {"name": cfg.model.name, "site": cfg.model.site}, "data": to_dict(cfg.data),
            "train": train, "sae": to_dict(cfg.sae)}


class Trainer:
    """Train every SAE of `cfg.sae` on one activation stream.

    lm: an already loaded `saeforge.models.LanguageModel` (else the stream loads cfg.model, or reads the cache).
    stream: any object with the activation-stream interface (`saeforge.data.open_stream`,
    `saeforge.training.SyntheticStream`); it must be positioned at its start unless resuming. Under data
    parallelism it must be this rank's stream, yielding train.batch_size / world_size rows a batch.
    dist: a `distributed.Distributed` when the run is one rank of a torchrun job (None: a single process).
    """

    def __init__(self, cfg: RunConfig, *, lm=None, stream=None, progress: bool = True,
                 dist: Optional[Distributed] = None):
        self.cfg, self.lm, self.dist = cfg, lm, dist
        self.is_main = dist is None or dist.is_main
        self.progress = progress and self.is_main
        self.out_dir = Path(cfg.train.out_dir)
        self.checkpoint_dir = self.out_dir / "checkpoints"
        device = cfg.train.device or cfg.model.device
        self.device = dist.place(device) if dist is not None else torch.device(device)
        if self.device.type == "cpu" and cfg.train.keep_freed_memory:
            keep_freed_memory()
        self.compute_precision = choose_precision(cfg.train.compute_dtype, self.device)
        self.rank, self.world_size = (dist.rank, dist.world_size) if dist is not None else (0, 1)
        if cfg.train.batch_size % self.world_size:
            raise ConfigError(f"train.batch_size: {cfg.train.batch_size} is the global batch, split evenly over the "
                              f"{self.world_size} ranks, so it must be a multiple of {self.world_size}")
        self.local_batch_size = cfg.train.batch_size // self.world_size
        for index, spec in enumerate(cfg.sae):
            cls = architecture_class(spec.architecture)
            if not cls.trainable:
                trainable = sorted(name for name, c in REGISTRY.items() if c.trainable)
                raise ConfigError(f"sae[{index}].architecture: {spec.architecture!r} is not trained directly "
                                  f"(trainable: {trainable}); {cls.made_by}")
        if not cfg.sae:
            raise ConfigError("sae: the run lists no SAEs ([[sae]] tables)")
        self.total_steps = cfg.train.tokens // cfg.train.batch_size
        if self.total_steps < 1:
            raise ConfigError(f"train.tokens: {cfg.train.tokens} is less than one batch ({cfg.train.batch_size})")
        self.plan = StepPlan.of(cfg.train, self.total_steps)
        self.needs_grad = any(architecture_class(spec.architecture).needs_grad for spec in cfg.sae)
        self.stream = stream
        self.runs: dict[str, SAERun] = {}
        self.resamples: list[dict] = []
        self.step = 0
        self.heldout_samples: Optional[dict[str, torch.Tensor]] = None  # see _prepare_heldout
        self._heldout_step = 0
        self._last_metrics: dict[str, dict[str, float]] = {}

    # ------------------------------------------------------------------------------------------------ setup
    def _open_stream(self):
        if self.stream is None:
            from saeforge.data import open_stream

            model = self.cfg.model
            if self.dist is not None:  # the LM of this rank on its own GPU
                model = dataclasses.replace(model, device=str(self.dist.place(model.device)))
            self.stream = open_stream(model, self.cfg.data, self.local_batch_size, lm=self.lm,
                                      grad=self.needs_grad, seed=self.cfg.train.seed, rank=self.rank,
                                      world_size=self.world_size, split="train", progress=self.progress)
        rows = getattr(self.stream, "batch_size", self.local_batch_size)
        if self.dist is not None and rows != self.local_batch_size:
            raise ConfigError(f"the activation stream of rank {self.rank} yields batches of {rows} rows, but each of "
                              f"the {self.world_size} ranks takes train.batch_size / {self.world_size} = "
                              f"{self.local_batch_size}")
        self.stats = self.stream.activation_stats()
        try:
            self.scale = float(self.stats.scale(self.cfg.train.normalize))
        except ValueError as e:
            raise TrainingError(f"the activation statistics cannot normalise the data: {e}") from e
        if self.dist is not None:  # every rank trains on c x with rank 0's c
            self.scale = self.dist.broadcast_float(self.scale)
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise TrainingError(f"the stream's activation scale is {self.scale}; it must be a positive number")
        if self.stats.max_input_norm is not None and self.is_main:
            print(f"note: tokens with raw norm above {self.stats.max_input_norm:.6g} ({self.cfg.data.max_norm_ratio:g}x "
                  f"the median {self.stats.median_norm:.6g}) are left out of training as outliers: "
                  f"{self.stats.excluded} of the {self.stats.excluded + self.stats.tokens:,} tokens of the statistics "
                  "sample (data.keep_outliers = true keeps them)", file=sys.stderr)
        return self.stream

    def _build_runs(self, d_in: int) -> None:
        train = self.cfg.train
        for index, spec in enumerate(self.cfg.sae):
            d_sae = sae_width(spec, d_in)
            name = sae_name(spec, d_sae)
            if name in self.runs:
                raise ConfigError(f"sae[{index}].name: two SAEs are both called {name!r}; give them distinct names")
            _check_fits_in_memory(index, name, d_in, d_sae)
            options = dict(spec.options)
            if spec.k is not None:
                options["k"] = spec.k
            torch.manual_seed(_seed_for(train.seed, name))  # the SAE's initialisation
            try:
                sae = architecture_class(spec.architecture).for_training(d_in, d_sae, options, self.scale)
            except (TypeError, ValueError, FileNotFoundError) as e:
                raise ConfigError(f"sae[{index}] ({name!r}): {e}") from e
            sae.to(self.device)
            betas = spec.adam_betas or train.adam_betas or sae.adam_betas
            self.runs[name] = SAERun(
                name, sae, train, total_steps=self.total_steps, plan=self.plan, lr=spec.lr or train.lr,
                betas=tuple(betas), sparsity_coeff=spec.sparsity_coeff if sae.uses_sparsity_coeff else None,
                target_l0=spec.target_l0 if sae.uses_sparsity_coeff else None,
                resample=train.resample if spec.resample is None else spec.resample,
                seed=_seed_for(train.seed + 1, name), compute_dtype=self.compute_precision.dtype,
            )
            if self.dist is not None:
                self.runs[name].sync = ReplicaSync(self.dist, sae, self.runs[name].params)

    def _model_name(self) -> str:
        """The LM's own name: of the LM passed in, else the one the stream loaded or the cache recorded, else the
        config's spec."""
        blocks = getattr(self.stream, "blocks", None)
        live_lm = getattr(blocks, "lm", None)
        cache = getattr(blocks, "cache", None)
        manifest = getattr(cache, "manifest", None) or {}
        for name in (getattr(self.lm, "name", None), getattr(self.stream, "model_name", None),
                     getattr(live_lm, "name", None), manifest.get("model")):
            if isinstance(name, str) and name:
                return name
        return self.cfg.model.name

    def _metadata(self, name: str, training: TrainingRecord) -> SAEMetadata:
        return SAEMetadata(
            model_name=self._model_name(), site=self.cfg.model.site, context_size=self.cfg.data.context_len,
            dataset=str(self.cfg.data.cache_dir or self.cfg.data.source), name=name, activation_scale=self.scale,
            activation_scale_folded=True, training=training,
            precision={"sae_compute": self.compute_precision.record(), "lm": self._lm_precision()},
            max_input_norm=self.stats.max_input_norm,  # raw units; None: no token was left out
            normalization=Normalization(mode=self.cfg.train.normalize, scale=self.scale,
                                        mean_norm=self.stats.mean_norm))  # ||mu||, raw units

    def _lm_precision(self) -> dict:
        """The LM's dtype and why: from the live LM, else the dtype the cache was harvested in."""
        blocks = getattr(self.stream, "blocks", None)
        for lm in (self.lm, getattr(blocks, "lm", None)):
            if getattr(lm, "precision", None) is not None:
                return lm.precision.record()
        manifest = getattr(getattr(blocks, "cache", None), "manifest", None) or {}
        return {"dtype": str(manifest.get("lm_dtype", "unknown")).removeprefix("torch."),
                "reason": "the activation cache was harvested in this dtype"}

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "config": _fingerprint(self.cfg),
            "stream": self.stream.state_dict(),
            "rng": rng,
            "saes": {name: run.state_dict() for name, run in self.runs.items()},
            "resamples": self.resamples,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a checkpoint's state. Under data parallelism every rank is given the whole state and takes its
        own stream position from it."""
        if state.get("format") != CHECKPOINT_FORMAT:
            raise TrainingError(f"checkpoint format {state.get('format')!r} is not {CHECKPOINT_FORMAT}")
        ranks = int(state.get("distributed", {}).get("world_size", 1))
        if ranks != self.world_size:
            def run_of(n):
                return "one process" if n == 1 else f"{n} ranks (torchrun, world size {n})"
            raise TrainingError(
                f"the checkpoint was written by a run of {run_of(ranks)}, and this run has "
                f"{run_of(self.world_size)}; each rank resumes its own share of the data, so resume with a world size "
                f"of {ranks} "
                + ("(run without torchrun, or with one process)" if ranks == 1 else
                   f"(torchrun --nnodes M --nproc-per-node P with M x P = {ranks})")
                + ", or start a new out_dir")
        mine = json.loads(json.dumps(_fingerprint(self.cfg)))
        if state["config"] != mine:
            diff = sorted(k for k in mine if mine[k] != state["config"].get(k))
            raise TrainingError(f"the checkpoint was written by a run with a different config (sections {diff}); "
                                "resume with the same config, or start a new out_dir")
        if set(state["saes"]) != set(self.runs):
            raise TrainingError(f"the checkpoint holds SAEs {sorted(state['saes'])}, the config {sorted(self.runs)}")
        self.step = int(state["step"])
        self.stream.load_state_dict(state["distributed"]["streams"][self.rank] if self.dist is not None
                                    else state["stream"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        for name, run in self.runs.items():
            run.load_state_dict(state["saes"][name])
        self.resamples = list(state["resamples"])

    def save_checkpoint(self) -> Path:
        """Write a checkpoint of the current step. Under data parallelism every rank calls it: rank 0 writes it, with
        every rank's stream position, after checking that the ranks hold identical SAEs."""
        if self.dist is None:
            return save_checkpoint(self.checkpoint_dir, self.step, self.state_dict(),
                                   keep=self.cfg.train.keep_checkpoints)
        check_replicas(self.dist, self.runs, self.step)
        streams = self.dist.all_gather_json(self.stream.state_dict())
        if not self.is_main:
            return self.checkpoint_dir / step_dir_name(self.step)
        state = self.state_dict()
        state["distributed"] = {"world_size": self.world_size, "streams": streams}
        return save_checkpoint(self.checkpoint_dir, self.step, state, keep=self.cfg.train.keep_checkpoints)

    # ------------------------------------------------------------------------------------------------ training
    def prepare(self, resume: bool = False, *, overwrite: bool = False) -> None:
        """Open the stream and build the SAEs (restored from the newest checkpoint when resuming). `run` calls it
        when it was not called before; calling it first gives access to `self.runs` before training starts."""
        check_writable_dir(self.out_dir, "train.out_dir")
        if self.stream is None and not self.cfg.data.cache_dir:
            check_text_source(self.cfg.data.source, self.cfg.data.text_field)
        existing = self._existing_checkpoint(resume, overwrite)
        stream = self._open_stream()
        if self.progress:
            lm = self._lm_precision()
            print(f"language model: precision {lm['dtype']}: {lm['reason']}\n"
                  f"SAE products: {self.compute_precision.describe()}", file=sys.stderr)
        self._build_runs(int(stream.d_in))
        if resume and existing is not None:
            path, state = self._load_newest_checkpoint()
            self.load_state_dict(state)
            if self.is_main:
                print(f"resuming from {path} (step {self.step})", file=sys.stderr)
        elif resume and self.is_main:
            print(f"no checkpoint under {self.checkpoint_dir}; starting from the beginning", file=sys.stderr)

    def _existing_checkpoint(self, resume: bool, overwrite: bool) -> Optional[str]:
        """The checkpoint already under out_dir (removed with overwrite; refused without resume or overwrite).
        Under data parallelism rank 0 looks and tells the others, so that every rank decides alike."""
        existing, error = None, None
        if self.is_main:
            found = latest_checkpoint(self.checkpoint_dir)
            if found is not None and not resume:
                if not overwrite:
                    error = (f"{self.out_dir} already holds a checkpoint ({found.name}); pass resume=True "
                             "(--resume) to continue it, or overwrite=True (--overwrite) to start again")
                else:
                    shutil.rmtree(self.checkpoint_dir)
                    found = None
            existing = None if found is None else str(found)
        if self.dist is not None:
            existing, error = self.dist.broadcast_json([existing, error])
        if error is not None:
            raise TrainingError(error)
        return existing

    def _load_newest_checkpoint(self) -> tuple[Path, dict]:
        """(path, state) of the newest good checkpoint; under data parallelism rank 0 reads it and broadcasts it."""
        if self.dist is None:
            path, _, state = load_newest_good_checkpoint(self.checkpoint_dir)
            return path, state
        path, error = None, None
        if self.is_main:
            try:
                path, _, state = load_newest_good_checkpoint(self.checkpoint_dir)
            except CheckpointError as e:
                error = str(e)
        path, error = self.dist.broadcast_json([None if path is None else str(path), error])
        if error is not None:
            raise CheckpointError(error)
        state = self.dist.broadcast_state(state if self.is_main else None)
        return Path(path), state

    def _scaled(self, batch: dict) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        x = batch["x"].to(self.device, torch.float32, non_blocking=True) * self.scale
        if not torch.isfinite(x.sum()) and not torch.isfinite(x).all():  # a finite sum clears x in one reduction
            n_nan, n_inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
            raise TrainingError(
                f"step {self.step + 1}: the activation batch holds {n_nan} NaN and {n_inf} Inf values, so the loss "
                f"of SAE {next(iter(self.runs))!r} (and every other) would be non-finite; {self._last_good()}")
        grad = None
        if self.needs_grad:
            if "grad" not in batch:
                raise TrainingError("an SAE whose encoder reads LM-loss gradients needs them, but the stream yields "
                                    "no 'grad' (open it with grad=True, or harvest the cache with gradients)")
            # d L / d(c x) = (d L / d x) / c
            grad = batch["grad"].to(self.device, torch.float32, non_blocking=True) / self.scale
            if not torch.isfinite(grad.sum()) and not torch.isfinite(grad).all():
                n_nan, n_inf = int(torch.isnan(grad).sum()), int(torch.isinf(grad).sum())
                users = [name for name, run in self.runs.items() if run.sae.needs_grad]
                raise TrainingError(
                    f"step {self.step + 1}: the stored LM-loss gradient batch holds {n_nan} NaN and {n_inf} Inf "
                    f"values, which SAE {users[0]!r} (and every SAE that reads gradients: {users}) selects latents with; "
                    f"{self._last_good()}")
        return x, grad

    def _last_good(self) -> str:
        last = latest_checkpoint(self.checkpoint_dir)
        return f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"

    def _check_losses(self, losses: list[torch.Tensor]) -> None:
        if bool(torch.isfinite(torch.stack(losses)).all()):
            return
        for name, loss in zip(self.runs, losses):
            if not torch.isfinite(loss):
                raise TrainingError(f"SAE {name!r}: the loss is {float(loss)} at step {self.step + 1}; "
                                    f"training stopped ({self._last_good()})")

    def _resample_due(self) -> bool:
        # Depends on [train] only, not on which SAEs resample: the stream is consumed the same way whatever the
        # mix of SAEs, so an SAE trains on the same batches alone as next to others.
        plan = self.plan
        return self.cfg.train.resample and self.step % plan.resample_every == 0 and self.step <= plan.resample_until

    def _resample(self, batches, monitor: Monitor) -> None:
        """Draw fresh inputs (consumed from the stream, not trained on) and resample each SAE's dead latents."""
        t = self.cfg.train
        inputs = []
        draws = math.ceil(t.resample_sample_tokens / t.batch_size)
        for _ in range(draws):
            try:
                inputs.append(self._scaled(next(batches))[0])
            except StopIteration:
                break
        if self.dist is not None:  # every rank's draws, in global batch order; the same sample on every rank
            sample = self.dist.gather_batches(inputs, int(self.stream.d_in), count=draws)
            if sample.shape[0] == 0:
                return
        elif not inputs:
            return
        else:
            sample = torch.cat(inputs)
        tokens = self.step * t.batch_size
        for name, run in self.runs.items():
            if run.resample:
                n, ess = run.resample_now(sample, self.step, tokens)
                self.resamples.append({"step": self.step, "sae": name, "n_resampled": n,
                                       "ess": ess if n else None})
                if n and self.is_main:
                    monitor.event(self.step, f"resampled {n} dead latents of {name} (draw weights' effective "
                                             f"sample size {ess:.0f} of {sample.shape[0]} inputs)")

    def _log(self, monitor: Monitor, *, final: bool = False) -> dict[str, dict[str, float]]:
        tokens = self.step * self.cfg.train.batch_size
        metrics = {name: run.take_metrics(self.step, tokens) for name, run in self.runs.items()}
        data = {"excluded_tokens": float(self._excluded_tokens()),
                "epoch": float(getattr(self.stream, "epoch", 0))}
        held_out = {}
        if not self.is_main:  # every rank sums the metrics; rank 0 logs them
            return metrics
        if self.heldout_samples is not None and (final or self.step - self._heldout_step >= self.plan.heldout_every):
            held_out = self._heldout_mse()
            self._heldout_step = self.step
        for name, m in metrics.items():
            m.update(data)
            m.update(held_out.get(name, {}))
        monitor.log(self.step, metrics)
        return metrics

    def _excluded_tokens(self) -> int:
        """Outlier tokens left out of training so far (by every rank: under data parallelism a collective)."""
        excluded = int(getattr(self.stream, "excluded_tokens", 0))
        return excluded if self.dist is None else self.dist.sum_int(excluded)

    def _prepare_heldout(self) -> None:
        """Fixed samples (scaled) of training and held-out activations for the train vs held-out MSE (rank 0)."""
        self.heldout_samples, self._heldout_step = None, self.step
        if not self.is_main:
            return
        n = self.cfg.train.heldout_tokens
        sample = getattr(self.stream, "heldout_sample", None)
        heldout = sample(n) if n > 0 and sample is not None else None
        if heldout is None:
            if n > 0:
                print("note: no held-out activations (set data.heldout_cache_dir to a cache harvested with split "
                      "'eval'), so no held-out MSE is logged", file=sys.stderr)
            return
        train = self.stream.training_sample(n)
        self.heldout_samples = {"train_mse": train.to(self.device) * self.scale,
                                "heldout_mse": heldout.to(self.device) * self.scale}

    @torch.no_grad()
    def _heldout_mse(self) -> dict[str, dict[str, float]]:
        """Each SAE's MSE (||x - x_hat||^2 on scaled activations, the units of `recon`) on the fixed samples.
        SAEs whose encoder reads LM gradients are skipped: the samples do not hold them."""
        out = {}
        for name, run in self.runs.items():
            if not run.sae.needs_grad:
                out[name] = {key: float(per_token_loss(run.sae, x, self.cfg.train.batch_size).mean())
                             for key, x in self.heldout_samples.items()}
        return out

    def run(self, resume: bool = False, *, overwrite: bool = False) -> TrainResult:
        """Train to train.tokens (or until the data runs out); save the SAEs; return where they are."""
        t = self.cfg.train
        if not self.runs:
            self.prepare(resume, overwrite=overwrite)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.is_main:
            (self.out_dir / "run_config.json").write_text(json.dumps(to_dict(self.cfg), indent=1))
        monitor = Monitor(total_steps=self.total_steps, start_step=self.step, batch_size=t.batch_size,
                          log_dir=self.out_dir / "tensorboard" if t.tensorboard and self.is_main else None,
                          out_dir=self.out_dir, wandb_project=t.wandb_project if self.is_main else None,
                          run_name=self.out_dir.name, config=to_dict(self.cfg), progress=self.progress)
        batches = iter(self.stream)
        self._prepare_heldout()
        exhausted = False
        metrics: dict[str, dict[str, float]] = {}
        try:
            while self.step < self.total_steps:
                if self.dist is None:
                    try:
                        batch = next(batches)
                    except StopIteration:
                        exhausted = True
                        break
                    x, grad = self._scaled(batch)
                    global_rows = None
                else:
                    batch = next(batches, None)
                    # The rows of the step over all ranks: a rank whose data ran out takes part with none, and the
                    # run ends when every rank's has.
                    global_rows = self.dist.sum_int(0 if batch is None else batch["x"].shape[0])
                    if global_rows == 0:
                        exhausted = True
                        break
                    x, grad = self._scaled(batch) if batch is not None else self._no_rows()
                if self.step == 0:
                    self._init_b_dec(x)
                tokens_after = (self.step + 1) * t.batch_size
                losses = [run.step(x, grad, self.step, tokens_after, global_rows) for run in self.runs.values()]
                self._check_losses(losses)
                self.step += 1
                monitor.advance()
                if self._resample_due():
                    self._resample(batches, monitor)
                if self.step % t.log_every == 0:
                    metrics = self._log(monitor, final=self.step == self.total_steps)
                if self.step % t.checkpoint_every == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
            if any(run.metric_steps for run in self.runs.values()):
                metrics = self._log(monitor, final=True)
        finally:
            monitor.close()
        checkpoint = self.save_checkpoint()
        tokens = self.step * t.batch_size
        if exhausted and self.is_main:
            print(f"the data ran out after {tokens:,} tokens ({self.step} steps) of the {t.tokens:,} asked for; "
                  f"final checkpoint {checkpoint}", file=sys.stderr)
        self._last_metrics = metrics
        excluded = self._excluded_tokens()
        if self.is_main:
            sae_dirs = self.save_saes(excluded_tokens=excluded)
        else:
            sae_dirs = {name: self.out_dir / name for name in self.runs}
        rows = [{"name": name, "architecture": run.sae.architecture, "d_sae": run.sae.d_sae,
                 "setting": self._setting(run), **metrics.get(name, {}),
                 "dead_pct": 100 * metrics.get(name, {}).get("dead_frac", float("nan"))}
                for name, run in self.runs.items()]
        if self.progress:
            print(summary_table(rows), file=sys.stderr)
            if self.stats.max_input_norm is not None:
                print(f"outlier tokens left out of training: {excluded:,} (raw norm above "
                      f"{self.stats.max_input_norm:.6g})", file=sys.stderr)
        if self.dist is not None:
            self.dist.barrier()  # every rank returns once rank 0 has saved the SAEs
        return TrainResult(sae_dirs=sae_dirs, tokens_seen=tokens, steps=self.step, data_exhausted=exhausted,
                           metrics=metrics, resamples=list(self.resamples), excluded_tokens=excluded)

    def _no_rows(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """An empty share of a step (this rank's data ran out before the others')."""
        x = torch.empty(0, int(self.stream.d_in), device=self.device)
        return x, (torch.empty_like(x) if self.needs_grad else None)

    @staticmethod
    def _setting(run: SAERun) -> str:
        """k, or the final lambda (with the L0 target it was steered to)."""
        if hasattr(run.sae, "k"):
            return f"k={run.sae.k}"
        if run.l0_controller is not None:
            return f"{run.sparsity_coeff:.4g} (target L0 {run.l0_controller.target_l0:g})"
        return "-" if run.sparsity_coeff is None else f"{run.sparsity_coeff:g}"

    @torch.no_grad()
    def _init_b_dec(self, x: torch.Tensor) -> None:
        """b_dec starts at the geometric median (or mean) of the first batch, as in Anthropic's and Gao et al.'s
        recipes; that batch is then trained on as usual."""
        if self.cfg.train.b_dec_init == "zeros":
            return
        if self.dist is not None:  # the first global batch; rank 0 computes, every rank takes its b_dec
            x = self.dist.gather_batches([x], int(self.stream.d_in))
        for run in self.runs.values():
            if run.sae.b_dec.requires_grad:  # a frozen b_dec (rescale & shift) keeps the baseline's
                if self.is_main:
                    run.sae.init_b_dec(x, method=self.cfg.train.b_dec_init)
                if self.dist is not None:
                    self.dist.broadcast_(run.sae.b_dec.data)

    def _training_record(self, run: SAERun, tokens: int, excluded_tokens: int) -> TrainingRecord:
        """What cfg.json keeps of training: lambda, the L0 target and L0 reached, outliers, epochs, MSEs."""
        last = self._last_metrics.get(run.name, {})
        controller = run.l0_controller
        return TrainingRecord(
            tokens=tokens, steps=self.step, lr=run.lr_schedule.base, sparsity_coeff=run.sparsity_coeff,
            target_l0=controller.target_l0 if controller is not None else None,
            l0_ema_at_freeze=controller.l0_ema if controller is not None else None,
            l0=last.get("l0"), train_mse=last.get("train_mse"), heldout_mse=last.get("heldout_mse"),
            excluded_tokens=excluded_tokens, last_epoch=int(getattr(self.stream, "epoch", 0)))

    def save_saes(self, excluded_tokens: Optional[int] = None) -> dict[str, Path]:
        """Each SAE to {out_dir}/{name}/ with the activation scale folded in and its firing counts.
        excluded_tokens: the outlier tokens left out (by every rank); None = this process's stream's count."""
        if excluded_tokens is None:
            excluded_tokens = int(getattr(self.stream, "excluded_tokens", 0))
        dirs = {}
        tokens = self.step * self.cfg.train.batch_size
        for name, run in self.runs.items():
            sae = copy.deepcopy(run.sae).cpu()
            sae.fold_activation_scale(self.scale)
            sae.meta = self._metadata(name, self._training_record(run, tokens, excluded_tokens))
            dirs[name] = sae.save(self.out_dir / name, sparsity=run.tracker.counts.cpu(), n_tokens=tokens)
        return dirs
