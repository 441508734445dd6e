"""The activation stream: shuffled training batches from a language model or a harvested cache.

Shuffling works in blocks. A block is a bounded slice of the data: `buffer_tokens // context_len` consecutive
contexts of this rank (live LM), or as many cache shards as fit in `buffer_tokens` (cache; shards are visited in a
seeded random order). A block's valid tokens are permuted by a generator seeded from (seed, rank, block index) and
served in that order; batches run on across block boundaries. So memory holds one block, and each batch is a uniform
sample of a few hundred contexts rather than a run of neighbouring tokens of the same few documents. Documents are
also shuffled (seeded, bounded buffer) before packing, so blocks do not follow the source's topic order.

Resume is deterministic replay of one block. Everything a block holds is a pure function of its index and the
stream's fingerprint (source, site, seed, rank, ...), so the state is just (block index, offset in the block,
tokens seen, scale) and is JSON-able. `load_state_dict` recomputes the current block (one buffer's worth of LM
forward passes, or one read of its shards) and skips `offset` tokens; on CPU the resumed stream yields bitwise the
batches the uninterrupted one would have. The order of tokens does not depend on the batch size, so a resumed run
may even change it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from pathlib import Path
from typing import Any, Iterator, Optional, Protocol

import torch

from saeforge.data.packing import pack_contexts, training_mask
from saeforge.data.sources import shuffle_documents, text_source

STATE_FORMAT = "saeforge-activation-stream"
SCALE_SAMPLE_TOKENS = 16384  # tokens used to estimate the activation scale of a live stream


class NonFiniteActivationsError(FloatingPointError):
    """The language model produced NaN or Inf at the harvested site."""


def activation_scale(sum_sq_norms: float, n_tokens: int, d_in: int) -> float:
    """METHODS.md "Activation scale": the c with E||c x||^2 = d_in, from the summed squared norms of a sample."""
    if n_tokens == 0 or sum_sq_norms <= 0:
        raise ValueError("cannot estimate the activation scale: the sample has no tokens or only zero activations")
    return math.sqrt(d_in * n_tokens / sum_sq_norms)


def capture_training_tokens(
    lm: Any, site: str, tokens: torch.Tensor, *, keep_bos: bool, grad: bool, lm_batch_size: int
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Run the LM on contexts [N, S]; return the site's activations (and gradients) at training positions, [n, d].

    The values keep the LM's dtype. NaN/Inf is an error naming the site.
    """
    xs, gs = [], []
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

    def estimate_scale(self) -> float: ...


