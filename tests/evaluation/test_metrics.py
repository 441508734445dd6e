"""Each metric against an independent computation on small tensors, fed in several batches."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from saeforge.evaluation.analysis import covariance_matched_directions, decoder_max_cosine, DirectionalDerivatives
from saeforge.evaluation.metrics import (
    FiringStats,
    LossStats,
    ReconstructionStats,
    log10_frequency_histogram,
    loss_added,
    loss_recovered,
)


def _feed(stats, *tensors, n_batches=3):
    for parts in zip(*(t.chunk(n_batches) for t in tensors)):
        stats.update(*parts)
    return stats


def test_gamma_of_a_shrunk_reconstruction_is_the_shrink_factor():
    x = torch.randn(100, 16, dtype=torch.float64)
    assert _feed(ReconstructionStats(), x, 0.8 * x).result()["gamma"] == pytest.approx(0.8, rel=1e-9)
    assert _feed(ReconstructionStats(), x, 1.25 * x).result()["gamma"] == pytest.approx(1.25, rel=1e-9)


def test_centered_gamma_sees_shrinkage_that_a_large_mean_hides():
    # x = a large constant offset + a small varying part; the reconstruction keeps the offset and shrinks the rest.
    g = torch.Generator().manual_seed(1)
    offset = torch.full((16,), 50.0, dtype=torch.float64)
    varying = torch.randn(200, 16, generator=g, dtype=torch.float64)
    x, x_hat = offset + varying, offset + 0.7 * varying
    stats = ReconstructionStats()
    for xb, xhb in zip(x.split(50), x_hat.split(50)):
        stats.update(xb, xhb, center=offset)
    result = stats.result()
    assert result["gamma"] > 0.99  # pinned near 1 by the offset
    assert result["gamma_centered"] == pytest.approx(0.7, rel=1e-9)


def test_gamma_is_a_ratio_of_sums_over_the_whole_set_not_a_mean_of_batch_ratios():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 8, generator=g)
    x_hat = x * torch.linspace(0.5, 1.0, 60)[:, None] + 0.1 * torch.randn(60, 8, generator=g)
    x_np, xh_np = x.double().numpy(), x_hat.double().numpy()
    expected = (xh_np ** 2).sum() / (xh_np * x_np).sum()  # argmin_g E||x_hat/g - x||^2
    # The same quantity by direct minimisation of E||x_hat/g - x||^2 over g.
    grid = np.linspace(0.3, 2.0, 170001)
    objective = [((xh_np / gg - x_np) ** 2).sum() for gg in grid[::1000]]
    assert abs(grid[::1000][int(np.argmin(objective))] - expected) < 0.011
    got = _feed(ReconstructionStats(), x, x_hat, n_batches=4).result()["gamma"]
    assert got == pytest.approx(expected, rel=1e-10)
    per_batch = np.mean([(b2 ** 2).sum() / (b2 * b1).sum() for b1, b2 in zip(np.split(x_np, 4), np.split(xh_np, 4))])
    assert abs(per_batch - expected) > 1e-4  # the wrong definition would differ on this data


def test_nmse_fvu_cosine_mse_match_numpy():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 12, generator=g) + 3.0
    x_hat = x + 0.3 * torch.randn(50, 12, generator=g)
    r = _feed(ReconstructionStats(), x, x_hat).result()
    a, b = x.double().numpy(), x_hat.double().numpy()
    err = ((a - b) ** 2).sum(1)
    assert r["mse"] == pytest.approx(err.mean(), rel=1e-10)
    assert r["nmse"] == pytest.approx((np.sqrt(err) / np.linalg.norm(a, axis=1)).mean(), rel=1e-10)
    assert r["fvu"] == pytest.approx(err.mean() / ((a - a.mean(0)) ** 2).sum(1).mean(), rel=1e-9)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert r["cosine"] == pytest.approx(cos.mean(), rel=1e-10)


def test_perfect_reconstruction():
    x = torch.randn(20, 5)
    r = ReconstructionStats()
    r.update(x, x.clone())
    out = r.result()
    assert out["mse"] == 0 and out["nmse"] == 0 and out["fvu"] == 0
    assert out["cosine"] == pytest.approx(1.0) and out["gamma"] == pytest.approx(1.0)


def test_firing_stats_l0_dead_dense_and_histogram():
    f = torch.zeros(1000, 6)
    f[:, 0] = 1.0  # fires always: dense
    f[:200, 1] = 2.0  # 20%: dense
    f[:50, 2] = 0.5  # 5%: not dense
    f[:1, 3] = 3.0  # 0.1%
    # latents 4 and 5 never fire: dead
    stats = _feed(FiringStats(6), f, n_batches=7)
    out = stats.result(dense_threshold=0.1)
    assert out["l0"] == pytest.approx((1000 + 200 + 50 + 1) / 1000)
    assert out["dead_fraction"] == pytest.approx(2 / 6)
    assert out["dense_fraction"] == pytest.approx(2 / 6)
    hist = out["firing_log10_hist"]
    assert hist["dead"] == 2 and sum(hist["counts"]) == 4
    edges = np.array(hist["edges"])
    for freq in (1.0, 0.2, 0.05, 0.001):
        b = min(np.searchsorted(edges, math.log10(freq), side="right") - 1, len(edges) - 2)
        assert hist["counts"][b] >= 1, freq
    # CDF at each edge: fraction of all latents (dead ones at -inf) at or below it.
    freqs = np.array([1.0, 0.2, 0.05, 0.001, 0.0, 0.0])
    with np.errstate(divide="ignore"):
        logs = np.log10(freqs)
    assert hist["cdf"] == pytest.approx([(logs <= e).mean() for e in edges])


def test_frequency_histogram_median():
    freq = torch.tensor([1e-3, 1e-2, 1e-1])
    assert log10_frequency_histogram(freq)["median_log10_freq"] == pytest.approx(-2.0)


def test_loss_recovered_and_added():
    assert loss_recovered(2.0, 2.0, 6.0) == 1.0
    assert loss_recovered(2.0, 6.0, 6.0) == 0.0
    assert loss_recovered(2.0, 3.0, 6.0) == pytest.approx(0.75)
    assert loss_added(2.0, 2.5) == pytest.approx(0.25)
    s = LossStats()
    s.update(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, 0.0]]))
    s.update(torch.tensor([[3.0]]), torch.tensor([[1.0]]))
    assert s.ce == pytest.approx(2.0) and s.kl == pytest.approx(0.5)


def test_decoder_max_cosine_matches_brute_force():
    W = torch.randn(37, 9)
    got = decoder_max_cosine(W, chunk=8)
    Wn = W / W.norm(dim=1, keepdim=True)
    sims = (Wn @ Wn.T).numpy()
    np.fill_diagonal(sims, -np.inf)
    assert got.numpy() == pytest.approx(sims.max(1), abs=1e-6)
    # A duplicated row has a twin at cosine 1.
    assert decoder_max_cosine(torch.cat([W, W[:1]]))[0] == pytest.approx(1.0, abs=1e-6)


def test_directional_derivative_is_mean_abs_grad_dot_direction():
    g = torch.randn(30, 4)
    u = torch.eye(4)[:2]
    dd = DirectionalDerivatives(u)
    for part in g.chunk(3):
        dd.update(part)
    assert dd.result() == pytest.approx(g[:, :2].abs().mean().item(), rel=1e-6)


def test_covariance_matched_directions_follow_the_covariance():
    cov = torch.diag(torch.tensor([100.0, 1.0, 0.0]))
    u = covariance_matched_directions(cov, 2000, torch.Generator().manual_seed(0))
    assert torch.allclose(u.norm(dim=1), torch.ones(2000), atol=1e-5)
    assert u[:, 2].abs().max() < 1e-6  # no variance along the third axis
    assert (u[:, 0] ** 2).mean() > 0.9  # most of each direction lies along the high-variance axis
