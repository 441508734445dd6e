"""Stand-ins for SAEs and token batches in the evaluation tests (rootdir-relative import, like data_helpers)."""

from __future__ import annotations

import torch
from torch import nn

from saeforge.saes import SAEMetadata


class AffineMap(nn.Module):
    """A stand-in SAE: f = (x - center) @ enc, x_hat = f @ W_dec + b_dec (identity, zero and PCA maps are all
    of this form)."""

    architecture = "test"
    needs_grad = False

    def __init__(self, enc, W_dec, b_dec, center=None, max_input_norm=None):
        super().__init__()
        self.enc, self.W_dec, self.b_dec = enc, W_dec, b_dec
        self.center = torch.zeros(enc.shape[0]) if center is None else center
        self.d_in, self.d_sae = W_dec.shape[1], W_dec.shape[0]
        self.meta = SAEMetadata(max_input_norm=max_input_norm)

    def encode(self, x, grad=None):
        return (x - self.center.to(x)) @ self.enc.to(x)

    def decode(self, f):
        return f @ self.W_dec.to(f) + self.b_dec.to(f)


def random_contexts(lm, n: int, length: int, seed: int) -> torch.Tensor:
    """n random token contexts of `length`, each starting with BOS."""
    tokens = torch.randint(3, lm.vocab_size, (n, length), generator=torch.Generator().manual_seed(seed))
    tokens[:, 0] = lm.bos_token_id
    return tokens
