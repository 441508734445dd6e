"""BatchTopK and Matryoshka BatchTopK: the batch-wide selection (mean L0 exactly k), the inference threshold theta
(its running estimate, the JumpReLU export, activation-scale folding, save/load), Matryoshka's sum of prefix
losses (against losses computed here from the formulas), and the generic paths: the trainer, checkpoints, the sweep
grid. The hand-derived backwards are checked against autograd in test_backward.py, dictionary recovery in
test_recovery.py."""

from __future__ import annotations

import copy

import pytest
import torch

from saeforge.config import RunConfig, SAESpec, TrainConfig
from saeforge.saes import BatchTopKSAE, JumpReLUSAE, MatryoshkaBatchTopKSAE, create_sae, load_sae
from saeforge.saes.matryoshka import prefix_sizes
from saeforge.training import SyntheticStream, Trainer, latest_checkpoint

D_IN, D_SAE, K = 20, 80, 6
ARCHS = {"batchtopk": {}, "matryoshka_batchtopk": {"prefixes": [8, 24]}}


def make(name, seed=0, **options):
    torch.manual_seed(seed)
    sae = create_sae(name, d_in=D_IN, d_sae=D_SAE, **{"k": K, **ARCHS[name], **options})
    with torch.no_grad():  # away from the initial point; biases mostly positive, so far more than k*B entries > 0
        sae.W_enc.mul_(1.5)
        sae.b_enc.normal_(0.3, 0.3)
        sae.b_dec.normal_(0, 0.3)
    return sae


def batch(n=128, seed=1):
    return 2 * torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed))


def pre_acts(sae, x):
    """ W_enc (x - b_dec) + b_enc, written out here."""
    return ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).detach()


def batch_topk_by_sorting(sae, x):
    """F = Z restricted to the k*B largest entries of Z = ReLU(pre) over the batch, from a full sort."""
    z = torch.relu(pre_acts(sae, x))
    cutoff = z.reshape(-1).sort(descending=True).values[sae.k * x.shape[0] - 1]
    return z * (z >= cutoff)


# ------------------------------------------------------------------------------------------ the batch selection
@pytest.mark.parametrize("name", list(ARCHS))
@pytest.mark.parametrize("path", ["autograd", "by_hand"])
def test_mean_l0_over_a_training_batch_is_exactly_k(name, path):
    sae = make(name)
    x = batch(128)
    assert (pre_acts(sae, x) > 0).sum() > 3 * K * 128  # far more candidates than the selection keeps
    out = sae.loss(x) if path == "autograd" else sae.loss_and_grads(x)
    per_token = (out.feats != 0).sum(-1)
    assert int(per_token.sum()) == K * 128 and int(out.fired().sum()) == K * 128  # mean L0 = k exactly
    assert per_token.min() < K < per_token.max()  # ... on average over the batch, not on every token
    expected = batch_topk_by_sorting(sae, x)
    torch.testing.assert_close(out.feats.reshape(expected.shape).detach(), expected, rtol=1e-5, atol=1e-5)


def test_batch_topk_keeps_zeros_silent_when_few_entries_are_positive():
    sae = make("batchtopk")
    with torch.no_grad():
        sae.b_enc.fill_(-6.0)  # almost nothing is positive
    x = batch(64)
    positive = int((pre_acts(sae, x) > 0).sum())
    assert 0 < positive < K * 64
    assert int(sae.loss_and_grads(x).fired().sum()) == positive == int((sae.loss(x).feats > 0).sum())


# ------------------------------------------------------------------------------------------ theta
def smallest_kept(sae, x) -> float:
    f = batch_topk_by_sorting(sae, x)
    return float(f[f > 0].min())


@pytest.mark.parametrize("path", ["autograd", "by_hand"])
def test_threshold_is_the_running_mean_of_the_smallest_kept_activation(path):
    sae = make("batchtopk", threshold_rate=0.25)
    minima, expected = [], None
    for t in range(6):
        x = batch(64, seed=t)
        minima.append(smallest_kept(sae, x))  # the SAE does not change: only theta is updated
        with torch.no_grad():
            sae.loss(x) if path == "autograd" else sae.grads_by_hand(x, None, None, None, torch.float32)
        # The first batch's value, then an exponential moving average with rate 0.25.
        expected = minima[0] if expected is None else expected + 0.25 * (minima[-1] - expected)
        assert float(sae.threshold) == pytest.approx(expected, rel=1e-5), t
    assert len(set(minima)) == len(minima)  # the batches differ, so the averaging was exercised


