"""L0 targets: adjust lambda during the first part of training so that an SAE reaches a chosen L0, then freeze it.

METHODS.md ("what lambda means"): users think in L0, and L0 scales roughly as lambda^-1.8. The controller keeps an
exponential moving average of log L0 (per-batch L0 is noisy) and moves log lambda against the error:

    e_t          = EMA_t(log L0) - log L0_target
    log lambda  += rate * e_t            (an integral controller on log lambda)

L0 above the target raises lambda, below lowers it. It runs only from the end of the sparsity warm-up (while lambda
is still ramping the L0 says little about the final lambda) to `until` (train.l0_control_frac of the steps); lambda
is then frozen, so the second part of training optimises one fixed loss. The state is three floats and a count, and
a resumed run continues it exactly.
"""

from __future__ import annotations

import math
from typing import Optional

# Starting lambda when a spec gives only target_l0: with centred normalisation (E||c (x - mu)||^2 = d_in) it gave
# L0 of the order of 10-100 for Gated and ReLU SAEs on blocks.9.resid_post of Gemma 3 270M.
DEFAULT_START_COEFF = 1.0
# EMA weight of the previous value: an average over about 1 / (1 - 0.9) = 10 batches. Longer averages lag, and
# the lag made the controller overshoot on synthetic data (tests/training/test_recipe.py); per-batch L0 of 512+
# tokens is steady enough.
EMA_DECAY = 0.9


class L0Controller:
    def __init__(self, target_l0: float, start_coeff: float, *, rate: float, start: int, until: int):
        if not (target_l0 > 0 and start_coeff > 0):
            raise ValueError(f"L0Controller: target_l0 and start_coeff must be positive, got {target_l0}, {start_coeff}")
        self.target_l0, self.rate, self.start, self.until = float(target_l0), float(rate), int(start), int(until)
        self.log_coeff = math.log(start_coeff)
        self.ema_log_l0: Optional[float] = None

    @property
    def coeff(self) -> float:
        return math.exp(self.log_coeff)

    @property
    def l0_ema(self) -> Optional[float]:
        return None if self.ema_log_l0 is None else math.exp(self.ema_log_l0)

    def update(self, l0: float, step: int) -> None:
        """Record the L0 of the batch of `step` (0-based) and adjust lambda for the next step."""
        if not self.active(step):
            return
        log_l0 = math.log(max(l0, 1e-3))  # an SAE with no firing at all reads as L0 = 0.001
        if self.ema_log_l0 is None:
            self.ema_log_l0 = log_l0
        else:
            self.ema_log_l0 = EMA_DECAY * self.ema_log_l0 + (1 - EMA_DECAY) * log_l0
        self.log_coeff += self.rate * (self.ema_log_l0 - math.log(self.target_l0))

    def active(self, step: int) -> bool:
        """Whether lambda is being adjusted at `step` (after the warm-up, before it is frozen)."""
        return self.start <= step < self.until

    def state_dict(self) -> dict:
        return {"log_coeff": self.log_coeff, "ema_log_l0": self.ema_log_l0}

    def load_state_dict(self, state: dict) -> None:
        self.log_coeff = float(state["log_coeff"])
        self.ema_log_l0 = None if state["ema_log_l0"] is None else float(state["ema_log_l0"])
