"""JumpReLU SAEs trained directly (Rajamanoharan et al. 2024, "Jumping Ahead"): the hand-derived backward against
autograd's pseudo-derivatives (eqs. 11-12), the threshold's pseudo-derivative against the derivative of the expected
loss, an L0 target reached through the trainer, float32 thresholds, save/load and the activation-scale fold.

Dictionary recovery on the synthetic benchmark is in tests/saes/test_recovery.py."""

import copy
import json
import math

import pytest
import torch

import saeforge as sf
from saeforge.config import RunConfig, SAESpec, TrainConfig
from saeforge.saes import create_sae, load_sae
from saeforge.saes.jumprelu import paper_scale
from saeforge.training import SyntheticStream, Trainer

D_IN, D_SAE, TOKENS = 45, 256, 300  # d_in not a multiple of the 16 that decoder_grad pads to

CASES = {
    "paper-bandwidth": {},  # eps = 0.001 * sqrt(d_in): few pre-activations fall in the window
    "wide-bandwidth": {"bandwidth": 0.35},  # many do: every term of theta's gradient is exercised
}
# No pre-activation of these cases lies within 7e-5 of a threshold or a window edge (checked below in float64),
# 20x the float32 rounding (3.5e-6) by which the two paths' pre-activations may differ: fp32 masks agree on any CPU.
MARGIN = 2e-5


def make(case: str, seed: int = 0):
    torch.manual_seed(seed)
    sae = create_sae("jumprelu", d_in=D_IN, d_sae=D_SAE, **CASES[case])
    with torch.no_grad():  # away from the initial point; some thresholds negative (they act as 0)
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.3)
        sae.threshold.normal_(0.8, 0.6)
        sae.W_enc.mul_(1.5)
    x = 2 * torch.randn(TOKENS, D_IN)
    return sae, x


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


# ------------------------------------------------------------------------------ hand-derived backward vs autograd
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_hand_derived_backward_matches_autograd(case, dtype):
    sae, x = make(case)
    assert (sae.threshold < 0).any() and (sae.threshold > 0).any()
    with torch.no_grad():
        pi = (x.double() - sae.b_dec.double()) @ sae.W_enc.double() + sae.b_enc.double()
        gap = (pi - sae.threshold.clamp(min=0).double()).abs()
    assert gap.min() > MARGIN and (gap - sae.epsilon / 2).abs().min() > MARGIN
    reference = copy.deepcopy(sae)
    bf16 = dtype == "bf16"
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        expected = reference.loss(x, sparsity_coeff=0.7)
    expected.total.backward()
    got = sae.loss_and_grads(x, sparsity_coeff=0.7, compute_dtype=torch.bfloat16 if bf16 else None)
    tol = 2e-2 if bf16 else 1e-5
    for name in ("total", "recon", "sparsity", "aux"):
        a, b = getattr(got, name), getattr(expected, name).detach()
        assert abs(float(a) - float(b)) <= tol * max(1.0, abs(float(b))), name
    assert relative_error(got.x_hat, expected.x_hat.detach().float()) < tol
    flipped = int((got.fired() - expected.fired()).abs().sum())
    assert flipped <= (0.01 * int(expected.fired().sum()) if bf16 else 0)
    for (name, p), (_, q) in zip(sae.named_parameters(), reference.named_parameters()):
        assert q.grad is not None and p.grad is not None, name
        assert p.grad.dtype == p.dtype == (torch.float32), name
        assert q.grad.norm() > 0, f"{name}: autograd gives no gradient; the case exercises nothing"
        assert relative_error(p.grad, q.grad) < tol, name


def test_leading_dimensions_are_kept():
    sae, x = make("wide-bandwidth")
    x = x[:294].reshape(6, 49, D_IN)
    reference = copy.deepcopy(sae)
    expected = reference.loss(x, sparsity_coeff=0.7)
    expected.total.backward()
    got = sae.loss_and_grads(x, sparsity_coeff=0.7)
    assert got.x_hat.shape == expected.x_hat.shape == (6, 49, D_IN)
    assert got.feats.shape == expected.feats.shape == (6, 49, D_SAE)
    torch.testing.assert_close(sae.threshold.grad, reference.threshold.grad, rtol=1e-5, atol=1e-6)


def test_lambda_is_required():
    sae, x = make("paper-bandwidth")
    for call in (sae.loss, sae.loss_and_grads):
        with pytest.raises(ValueError, match="sparsity_coeff"):
            call(x)


