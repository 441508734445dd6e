"""One SAE's share of a training run: its optimizer, schedules, firing tracker, resampling RNG and one step.

The trainer holds one `SAERun` per SAE and feeds every batch of the shared stream to each in turn.
"""

from __future__ import annotations

from typing import Optional

import torch

from saeforge.config import TrainConfig
from saeforge.training.l0_target import DEFAULT_START_COEFF, L0Controller
from saeforge.training.optim import ConstrainedAdam
from saeforge.training.resample import FiringTracker, resample_dead_latents
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

    def step(self, x: torch.Tensor, grad: Optional[torch.Tensor], step: int, tokens_after: int) -> torch.Tensor:
        """One optimizer step on batch x (already scaled). Returns the total loss, detached (not synchronised)."""
        self.optimizer.set_lr(self.lr_schedule(step))
        coeff = self.coeff(step) if self.sae.uses_sparsity_coeff else None
        dead_mask = None
        if self.uses_aux_k:
            dead_mask = self.tracker.dead_mask(tokens_after - x.shape[0], self.train.aux_k_dead_tokens)
        out = self.sae.loss_and_grads(x, sparsity_coeff=coeff, grad=grad if self.sae.needs_grad else None,
                                      dead_mask=dead_mask,
                                      compute_dtype=self.compute_dtype)
        # Data parallelism goes here: all-reduce (mean) the parameter gradients across ranks before the step.
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        l0 = self.tracker.update(out.fired(), x.shape[0], tokens_after)
        if self.l0_controller is not None and self.l0_controller.active(step):
            self.l0_controller.update(float(l0), step)  # one synchronisation per step, while lambda is adjusted
        total = out.total.detach()
        with torch.no_grad():
            values = torch.stack([total, out.recon.detach(), out.sparsity.detach(), out.aux.detach(), l0])
            self.metric_sums += values.to(torch.float64)
        self.metric_steps += 1
        return total

    def take_metrics(self, step: int, tokens: int) -> dict[str, float]:
        """Means since the last call (one synchronisation), plus dead fraction and learning rate."""
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
        sample size of the draw weights."""
        dead = self.tracker.dead_mask(tokens, self.plan.dead_window * self.train.batch_size)
        idx, ess = resample_dead_latents(self.sae, self.optimizer, dead, inputs, self.generator,
                                         chunk=self.train.batch_size, loss_power=self.train.resample_loss_power)
        if idx.numel():
            self.tracker.revive(idx, tokens)
            self.lr_schedule.last_resample_step = step
        return int(idx.numel()), ess

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
