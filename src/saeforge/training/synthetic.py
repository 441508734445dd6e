"""A synthetic activation stream with known sparse structure, for experiments and tests without a language model.

Each token is a sparse non-negative combination of `n_features` fixed unit directions (feature i fires with a
probability that falls off as a power law, so some features are rare), times `raw_scale`, plus a little Gaussian
noise. With `grad=True` each token also carries the gradient of a fixed quadratic "downstream loss"
L(x) = 1/2 sum_i w_i (d_i . x)^2 in which features have different importances w_i: the stand-in for the LM-loss
gradient that gradient TopK SAEs select with.

It implements the activation-stream interface of `saeforge.data.open_stream`: iteration yields {"x", ["grad"]}
batches; `d_in`, `scale`, `tokens_seen`, `activation_stats()`, `training_sample(n)`, `heldout_sample(n)`,
`state_dict()` / `load_state_dict()`. Batch b of rank r is generated from its own seed (seed, b * world_size + r),
so the stream resumes exactly and ranks read disjoint data; the statistics sample and the held-out sample are
batches of negative index, which training never reads.
"""

from __future__ import annotations

from typing import Optional

import torch

from saeforge.data.store import ActivationStats, activation_stats

HELDOUT_FIRST_INDEX = -1_000_000  # held-out batches: indices from here down


class SyntheticStream:
    def __init__(
        self,
        d_in: int,
        batch_size: int,
        *,
        n_features: Optional[int] = None,
        active_per_token: float = 4.0,
        raw_scale: float = 5.0,
        noise: float = 0.01,
        grad: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        max_tokens: Optional[int] = None,
    ):
        if d_in < 1 or batch_size < 1:
            raise ValueError(f"d_in and batch_size must be positive, got {d_in}, {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.d_in, self.batch_size, self.grad = d_in, batch_size, grad
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.max_tokens = max_tokens
        self.noise, self.raw_scale = noise, raw_scale
        n_features = n_features or 4 * d_in
        g = torch.Generator().manual_seed(seed)
        self.features = torch.nn.functional.normalize(torch.randn(n_features, d_in, generator=g), dim=1)
        rate = 1.0 / torch.arange(1, n_features + 1, dtype=torch.float64) ** 0.7  # power-law firing rates
        self.fire_prob = (rate * active_per_token / rate.sum()).clamp(max=1.0).float()
        self.importance = torch.rand(n_features, generator=g) ** 3  # a few features matter most downstream
        self.batches = 0
        self.excluded_tokens, self.epoch = 0, 0  # nothing is left out; the data never repeats
        # Statistics (METHODS.md "Activation scale") from a fixed sample of its own; no outliers are left out.
        self._sample = torch.cat([self._make(-1 - i)["x"] for i in range(4)])
        self._stats = activation_stats(self._sample, None)
        self.scale = self._stats.scale("uncentered")  # c with E||c x||^2 = d_in

    @property
    def tokens_seen(self) -> int:
        return self.batches * self.batch_size

    def _make(self, index: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + index) % 2**63)
        fires = torch.rand(self.batch_size, len(self.fire_prob), generator=g) < self.fire_prob
        magnitude = torch.rand(self.batch_size, len(self.fire_prob), generator=g) + 0.5
        codes = fires * magnitude
        x = self.raw_scale * (codes @ self.features)
        x = x + self.noise * self.raw_scale * torch.randn(x.shape, generator=g)
        batch = {"x": x}
        if self.grad:
            # dL/dx for L(x) = 1/2 sum_i w_i (d_i . x)^2
            batch["grad"] = ((x @ self.features.T) * self.importance) @ self.features
        return batch

    def activation_stats(self) -> ActivationStats:
        return self._stats

    def training_sample(self, n_tokens: int) -> torch.Tensor:
        return self._sample[:n_tokens]

    def heldout_sample(self, n_tokens: int) -> torch.Tensor:
        n_batches = -(-n_tokens // self.batch_size)
        return torch.cat([self._make(HELDOUT_FIRST_INDEX - i)["x"] for i in range(n_batches)])[:n_tokens]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.max_tokens is not None and self.tokens_seen + self.batch_size > self.max_tokens:
            raise StopIteration
        batch = self._make(self.batches * self.world_size + self.rank)
        self.batches += 1
        return batch

    def state_dict(self) -> dict:
        return {"batches": self.batches, "seed": self.seed, "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        mine = (self.seed, self.rank, self.world_size)
        theirs = (state["seed"], state["rank"], state["world_size"])
        if mine != theirs:
            raise ValueError(f"stream state is for (seed, rank, world_size) = {theirs}, this stream is {mine}")
        self.batches = int(state["batches"])
