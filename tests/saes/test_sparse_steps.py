"""The active-set steps (saes/active.py) against the dense ones: the same loss, gradients and firing counts at every
density, all-dead and all-firing batches included, and training that switches between them equal to all-dense
training. Also the exact top-k selection of the TopK family against torch.topk."""

import copy

import pytest
import torch

from saeforge.config import TrainConfig
from saeforge.saes.active import ActiveEntries, forced_path, goes_sparse
from saeforge.saes.gated import GatedSAE
from saeforge.saes.topk import top_k_indices
from saeforge.training.sae_run import SAERun
from saeforge.training.schedules import StepPlan
from test_backward import CASES as BACKWARD_CASES
from test_backward import D_SAE, TOKENS, relative_error
from test_backward import make as backward_make

# The architectures with a dense and a sparse step, in test_backward's variants.
CASES = [name for name in BACKWARD_CASES if name.startswith(("relu", "gated", "jumprelu"))]
# The share of [tokens, d_sae] entries the encoder's bias makes active: 0 and 1 are the all-dead and all-firing batches.
DENSITIES = {"dead": 0.0, "sparse": 0.03, "mid": 0.3, "full": 1.0}


def make(case: str, density: float, seed: int = 0):
    """An SAE of the case, away from its initial point, whose encoder bias makes about `density` of the entries of
    a batch active (the gate's for Gated; for JumpReLU the thresholds sit inside that share), and the batch."""
    sae, inputs = backward_make(case, seed)  # away from the initial point
    x = inputs["x"]
    with torch.no_grad():
        pre = (x - sae.b_dec) @ sae.W_enc
        # Per latent, the bias that puts `density` of the tokens above 0 (past every token at 0 and 1); no token
        # sits exactly at the cut.
        if 0 < density < 1:
            bias = 1e-3 * torch.sign(torch.randn(D_SAE)) - pre.quantile(1 - density, dim=0)
        else:
            bias = (pre.abs().amax(0) + 1) * (1 if density else -1)
        if sae.architecture == "jumprelu":
            sae.threshold.copy_(0.3 * torch.rand(D_SAE))
            sae.b_enc.copy_(bias + sae.threshold)
        elif isinstance(sae, GatedSAE):
            sae.b_gate.copy_(bias)
        else:
            sae.b_enc.copy_(bias)
    return sae, dict(x=x, sparsity_coeff=inputs["sparsity_coeff"])


def both_paths(case: str, density: float, compute_dtype):
    sae, inputs = make(case, density)
    dense_sae = copy.deepcopy(sae)
    with forced_path("dense"):
        dense = dense_sae.loss_and_grads(**inputs, compute_dtype=compute_dtype)
    with forced_path("sparse"):
        sparse = sae.loss_and_grads(**inputs, compute_dtype=compute_dtype)
    return sae, dense_sae, sparse, dense


