"""The SAE architectures against METHODS.md: gradient routing, the Gated -> JumpReLU conversion, save/load, bad input."""

import json

import pytest
import torch

import saeforge as sf
from saeforge.saes import REGISTRY, SAEMetadata, load_sae

ARCHS = {
    "relu": {},
    "relu_dn": {"sparsity_penalty": "l1_decoder_norm"},
    "gated": {},
    "gated_untied": {"tied": False},
    "gated_no_rmag": {"use_r_mag": False},
    "topk": {"k": 5},
    "gradient_topk": {"k": 5, "beta": 3.0, "grad_norm": "unit_rms"},
    "jumprelu": {},
    "batchtopk": {"k": 5},
    "matryoshka_batchtopk": {"k": 5, "prefixes": [10, 20]},
}


def make(label, d_in=12, d_sae=40, seed=0):
    torch.manual_seed(seed)
    name = label.split("_dn")[0] if label.startswith("relu") else label
    name = "gated" if label.startswith("gated") else name
    sae = sf.create_sae(name, d_in=d_in, d_sae=d_sae, **ARCHS[label])
    with torch.no_grad():  # non-trivial values in every tensor
        for p in sae.parameters():
            p.add_(0.3 * torch.randn_like(p))
        sae.normalize_decoder()
    return sae


def run(sae, x, grad=None):
    return sae.encode(x, grad=grad) if sae.needs_grad else sae.encode(x)


def test_registry_has_every_architecture():
    assert set(REGISTRY) == {"relu", "gated", "topk", "gradient_topk", "jumprelu", "batchtopk",
                             "matryoshka_batchtopk"}


def test_gated_reconstruction_term_gives_b_gate_no_gradient():
    sae = make("gated")
    x = torch.randn(64, 12)
    recon = sae.loss(x, sparsity_coeff=1e-2).recon
    g = torch.autograd.grad(recon, [sae.b_gate, sae.W_enc, sae.b_mag, sae.r_mag], allow_unused=True)
    assert g[0] is None or torch.all(g[0] == 0)
    # W_gate still learns from reconstruction, through the tied W_mag.
    assert g[1] is not None and g[1].abs().sum() > 0
    assert g[2].abs().sum() > 0 and g[3].abs().sum() > 0


def test_gated_sparsity_and_aux_terms_do_train_b_gate():
    sae = make("gated")
    out = sae.loss(torch.randn(64, 12), sparsity_coeff=1e-2)
    (g_sp,) = torch.autograd.grad(out.sparsity, [sae.b_gate], retain_graph=True)
    (g_aux,) = torch.autograd.grad(out.aux, [sae.b_gate])
    assert g_sp.abs().sum() > 0 and g_aux.abs().sum() > 0


def test_gated_aux_term_freezes_decoder_but_not_input_side_b_dec():
    sae = make("gated")
    x = torch.randn(64, 12)
    aux = sae.loss(x, sparsity_coeff=1e-2).aux
    g_wdec, g_bdec = torch.autograd.grad(aux, [sae.W_dec, sae.b_dec], allow_unused=True)
    assert g_wdec is None or torch.all(g_wdec == 0)
    # b_dec still gets gradient, but only from the input side (x - b_dec) of pi_gate: check it against a
    # hand-built aux loss in which the decoder-side b_dec is a separate constant.
    b_in = sae.b_dec.detach().clone().requires_grad_(True)
    pi_gate = (x - b_in) @ sae.W_enc + sae.b_gate
    manual = (x - (torch.relu(pi_gate) @ sae.W_dec.detach() + sae.b_dec.detach())).pow(2).sum(-1).mean()
    (g_manual,) = torch.autograd.grad(manual, [b_in])
    torch.testing.assert_close(g_bdec, g_manual)


def test_gated_unfrozen_aux_decoder_gets_gradient():
    sae = make("gated")
    sae.freeze_aux_decoder = False
    aux = sae.loss(torch.randn(64, 12), sparsity_coeff=1e-2).aux
    g_wdec, g_bdec = torch.autograd.grad(aux, [sae.W_dec, sae.b_dec])
    assert g_wdec.abs().sum() > 0
    # Now b_dec's gradient includes the decoder side: it differs from the frozen version.
    frozen = make("gated")
    aux_f = frozen.loss(torch.randn(64, 12), sparsity_coeff=1e-2).aux
    assert not torch.allclose(g_bdec, torch.autograd.grad(aux_f, [frozen.b_dec])[0])


def test_gated_tied_w_mag_is_exp_r_mag_times_w_gate_row_by_row():
    sae = make("gated")
    x = torch.randn(32, 12)
    W_gate = sae.W_enc.detach().T  # [d_sae, d_in], row i = latent i
    W_mag = torch.exp(sae.r_mag.detach())[:, None] * W_gate
    for i in range(sae.d_sae):
        torch.testing.assert_close(W_mag[i], torch.exp(sae.r_mag[i]).detach() * W_gate[i])
    pi_gate = (x - sae.b_dec) @ W_gate.T + sae.b_gate
    pi_mag = (x - sae.b_dec) @ W_mag.T + sae.b_mag
    expected = (pi_gate > 0).float() * torch.relu(pi_mag)
    torch.testing.assert_close(sae.encode(x), expected.detach(), rtol=1e-5, atol=1e-6)


