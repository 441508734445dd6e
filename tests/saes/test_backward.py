"""The hand-derived backwards (`SAE.loss_and_grads`) against autograd on each architecture's `loss`.

float32 must agree to rounding; bfloat16 products (against autocast) to bfloat16's precision."""

import copy

import pytest
import torch

from saeforge.saes import create_sae
from saeforge.saes.base import count_fired
from saeforge.saes.gated import GatedSAE

D_IN, D_SAE, TOKENS = 45, 256, 300  # d_in not a multiple of the 16 that decoder_grad pads to

CASES = {
    "relu": ("relu", {}),
    "relu-decoder-norm": ("relu", {"sparsity_penalty": "l1_decoder_norm"}),
    "gated": ("gated", {}),
    "gated-untied": ("gated", {"tied": False}),
    "gated-no-r_mag": ("gated", {"use_r_mag": False}),
    "gated-unfrozen-aux": ("gated", {"freeze_aux_decoder": False}),
    "gated-decoder-norm": ("gated", {"sparsity_penalty": "l1_decoder_norm"}),
    "gated-decoder-norm-unfrozen": ("gated", {"sparsity_penalty": "l1_decoder_norm", "freeze_aux_decoder": False}),
    "gated-rescale-shift": ("gated-from-relu", {}),
    "jumprelu": ("jumprelu", {}),
    "jumprelu-wide-window": ("jumprelu", {"bandwidth": 0.5}),  # more entries in the window, off and on
    "topk": ("topk", {"k": 8}),
    "topk-auxk": ("topk", {"k": 8, "k_aux": 16}),
    "gradient_topk": ("gradient_topk", {"k": 8, "beta": 3.0}),
    "gradient_topk-unit_rms": ("gradient_topk", {"k": 8, "beta": 3.0, "grad_norm": "unit_rms"}),
    "gradient_topk-auxk": ("gradient_topk", {"k": 8, "k_aux": 16, "beta": 3.0}),
    "batchtopk": ("batchtopk", {"k": 8}),
    "batchtopk-auxk": ("batchtopk", {"k": 8, "k_aux": 16}),
    "matryoshka_batchtopk": ("matryoshka_batchtopk", {"k": 8, "prefixes": [16, 64, 200]}),
    "matryoshka_batchtopk-fractions": ("matryoshka_batchtopk", {"k": 8, "prefixes": [1 / 32, 0.25]}),
    "matryoshka_batchtopk-auxk": ("matryoshka_batchtopk", {"k": 8, "k_aux": 16, "prefixes": [16, 64]}),
}


def make(case: str, seed: int = 0):
    torch.manual_seed(seed)
    arch, options = CASES[case]
    if arch == "gated-from-relu":
        sae = GatedSAE.from_relu(create_sae("relu", d_in=D_IN, d_sae=D_SAE))
    else:
        sae = create_sae(arch, d_in=D_IN, d_sae=D_SAE, **options)
    with torch.no_grad():  # away from the initial point, so that every term and branch is exercised
        for p in sae.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.3)
        sae.W_enc.mul_(1.5)
        if hasattr(sae, "W_mag"):
            sae.W_mag.normal_(0, 0.2)
    x = 2 * torch.randn(TOKENS, D_IN)
    grad = torch.randn(TOKENS, D_IN) if sae.needs_grad else None
    dead = torch.arange(D_SAE) % 3 == 0 if case.endswith("auxk") else None
    coeff = 0.7 if sae.uses_sparsity_coeff else None
    return sae, dict(x=x, sparsity_coeff=coeff, grad=grad, dead_mask=dead)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_hand_derived_backward_matches_autograd(case, dtype):
    sae, inputs = make(case)
    reference = copy.deepcopy(sae)
    bf16 = dtype == "bf16"
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        expected = reference.loss(**inputs)
    expected.total.backward()
    got = sae.loss_and_grads(**inputs, compute_dtype=torch.bfloat16 if bf16 else None)
    tol = 2e-2 if bf16 else 1e-5
    for name in ("total", "recon", "sparsity", "aux"):
        a, b = getattr(got, name), getattr(expected, name).detach()
        assert abs(float(a) - float(b)) <= tol * max(1.0, abs(float(b))), name
    assert relative_error(got.x_hat, expected.x_hat.detach().float()) < tol
    # bf16: pi_gate is rounded with its bias included (autocast adds the bias in float32), which can flip a
    # firing that sits at the threshold.
    flipped = int((got.fired() - expected.fired()).abs().sum())
    assert flipped <= (0.01 * int(expected.fired().sum()) if bf16 else 0)
    checked = 0
    for (name, p), (_, q) in zip(sae.named_parameters(), reference.named_parameters()):
        assert (p.grad is None) == (q.grad is None), f"{name}: gradient presence differs from autograd"
        if q.grad is not None and q.grad.norm() > 0:
            assert relative_error(p.grad, q.grad) < tol, name
            checked += 1
    assert checked >= 2


