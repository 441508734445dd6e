"""Gradient pursuit (paper A App. A) recovers known sparse codes."""

from __future__ import annotations

import pytest
import torch

from saeforge import create_sae
from saeforge.evaluation.ito import GradientPursuitSAE, gradient_pursuit


def _sparse_codes(n: int, m: int, k: int, g: torch.Generator) -> torch.Tensor:
    a = torch.zeros(n, m)
    for row in a:
        support = torch.randperm(m, generator=g)[:k]
        row[support] = 0.5 + torch.rand(k, generator=g)
    return a


def test_recovers_a_known_sparse_code_exactly_with_orthonormal_atoms():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    D = q[:30].float()  # 30 orthonormal atoms in R^40
    a_true = _sparse_codes(64, 30, 5, g)
    a = gradient_pursuit(a_true @ D, D, k=5)
    assert torch.equal(a != 0, a_true != 0)
    assert torch.allclose(a, a_true, atol=1e-5)


def test_recovers_the_support_with_an_overcomplete_incoherent_dictionary():
    g = torch.Generator().manual_seed(1)
    D = torch.randn(512, 256, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    a_true = _sparse_codes(32, 512, 3, g)
    y = a_true @ D
    a = gradient_pursuit(y, D, k=3)
    assert ((a != 0) == (a_true != 0)).all()
    # k gradient steps are not a full least-squares solve on a non-orthogonal dictionary; more iterations are.
    assert ((y - a @ D).norm(dim=1) / y.norm(dim=1)).max() < 0.15
    a_more = gradient_pursuit(y, D, k=10)
    assert (a_more - a_true).abs().max() < 1e-3


def test_codes_are_non_negative_and_at_most_k_sparse():
    g = torch.Generator().manual_seed(2)
    D = torch.randn(64, 16, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    a = gradient_pursuit(torch.randn(100, 16, generator=g), D, k=4)
    assert (a >= 0).all()
    assert ((a != 0).sum(1) <= 4).all()
    with pytest.raises(ValueError, match="k >= 1"):
        gradient_pursuit(torch.randn(2, 16), D, k=0)


def test_wrapper_uses_the_decoder_and_ignores_the_encoder():
    torch.manual_seed(0)
    sae = create_sae("relu", d_in=16, d_sae=32)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(16))
        sae.W_enc.zero_()  # a useless encoder must not matter
    codes = _sparse_codes(8, 32, 2, torch.Generator().manual_seed(3))
    codes[:, :] = 0
    codes[:, 5] = 1.5  # one atom: exact after one step
    x = sae.decode(codes).detach()
    ito = GradientPursuitSAE(sae, k=1)
    assert torch.allclose(ito.encode(x), codes, atol=1e-5)
    assert torch.allclose(ito(x), x, atol=1e-5)
