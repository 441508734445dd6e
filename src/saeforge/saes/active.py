"""The active set of a batch: the (token, latent) entries where a sparse SAE's latents are non-zero, and the products
a training step needs on them. Each product costs (entries) * dim multiply-adds where the dense one costs
tokens * d_sae * dim, so once an SAE is sparse (tens of latents per token out of thousands) everything after the
encoder's forward product is cheap.

Measured on a 2-core Xeon (AVX-512; tokens 4096, d_sae 8192, d_in 640, float32) at L0 16 / 64 / 256, against a
dense product of 400 ms: decoding (rows of W gathered and summed per token, `F.embedding_bag`) 12 / 35 / 113 ms,
against 19 / 45 / 120 ms as a CSR x dense product; sums over tokens (the transposed product, W_dec's and W_enc's
gradients) 7 / 24 / 113 ms as an `embedding_bag` over the entries grouped by latent, against 34 / 57 / 137 ms as a
CSR product and 72 / 251 / 422 ms through a CSR transpose; the sampled product (y . W[latent] at each entry)
27 / 44 / 136 ms with `torch.sparse.sampled_addmm`, against 0.6 / 1.5 / 3.7 s gathering rows in chunks. Hence
embedding_bag for the first two and sampled_addmm for the third. Float32: the kernels have no bfloat16 version, and
at these sizes they need none.

Whether a step goes sparse is decided per batch (`goes_sparse`), from the density of the batch (measured on a
sample of its rows) against the architecture's break-even density (`SAE.sparse_below`), so the dense early phase of
training stays on the dense products. `forced_path` overrides the choice (tests and benchmarks).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Iterator, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

_forced: Literal["dense", "sparse"] | None = None

# Rows of the batch whose density decides the path: enough for a density estimate, a small share of a large batch.
DENSITY_SAMPLE_ROWS = 256


@contextlib.contextmanager
def forced_path(path: Literal["dense", "sparse"]) -> Iterator[None]:
    """Within the block, every hand-derived step takes `path` whatever the density (tests and benchmarks)."""
    global _forced
    if path not in ("dense", "sparse"):
        raise ValueError(f"forced_path: path must be 'dense' or 'sparse', got {path!r}")
    before, _forced = _forced, path
    try:
        yield
    finally:
        _forced = before


def goes_sparse(scores: Tensor, floor: Tensor | float, sparse_below: float) -> bool:
    """Whether the step takes the active-set path: the fraction of entries of scores [tokens, d_sae] above floor
    (a number, or one per latent), measured on evenly spaced rows, is below sparse_below."""
    if _forced is not None:
        return _forced == "sparse"
    stride = max(1, scores.shape[0] // DENSITY_SAMPLE_ROWS)
    sample = scores[::stride]
    return int(torch.count_nonzero(sample > floor)) < sparse_below * sample.numel()


def _csr(rows: Tensor, cols: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the operations used here are not
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(rows, cols, values, shape)


def _pointers(keys: Tensor, count: int) -> Tensor:
    """CSR pointers [count + 1] of entries sorted by keys (each in [0, count))."""
    ptr = torch.zeros(count + 1, dtype=torch.long, device=keys.device)
    ptr[1:] = torch.bincount(keys, minlength=count).cumsum(0)
    return ptr


class ActiveEntries:
    """Entries (token, latent) of a sparse [tokens, width] matrix, in row-major order; a row holds any number of
    entries. Latents are relative to the first latent of the slice of the dictionary the entries cover (a
    Matryoshka group), so `width` is that slice's. Values are passed to each product, not held."""

    def __init__(self, tok: Tensor, lat: Tensor, n: int, width: int):
        self.tok, self.lat, self.n, self.width = tok, lat, n, width
        self.offsets = _pointers(tok, n)

    @functools.cached_property
    def _by_latent(self) -> tuple[Tensor, Tensor, Tensor]:
        """The transpose (latents as rows) for sums over tokens: the order that groups the entries by latent (token
        order kept within), its pointers, and the tokens in that order."""
        order = self.lat.to(torch.int32).argsort(stable=True)  # int32 keys sort 6x faster than int64 here
        return order, _pointers(self.lat, self.width), self.tok[order]

    @classmethod
    def of_rows(cls, idx: Tensor, width: int) -> "ActiveEntries":
        """The entries of idx [tokens, k], k latents per token (sorted in each row)."""
        n, k = idx.shape
        tok = torch.arange(n, device=idx.device).repeat_interleave(k)
        return cls(tok, idx.reshape(-1), n, width)

    @classmethod
    def above(cls, scores: Tensor, floor: Tensor | float) -> tuple["ActiveEntries", Tensor]:
        """The entries of scores [tokens, width] above floor (a number, or one per latent), and their scores as
        float32 [entries]."""
        n, width = scores.shape
        flat = (scores > floor).view(-1).nonzero().squeeze(1)
        values = scores.view(-1)[flat].float()
        return cls(torch.div(flat, width, rounding_mode="floor"), flat % width, n, width), values

    @property
    def count(self) -> int:
        return self.lat.numel()

    def decode(self, values: Tensor, W: Tensor) -> Tensor:
        """[tokens, dim]: for each token, the sum of its entries' values times their rows of W [width, dim]."""
        return F.embedding_bag(self.lat, W, self.offsets[:-1], mode="sum", per_sample_weights=values.to(W.dtype))

    def sum_over_tokens(self, values: Tensor, y: Tensor) -> Tensor:
        """[width, dim]: for each latent, the sum over its entries of the entry's value times its token's y
        [tokens, dim] (values^T @ y as a sparse product)."""
        order, pointers, tokens = self._by_latent
        return F.embedding_bag(tokens, y.contiguous(), pointers[:-1], mode="sum",
                               per_sample_weights=values[order].to(y.dtype))

    def dot_rows(self, y: Tensor, W: Tensor) -> Tensor:
        """[entries]: y[token] . W[latent] for each entry (y @ W^T sampled at the entries); W [width, dim]."""
        if self.count == 0:
            return y.new_zeros(0)
        pattern = _csr(self.offsets, self.lat, y.new_ones(self.count), (self.n, self.width))
        return torch.sparse.sampled_addmm(pattern, y, W.T, beta=0.0).values()

    def latent_sums(self, values: Tensor) -> Tensor:
        """[width]: the sum of each latent's entries' values, float32."""
        return torch.zeros(self.width, device=values.device).index_add_(0, self.lat, values.float())

    def fired(self, values: Tensor) -> Tensor:
        """Per-latent count of entries with a non-zero value, int32 [width]."""
        return torch.bincount(self.lat[values != 0], minlength=self.width).to(torch.int32)