@pytest.mark.parametrize("density", sorted(DENSITIES))
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_active_set_step_equals_dense_step(case, density, dtype):
    bf16 = dtype == "bf16"
    sae, dense_sae, sparse, dense = both_paths(case, DENSITIES[density], torch.bfloat16 if bf16 else None)
    assert sparse._feats is None and isinstance(sparse.active[1], ActiveEntries), "the sparse path was not taken"
    assert dense._feats is not None, "the dense path was not taken"
    # bf16: the sparse path keeps float32 where the dense one rounds its later products to bf16.
    tol = 2e-2 if bf16 else 1e-5
    for name in ("total", "recon", "sparsity", "aux"):
        a, b = float(getattr(sparse, name)), float(getattr(dense, name))
        assert abs(a - b) <= tol * max(1.0, abs(b)), name
    assert relative_error(sparse.x_hat, dense.x_hat) < tol
    assert relative_error(sparse.feats, dense.feats) < tol
    fired, expected = sparse.fired(), dense.fired()
    if DENSITIES[density] == 0 and not case.startswith("jumprelu"):
        assert int(expected.sum()) == 0  # the all-dead batch is all dead
    if DENSITIES[density] == 1 and case.startswith("gated"):
        assert int(sparse.active[1].count) == TOKENS * D_SAE  # the gate is open everywhere
    flipped = int((fired - expected).abs().sum())
    assert flipped <= (0.01 * int(expected.sum()) if bf16 else 0)
    assert torch.equal(fired, (sparse.feats != 0).sum(0, dtype=torch.int32))
    checked = 0
    for (name, p), (_, q) in zip(sae.named_parameters(), dense_sae.named_parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if q.grad is not None:
            if q.grad.norm() == 0:
                assert p.grad.norm() == 0, name
            else:
                assert relative_error(p.grad, q.grad) < tol, name
                checked += 1
    if DENSITIES[density] > 0:  # all dead: b_dec's gradient at most, checked above with the zero ones
        assert checked >= 2


@pytest.mark.parametrize("case", ["relu", "gated", "gated-untied", "jumprelu-wide-window"])
def test_the_density_decides_the_path(case):
    """Below the architecture's break-even density the step goes sparse, above it dense."""
    for density, sparse in ((0.0, True), (0.01, True), (0.5, False), (1.0, False)):
        sae, inputs = make(case, density)
        out = sae.loss_and_grads(**inputs)
        assert (out._feats is None) == sparse, (case, density)


def test_goes_sparse_reads_the_density_and_the_forced_path():
    scores = torch.full((1000, 100), -1.0)
    scores[:, :4] = 1.0  # density 0.04
    assert goes_sparse(scores, 0.0, 0.05) and not goes_sparse(scores, 0.0, 0.03)
    assert goes_sparse(scores, torch.full((100,), 2.0), 1e-9)  # a per-latent floor above every score: density 0
    assert not goes_sparse(scores, torch.full((100,), -2.0), 0.99)  # and below every score: density 1
    with forced_path("dense"):
        assert not goes_sparse(scores, 0.0, 0.05)
    with forced_path("sparse"):
        assert goes_sparse(scores, 0.0, 0.03)
    assert goes_sparse(scores, 0.0, 0.05)  # restored after the block
    with pytest.raises(ValueError, match="dense' or 'sparse"):
        with forced_path("fast"):
            pass


def test_active_entries_products_equal_dense_products():
    torch.manual_seed(0)
    n, width, dim = 37, 50, 9
    dense = torch.randn(n, width).relu_() * (torch.rand(n, width) < 0.2)
    dense[5] = 0  # a token with no entry
    dense[:, 7] = 0  # a latent with none
    active, values = ActiveEntries.above(dense, 0.0)
    W, y = torch.randn(width, dim), torch.randn(n, dim)
    torch.testing.assert_close(active.decode(values, W), dense @ W)
    torch.testing.assert_close(active.sum_over_tokens(values, y), dense.T @ y)
    mask = dense != 0
    torch.testing.assert_close(active.dot_rows(y, W), (y @ W.T)[mask])
    torch.testing.assert_close(active.latent_sums(values), dense.sum(0))
    assert torch.equal(active.fired(values), mask.sum(0, dtype=torch.int32))
    empty, none = ActiveEntries.above(torch.zeros(n, width), 0.0)
    assert empty.count == 0
    assert torch.equal(empty.decode(none, W), torch.zeros(n, dim))
    assert torch.equal(empty.sum_over_tokens(none, y), torch.zeros(width, dim))
    assert empty.dot_rows(y, W).numel() == 0


def run_steps(case: str, paths: list[str], density: float = 0.05):
    """SAERun (the trainer's step: hand-derived backward, constrained Adam, firing tracker) over a fixed stream,
    one forced path per step. Returns the run."""
    sae, inputs = make(case, density)
    train = TrainConfig(batch_size=TOKENS, lr_warmup_steps=0, tensorboard=False)
    run = SAERun(case, sae, train, total_steps=100, plan=StepPlan.of(train, 100), lr=3e-3, betas=sae.adam_betas,
                 sparsity_coeff=inputs["sparsity_coeff"], resample=False, seed=0)
    g = torch.Generator().manual_seed(1)
    for step, path in enumerate(paths):
        x = inputs["x"][torch.randperm(TOKENS, generator=g)]
        with forced_path(path):
            run.step(x, None, step, (step + 1) * TOKENS)
    return run


@pytest.mark.parametrize("case", ["relu", "gated", "jumprelu-wide-window"])
def test_switching_paths_mid_training_equals_dense_training(case):
    steps = 10
    dense = run_steps(case, ["dense"] * steps)
    for paths in (["dense"] * 5 + ["sparse"] * 5, ["sparse"] * 5 + ["dense"] * 5, ["sparse", "dense"] * 5):
        mixed = run_steps(case, paths)
        for (name, p), (_, q) in zip(mixed.sae.named_parameters(), dense.sae.named_parameters()):
            assert relative_error(p.detach(), q.detach()) < 1e-4, (name, paths)
        for key, counts in dense.tracker.state_dict().items():  # firing counts and when each latent last fired
            assert torch.equal(mixed.tracker.state_dict()[key], counts), key
        torch.testing.assert_close(mixed.metric_sums, dense.metric_sums, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 5, 16, 40, 64, 300])
@pytest.mark.parametrize("width", [1024, 1000])
def test_top_k_indices_selects_what_topk_selects(k, width):
    torch.manual_seed(k)
    scores = torch.randn(64, width)
    scores[3] = 0.5  # a row of ties
    scores[4, :10] = -torch.inf
    scores[5, ::7] = 9.0  # many tied maxima
    got = top_k_indices(scores, k)
    assert got.shape == (64, k)
    for idx in got:
        assert idx.unique().numel() == k  # distinct latents
    expected = scores.topk(k, dim=-1).values
    torch.testing.assert_close(scores.gather(1, got).sort(-1, descending=True).values, expected, rtol=0, atol=0)
    untied = torch.randn(64, width)
    assert torch.equal(top_k_indices(untied, k).sort(-1).values, untied.topk(k, dim=-1).indices.sort(-1).values)


def test_top_k_indices_keeps_leading_dimensions():
    scores = torch.randn(3, 5, 1024)
    got = top_k_indices(scores, 4)
    assert got.shape == (3, 5, 4)
    assert torch.equal(got.sort(-1).values, scores.topk(4, dim=-1).indices.sort(-1).values)