def test_threshold_is_a_buffer_that_eval_mode_leaves_alone():
    sae = make("matryoshka_batchtopk")
    assert "threshold" not in dict(sae.named_parameters()) and "threshold" in sae.state_dict()
    assert sae.latent_params() == {"W_enc": 1, "b_enc": 0, "W_dec": 0}
    sae.loss_and_grads(batch())
    theta = sae.threshold.clone()
    assert theta > 0
    assert sae.threshold.grad is None and not sae.threshold.requires_grad
    sae.eval()
    sae.loss(batch(seed=5))
    sae.loss_and_grads(batch(seed=6))
    assert torch.equal(sae.threshold, theta)


def test_inference_at_theta_gives_about_k_latents_per_token():
    """theta estimated on batches of the data gives L0 near k on new data of the same kind (that is what the
    paper's estimate is for), though no longer exactly k on every batch."""
    sae = make("batchtopk")
    for s in range(30):
        sae.loss(batch(256, seed=s))
    f = sae.encode(batch(4096, seed=999))
    l0 = float((f != 0).sum(-1).float().mean())
    assert abs(l0 - K) < 0.1 * K, l0


@pytest.mark.parametrize("name", list(ARCHS))
def test_encode_is_relu_cut_at_theta(name):
    sae = make(name)
    with torch.no_grad():
        sae.threshold.fill_(0.7)
    x = batch(200)
    z = torch.relu(pre_acts(sae, x))
    clear = (z - 0.7).abs() > 1e-4  # entries float rounding cannot move across theta
    assert clear.float().mean() > 0.99
    expected = z * (z > 0.7)
    f = sae.encode(x)
    torch.testing.assert_close(f[clear], expected[clear], rtol=1e-5, atol=1e-5)
    assert ((z > 0) & (z < 0.7)).any() and (f > 0).any()  # theta does cut some positive activations
    torch.testing.assert_close(sae(x), f @ sae.W_dec + sae.b_dec, rtol=1e-5, atol=1e-5)
    with pytest.raises(NotImplementedError, match="encode"):
        sae.encode_sparse(x)