# ------------------------------------------------------------------------------ the pseudo-derivatives themselves
def one_latent(theta: float, eps: float) -> sf.JumpReLUSAE:
    """d_in = d_sae = 1, identity encoder and decoder, no biases: pi = x, f = x H(x - theta), x_hat = f."""
    sae = sf.JumpReLUSAE(d_in=1, d_sae=1, bandwidth=eps)
    with torch.no_grad():
        sae.W_enc.fill_(1.0)
        sae.W_dec.fill_(1.0)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.threshold.fill_(theta)
    return sae


def test_threshold_gradient_by_hand_on_a_tiny_example():
    # theta = 1, eps = 0.5: the window is (0.75, 1.25). Tokens x = 0.8 (in it, below theta: f = 0), 1.1 (in it,
    # above: f = x, no error), 2.0 (above, outside), 0.3 (below, outside).
    theta, eps, lam = 1.0, 0.5, 0.2
    x = torch.tensor([[0.8], [1.1], [2.0], [0.3]])
    n = 4
    # recon = sum_t (x_t - f_t)^2 / n; d recon / d f_t = 2 (f_t - x_t) / n: -1.6/4 for x = 0.8, 0 for x = 1.1.
    # eq. 11: d f_t / d theta := -(theta / eps) K = -2 for the two tokens in the window;
    # eq. 12: d H_t / d theta := -(1 / eps) K = -2 for the same two; the L0 term is lambda * sum_t H_t / n.
    expected = (-1.6 / n) * (-2.0) + 0.0 * (-2.0) + lam * (-2.0 - 2.0) / n
    for path in ("autograd", "by hand"):
        sae = one_latent(theta, eps)
        if path == "autograd":
            out = sae.loss(x, sparsity_coeff=lam)
            out.total.backward()
        else:
            out = sae.loss_and_grads(x, sparsity_coeff=lam)
        assert float(out.sparsity.detach()) == pytest.approx(2 / n)  # 1.1 and 2.0 fire
        assert float(out.recon.detach()) == pytest.approx((0.8**2 + 0.3**2) / n)
        assert float(sae.threshold.grad) == pytest.approx(expected, rel=1e-6), path
        # The encoder learns from reconstruction only (no STE to pi): the firing tokens have zero error here.
        assert float(sae.b_enc.grad) == 0.0 and float(sae.W_enc.grad.abs().sum()) == 0.0, path


def test_threshold_gradient_estimates_the_derivative_of_the_expected_loss():
    """With pi = x ~ N(0, 1) the expected loss is known in closed form:
        E[(x - f)^2] = E[x^2 1[x <= theta]] = Phi(theta) - theta phi(theta),  E[H(x - theta)] = 1 - Phi(theta),
    and the pseudo-derivatives (a kernel density estimate at theta) must estimate its derivative, which is checked
    by a central finite difference of the closed form."""
    theta, eps, lam, h = 0.8, 0.1, 0.1, 1e-4
    phi = lambda t: math.exp(-t * t / 2) / math.sqrt(2 * math.pi)
    Phi = lambda t: 0.5 * (1 + math.erf(t / math.sqrt(2)))
    expected_loss = lambda t: (Phi(t) - t * phi(t)) + lam * (1 - Phi(t))
    derivative = (expected_loss(theta + h) - expected_loss(theta - h)) / (2 * h)  # (theta^2 - lam) phi
    x = torch.randn(2_000_000, 1, generator=torch.Generator().manual_seed(0))
    for path in ("autograd", "by hand"):
        sae = one_latent(theta, eps)
        if path == "autograd":
            sae.loss(x, sparsity_coeff=lam).total.backward()
        else:
            sae.loss_and_grads(x, sparsity_coeff=lam)
        # About n phi(theta) eps = 58,000 tokens in the window: a sampling error near 0.7%. The reconstruction
        # term's estimate averages over the lower half of the window only, a bias of about -1.4% at eps = 0.1
        # (over five seeds the error was -0.2% to -2.3%).
        assert float(sae.threshold.grad) == pytest.approx(derivative, rel=0.04), path


def test_the_l0_penalty_trains_only_the_threshold():
    sae, x = make("wide-bandwidth")
    out = sae.loss(x, sparsity_coeff=1.0)
    names = [n for n, _ in sae.named_parameters()]
    grads = torch.autograd.grad(out.sparsity, list(sae.parameters()), allow_unused=True)
    for name, g in zip(names, grads):
        if name == "threshold":
            assert g is not None and g.abs().sum() > 0
            assert (g <= 0).all()  # a larger lambda only ever raises thresholds
        else:
            assert g is None or g.abs().sum() == 0, name


