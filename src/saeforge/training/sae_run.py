"""One SAE's share of a training run: its optimizer, schedules, firing tracker, resampling RNG and one step.

The trainer holds one `SAERun` per SAE and feeds every batch of the shared stream to each in turn. Under data
parallelism (training/distributed.py) the trainer gives each run a `ReplicaSync` (`sync`): the step then sums the
gradients, firing counts and buffers over the ranks before the optimizer step, and resampling is drawn on rank 0.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from saeforge.config import TrainConfig
from saeforge.training.l0_target import DEFAULT_START_COEFF, L0Controller
from saeforge.training.optim import ConstrainedAdam
from saeforge.training.resample import FiringTracker, apply_resample, draw_resample_inputs, resample_dead_latents
from saeforge.training.schedules import CoeffSchedule, LRSchedule, StepPlan

METRICS = ("loss", "recon", "sparsity", "aux", "l0")


class SAERun:
    def __init__(
        self,
        name: str,
        sae,
        train: TrainConfig,
        *,
        total_steps: int,
        plan: StepPlan,
        lr: float,
        betas: tuple[float, float],
        sparsity_coeff: Optional[float],
        target_l0: Optional[float] = None,
        resample: bool,
        seed: int,
        compute_dtype: Optional[torch.dtype] = None,
    ):
        self.name, self.sae, self.train, self.plan = name, sae, train, plan
        self.device = sae.W_dec.device
        self.compute_dtype = None if compute_dtype == torch.float32 else compute_dtype  # None: the parameters' dtype
        self.resample = resample and sae.supports_resampling
        self.uses_aux_k = sae.dead_latents == "aux_k"
        constrain = getattr(sae, "constrain_decoder_norm", True)
        params = [p for p in sae.parameters() if p.requires_grad]
        self.params = params
        self.sync = None  # a distributed.ReplicaSync under data parallelism (set by the trainer)
        self.optimizer = ConstrainedAdam(
            params,
            unit_norm_rows=[sae.W_dec] if constrain and sae.W_dec.requires_grad else [],
            lr=lr,
            betas=betas,
        )
        self.lr_schedule = LRSchedule(
            base=lr,
            total_steps=total_steps,
            warmup_steps=plan.lr_warmup,
            decay=train.lr_decay,
            decay_start=int(train.lr_decay_start_frac * total_steps),
            resample_drop=train.resample_lr_drop,
            resample_warmup_steps=plan.resample_lr_warmup,
        )
        # lambda(step) = (the L0 controller's lambda, or the fixed one) x the warm-up factor
        self.coeff_schedule = CoeffSchedule(sparsity_coeff or 0.0, plan.sparsity_warmup)
        self.l0_controller = None
        if target_l0 is not None and sae.uses_sparsity_coeff:
            self.l0_controller = L0Controller(target_l0, sparsity_coeff or DEFAULT_START_COEFF,
                                              rate=train.l0_control_rate, start=plan.sparsity_warmup,
                                              until=plan.l0_control_until)
        self.tracker = FiringTracker(sae.d_sae, self.device)
        self.generator = torch.Generator().manual_seed(seed)  # resampling draws; CPU, so it checkpoints alike
        self.metric_sums = torch.zeros(len(METRICS), dtype=torch.float64, device=self.device)
        self.metric_steps = 0

    @property
    def dead_window_tokens(self) -> int:
        if self.uses_aux_k:
            return self.train.aux_k_dead_tokens
        return self.plan.dead_window * self.train.batch_size

    @property
    def sparsity_coeff(self) -> Optional[float]:
        """lambda after the warm-up: the fixed one, or the L0 controller's current (finally: frozen) one."""
        if not self.sae.uses_sparsity_coeff:
            return None
        return self.l0_controller.coeff if self.l0_controller is not None else self.coeff_schedule.final

    def coeff(self, step: int) -> float:
        return self.sparsity_coeff * self.coeff_schedule.warmup(step)

    def step(self, x: torch.Tensor, grad: Optional[torch.Tensor], step: int, tokens_after: int,
             batch_tokens: Optional[int] = None, *, through_lm: Optional[Callable] = None) -> torch.Tensor:
        """One optimizer step on batch x (already scaled). Returns the total loss, detached (not synchronised).
        through_lm: for an SAE whose loss runs through the LM (`needs_lm`), the batch's splice (SAE.lm_loss).

        Under data parallelism (`self.sync` set) x is this rank's share of the step, possibly empty, and
        batch_tokens the rows of the whole step over all ranks; the gradients, firing counts and buffers are summed
        across the ranks before the optimizer step (distributed.ReplicaSync), so every rank takes the same step."""
        n = x.shape[0] if batch_tokens is None else batch_tokens
        self.optimizer.set_lr(self.lr_schedule(step))
        coeff = self.coeff(step) if self.sae.uses_sparsity_coeff else None
        dead_mask = None
        if self.uses_aux_k:
            dead_mask = self.tracker.dead_mask(tokens_after - n, self.train.aux_k_dead_tokens)
        out = None
        if self.sae.needs_lm:
            if through_lm is None:
                raise ValueError(f"SAE {self.name!r} trains through the LM: step needs through_lm")
            out = self.sae.lm_loss(x, through_lm, dead_mask=dead_mask)  # its products in float32: the LM dominates
            out.total.backward(inputs=self.params)  # the LM's weights get no gradient, whatever their flags
        elif x.shape[0] or self.sync is None:
            out = self.sae.loss_and_grads(x, sparsity_coeff=coeff, grad=grad if self.sae.needs_grad else None,
                                          dead_mask=dead_mask,
                                          compute_dtype=self.compute_dtype)
        if self.sync is not None:  # the global gradient, firing counts and buffers
            fired = self.sync.reduce(out.fired() if out is not None else None, x.shape[0], n)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.sync is None:
            fired = out.fired()
        l0 = self.tracker.update(fired, n, tokens_after)
        if self.l0_controller is not None and self.l0_controller.active(step):
            self.l0_controller.update(float(l0), step)  # one synchronisation per step, while lambda is adjusted
        if out is None:
            total = torch.zeros((), device=self.device)
            values = torch.zeros(len(METRICS), dtype=torch.float64, device=self.device)
            values[-1] = l0
        else:
            total = out.total.detach()
            with torch.no_grad():
                values = torch.stack([total, out.recon.detach(), out.sparsity.detach(), out.aux.detach(), l0])
        with torch.no_grad():
            if self.sync is not None:
                # this rank's share of the step's means; summed over the ranks at take_metrics (l0 is global already)
                values = values.to(torch.float64) * (x.shape[0] / n)
                values[-1] = l0.to(torch.float64) / self.sync.dist.world_size
            self.metric_sums += values.to(torch.float64)
        self.metric_steps += 1
        return total

    def take_metrics(self, step: int, tokens: int) -> dict[str, float]:
        """Means since the last call (one synchronisation), plus dead fraction and learning rate. Under data
        parallelism every rank calls it at the same step (it sums the ranks' shares)."""
        if self.sync is not None:
            self.sync.dist.all_reduce_(self.metric_sums)
        means = (self.metric_sums / max(1, self.metric_steps)).tolist()
        self.metric_sums.zero_()
        self.metric_steps = 0
        metrics = dict(zip(METRICS, means))
        dead = self.tracker.dead_mask(tokens, self.dead_window_tokens, strict=False)
        metrics["dead_frac"] = float(dead.float().mean())
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        if self.sae.uses_sparsity_coeff:
            metrics["sparsity_coeff"] = self.coeff(max(0, step - 1))
        return metrics

    def resample_now(self, inputs: torch.Tensor, step: int, tokens: int) -> tuple[int, float]:
        """Resample latents dead over the window from `inputs`; returns how many were resampled and the effective
        sample size of the draw weights. Under data parallelism `inputs` is the sample gathered from every rank (the
        same on each); rank 0 draws, broadcasts the drawn rows' indices and its generator state, and every rank
        applies them, so the SAEs, Adam moments and generators stay identical."""
        dead = self.tracker.dead_mask(tokens, self.plan.dead_window * self.train.batch_size)
        if self.sync is None:
            idx, ess = resample_dead_latents(self.sae, self.optimizer, dead, inputs, self.generator,
                                             chunk=self.train.batch_size, loss_power=self.train.resample_loss_power)
        else:
            idx, ess = self._resample_replicated(dead, inputs)
        if idx.numel():
            self.tracker.revive(idx, tokens)
            self.lr_schedule.last_resample_step = step
        return int(idx.numel()), ess

    def _resample_replicated(self, dead: torch.Tensor, inputs: torch.Tensor) -> tuple[torch.Tensor, float]:
        dist = self.sync.dist
        idx = dead.nonzero().squeeze(1)  # the dead masks are the same on every rank (global firing counts)
        if idx.numel() == 0 or inputs.shape[0] == 0:
            return idx[:0], float("nan")
        drawn = torch.empty(idx.numel(), dtype=torch.int64)
        ess = torch.zeros(1, dtype=torch.float64)
        if dist.is_main:
            drawn, e = draw_resample_inputs(self.sae, idx.numel(), inputs, self.generator,
                                            chunk=self.train.batch_size, loss_power=self.train.resample_loss_power)
            ess[0] = e
        state = self.generator.get_state()
        for t in (drawn, ess, state):
            dist.broadcast_(t)
        self.generator.set_state(state)
        apply_resample(self.sae, self.optimizer, idx, inputs[drawn.to(inputs.device)])
        return idx, float(ess[0])

    # ------------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        names = {id(p): n for n, p in self.sae.named_parameters()}
        return {
            "weights": dict(self.sae.state_dict()),
            "optimizer": self.optimizer.named_state(names),
            "lr_schedule": self.lr_schedule.state_dict(),
            "tracker": self.tracker.state_dict(),
            "generator": self.generator.get_state(),
            "l0_controller": self.l0_controller.state_dict() if self.l0_controller is not None else None,
            "metric_sums": self.metric_sums,
            "metric_steps": self.metric_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        self.sae.load_state_dict({k: v.to(self.device) for k, v in state["weights"].items()})
        self.optimizer.load_named_state(state["optimizer"], dict(self.sae.named_parameters()))
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.tracker.load_state_dict(state["tracker"])
        self.generator.set_state(state["generator"])
        if self.l0_controller is not None:
            self.l0_controller.load_state_dict(state["l0_controller"])
        self.metric_sums.copy_(state["metric_sums"])
        self.metric_steps = int(state["metric_steps"])