class LiveBlocks:
    """Blocks of activations computed by the LM from packed contexts of this rank's share of the source."""

    def __init__(self, lm, site, data_cfg, *, split, seed, rank, world_size, grad):
        self.lm, self.site, self.cfg = lm, site, data_cfg
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

    def _all_contexts(self) -> Iterator[torch.Tensor]:
        texts = shuffle_documents(text_source(self.cfg.source, self.split, self.cfg.text_field), self.seed)
        return pack_contexts(texts, self.lm.tokenizer, self.cfg.context_len, bos_token_id=self.lm.bos_token_id)

    def load(self, index):
        # Global context i belongs to rank i % world_size: ranks get disjoint, interleaved shares.
        target = index * self.contexts_per_block
        if self._contexts is None or self._position > target:
            self._contexts = itertools.islice(self._all_contexts(), self.rank, None, self.world_size)
            self._position = 0
        skip = target - self._position
        contexts = list(itertools.islice(self._contexts, skip, skip + self.contexts_per_block))
        self._position = target + len(contexts)
        if not contexts:
            return None
        return capture_training_tokens(
            self.lm, self.site, torch.stack(contexts),
            keep_bos=self.cfg.keep_bos, grad=self.grad, lm_batch_size=self.cfg.lm_batch_size,
        )

    def estimate_scale(self) -> float:
        # Estimated on the first contexts of the whole (unsharded) stream, so every rank gets the same c.
        n_contexts = max(1, min(self.contexts_per_block, SCALE_SAMPLE_TOKENS // self.cfg.context_len))
        contexts = list(itertools.islice(self._all_contexts(), n_contexts))
        if not contexts:
            raise ValueError(f"text source {self.cfg.source!r} ({self.split} split) is too short for one context")
        x, _ = capture_training_tokens(
            self.lm, self.site, torch.stack(contexts),
            keep_bos=self.cfg.keep_bos, grad=False, lm_batch_size=self.cfg.lm_batch_size,
        )
        x = x.double()
        return activation_scale(float((x * x).sum()), x.shape[0], self.d_in)


class ActivationStream:
    """Iterator of {"x": [batch, d] float32 (, "grad": [batch, d])} raw activations; see the module docstring."""

    def __init__(self, blocks: BlockSource, batch_size: int, *, seed: int, rank: int, grad: bool,
                 scale: Optional[float] = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.blocks, self.batch_size, self.seed, self.rank, self.grad = blocks, batch_size, seed, rank, grad
        self.d_in = blocks.d_in
        self.tokens_seen = 0
        self._scale = scale
        self._block_index = 0
        self._offset = 0  # tokens of the current block already served
        self._block: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None

    @property
    def scale(self) -> float:
        """Activation scale c with E||c x||^2 = d_in (estimated once, on first use, or read from the cache)."""
        if self._scale is None:
            self._scale = self.blocks.estimate_scale()
        return self._scale

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
        generator = torch.Generator().manual_seed(_block_seed(self.seed, self.rank, index))
        order = torch.randperm(x.shape[0], generator=generator).to(x.device)
        return x[order], (g[order] if self.grad else None)

    def state_dict(self) -> dict:
        """JSON-able position of the stream (see the module docstring for how resume replays it)."""
        return {
            "format": STATE_FORMAT, "version": 1, "block": self._block_index, "offset": self._offset,
            "tokens_seen": self.tokens_seen, "scale": self._scale, "fingerprint": self.blocks.fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not an activation stream state (format {state.get('format')!r})")
        saved, current = state["fingerprint"], self.blocks.fingerprint
        differ = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        if differ:
            details = ", ".join(f"{k}: saved {saved.get(k)!r} vs now {current.get(k)!r}" for k in differ)
            raise ValueError(f"cannot resume the activation stream: it was opened differently ({details})")
        self._block_index, self._offset = int(state["block"]), int(state["offset"])
        self.tokens_seen = int(state["tokens_seen"])
        self._scale = state["scale"] if state["scale"] is not None else self._scale
        self._block = None


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
) -> ActivationStream:
    """Open the activation stream at `model_cfg.site`: from `data_cfg.cache_dir` when set, else from the live LM
    (`lm`, or loaded from `model_cfg`). Each rank of `world_size` reads a disjoint share."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if data_cfg.cache_dir:
        from saeforge.data.cache import ActivationCache, CacheBlocks

        cache = ActivationCache(data_cfg.cache_dir, model=_model_names(model_cfg, lm), site=model_cfg.site,
                                split=split, keep_bos=data_cfg.keep_bos, grad=grad)
        blocks = CacheBlocks(cache, buffer_tokens=data_cfg.buffer_tokens, seed=seed, rank=rank,
                             world_size=world_size, grad=grad)
        return ActivationStream(blocks, batch_size, seed=seed, rank=rank, grad=grad, scale=cache.scale)
    if lm is None:
        from saeforge.models import load_lm

        lm = load_lm(model_cfg.name, device=model_cfg.device, dtype=getattr(torch, model_cfg.dtype))
    blocks = LiveBlocks(lm, model_cfg.site, data_cfg, split=split, seed=seed, rank=rank,
                        world_size=world_size, grad=grad)
    return ActivationStream(blocks, batch_size, seed=seed, rank=rank, grad=grad)


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
