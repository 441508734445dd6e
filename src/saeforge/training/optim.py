"""Decoder-norm-constrained Adam (METHODS.md, "Baseline SAE": the "constrained Adam" of paper A).

Decoder rows are held at exactly unit norm. Before each step the component of each row's gradient along the row
is removed (so the step moves the row tangentially); after the step the rows are renormalised, which removes the
small radial drift that a finite step along the tangent leaves.

The Adam update itself is written out here (rather than subclassing torch.optim.Adam) so that its state is a plain
per-parameter dict of tensors that the checkpoint code saves with safetensors, and so that resampling can reset the
state of individual latent rows.
"""

from __future__ import annotations

from typing import Iterable

import torch


def project_out_radial_grad(weight: torch.Tensor, grad: torch.Tensor) -> None:
    """In place: grad_i <- grad_i - (grad_i . w_i) w_i for every row i of a unit-norm-row weight."""
    radial = (grad * weight).sum(dim=1, keepdim=True)
    grad.sub_(radial * weight)


@torch.no_grad()
def normalize_rows_(weight: torch.Tensor, eps: float = 1e-12) -> None:
    """In place: every row of `weight` to unit L2 norm."""
    weight.div_(weight.norm(dim=1, keepdim=True).clamp_min(eps))


class ConstrainedAdam(torch.optim.Optimizer):
    """Adam whose `unit_norm_rows` parameters keep unit-norm rows (each a [n_rows, dim] matrix, e.g. W_dec).

    State per parameter: `step` (a 0-dim float64 tensor), `exp_avg`, `exp_avg_sq`.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        *,
        unit_norm_rows: Iterable[torch.nn.Parameter] = (),
        lr: float = 3e-4,
        betas: tuple[float, float] = (0.0, 0.999),
        eps: float = 1e-8,
    ):
        if lr < 0:
            raise ValueError(f"lr must be non-negative, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Adam betas must lie in [0, 1), got {betas}")
        super().__init__(list(params), dict(lr=lr, betas=tuple(betas), eps=eps))
        self.unit_norm_rows = list(unit_norm_rows)
        known = {id(p) for group in self.param_groups for p in group["params"]}
        for w in self.unit_norm_rows:
            if w.dim() != 2 or id(w) not in known:
                raise ValueError("unit_norm_rows must be 2-d parameters that the optimizer also updates")

    def set_lr(self, lr: float) -> None:
        for group in self.param_groups:
            group["lr"] = lr

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("ConstrainedAdam.step takes no closure")
        for w in self.unit_norm_rows:
            if w.grad is not None:
                project_out_radial_grad(w, w.grad)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float64)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"].item()
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                bias1 = 1.0 - beta1**t
                bias2 = 1.0 - beta2**t
                denom = (exp_avg_sq / bias2).sqrt_().add_(group["eps"])
                p.addcdiv_(exp_avg, denom, value=-group["lr"] / bias1)
        for w in self.unit_norm_rows:
            normalize_rows_(w)
        return None

    @torch.no_grad()
    def reset_rows(self, param: torch.nn.Parameter, index: torch.Tensor, dim: int) -> None:
        """Zero the Adam moments of `param` at positions `index` along `dim` (after those latents are resampled)."""
        state = self.state.get(param)
        if not state:
            return
        for key in ("exp_avg", "exp_avg_sq"):
            state[key].index_fill_(dim, index.to(state[key].device), 0.0)

    # The checkpoint code addresses parameters by name, not by position, so state is exchanged as
    # {param_name: {"step", "exp_avg", "exp_avg_sq"}} together with the names of the parameters.
    def named_state(self, names: dict[int, str]) -> dict[str, torch.Tensor]:
        """Flat {f"{param_name}.{key}": tensor} for every parameter with state; names maps id(param) -> name."""
        out = {}
        for p, state in self.state.items():
            for key, value in state.items():
                out[f"{names[id(p)]}.{key}"] = value
        return out

    def load_named_state(self, flat: dict[str, torch.Tensor], params: dict[str, torch.nn.Parameter]) -> None:
        """Inverse of named_state; params maps name -> parameter. Unknown or missing entries are errors."""
        self.state.clear()
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in flat.items():
            name, _, field = key.rpartition(".")
            if name not in params or field not in ("step", "exp_avg", "exp_avg_sq"):
                raise ValueError(f"optimizer state has an entry {key!r} for no known parameter")
            grouped.setdefault(name, {})[field] = value
        for name, fields in grouped.items():
            p = params[name]
            if set(fields) != {"step", "exp_avg", "exp_avg_sq"}:
                raise ValueError(f"optimizer state of {name!r} is incomplete: has {sorted(fields)}")
            self.state[p] = {
                "step": fields["step"].to(torch.float64).cpu().clone(),
                "exp_avg": fields["exp_avg"].to(p.device, p.dtype).clone(),
                "exp_avg_sq": fields["exp_avg_sq"].to(p.device, p.dtype).clone(),
            }
