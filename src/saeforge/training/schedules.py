"""Learning-rate and sparsity-coefficient schedules.

Each schedule is a pure function of the step (plus, for the LR, the steps at which latents were last resampled),
so its whole state is a few integers and a resumed run computes exactly the same values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional


@dataclass
class LRSchedule:
    """lr(step) = base * warmup * decay * resample factor.

    - warmup: linear from 1/warmup_steps to 1 over the first `warmup_steps` steps;
    - decay: none, or linear / cosine to 0 from `decay_start` to `total_steps`;
    - resample (paper A's change to Anthropic's procedure): after latents are resampled at step s the LR drops to
      `resample_drop` x and returns to 1x on a half cosine over `resample_warmup_steps`.
    """

    base: float
    total_steps: int
    warmup_steps: int = 0
    decay: Literal["none", "linear", "cosine"] = "none"
    decay_start: int = 0
    resample_drop: float = 0.1
    resample_warmup_steps: int = 1000
    last_resample_step: Optional[int] = None

    def __call__(self, step: int) -> float:
        return self.base * self.warmup(step) * self.decay_factor(step) * self.resample_factor(step)

    def warmup(self, step: int) -> float:
        if self.warmup_steps <= 0:
            return 1.0
        return min(1.0, (step + 1) / self.warmup_steps)

    def decay_factor(self, step: int) -> float:
        if self.decay == "none" or step < self.decay_start:
            return 1.0
        span = max(1, self.total_steps - self.decay_start)
        frac = min(1.0, (step - self.decay_start) / span)
        if self.decay == "linear":
            return 1.0 - frac
        return 0.5 * (1.0 + math.cos(math.pi * frac))

    def resample_factor(self, step: int) -> float:
        if self.last_resample_step is None or self.resample_warmup_steps <= 0:
            return 1.0
        since = step - self.last_resample_step
        if since < 0 or since >= self.resample_warmup_steps:
            return 1.0
        rise = 0.5 * (1.0 - math.cos(math.pi * since / self.resample_warmup_steps))  # 0 -> 1, cosine
        return self.resample_drop + (1.0 - self.resample_drop) * rise

    def state_dict(self) -> dict:
        return {"last_resample_step": self.last_resample_step}

    def load_state_dict(self, state: dict) -> None:
        self.last_resample_step = state["last_resample_step"]


@dataclass
class CoeffSchedule:
    """Sparsity coefficient lambda(step): linear warmup from lambda/warmup_steps to lambda (0 steps = constant)."""

    final: float
    warmup_steps: int = 0

    def __call__(self, step: int) -> float:
        return self.final * self.warmup(step)

    def warmup(self, step: int) -> float:
        """The warm-up factor of `step`: (step + 1) / warmup_steps, at most 1."""
        if self.warmup_steps <= 0:
            return 1.0
        return min(1.0, (step + 1) / self.warmup_steps)


@dataclass(frozen=True)
class StepPlan:
    """The step counts of a run, with train's unset (None) ones sized to its length `total_steps`.

    Fractions (of total steps) used for unset fields: warm-ups of lr and lambda 5% (Anthropic's April 2024 update
    warms lambda up over the first 5%); resampling every 1/8 until half of the run (METHODS.md: "a few times in
    the first half"), a latent dead when it did not fire over one resampling interval, the LR re-warm-up after a
    resample a quarter of the interval (paper A's 1000 steps, scaled from its long runs); held-out MSE every 5%.
    """

    lr_warmup: int
    sparsity_warmup: int
    resample_every: int
    resample_until: int
    dead_window: int
    resample_lr_warmup: int
    heldout_every: int
    l0_control_until: int

    @classmethod
    def of(cls, train, total_steps: int) -> "StepPlan":
        def given_or(value: Optional[int], frac: float) -> int:
            return value if value is not None else max(1, round(frac * total_steps))

        resample_every = given_or(train.resample_every, 1 / 8)
        return cls(
            lr_warmup=given_or(train.lr_warmup_steps, 0.05),
            sparsity_warmup=given_or(train.sparsity_warmup_steps, 0.05),
            resample_every=resample_every,
            resample_until=given_or(train.resample_until, 0.5),
            dead_window=train.dead_window_steps if train.dead_window_steps is not None else resample_every,
            resample_lr_warmup=(train.resample_lr_warmup_steps if train.resample_lr_warmup_steps is not None
                                else max(1, resample_every // 4)),
            heldout_every=given_or(train.heldout_every, 0.05),
            l0_control_until=round(train.l0_control_frac * total_steps),
        )
