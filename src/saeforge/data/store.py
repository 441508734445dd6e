"""The activation stream: shuffled training batches from a language model or a harvested cache.

Shuffling works in blocks. A block is a bounded slice of the data: `buffer_tokens // context_len` consecutive
contexts of this rank (live LM), or as many cache shards as fit in `buffer_tokens` (cache; shards are visited in a
seeded random order). A block's valid tokens are permuted by a generator seeded from (seed, rank, block index) and
served in that order; batches run on across block boundaries. So memory holds one block, and each batch is a uniform
sample of a few hundred contexts rather than a run of neighbouring tokens of the same few documents. Documents are
also shuffled (seeded, bounded buffer) before packing, so blocks do not follow the source's topic order.

Resume is deterministic replay of one block. Everything a block holds is a pure function of its index and the
stream's fingerprint (source, site, seed, rank, ...), so the state is just (block index, offset in the block,
tokens seen, statistics) and is JSON-able. `load_state_dict` recomputes the current block (one buffer's worth of LM
forward passes, or one read of its shards) and skips `offset` tokens; on CPU the resumed stream yields bitwise the
batches the uninterrupted one would have. The order of tokens does not depend on the batch size, so a resumed run
may even change it.

Statistics and outliers. Before the first batch the stream measures a sample (`ActivationStats`): the median raw
norm, the mean mu, E||x||^2 and E||x - mu||^2. Tokens whose raw norm exceeds `max_norm_ratio` x the median
(attention sinks, METHODS.md) are then left out of every block before it is shuffled, like BOS, and counted
(`excluded_tokens`); the threshold in raw units is `max_input_norm`. A cache is read for several epochs when asked
(cache.py, `CacheBlocks`); a block index runs on across epochs, so the position (epoch included) resumes exactly.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol

import torch
from tqdm.auto import tqdm

from saeforge.data.packing import source_contexts, training_mask

STATE_FORMAT = "saeforge-activation-stream"
CONTEXT_STATE_FORMAT = "saeforge-context-stream"
SCALE_SAMPLE_TOKENS = 16384  # tokens used to estimate the activation statistics of a live stream


class NonFiniteActivationsError(FloatingPointError):
    """The language model produced NaN or Inf at the harvested site."""


def activation_scale(sum_sq_norms: float, n_tokens: int, d_in: int) -> float:
    """METHODS.md "Activation scale": the c with E||c x||^2 = d_in, from the summed squared norms of a sample."""
    if n_tokens == 0 or sum_sq_norms <= 0:
        raise ValueError("cannot estimate the activation scale: the sample has no tokens or only zero activations")
    return math.sqrt(d_in * n_tokens / sum_sq_norms)


@dataclass(frozen=True)
class ActivationStats:
    """What normalisation and outlier exclusion need to know of a sample of raw activations [n, d].

    Every mean is over the kept rows (raw norm <= max_input_norm); `median_norm` is over the whole sample."""

    tokens: int  # rows of the sample kept
    excluded: int  # rows of the sample above max_input_norm
    median_norm: float  # median raw norm ||x|| of the sample
    max_input_norm: Optional[float]  # raw-norm threshold of the outliers; None = nothing is left out
    mean: tuple[float, ...]  # mu = E x
    mean_sq_norm: float  # E ||x||^2
    centered_sq_norm: float  # E ||x - mu||^2

    @property
    def d_in(self) -> int:
        return len(self.mean)

    @property
    def mean_norm(self) -> float:
        return math.sqrt(sum(v * v for v in self.mean))

    def scale(self, normalize: str = "uncentered") -> float:
        """METHODS.md "Activation scale": the c with E||c x||^2 = d_in ("uncentered", paper A) or
        E||c (x - mu)||^2 = d_in ("centered")."""
        if normalize not in ("centered", "uncentered"):
            raise ValueError(f"normalize must be 'centered' or 'uncentered', got {normalize!r}")
        sq = self.centered_sq_norm if normalize == "centered" else self.mean_sq_norm
        if not sq > 0:
            raise ValueError(f"cannot normalise activations ({normalize}): the sample's mean squared norm is {sq}")
        return math.sqrt(self.d_in / sq)

    def to_dict(self) -> dict:
        return {**asdict(self), "mean": list(self.mean)}

    @classmethod
    def from_dict(cls, d: dict) -> "ActivationStats":
        return cls(**{**d, "mean": tuple(d["mean"])})


def activation_stats(x: torch.Tensor, max_norm_ratio: Optional[float]) -> ActivationStats:
    """Statistics of the sample x [n, d] (computed in float64), rows with ||x|| > max_norm_ratio x the median norm
    left out (max_norm_ratio None: none)."""
    if x.shape[0] == 0:
        raise ValueError("cannot estimate activation statistics from an empty sample")
    x = x.double()
    norms = x.norm(dim=1)
    median = float(norms.median())
    threshold = None if max_norm_ratio is None else max_norm_ratio * median
    kept = x if threshold is None else x[norms <= threshold]
    mu = kept.mean(0)
    return ActivationStats(
        tokens=kept.shape[0], excluded=x.shape[0] - kept.shape[0], median_norm=median, max_input_norm=threshold,
        mean=tuple(mu.tolist()), mean_sq_norm=float(kept.pow(2).sum(1).mean()),
        centered_sq_norm=float((kept - mu).pow(2).sum(1).mean()),
    )


def capture_training_tokens(
    lm: Any, site: str, tokens: torch.Tensor, *, keep_bos: bool, grad: bool, lm_batch_size: int,
    progress: Optional[str] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Run the LM on contexts [N, S]; return the site's activations (and gradients) at training positions, [n, d].

    The values keep the LM's dtype. NaN/Inf is an error naming the site. `progress`: a description for a
    tokens/s progress bar over these contexts (none when None).
    """
    xs, gs = [], []
    bar = tqdm(total=tokens.numel(), desc=progress, unit="tok", unit_scale=True, leave=False, file=sys.stderr,
               disable=progress is None, dynamic_ncols=True)
    for chunk in tokens.split(lm_batch_size):
        chunk = chunk.to(lm.device)
        mask = training_mask(chunk, lm.bos_token_id, lm.pad_token_id, keep_bos)
        if grad:
            acts, grads = lm.capture(chunk, [site], grad=True)
            g = grads[site][mask].detach()
            _check_finite(g, lm, site, "gradients")
            gs.append(g)
        else:
            acts = lm.capture(chunk, [site])
        x = acts[site][mask].detach()
        _check_finite(x, lm, site, "activations")
        xs.append(x)
        bar.update(chunk.numel())
    bar.close()
    return torch.cat(xs), (torch.cat(gs) if grad else None)