def test_gradients_accumulate_like_backward():
    sae, inputs = make("gated")
    sae.loss_and_grads(**inputs)
    once = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.loss_and_grads(**inputs)
    for n, p in sae.named_parameters():
        torch.testing.assert_close(p.grad, 2 * once[n])


def test_compute_dtype_is_checked():
    sae, inputs = make("relu")
    with pytest.raises(ValueError, match="compute_dtype"):
        sae.loss_and_grads(**inputs, compute_dtype=torch.float16)


def test_bad_input_names_the_problem():
    sae, inputs = make("topk")
    inputs["x"][3, 5] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        sae.loss_and_grads(**inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 255, 700])
def test_count_fired_is_exact(dtype, rows):
    f = torch.relu(torch.randn(rows, 64)).to(dtype)
    f[:, 7] = 0.5  # fires on every row: a bf16 sum over 700 rows would round
    assert torch.equal(count_fired(f), (f > 0).sum(0, dtype=torch.int32))


def test_leading_dimensions_are_kept():
    sae, inputs = make("gated")
    inputs["x"] = inputs["x"][:294].reshape(6, 49, D_IN)
    reference = copy.deepcopy(sae)
    expected = reference.loss(**inputs)
    expected.total.backward()
    got = sae.loss_and_grads(**inputs)
    assert got.x_hat.shape == expected.x_hat.shape == (6, 49, D_IN)
    assert got.feats.shape == expected.feats.shape == (6, 49, D_SAE)
    torch.testing.assert_close(sae.W_enc.grad, reference.W_enc.grad)


@pytest.mark.parametrize("case", ["relu-decoder-norm", "gated-decoder-norm-unfrozen"])
def test_zero_decoder_row_has_a_finite_gradient(case):
    sae, inputs = make(case)
    with torch.no_grad():
        sae.W_dec[3] = 0
    reference = copy.deepcopy(sae)
    reference.loss(**inputs).total.backward()
    sae.loss_and_grads(**inputs)
    assert torch.isfinite(sae.W_dec.grad).all()
    torch.testing.assert_close(sae.W_dec.grad, reference.W_dec.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("case", ["relu", "gated-rescale-shift", "topk-auxk"])
def test_other_parameter_dtypes_go_through_autograd(case, dtype):
    sae, inputs = make(case)
    sae = sae.to(dtype)
    inputs["x"] = inputs["x"].to(dtype)
    out = sae.loss_and_grads(**inputs, compute_dtype=torch.bfloat16 if dtype == torch.bfloat16 else None)
    assert torch.isfinite(out.total)
    assert all(p.grad is not None and p.grad.dtype == dtype for p in sae.parameters() if p.requires_grad)


def test_empty_batch_is_refused():
    sae, inputs = make("relu")
    inputs["x"] = inputs["x"][:0]
    with pytest.raises(ValueError, match="no tokens"):
        sae.loss_and_grads(**inputs)