def test_gated_without_r_mag_has_no_r_mag_parameter():
    sae = make("gated_no_rmag")
    assert "r_mag" not in dict(sae.named_parameters())
    assert torch.all(sae.r_mag == 0) and "r_mag" in sae.state_dict()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_jumprelu_from_gated_is_exact(seed):
    torch.manual_seed(seed)
    gated = sf.GatedSAE(d_in=16, d_sae=48)
    with torch.no_grad():
        gated.W_enc.add_(0.5 * torch.randn_like(gated.W_enc))
        gated.b_gate.copy_(torch.randn(48))
        gated.b_mag.copy_(torch.randn(48))
        gated.r_mag.copy_(0.7 * torch.randn(48))
        gated.b_dec.copy_(torch.randn(16))
    jr = sf.JumpReLUSAE.from_gated(gated)
    x = 2 * torch.randn(256, 16)
    f_g, f_j = gated.encode(x), jr.encode(x)
    assert (f_g != 0).float().mean() > 0.05  # non-trivial: features fire
    assert torch.equal(f_g != 0, f_j != 0)
    torch.testing.assert_close(f_j, f_g, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(jr(x), gated(x), rtol=1e-5, atol=1e-5)
    # Both branches of threshold = max(b_mag - exp(r_mag) b_gate, 0) are exercised.
    raw = gated.b_mag - torch.exp(gated.r_mag) * gated.b_gate
    assert (raw < 0).any() and (raw > 0).any()


def test_jumprelu_from_untied_gated_is_refused():
    with pytest.raises(ValueError, match="tied"):
        sf.JumpReLUSAE.from_gated(sf.GatedSAE(d_in=8, d_sae=16, tied=False))


@pytest.mark.parametrize("label", list(ARCHS))
def test_save_load_round_trip_is_bit_exact(label, tmp_path):
    sae = make(label)
    sae.meta = SAEMetadata(model_name="tiny", site="blocks.1.resid_post", context_size=16)
    counts = torch.arange(sae.d_sae, dtype=torch.float32)
    sae.save(tmp_path / label, sparsity=counts, n_tokens=1000)
    loaded = load_sae(tmp_path / label)
    assert type(loaded) is type(sae)
    assert loaded.options() == sae.options()
    a, b = sae.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    x, g = torch.randn(10, 12), torch.randn(10, 12)
    assert torch.equal(run(sae, x, g), run(loaded, x, g))
    assert loaded.meta.site == "blocks.1.resid_post"
    assert (tmp_path / label / "sparsity.safetensors").exists()


def test_saved_files_use_saelens_names_and_shapes(tmp_path):
    from safetensors.torch import load_file

    sf.GatedSAE(d_in=8, d_sae=24).save(tmp_path / "g")
    t = load_file(str(tmp_path / "g" / "sae_weights.safetensors"))
    assert {k: tuple(v.shape) for k, v in t.items()} == {
        "W_enc": (8, 24), "b_gate": (24,), "r_mag": (24,), "b_mag": (24,), "W_dec": (24, 8), "b_dec": (8,)}
    cfg = json.loads((tmp_path / "g" / "cfg.json").read_text())
    assert cfg["architecture"] == "gated" and cfg["d_in"] == 8 and cfg["d_sae"] == 24
    assert cfg["metadata"]["hook_name"] is None and cfg["apply_b_dec_to_input"] is True
    sf.TopKSAE(d_in=8, d_sae=24, k=3).save(tmp_path / "t")
    cfg = json.loads((tmp_path / "t" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 3
    sf.ReluSAE(d_in=8, d_sae=24).save(tmp_path / "r")
    assert set(load_file(str(tmp_path / "r" / "sae_weights.safetensors"))) == {"W_enc", "b_enc", "W_dec", "b_dec"}


@pytest.mark.parametrize("label", ["relu", "gated", "topk", "gradient_topk", "jumprelu", "batchtopk",
                                   "matryoshka_batchtopk"])
def test_fold_activation_scale_makes_raw_inputs_work(label):
    sae = make(label)
    c = 3.7
    x = torch.randn(50, 12)
    g = torch.randn(50, 12)
    with torch.no_grad():
        # Trained on c*x (with gradient g/c w.r.t. c*x); after folding it takes x (and g) directly.
        f_scaled = run(sae, c * x, g / c)
        x_hat_scaled = sae.decode(f_scaled)
        sae.fold_activation_scale(c)
        f_raw = run(sae, x, g)
        torch.testing.assert_close(f_raw, f_scaled / c, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(sae.decode(f_raw), x_hat_scaled / c, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(sae.d_sae))


def test_topk_sparse_decode_matches_dense():
    sae = make("topk")
    x = torch.randn(30, 12)
    vals, idx, _ = sae.encode_sparse(x)
    torch.testing.assert_close(sae.decode_sparse(vals, idx), sae.decode(sae.encode(x)), rtol=1e-5, atol=1e-5)
    assert torch.all((sae.encode(x) != 0).sum(-1) <= 5)


def test_gradient_topk_selects_by_gradient_score():
    torch.manual_seed(0)
    sae = sf.GradientTopKSAE(d_in=8, d_sae=32, k=3, beta=1e5)
    x, g = torch.randn(20, 8), 1e-5 * torch.randn(20, 8)
    z = torch.relu(sae.pre_acts(x))
    score = z + 1e5 * z * (g @ sae.W_dec.T).abs()
    expected = torch.zeros_like(z).scatter(-1, score.topk(3, dim=-1).indices, z.gather(-1, score.topk(3, -1).indices))
    torch.testing.assert_close(sae.encode(x, grad=g), expected)
    # With a zero gradient it is plain TopK; with a large one the selection changes for some token.
    plain = sf.TopKSAE(d_in=8, d_sae=32, k=3)
    plain.load_state_dict(sae.state_dict())
    assert torch.equal(sae.encode(x, grad=torch.zeros_like(x)), plain.encode(x))
    assert not torch.equal(sae.encode(x, grad=g), plain.encode(x))
    # The selection is a mask: gradients reach W_enc only through the selected z.
    out = sae.loss(x, grad=g)
    out.total.backward()
    assert sae.W_enc.grad is not None and torch.isfinite(sae.W_enc.grad).all()


def test_topk_auxk_trains_only_dead_latents():
    sae = make("topk")
    x = torch.randn(64, 12)
    dead = torch.zeros(sae.d_sae, dtype=torch.bool)
    dead[:10] = True
    out = sae.loss(x, dead_mask=dead)
    assert out.aux > 0
    (g,) = torch.autograd.grad(out.aux, [sae.W_dec])
    assert g[10:].abs().sum() == 0 and g[:10].abs().sum() > 0
    assert sae.loss(x).aux == 0


def test_resample_latents_reinitialises_as_methods_describe():
    sae = make("gated")
    idx = torch.tensor([3, 7])
    live = torch.ones(sae.d_sae, dtype=torch.bool)
    live[idx] = False
    mean_live = sae.W_enc.detach().norm(dim=0)[live].mean()
    dirs = torch.randn(2, 12)
    sae.resample_latents(idx, dirs)
    unit = dirs / dirs.norm(dim=1, keepdim=True)
    torch.testing.assert_close(sae.W_dec[idx].detach(), unit)
    torch.testing.assert_close(sae.W_enc[:, idx].detach().T, unit * 0.2 * mean_live)
    for name in ("b_gate", "b_mag", "r_mag"):
        assert torch.all(getattr(sae, name)[idx] == 0)


# ---------------------------------------------------------------------------------------------- bad input
def test_wrong_last_dimension_is_named():
    with pytest.raises(ValueError, match=r"last dimension must be d_in=12"):
        make("relu").encode(torch.randn(4, 13))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_is_named(bad):
    x = torch.randn(4, 12)
    x[1, 2] = bad
    for label in ("relu", "gated", "topk"):
        with pytest.raises(ValueError, match="non-finite"):
            make(label).loss(x, sparsity_coeff=1e-3)


def test_unknown_architecture_is_named():
    with pytest.raises(ValueError, match=r"unknown SAE architecture 'gatd'.*gated"):
        sf.create_sae("gatd", d_in=4, d_sae=8)


@pytest.mark.parametrize("k", [-1, 0, 2.5])
def test_bad_k_is_named(k):
    with pytest.raises(ValueError, match="k must be a positive integer"):
        sf.TopKSAE(d_in=4, d_sae=8, k=k)


def test_k_larger_than_d_sae_is_named():
    with pytest.raises(ValueError, match="larger than d_sae"):
        sf.GradientTopKSAE(d_in=4, d_sae=8, k=9)


def test_gradient_topk_without_grad_is_named():
    with pytest.raises(ValueError, match="needs grad="):
        sf.GradientTopKSAE(d_in=4, d_sae=8, k=2).encode(torch.randn(3, 4))


def test_cfg_json_with_missing_field_is_named(tmp_path):
    sf.ReluSAE(d_in=4, d_sae=8).save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    del cfg["d_sae"]
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="missing field 'd_sae'"):
        load_sae(tmp_path)


def test_weights_of_wrong_shape_are_named(tmp_path):
    sf.ReluSAE(d_in=4, d_sae=8).save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["d_sae"] = 9
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"tensor 'W_(enc|dec)' has shape"):
        load_sae(tmp_path)


def test_variant_names_non_default_switches():
    assert sf.GatedSAE(d_in=4, d_sae=8).variant() == "gated"
    assert sf.GatedSAE(d_in=4, d_sae=8, tied=False).variant() == "gated (tied=False)"
    assert sf.TopKSAE(d_in=4, d_sae=8, k=3).variant() == "topk"
    assert sf.GradientTopKSAE(d_in=4, d_sae=8, k=3, beta=10.0).variant() == "gradient_topk (beta=10)"