def test_a_threshold_at_or_below_zero_is_a_relu_and_the_penalty_lifts_it():
    sae = one_latent(-0.05, 0.2)
    x = torch.tensor([[-0.5], [-0.03], [0.02], [0.07], [0.5]])
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), torch.relu(x))  # no negative features
    sae.loss_and_grads(x, sparsity_coeff=1.0)
    assert float(sae.threshold.grad) < 0  # gradient descent raises it
    assert torch.equal(sae.loss_and_grads(x, sparsity_coeff=1.0).fired(), torch.tensor([3], dtype=torch.int32))


# ------------------------------------------------------------------------------ defaults and float32 thresholds
def test_defaults_follow_the_paper():
    sae = sf.JumpReLUSAE(d_in=64, d_sae=128)
    # theta = eps = 0.001 in the paper's units (mean squared norm 1), i.e. 0.001 * sqrt(d_in) in saeforge's.
    assert sae.epsilon == pytest.approx(0.008) == paper_scale(64)
    assert torch.all(sae.threshold == torch.tensor(0.008))
    assert torch.all(sae.b_enc == 0)
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T)
    assert sae.trainable and sae.sparsity == "coefficient" and sae.uses_sparsity_coeff
    assert sae.adam_betas == (0.0, 0.999) and sae.dead_latents == "none" and sae.constrain_decoder_norm
    assert sae.options() == {"bandwidth": None} and sae.variant() == "jumprelu"
    assert sf.JumpReLUSAE(d_in=64, d_sae=128, bandwidth=0.05).variant() == "jumprelu (bandwidth=0.05)"


@pytest.mark.parametrize("bad", [0, -0.1, float("nan"), float("inf"), True, "0.1"])
def test_bad_bandwidth_is_named(bad):
    with pytest.raises(ValueError, match="bandwidth"):
        sf.JumpReLUSAE(d_in=4, d_sae=8, bandwidth=bad)


def test_threshold_stays_float32_whatever_the_weights():
    sae = sf.JumpReLUSAE(d_in=8, d_sae=16, dtype=torch.bfloat16)
    assert sae.W_enc.dtype == torch.bfloat16 and sae.threshold.dtype == torch.float32
    sae = sf.JumpReLUSAE(d_in=8, d_sae=16)
    with torch.no_grad():
        sae.threshold.fill_(1.0 + 2**-12)  # not a bfloat16 number
    sae.to(torch.bfloat16)
    assert sae.W_dec.dtype == torch.bfloat16
    assert sae.threshold.dtype == torch.float32 and torch.all(sae.threshold == 1.0 + 2**-12)
    assert sae.to(torch.float64).threshold.dtype == torch.float64
    # With bfloat16 weights, a threshold step far below bfloat16's spacing (2^-7 near 1) is still taken.
    sae = sf.JumpReLUSAE(d_in=1, d_sae=1, bandwidth=0.5, dtype=torch.bfloat16)
    with torch.no_grad():
        sae.W_enc.fill_(1.0)
        sae.W_dec.fill_(1.0)
        sae.threshold.fill_(1.0)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    sae.loss_and_grads(torch.tensor([[0.9], [1.1]], dtype=torch.bfloat16), sparsity_coeff=1.0,
                       compute_dtype=torch.bfloat16)
    opt.step()
    assert float(sae.threshold.detach()) == pytest.approx(1.0 + 1e-4, rel=1e-6)


