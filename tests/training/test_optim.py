"""Decoder-norm-constrained Adam on plain parameters."""

from __future__ import annotations

import torch

from saeforge.training import ConstrainedAdam
from saeforge.training.optim import project_out_radial_grad


def unit_rows(n: int, d: int, seed: int) -> torch.nn.Parameter:
    w = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return torch.nn.Parameter(w / w.norm(dim=1, keepdim=True))


def test_rows_stay_unit_norm_over_many_steps():
    w_dec = unit_rows(64, 8, 0)
    target = torch.randn(64, 8, generator=torch.Generator().manual_seed(1)) * 3.0
    opt = ConstrainedAdam([w_dec], unit_norm_rows=[w_dec], lr=0.05, betas=(0.0, 0.999))
    start = w_dec.detach().clone()
    for _ in range(50):
        loss = (w_dec - target).pow(2).sum()  # pulls rows off the unit sphere
        loss.backward()
        opt.step()
        opt.zero_grad()
        torch.testing.assert_close(w_dec.norm(dim=1), torch.ones(64), rtol=0, atol=1e-6)
    assert (w_dec.detach() - start).abs().max() > 0.1  # it did move, along the sphere
    # ... towards the target's directions
    cos = torch.nn.functional.cosine_similarity(w_dec.detach(), target, dim=1)
    assert cos.mean() > torch.nn.functional.cosine_similarity(start, target, dim=1).mean()


def test_radial_gradient_is_removed_before_the_step():
    w = unit_rows(5, 4, 2).detach()
    grad = torch.randn(5, 4) + 3 * w  # a large component along each row
    project_out_radial_grad(w, grad)
    torch.testing.assert_close((grad * w).sum(1), torch.zeros(5), rtol=0, atol=1e-6)
    # The radial part of a gradient has no effect on the step.
    tangential = torch.randn(5, 4, generator=torch.Generator().manual_seed(6))
    project_out_radial_grad(w, tangential)
    results = []
    for g in (tangential, tangential + 2.0 * w):
        w_dec = torch.nn.Parameter(w.clone())
        opt = ConstrainedAdam([w_dec], unit_norm_rows=[w_dec], lr=0.1)
        w_dec.grad = g.clone()
        opt.step()
        results.append(w_dec.detach())
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-5)
    assert (results[0] - w).abs().max() > 0.05


def test_unconstrained_parameters_follow_torch_adam():
    ours = torch.nn.Parameter(torch.randn(6, 3, generator=torch.Generator().manual_seed(4)))
    ref = torch.nn.Parameter(ours.detach().clone())
    opt = ConstrainedAdam([ours], lr=0.01, betas=(0.9, 0.99), eps=1e-8)
    ref_opt = torch.optim.Adam([ref], lr=0.01, betas=(0.9, 0.99), eps=1e-8)
    for i in range(20):
        g = torch.randn(6, 3, generator=torch.Generator().manual_seed(100 + i))
        ours.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(ours.detach(), ref.detach(), rtol=1e-6, atol=1e-7)
    # The first step of Adam moves each entry by lr * g / (|g| + eps) (bias-corrected moments are g and g^2).
    p = torch.nn.Parameter(torch.zeros(5))
    opt = ConstrainedAdam([p], lr=0.1, betas=(0.0, 0.999))
    p.grad = torch.tensor([2.0, -0.5, 1e-3, 0.0, -3.0])
    opt.step()
    torch.testing.assert_close(p.detach(), -0.1 * p.grad / (p.grad.abs() + 1e-8))


def test_transposed_parameters_and_restored_state_update_correctly():
    # An encoder made as W_dec.T.clone() is column-major; its moments come back from a checkpoint row-major.
    base = torch.randn(6, 4, generator=torch.Generator().manual_seed(8))
    ours, ref = torch.nn.Parameter(base.T.clone()), torch.nn.Parameter(base.T.clone())
    opt = ConstrainedAdam([ours], lr=0.1, betas=(0.9, 0.999))
    ref_opt = torch.optim.Adam([ref], lr=0.1, betas=(0.9, 0.999), foreach=False)
    for i in range(6):
        g = torch.randn(4, 6, generator=torch.Generator().manual_seed(i))
        ours.grad, ref.grad = g.clone(), g.T.contiguous().T  # the gradient in either layout
        opt.step()
        ref_opt.step()
        if i == 2:
            flat = {k: v.contiguous().clone() for k, v in opt.named_state({id(ours): "W_enc"}).items()}
            opt = ConstrainedAdam([ours], lr=0.1, betas=(0.9, 0.999))
            opt.load_named_state(flat, {"W_enc": ours})
    torch.testing.assert_close(ours.detach(), ref.detach(), rtol=1e-6, atol=1e-7)


def test_reset_rows_and_named_state_round_trip():
    w_enc = torch.nn.Parameter(torch.randn(4, 10))
    w_dec = unit_rows(10, 4, 5)
    opt = ConstrainedAdam([w_enc, w_dec], unit_norm_rows=[w_dec], lr=0.01, betas=(0.9, 0.999))
    for _ in range(3):
        (w_enc.sum() + (w_dec * torch.arange(4.0)).sum()).backward()
        opt.step()
        opt.zero_grad()
    idx = torch.tensor([1, 7])
    opt.reset_rows(w_enc, idx, dim=1)
    opt.reset_rows(w_dec, idx, dim=0)
    for key in ("exp_avg", "exp_avg_sq"):
        assert (opt.state[w_enc][key][:, idx] == 0).all() and (opt.state[w_enc][key][:, 0] != 0).all()
        assert (opt.state[w_dec][key][idx] == 0).all() and (opt.state[w_dec][key][0] != 0).any()

    names = {id(w_enc): "W_enc", id(w_dec): "W_dec"}
    flat = opt.named_state(names)
    assert sorted(flat) == sorted(f"{n}.{k}" for n in ("W_enc", "W_dec") for k in ("step", "exp_avg", "exp_avg_sq"))
    fresh = ConstrainedAdam([w_enc, w_dec], unit_norm_rows=[w_dec], lr=0.01, betas=(0.9, 0.999))
    fresh.load_named_state(flat, {"W_enc": w_enc, "W_dec": w_dec})
    for p in (w_enc, w_dec):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(fresh.state[p][key], opt.state[p][key])