@pytest.mark.parametrize("name", list(ARCHS))
def test_exported_jumprelu_reproduces_the_inference_features(name, tmp_path):
    sae = make(name)
    for s in range(5):  # theta from training steps
        sae.loss_and_grads(batch(seed=s))
    sae.meta.site = "blocks.3.resid_post"
    jr = sae.to_jumprelu()
    assert isinstance(jr, JumpReLUSAE) and jr.meta.site == "blocks.3.resid_post"
    assert torch.equal(jr.threshold, sae.threshold.expand(D_SAE))
    x = batch(500, seed=77)
    with torch.no_grad():
        f, f_jr = sae.encode(x), jr.encode(x)
        assert 0 < (f != 0).float().mean() < 0.5
        assert torch.equal(f != 0, f_jr != 0)
        torch.testing.assert_close(f_jr, f, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(jr(x), sae(x), rtol=1e-6, atol=1e-6)
        # ... and so does the JumpReLU saved and loaded.
        jr.save(tmp_path / "jr")
        torch.testing.assert_close(load_sae(tmp_path / "jr")(x), sae(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(ARCHS))
def test_fold_activation_scale_scales_theta(name):
    sae = make(name)
    with torch.no_grad():
        sae.threshold.fill_(0.9)
    c = 3.7
    x = batch(100)
    with torch.no_grad():
        f_scaled, x_hat_scaled = sae.encode(c * x), sae(c * x)
        sae.fold_activation_scale(c)
        assert float(sae.threshold) == pytest.approx(0.9 / c)
        f_raw = sae.encode(x)
        assert torch.equal(f_raw != 0, f_scaled != 0)
        torch.testing.assert_close(f_raw, f_scaled / c, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(sae(x), x_hat_scaled / c, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(ARCHS))
def test_save_load_round_trip_keeps_the_threshold(name, tmp_path):
    sae = make(name, threshold_rate=0.05)
    for s in range(3):
        sae.loss_and_grads(batch(seed=s))
    assert sae.threshold > 0
    sae.save(tmp_path / name)
    loaded = load_sae(tmp_path / name)
    assert type(loaded) is type(sae) and loaded.options() == sae.options()
    assert torch.equal(loaded.threshold, sae.threshold)
    for key, value in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = batch(50, seed=9)
    assert torch.equal(loaded.encode(x), sae.encode(x))
    assert torch.equal(loaded.to_jumprelu().threshold, sae.to_jumprelu().threshold)
    if name == "matryoshka_batchtopk":
        assert loaded.prefix_sizes == sae.prefix_sizes == (8, 24, D_SAE)


# ------------------------------------------------------------------------------------------ Matryoshka
def prefix_losses_by_formula(sae, x, dead_mask):
    """sum_m ||x - (F[:, :s_m] W_dec[:s_m] + b_dec)||^2 and AuxK, each a mean over tokens, written out here."""
    f = batch_topk_by_sorting(sae, x)
    recons = [((x - (f[:, :s] @ sae.W_dec[:s] + sae.b_dec)) ** 2).sum(-1).mean() for s in sae.prefix_sizes]
    residual = (x - (f @ sae.W_dec + sae.b_dec)).detach()
    pre = pre_acts(sae, x)
    dead_pre = pre.masked_fill(~dead_mask, float("-inf"))
    idx = dead_pre.topk(min(sae.k_aux, int(dead_mask.sum())), dim=-1).indices
    f_aux = torch.zeros_like(pre).scatter(-1, idx, torch.relu(pre.gather(-1, idx)))
    aux = ((residual - f_aux @ sae.W_dec) ** 2).sum(-1).mean()
    return torch.stack(recons), aux


@pytest.mark.parametrize("path", ["autograd", "by_hand"])
def test_matryoshka_total_is_the_sum_of_every_prefix_loss_plus_aux(path):
    sae = make("matryoshka_batchtopk", prefixes=[4, 16, 40], k_aux=10)
    assert sae.prefix_sizes == (4, 16, 40, D_SAE)
    x = batch(128)
    dead = torch.arange(D_SAE) % 4 == 1
    recons, aux = (t.detach() for t in prefix_losses_by_formula(sae, x, dead))
    out = sae.loss(x, dead_mask=dead) if path == "autograd" else sae.loss_and_grads(x, dead_mask=dead)
    torch.testing.assert_close(out.prefix_recon.detach(), recons, rtol=1e-5, atol=1e-5)
    assert float(out.aux.detach()) == pytest.approx(float(aux), rel=1e-5) and float(aux) > 0
    assert float(out.total.detach()) == pytest.approx(float(recons.sum() + sae.aux_coeff * aux), rel=1e-5)
    assert float(out.recon.detach()) == pytest.approx(float(recons[-1]), rel=1e-5)  # recon: the whole dictionary's
    assert len(set(round(float(r), 4) for r in recons)) == 4  # four different terms


def test_each_prefix_loss_reaches_the_gradients():
    """The hand-derived gradients equal those of sum_m recon_m + aux_coeff * aux computed here from the formulas,
    and dropping any one prefix's term changes them: every prefix trains its latents."""
    sae = make("matryoshka_batchtopk", prefixes=[4, 16, 40], k_aux=10)
    x = batch(128)
    dead = torch.arange(D_SAE) % 4 == 1
    sae.loss_and_grads(x, dead_mask=dead)
    reference = make("matryoshka_batchtopk", prefixes=[4, 16, 40], k_aux=10)
    recons, aux = prefix_losses_by_formula_with_grad(reference, x, dead)
    (recons.sum() + reference.aux_coeff * aux).backward()
    for (name, p), (_, q) in zip(sae.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
    for m in range(len(recons)):
        reference.zero_grad()
        recons, aux = prefix_losses_by_formula_with_grad(reference, x, dead)
        (recons.sum() - recons[m] + reference.aux_coeff * aux).backward()
        assert not torch.allclose(reference.W_dec.grad, sae.W_dec.grad, rtol=1e-3, atol=1e-4), m


def prefix_losses_by_formula_with_grad(sae, x, dead_mask):
    """prefix_losses_by_formula with gradients: the selection (a mask) from the formula, the values live."""
    with torch.no_grad():
        keep = batch_topk_by_sorting(sae, x) > 0
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    f = torch.relu(pre) * keep
    recons = [((x - (f[:, :s] @ sae.W_dec[:s] + sae.b_dec)) ** 2).sum(-1).mean() for s in sae.prefix_sizes]
    residual = (x - (f @ sae.W_dec + sae.b_dec)).detach()
    with torch.no_grad():
        idx = pre.masked_fill(~dead_mask, float("-inf")).topk(min(sae.k_aux, int(dead_mask.sum())), dim=-1).indices
    f_aux = torch.zeros_like(pre).scatter(-1, idx, torch.relu(pre.gather(-1, idx)))
    aux = ((residual - f_aux @ sae.W_dec) ** 2).sum(-1).mean()
    return torch.stack(recons), aux


def test_a_prefix_group_with_no_kept_latent_has_exact_gradients():
    sae = make("matryoshka_batchtopk", prefixes=[8, 24])
    with torch.no_grad():
        sae.b_enc[8:24] = -50.0  # the middle group never fires
    reference = copy.deepcopy(sae)
    x = batch(100)
    got = sae.loss_and_grads(x)
    expected = reference.loss(x)
    expected.total.backward()
    assert got.fired()[8:24].sum() == 0
    torch.testing.assert_close(got.prefix_recon, expected.prefix_recon.detach(), rtol=1e-5, atol=1e-5)
    for (name, p), (_, q) in zip(sae.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert torch.all(sae.W_dec.grad[8:24] == 0)


def test_matryoshka_trains_its_first_prefix_to_reconstruct_alone():
    """Trained on the same data, Matryoshka's first 6 latents reconstruct far better on their own than plain
    BatchTopK's first 6, whose loss never asked them to."""
    stream = SyntheticStream(D_IN, 256, seed=3, active_per_token=3.0)
    first = {}
    for name, options in (("batchtopk", {}), ("matryoshka_batchtopk", {"prefixes": [6, 24]})):
        torch.manual_seed(0)
        sae = create_sae(name, d_in=D_IN, d_sae=D_SAE, k=4, **options)
        opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
        stream.batches = 0
        for _ in range(300):
            x = next(stream)["x"] / 5.0
            opt.zero_grad(set_to_none=True)
            sae.loss_and_grads(x)
            opt.step()
            sae.normalize_decoder()
        x = stream._make(-5)["x"] / 5.0  # a held-out batch
        with torch.no_grad():
            f = sae.encode(x)
            err = (x - (f[:, :6] @ sae.W_dec[:6] + sae.b_dec)).pow(2).sum(-1).mean()
            first[name] = float(err / (x - x.mean(0)).pow(2).sum(-1).mean())  # the first prefix's FVU
    assert first["matryoshka_batchtopk"] < 0.8 * first["batchtopk"], first


def test_prefixes_are_counts_or_fractions_and_end_at_d_sae():
    assert prefix_sizes([128, 512], 2048) == (128, 512, 2048)
    assert prefix_sizes([0.0625, 0.25, 1.0], 2048) == (128, 512, 2048)
    assert prefix_sizes([512, 128, 2048, 0.25], 2048) == (128, 512, 2048)  # sorted, each size once
    assert MatryoshkaBatchTopKSAE(8, 40, k=2).prefix_sizes == (1, 2, 10, 40)  # the default fits small widths too
    for bad in ([], [0], [4096], [1.5], [0.0], ["a"], "128", [True]):
        with pytest.raises(ValueError, match="prefix"):
            MatryoshkaBatchTopKSAE(8, 2048, k=2, prefixes=bad)
    assert MatryoshkaBatchTopKSAE(8, 64, k=2, prefixes=[8, 32]).variant() == \
        "matryoshka_batchtopk (prefixes=(8, 32))"
    with pytest.raises(ValueError, match="threshold_rate"):
        BatchTopKSAE(8, 64, k=2, threshold_rate=0.0)


# ------------------------------------------------------------------------------------------ the generic paths
BATCH = 32


def run_config(tmp_path, specs, **train) -> RunConfig:
    base = dict(tokens=10 * BATCH, batch_size=BATCH, out_dir=str(tmp_path / "run"), lr=1e-2, lr_warmup_steps=2,
                checkpoint_every=3, log_every=5, tensorboard=False, aux_k_dead_tokens=2 * BATCH, seed=1)
    base.update(train)
    return RunConfig(train=TrainConfig(**base), sae=specs)


SPECS = [SAESpec("batchtopk", d_sae=48, k=3), SAESpec("matryoshka_batchtopk", d_sae=48, k=3,
                                                       options={"prefixes": [6, 12]})]


def test_the_trainer_trains_them_and_the_saved_saes_load(tmp_path):
    trainer = Trainer(run_config(tmp_path, SPECS), stream=SyntheticStream(16, BATCH, seed=7), progress=False)
    result = trainer.run()
    assert set(result.sae_dirs) == {"batchtopk_w48_k3", "matryoshka_batchtopk_w48_k3"}
    x = SyntheticStream(16, 256, seed=99)._make(0)["x"]
    for name, run in trainer.runs.items():
        assert result.metrics[name]["l0"] == pytest.approx(3.0)  # exactly k per training batch
        assert run.sae.threshold > 0
        # Adam holds the weights only: theta is not a parameter it steps.
        held = {id(p) for group in run.optimizer.param_groups for p in group["params"]}
        assert held == {id(p) for p in run.sae.parameters()} and id(run.sae.threshold) not in held
        saved = load_sae(result.sae_dirs[name])
        assert type(saved) is type(run.sae) and saved.k == 3
        # Saved with the activation scale folded in: theta / c, and the same features on raw activations.
        c = trainer.scale
        assert float(saved.threshold) == pytest.approx(float(run.sae.threshold) / c, rel=1e-6)
        with torch.no_grad():
            torch.testing.assert_close(saved.encode(x), run.sae.encode(c * x) / c, rtol=1e-4, atol=1e-5)
    assert load_sae(result.sae_dirs["matryoshka_batchtopk_w48_k3"]).prefix_sizes == (6, 12, 48)


def test_a_resumed_run_ends_with_the_threshold_of_an_unbroken_one(tmp_path):
    whole = Trainer(run_config(tmp_path / "whole", SPECS, resample=False), stream=SyntheticStream(16, BATCH, seed=7),
                    progress=False)
    whole.run()
    cfg = run_config(tmp_path / "broken", SPECS, resample=False)  # resample: the stream is read ahead
    first = Trainer(cfg, stream=SyntheticStream(16, BATCH, seed=7, max_tokens=6 * BATCH), progress=False).run()
    assert first.steps == 6 and latest_checkpoint(tmp_path / "broken" / "run" / "checkpoints") is not None
    resumed = Trainer(cfg, stream=SyntheticStream(16, BATCH, seed=7), progress=False)
    resumed.run(resume=True)
    for name, run in whole.runs.items():
        for key, value in run.sae.state_dict().items():
            assert torch.equal(resumed.runs[name].sae.state_dict()[key], value), f"{name}.{key}"


def test_the_sweep_grid_gives_them_k(tmp_path):
    from saeforge.config import load_config
    from saeforge.commands.sweep import expand_grid

    path = tmp_path / "g.toml"
    path.write_text('[eval]\ngrid_architectures = ["batchtopk", "matryoshka_batchtopk"]\ngrid_k = [4, 16]\n\n'
                    '[[sae]]\narchitecture = "matryoshka_batchtopk"\nk = 8\nexpansion = 4.0\n'
                    'options = {prefixes = [0.125, 0.5]}\n')
    cfg = expand_grid(load_config(path))
    assert [(s.architecture, s.k) for s in cfg.sae] == [("batchtopk", 4), ("batchtopk", 16),
                                                         ("matryoshka_batchtopk", 4), ("matryoshka_batchtopk", 16)]
    assert cfg.sae[0].options == {} and cfg.sae[2].options == {"prefixes": [0.125, 0.5]}