def _check_finite(t: torch.Tensor, lm: Any, site: str, what: str) -> None:
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).any(dim=-1).sum())
        raise NonFiniteActivationsError(
            f"the language model {getattr(lm, 'name', '?')!r} produced non-finite {what} (NaN/Inf) at site {site!r} "
            f"for {bad} of {t.shape[0]} tokens; try a float32 model dtype or another site"
        )


class BlockSource(Protocol):
    d_in: int
    fingerprint: dict

    def load(self, index: int) -> Optional[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """Block `index` of this rank as (x [n, d], grad [n, d] or None), or None past the end of the data."""

    def statistics_sample(self) -> torch.Tensor:
        """Raw activations [n, d] of this source to estimate statistics on (the same on every rank)."""

    def epoch_of(self, index: int) -> int:
        """The epoch block `index` belongs to."""


class LiveBlocks:
    """Blocks of activations computed by the LM from packed contexts of this rank's share of the source."""

    def __init__(self, lm, site, data_cfg, *, split, seed, rank, world_size, grad, progress=False):
        self.lm, self.site, self.cfg, self.progress = lm, site, data_cfg, progress
        self.split, self.seed, self.rank, self.world_size, self.grad = split, seed, rank, world_size, grad
        self.contexts_per_block = max(1, data_cfg.buffer_tokens // data_cfg.context_len)
        self.d_in = lm.site_dim(site)
        self.fingerprint = {
            "kind": "lm", "model": getattr(lm, "name", None), "site": site, "source": str(data_cfg.source),
            "text_field": data_cfg.text_field, "split": split, "context_len": data_cfg.context_len,
            "keep_bos": data_cfg.keep_bos, "buffer_tokens": data_cfg.buffer_tokens,
            "lm_batch_size": data_cfg.lm_batch_size, "seed": seed, "rank": rank, "world_size": world_size,
            "grad": grad, "lm_dtype": str(getattr(lm, "dtype", None)),
        }
        self._contexts: Optional[Iterator[torch.Tensor]] = None
        self._position = 0  # contexts of this rank consumed from self._contexts

    def contexts(self) -> Iterator[torch.Tensor]:
        """Every context of the source's split (all ranks'), in the seeded order."""
        return source_contexts(self.lm, self.cfg.source, self.split, self.cfg.context_len,
                               text_field=self.cfg.text_field, seed=self.seed)

    def load(self, index):
        # Global context i belongs to rank i % world_size: ranks get disjoint, interleaved shares.
        target = index * self.contexts_per_block
        if self._contexts is None or self._position > target:
            self._contexts = itertools.islice(self.contexts(), self.rank, None, self.world_size)
            self._position = 0
        skip = target - self._position
        contexts = list(itertools.islice(self._contexts, skip, skip + self.contexts_per_block))
        self._position = target + len(contexts)
        if not contexts:
            return None
        return capture_training_tokens(
            self.lm, self.site, torch.stack(contexts),
            keep_bos=self.cfg.keep_bos, grad=self.grad, lm_batch_size=self.cfg.lm_batch_size,
            progress=f"shuffle buffer {index + 1}: LM to {self.site}" if self.progress else None,
        )

    def epoch_of(self, index: int) -> int:
        return 0  # the text is read once

    def statistics_sample(self) -> torch.Tensor:
        # The first contexts of the whole (unsharded) stream, so every rank gets the same statistics.
        n_contexts = max(1, min(self.contexts_per_block, SCALE_SAMPLE_TOKENS // self.cfg.context_len))
        return self._first_contexts_rows(n_contexts, "activation statistics: LM sample")

    def first_rows(self, n_tokens: int) -> Optional[torch.Tensor]:
        """Activations of the first contexts of the whole stream: up to n_tokens rows (None when there are none)."""
        n_contexts = -(-n_tokens // max(1, self.cfg.context_len - (0 if self.cfg.keep_bos else 1)))
        try:
            return self._first_contexts_rows(n_contexts, f"held-out sample: LM on the {self.split} split")[:n_tokens]
        except ValueError:
            return None

    def _first_contexts_rows(self, n_contexts: int, description: str) -> torch.Tensor:
        contexts = list(itertools.islice(self.contexts(), n_contexts))
        if not contexts:
            raise ValueError(f"text source {self.cfg.source!r} ({self.split} split) is too short for one context")
        x, _ = capture_training_tokens(
            self.lm, self.site, torch.stack(contexts),
            keep_bos=self.cfg.keep_bos, grad=False, lm_batch_size=self.cfg.lm_batch_size,
            progress=description if self.progress else None,
        )
        return x


class ActivationStream:
    """Iterator of {"x": [batch, d] float32 (, "grad": [batch, d])} raw activations; see the module docstring.

    scale: a recorded uncentred scale (a cache's manifest) reported as `scale`; None = from the statistics.
    max_norm_ratio: outlier tokens above this ratio of the median norm are left out; None keeps every token.
    heldout: a function giving up to n held-out activations [<= n, d] (eval split), or None when there are none.
    """

    def __init__(self, blocks: BlockSource, batch_size: int, *, seed: int, rank: int, grad: bool,
                 scale: Optional[float] = None, max_norm_ratio: Optional[float] = None,
                 heldout: Optional[Callable[[int], Optional[torch.Tensor]]] = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.blocks, self.batch_size, self.seed, self.rank, self.grad = blocks, batch_size, seed, rank, grad
        self.d_in = blocks.d_in
        self.max_norm_ratio = max_norm_ratio
        self.tokens_seen = 0
        self._recorded_scale = scale
        self._stats: Optional[ActivationStats] = None
        self._sample: Optional[torch.Tensor] = None  # the statistics sample, once read
        self._heldout = heldout
        self._block_index = 0
        self._offset = 0  # tokens of the current block already served
        self._block: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None
        self._excluded_before_block = 0  # outlier tokens left out of the blocks before the current one
        self._block_excluded = 0  # ... and of the current block (counted once it is loaded)

    @property
    def stats(self) -> ActivationStats:
        """Statistics of the source's sample (estimated once, on first use): scale, mean, outlier threshold."""
        if self._stats is None:
            self._stats = activation_stats(self._statistics_sample(), self.max_norm_ratio)
        return self._stats

    def _statistics_sample(self) -> torch.Tensor:
        if self._sample is None:
            self._sample = self.blocks.statistics_sample()
        return self._sample

    def activation_stats(self) -> ActivationStats:
        return self.stats

    @property
    def scale(self) -> float:
        """Uncentred activation scale c with E||c x||^2 = d_in (a cache's recorded one, else from the sample)."""
        return self._recorded_scale if self._recorded_scale is not None else self.stats.scale("uncentered")

    @property
    def max_input_norm(self) -> Optional[float]:
        """Raw-norm threshold above which tokens are left out (None: none are)."""
        return self.stats.max_input_norm

    @property
    def excluded_tokens(self) -> int:
        """Outlier tokens left out of the data served so far (whole blocks: those of the current block count)."""
        return self._excluded_before_block + (self._block_excluded if self._block is not None else 0)

    @property
    def epoch(self) -> int:
        """The epoch (pass over the data) the stream is in; 0 for a live LM, which reads its text once."""
        return self.blocks.epoch_of(self._block_index)

    def heldout_sample(self, n_tokens: int) -> Optional[torch.Tensor]:
        """Up to n_tokens held-out raw activations (float32), outliers left out as in training; None if none."""
        if self._heldout is None or n_tokens < 1:
            return None
        x = self._heldout(n_tokens)
        if x is None or x.shape[0] == 0:
            return None
        x = x.float()
        if self.max_input_norm is not None:
            x = x[x.norm(dim=1) <= self.max_input_norm]
        return x

    def training_sample(self, n_tokens: int) -> torch.Tensor:
        """Up to n_tokens raw training activations (float32, the statistics sample), outliers left out."""
        x = self._statistics_sample()[:n_tokens].float()
        if self.max_input_norm is not None:
            x = x[x.norm(dim=1) <= self.max_input_norm]
        return x

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        xs, gs, need = [], [], self.batch_size
        while need > 0:
            if self._block is None:
                self._block = self._load_shuffled(self._block_index)
                if self._block is None:
                    break
            x, g = self._block
            take = min(need, x.shape[0] - self._offset)
            xs.append(x[self._offset : self._offset + take])
            if g is not None:
                gs.append(g[self._offset : self._offset + take])
            self._offset += take
            need -= take
            if self._offset == x.shape[0]:
                self._excluded_before_block += self._block_excluded
                self._block, self._block_index, self._offset = None, self._block_index + 1, 0
        if not xs:
            raise StopIteration
        batch = {"x": torch.cat(xs).float()}
        if self.grad:
            batch["grad"] = torch.cat(gs).float()
        self.tokens_seen += batch["x"].shape[0]
        return batch

    def _load_shuffled(self, index: int):
        block = self.blocks.load(index)
        if block is None:
            return None
        x, g = block
        if self.grad and g is None:
            raise ValueError("gradients were asked for but the activation source has none")
        self._block_excluded = 0
        if self.max_input_norm is not None:
            keep = x.float().norm(dim=1) <= self.max_input_norm
            self._block_excluded = int(x.shape[0] - keep.sum())
            if self._block_excluded:
                x, g = x[keep], (g[keep] if g is not None else None)
        generator = torch.Generator().manual_seed(_block_seed(self.seed, self.rank, index))
        order = torch.randperm(x.shape[0], generator=generator).to(x.device)
        return x[order], (g[order] if self.grad else None)

    def state_dict(self) -> dict:
        """JSON-able position of the stream (see the module docstring for how resume replays it)."""
        return {
            "format": STATE_FORMAT, "version": 2, "block": self._block_index, "offset": self._offset,
            "epoch": self.epoch, "tokens_seen": self.tokens_seen, "excluded_before_block": self._excluded_before_block,
            "stats": self._stats.to_dict() if self._stats is not None else None,
            "max_norm_ratio": self.max_norm_ratio, "fingerprint": self.blocks.fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        self._check_resumable(state, STATE_FORMAT, 2)
        self._block_index, self._offset = int(state["block"]), int(state["offset"])
        self._excluded_before_block = int(state["excluded_before_block"])
        self._block = None  # replayed on the next batch, which counts its outliers again

    def _check_resumable(self, state: dict, state_format: str, version: int) -> None:
        """Refuse a state of another kind or of a stream opened differently; take its token count and statistics."""
        if state.get("format") != state_format or state.get("version") != version:
            raise ValueError(f"not a {state_format} state of version {version} (format {state.get('format')!r}, "
                             f"version {state.get('version')!r})")
        saved = {**state["fingerprint"], "max_norm_ratio": state["max_norm_ratio"]}
        current = {**self.blocks.fingerprint, "max_norm_ratio": self.max_norm_ratio}
        differ = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        if differ:
            details = ", ".join(f"{k}: saved {saved.get(k)!r} vs now {current.get(k)!r}" for k in differ)
            raise ValueError(f"cannot resume the activation stream: it was opened differently ({details})")
        self.tokens_seen = int(state["tokens_seen"])
        if state["stats"] is not None:
            self._stats = ActivationStats.from_dict(state["stats"])


class ContextStream(ActivationStream):
    """Batches of whole contexts, for SAEs whose loss runs the LM on from the site (SAE.needs_lm): each batch is the
    next batch_size // context_len contexts of the source (its documents shuffled with the seed before packing;
    tokens stay in their contexts, since a splice needs each context whole), run clean through the LM once:
    {"x": raw site activations at the spliced positions [n, d] float32, "splice": the models.splice.SiteSplice that
    runs replacements of them through the rest of the LM}. Statistics, outlier threshold and samples are the
    activation stream's; outliers are not spliced (and not in x). The position is the number of contexts served,
    so a resumed stream continues exactly."""

    def __init__(self, blocks: LiveBlocks, batch_size: int, *, seed: int, max_norm_ratio: Optional[float] = None,
                 heldout: Optional[Callable[[int], Optional[torch.Tensor]]] = None):
        super().__init__(blocks, batch_size, seed=seed, rank=0, grad=False, max_norm_ratio=max_norm_ratio,
                         heldout=heldout)
        self.contexts_per_batch = max(1, batch_size // blocks.cfg.context_len)
        self._contexts: Optional[Iterator[torch.Tensor]] = None
        self._served = 0  # contexts
        self._excluded = 0

    @property
    def excluded_tokens(self) -> int:
        return self._excluded

    def __next__(self) -> dict:
        from saeforge.models.splice import SiteSplice

        if self._contexts is None:
            self._contexts = itertools.islice(self.blocks.contexts(), self._served, None)
        contexts = list(itertools.islice(self._contexts, self.contexts_per_batch))
        if not contexts:
            raise StopIteration
        lm, site = self.blocks.lm, self.blocks.site
        tokens = torch.stack(contexts)
        mask = training_mask(tokens, lm.bos_token_id, lm.pad_token_id, self.blocks.cfg.keep_bos)
        splice = SiteSplice(lm, site, tokens, mask, self.max_input_norm)
        _check_finite(splice.x, lm, site, "activations")
        self._served += len(contexts)
        self._excluded += int(mask.sum()) - int(splice.keep.sum())
        x = splice.x.float()
        self.tokens_seen += x.shape[0]
        return {"x": x, "splice": splice}

    def state_dict(self) -> dict:
        return {"format": CONTEXT_STATE_FORMAT, "version": 1, "contexts": self._served, "tokens_seen": self.tokens_seen,
                "excluded": self._excluded, "stats": self._stats.to_dict() if self._stats is not None else None,
                "max_norm_ratio": self.max_norm_ratio, "fingerprint": self.blocks.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        self._check_resumable(state, CONTEXT_STATE_FORMAT, 1)
        self._served, self._excluded = int(state["contexts"]), int(state["excluded"])
        self._contexts = None


def _block_seed(seed: int, rank: int, index: int) -> int:
    digest = hashlib.sha256(json.dumps([seed, rank, index]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def open_stream(
    model_cfg: Any,
    data_cfg: Any,
    batch_size: int,
    *,
    lm: Any = None,
    grad: bool = False,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    split: str = "train",
    progress: bool = False,
    whole_contexts: bool = False,
) -> ActivationStream:
    """Open the activation stream at `model_cfg.site`: from `data_cfg.cache_dir` when set (read for up to
    `data_cfg.max_epochs` epochs), else from the live LM (`lm`, or loaded from `model_cfg`). Each rank of
    `world_size` reads a disjoint share. `progress`: show a tokens/s bar while the LM fills each shuffle buffer.
    Outliers are left out unless `data_cfg.keep_outliers`. The stream's held-out sample comes from
    `data_cfg.heldout_cache_dir`, else (live LM, training split) from the LM's eval split.
    whole_contexts: a `ContextStream` of the live LM (one process, no cache, no gradients) instead."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if whole_contexts and (data_cfg.cache_dir or grad or world_size > 1):
        raise ValueError("a stream of whole contexts runs the live LM in one process: no cache_dir, grad or ranks")
    max_norm_ratio = None if data_cfg.keep_outliers else data_cfg.max_norm_ratio
    heldout = None
    if data_cfg.heldout_cache_dir:
        from saeforge.data.cache import ActivationCache

        heldout = ActivationCache(data_cfg.heldout_cache_dir, model=_model_names(model_cfg, lm),
                                  site=model_cfg.site, split="eval", keep_bos=data_cfg.keep_bos).first_rows
    if data_cfg.cache_dir:
        from saeforge.data.cache import ActivationCache, CacheBlocks

        cache = ActivationCache(data_cfg.cache_dir, model=_model_names(model_cfg, lm), site=model_cfg.site,
                                split=split, keep_bos=data_cfg.keep_bos, grad=grad)
        blocks = CacheBlocks(cache, buffer_tokens=data_cfg.buffer_tokens, seed=seed, rank=rank,
                             world_size=world_size, grad=grad, max_epochs=data_cfg.max_epochs)
        return ActivationStream(blocks, batch_size, seed=seed, rank=rank, grad=grad, scale=cache.scale,
                                max_norm_ratio=max_norm_ratio, heldout=heldout)
    if lm is None:
        from saeforge.models import load_lm

        lm = load_lm(model_cfg)
    blocks = LiveBlocks(lm, model_cfg.site, data_cfg, split=split, seed=seed, rank=rank,
                        world_size=world_size, grad=grad, progress=progress)
    if heldout is None and split == "train":
        heldout = LiveBlocks(lm, model_cfg.site, data_cfg, split="eval", seed=seed, rank=0, world_size=1,
                             grad=False).first_rows
    if whole_contexts:
        return ContextStream(blocks, batch_size, seed=seed, max_norm_ratio=max_norm_ratio, heldout=heldout)
    return ActivationStream(blocks, batch_size, seed=seed, rank=rank, grad=grad, max_norm_ratio=max_norm_ratio,
                            heldout=heldout)


def _model_names(model_cfg: Any, lm: Any) -> set[str]:
    """Names a cache of this model may be recorded under: the config's spec, what load_lm names that spec (the
    embedded model's name, a directory's absolute path), and the name of the LM passed in."""
    names = {model_cfg.name}
    if model_cfg.name == "embedded":
        from saeforge.models.loading import EMBEDDED_NAME

        names.add(EMBEDDED_NAME)
    elif Path(model_cfg.name).expanduser().is_dir():
        names.add(str(Path(model_cfg.name).expanduser().resolve()))
    if lm is not None and getattr(lm, "name", None):
        names.add(lm.name)
    return names