# ------------------------------------------------------------------------------ training through the trainer
@pytest.mark.parametrize("active, target", [(12.0, 8.0), (4.0, 3.0)])
def test_the_trainer_reaches_a_target_l0(tmp_path, active, target):
    """The L0 controller steers lambda of the L0 penalty as it steers an L1 coefficient (on log L0). Targets lie
    below the L0 the data wants (the number of active features per token): JumpReLU thresholds out noise even at
    lambda = 0, so a larger L0 is not reached by lowering lambda. The threshold moves about lr per step, so L0
    follows lambda with a lag: the run is long enough for it (at 600 steps L0 still undershoots by 20-25%)."""
    d_in, batch, steps = 32, 128, 2000
    train = TrainConfig(tokens=steps * batch, batch_size=batch, out_dir=str(tmp_path / "run"), lr=1e-2,
                        tensorboard=False, log_every=100, checkpoint_every=10**6, heldout_tokens=0,
                        compute_dtype="float32")
    spec = SAESpec("jumprelu", d_sae=128, target_l0=target, name="jr")
    stream = SyntheticStream(d_in, batch, seed=3, active_per_token=active)
    trainer = Trainer(RunConfig(train=train, sae=[spec]), stream=stream, progress=False)
    initial = paper_scale(d_in)  # the paper's theta_0, in saeforge's units
    result = trainer.run()
    held_out = SyntheticStream(d_in, 4096, seed=3, active_per_token=active)
    held_out.batches = 10**6  # data the run never saw
    x = next(held_out)["x"]
    saved = load_sae(result.sae_dirs["jr"])
    with torch.no_grad():
        l0 = float((saved.encode(x) > 0).float().sum(-1).mean())
    assert abs(l0 / target - 1) < 0.2, l0
    run = trainer.runs["jr"]
    assert run.sparsity_coeff != 1.0 and run.coeff(steps - 1) == run.coeff(int(0.8 * steps)) == run.sparsity_coeff
    assert float(run.sae.threshold.detach().mean()) > 50 * initial  # L0 fell because the thresholds rose
    record = json.loads((result.sae_dirs["jr"] / "cfg.json").read_text())
    assert record["training"]["target_l0"] == target and record["saeforge"]["architecture"] == "jumprelu"


def test_bf16_products_train_float32_thresholds(tmp_path):
    d_in, batch, steps = 32, 128, 300
    train = TrainConfig(tokens=steps * batch, batch_size=batch, out_dir=str(tmp_path / "run"), lr=1e-2,
                        tensorboard=False, log_every=50, checkpoint_every=10**6, heldout_tokens=0,
                        compute_dtype="bfloat16")
    spec = SAESpec("jumprelu", d_sae=128, target_l0=8.0, name="jr")
    stream = SyntheticStream(d_in, batch, seed=3, active_per_token=12.0)
    trainer = Trainer(RunConfig(train=train, sae=[spec]), stream=stream, progress=False)
    result = trainer.run()
    sae = trainer.runs["jr"].sae
    assert sae.threshold.dtype == torch.float32
    assert float(sae.threshold.detach().mean()) > 0.5  # from 0.0057: L0 fell from about d_sae / 2
    assert result.metrics["jr"]["l0"] < 16


# ------------------------------------------------------------------------------ files and folding
def test_save_and_load_keep_the_threshold(tmp_path):
    sae, x = make("wide-bandwidth")
    for _ in range(3):  # a few steps, so theta is a trained value
        sae.zero_grad()
        sae.loss_and_grads(x, sparsity_coeff=0.7)
        with torch.no_grad():
            for p in sae.parameters():
                p.sub_(1e-3 * p.grad)
    sae.save(tmp_path / "jr")
    loaded = load_sae(tmp_path / "jr")
    assert isinstance(loaded, sf.JumpReLUSAE) and loaded.bandwidth == 0.35
    assert loaded.threshold.dtype == torch.float32 and torch.equal(loaded.threshold, sae.threshold)
    assert torch.equal(loaded.encode(x), sae.encode(x))
    cfg = json.loads((tmp_path / "jr" / "cfg.json").read_text())
    assert cfg["saeforge"]["options"] == {"bandwidth": 0.35}
    # A bfloat16 SAE keeps its float32 thresholds through the files.
    half = copy.deepcopy(sae).to(torch.bfloat16)
    half.save(tmp_path / "half")
    back = load_sae(tmp_path / "half")
    assert back.W_enc.dtype == torch.bfloat16 and torch.equal(back.threshold, sae.threshold)


def test_fold_activation_scale_divides_the_threshold():
    """Trained on c*x: pi scales by 1/c on raw x, so theta must too; the same latents fire and features are 1/c."""
    sae, x = make("wide-bandwidth")
    c = 3.7
    theta = sae.threshold.detach().clone()
    with torch.no_grad():
        f_scaled = sae.encode(c * x)
        sae.fold_activation_scale(c)
        f_raw = sae.encode(x)
    torch.testing.assert_close(sae.threshold.detach(), theta / c)
    assert torch.equal(f_raw != 0, f_scaled != 0)
    torch.testing.assert_close(f_raw, f_scaled / c, rtol=1e-4, atol=1e-5)
    assert sae.meta.activation_scale == c
