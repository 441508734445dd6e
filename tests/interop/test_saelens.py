"""SAELens's format both ways, without sae_lens: saeforge's directories against SAELens's documented equations, and
SAELens directories built from its documented names and shapes read back with load_sae (test_saelens_real.py does
the same against the real package where it installs)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import saeforge as sf
from saeforge.interop import InteropError, export_saelens, read_sae
from saeforge.saes import REGISTRY, SAEMetadata

from interop_helpers import D_IN, D_SAE, assert_same, realistic


# ------------------------------------------------------------------------------------------------ SAELens's maths
def saelens_encode(cfg: dict, t: dict, x: torch.Tensor) -> torch.Tensor:
    """SAELens 6 inference, written from its definitions (StandardSAE, GatedSAE, TopKSAE, JumpReLUSAE)."""
    arch = cfg["architecture"]
    sae_in = x - t["b_dec"] * float(cfg.get("apply_b_dec_to_input", True))
    if arch == "gated":
        gate = (sae_in @ t["W_enc"] + t["b_gate"] > 0).float()
        return gate * torch.relu(sae_in @ (t["W_enc"] * t["r_mag"].exp()) + t["b_mag"])
    pre = sae_in @ t["W_enc"] + t["b_enc"]
    if arch == "standard":
        return torch.relu(pre)
    if arch == "jumprelu":
        return torch.relu(pre) * (pre > t["threshold"]).float()
    if arch == "topk":
        if cfg.get("rescale_acts_by_decoder_norm"):
            pre = pre * t["W_dec"].norm(dim=-1)
        top = pre.topk(cfg["k"], dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    raise AssertionError(arch)


def saelens_decode(cfg: dict, t: dict, f: torch.Tensor) -> torch.Tensor:
    if cfg["architecture"] == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        f = f / t["W_dec"].norm(dim=-1)
    return f @ t["W_dec"] + t["b_dec"]


def write_saelens(directory, cfg: dict, tensors: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "sae_weights.safetensors"))
    (directory / "cfg.json").write_text(json.dumps(cfg))


def saelens_cfg(arch: str, **extra) -> dict:
    return {"architecture": arch, "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
            "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
            "metadata": {"sae_lens_version": "6.54.12", "model_name": "google/gemma-3-270m",
                         "hook_name": "blocks.9.hook_resid_post", "context_size": 1024,
                         "dataset_path": "monology/pile-uncopyrighted", "prepend_bos": True},
            **extra}


def weights_for(arch: str, x, seed=0, **options) -> dict:
    name = {"standard": "relu", "topk": "topk", "gated": "gated", "jumprelu": "jumprelu"}[arch]
    sae = realistic(sf.create_sae(name, D_IN, D_SAE, **options), x, seed)
    return {k: v.clone() for k, v in sae.state_dict().items()}


# ------------------------------------------------------------------------------------------------ saeforge -> SAELens
ARCHITECTURES = [("relu", {}), ("relu", {"sparsity_penalty": "l1_decoder_norm"}), ("gated", {}),
                 ("gated", {"use_r_mag": False}), ("topk", {"k": 8}), ("jumprelu", {})]
ARCHITECTURES += [(name, {"k": 8}) for name in ("batchtopk", "matryoshka_batchtopk") if name in REGISTRY]


def _made(arch, options, x):
    sae = realistic(sf.create_sae(arch, D_IN, D_SAE, **options), x)
    if options.get("sparsity_penalty") == "l1_decoder_norm":
        with torch.no_grad():
            sae.W_dec.mul_(torch.linspace(0.3, 3.0, D_SAE)[:, None])  # trained without the norm constraint
    sae.eval()
    sae.meta = SAEMetadata(model_name="gemma-3-270m-q4_k_m", site="blocks.9.resid_post", context_size=128,
                           dataset="embedded", activation_scale=0.01, max_input_norm=5000.0)
    return sae


@pytest.mark.parametrize("arch, options", ARCHITECTURES, ids=[f"{a}{o}" for a, o in ARCHITECTURES])
def test_every_architecture_round_trips_and_matches_saelens_maths(tmp_path, x, arch, options):
    sae = _made(arch, options, x)
    with torch.no_grad():
        f, x_hat = sae.encode(x), sae(x)
    # saeforge's own directory: SAELens 6's config (so SAE.load_from_disk takes its 6.x path) + the saeforge block.
    sae.save(tmp_path / "native")
    cfg = json.loads((tmp_path / "native" / "cfg.json").read_text())
    assert cfg["metadata"]["sae_lens_version"].startswith("6.")
    assert cfg["metadata"]["hook_name"] == "blocks.9.hook_resid_post"
    assert cfg["metadata"]["hf_hook_name"] == "model.layers.9.output"
    assert cfg["metadata"]["model_name"] == "google/gemma-3-270m" and cfg["metadata"]["context_size"] == 128
    assert cfg["hook_name"] == "blocks.9.resid_post" and cfg["model_name"] == "gemma-3-270m-q4_k_m"
    native = sf.load_sae(tmp_path / "native")
    assert type(native) is type(sae) and native.options() == sae.options()
    assert all(torch.equal(a, b) for a, b in zip(native.state_dict().values(), sae.state_dict().values()))
    # The SAELens export: read back by load_sae as the same SAE, with saeforge's facts.
    export_saelens(sae, tmp_path / "saelens")
    cfg = json.loads((tmp_path / "saelens" / "cfg.json").read_text())
    tensors = load_file(str(tmp_path / "saelens" / "sae_weights.safetensors"))
    assert "saeforge" not in cfg and cfg["metadata"]["saeforge"]["architecture"] == arch
    with torch.no_grad():
        assert_same(f, saelens_encode(cfg, tensors, x), x_hat, saelens_decode(cfg, tensors, saelens_encode(
            cfg, tensors, x)), what=f"SAELens's equations on the export of {arch}")
    back = sf.load_sae(tmp_path / "saelens")
    assert back.architecture == arch and back.options() == sae.options()
    assert back.meta.site == "blocks.9.resid_post" and back.meta.model_name == "gemma-3-270m-q4_k_m"
    assert back.meta.activation_scale == 0.01 and back.meta.max_input_norm == 5000.0
    assert back.meta.imported["format"] == "saelens"
    with torch.no_grad():
        assert_same(f, back.encode(x), x_hat, back(x), tol=0, what=f"{arch} back from SAELens")
    if callable(getattr(sae, "to_jumprelu", None)):
        assert cfg["architecture"] == "jumprelu" and cfg["metadata"]["training_architecture"] == arch
    else:
        assert cfg["architecture"] == sae.saelens_architecture
    if cfg["architecture"] == "topk":
        assert cfg["k"] == 8 and cfg["rescale_acts_by_decoder_norm"] is False


def test_hook_names_in_the_forms_saelens_expects(tmp_path):
    cases = [("gemma-3-270m-q4_k_m", "blocks.4.attn_z", "blocks.4.attn.hook_z", "model.layers.4.self_attn.o_proj.input",
              "hook_z"),
             ("google/gemma-2-2b", "blocks.3.mlp_out", "blocks.3.hook_mlp_out",
              "model.layers.3.post_feedforward_layernorm.output", "none"),
             ("gpt2", "blocks.2.mlp_post", "blocks.2.mlp.hook_post", "transformer.h.2.mlp.c_proj.input", "none"),
             ("EleutherAI/pythia-70m", "blocks.1.resid_pre", "blocks.1.hook_resid_pre", "gpt_neox.layers.1.input",
              "none"),
             ("/some/local/model", "model.layers.2.mlp", "model.layers.2.mlp", "model.layers.2.mlp.output", "none")]
    for model, site, tl, hf, reshape in cases:
        sae = sf.ReluSAE(8, 16)
        sae.meta = SAEMetadata(model_name=model, site=site)
        cfg = sae.cfg_dict()
        assert (cfg["metadata"]["hook_name"], cfg["metadata"]["hf_hook_name"], cfg["reshape_activations"]) == (
            tl, hf, reshape), model


def test_what_saelens_cannot_hold_is_refused_and_marked(tmp_path, x):
    neg = realistic(sf.JumpReLUSAE(D_IN, D_SAE), x)
    with torch.no_grad():
        neg.threshold[:5] = -1.0
    cases = [(realistic(sf.GradientTopKSAE(D_IN, D_SAE, k=8), x), "loss gradient"),
             (realistic(sf.GatedSAE(D_IN, D_SAE, tied=False), x), "untied"),
             (neg, "5 of its 160 thresholds are negative")]
    for sae, message in cases:
        with pytest.raises(InteropError, match=message):
            export_saelens(sae, tmp_path / "out")
        assert not (tmp_path / "out" / "cfg.json").exists()
        # saeforge's own directory says the same, and keeps SAELens from loading it as a different SAE.
        cfg = sae.cfg_dict()
        assert cfg["architecture"] == f"saeforge:{sae.architecture}" and message in cfg["metadata"]["saelens_refusal"]
        sae.save(tmp_path / "native")
        assert sf.load_sae(tmp_path / "native").architecture == sae.architecture
    # A JumpReLU whose thresholds are all >= 0 (from_gated clamps them) is SAELens's.
    jr = sf.JumpReLUSAE.from_gated(realistic(sf.GatedSAE(D_IN, D_SAE), x))
    assert jr.cfg_dict()["architecture"] == "jumprelu"


# ------------------------------------------------------------------------------------------------ SAELens -> saeforge
def _check_read(tmp_path, cfg, tensors, x, *, scale=1.0, expect=None, **read):
    write_saelens(tmp_path / "sl", cfg, tensors)
    sae = read_sae(tmp_path / "sl", **read) if read else sf.load_sae(tmp_path / "sl")
    with torch.no_grad():
        f_ref = saelens_encode(cfg, tensors, x * scale)
        x_ref = saelens_decode(cfg, tensors, f_ref) / scale
        assert_same(f_ref, sae.encode(x), x_ref, sae(x), what=cfg["architecture"])
    if expect:
        assert sae.architecture == expect
    assert sae.meta.site == "blocks.9.resid_post" and sae.meta.model_name == "google/gemma-3-270m"
    assert sae.meta.context_size == 1024
    return sae


@pytest.mark.parametrize("arch, expect", [("standard", "relu"), ("gated", "gated"), ("jumprelu", "jumprelu")])
def test_saelens_directories_read_with_the_same_features(tmp_path, x, arch, expect):
    t = weights_for(arch, x)
    if arch != "gated":
        t["W_dec"] = t["W_dec"] * torch.linspace(0.3, 3.0, D_SAE)[:, None]  # SAELens keeps norms free
    if arch == "jumprelu":
        t["threshold"][:10] = -0.5  # SAELens applies a ReLU first: read as 0, the same function
    sae = _check_read(tmp_path, saelens_cfg(arch), t, x, expect=expect)
    assert torch.equal(sae.W_dec, t["W_dec"])  # the decoder keeps its norms: features equal SAELens's


def test_topk_with_rescale_acts_by_decoder_norm_is_folded_exactly(tmp_path, x):
    t = weights_for("topk", x, k=8)
    t["W_dec"] = t["W_dec"] * torch.linspace(0.3, 3.0, D_SAE)[:, None]
    sae = _check_read(tmp_path, saelens_cfg("topk", k=8, rescale_acts_by_decoder_norm=True), t, x, expect="topk")
    assert sae.k == 8
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(D_SAE), atol=1e-6)
    assert any("rescale_acts_by_decoder_norm" in c for c in sae.meta.imported["conversions"])


def test_apply_b_dec_to_input_false_is_folded_into_the_encoder(tmp_path, x):
    for arch in ("standard", "gated", "jumprelu"):
        t = weights_for(arch, x)
        _check_read(tmp_path / arch, saelens_cfg(arch, apply_b_dec_to_input=False), t, x)


def test_expected_average_only_in_needs_its_factor(tmp_path, x):
    s = D_IN ** 0.5 / float(x.norm(dim=1).mean())
    t = weights_for("standard", x * s)
    cfg = saelens_cfg("standard", normalize_activations="expected_average_only_in")
    write_saelens(tmp_path / "sl", cfg, t)
    with pytest.raises(InteropError, match="activation_scaler.json"):
        sf.load_sae(tmp_path / "sl")
    sae = _check_read(tmp_path, cfg, t, x, scale=s, activation_scale=s)
    assert "given" in sae.meta.imported["conversions"][0]
    (tmp_path / "sl" / "activation_scaler.json").write_text(json.dumps({"scaling_factor": s}))
    _check_read(tmp_path, cfg, t, x, scale=s)


def test_covariance_whitening_is_folded_and_per_token_norms_are_refused(tmp_path, x):
    g = torch.Generator().manual_seed(3)
    mean = x.mean(0)
    q, _ = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=g))
    matrix = q * torch.empty(D_IN).uniform_(0.001, 0.01, generator=g)
    inverse = torch.linalg.inv(matrix.double()).float()
    z = (x - mean) @ matrix
    for apply in (True, False):
        t = weights_for("standard", z, seed=4)
        cfg = saelens_cfg("standard", normalize_activations="covariance_whitening", apply_b_dec_to_input=apply)
        d = tmp_path / f"w{apply}"
        write_saelens(d, cfg, t)
        with pytest.raises(InteropError, match="activation_whitening.safetensors"):
            sf.load_sae(d)
        save_file({"mean": mean, "matrix": matrix.contiguous(), "inverse_matrix": inverse.contiguous()},
                  str(d / "activation_whitening.safetensors"))
        sae = sf.load_sae(d)
        with torch.no_grad():
            f_ref = saelens_encode(cfg, t, z)
            x_ref = saelens_decode(cfg, t, f_ref) @ inverse + mean
            assert_same(f_ref, sae.encode(x), x_ref, sae(x), tol=1e-4, what=f"whitening, apply={apply}")
    for norm in ("constant_norm_rescale", "layer_norm"):
        write_saelens(tmp_path / norm, saelens_cfg("standard", normalize_activations=norm), weights_for("standard", x))
        with pytest.raises(InteropError, match="per-token nonlinearity"):
            sf.load_sae(tmp_path / norm)


def test_batchtopk_training_checkpoint_reads_as_saelens_saves_it_for_inference(tmp_path, x):
    t = weights_for("standard", x)
    norms = torch.linspace(0.3, 3.0, D_SAE)
    t["W_dec"] = t["W_dec"] * norms[:, None]
    theta = 40.0
    t["topk_threshold"] = torch.tensor(theta, dtype=torch.float64)
    cfg = saelens_cfg("batchtopk", k=8.0, rescale_acts_by_decoder_norm=True)
    write_saelens(tmp_path / "b", cfg, t)
    sae = sf.load_sae(tmp_path / "b")
    assert sae.architecture == "jumprelu"
    assert sae.meta.imported["training_architecture"] == "batchtopk"
    # SAELens's inference form: norms folded (W_enc * n, b_enc * n, W_dec / n), threshold = topk_threshold.
    folded = {"W_enc": t["W_enc"] * norms, "b_enc": t["b_enc"] * norms, "W_dec": t["W_dec"] / norms[:, None],
              "b_dec": t["b_dec"], "threshold": torch.full((D_SAE,), theta)}
    jr = saelens_cfg("jumprelu")
    with torch.no_grad():
        f_ref = saelens_encode(jr, folded, x)
        assert_same(f_ref, sae.encode(x), saelens_decode(jr, folded, f_ref), sae(x))


def test_legacy_configs_and_checkpoints(tmp_path, x):
    # Pre-6 SAELens: hook_point, activation_fn_str topk with its k, a boolean normalize_activations, no metadata.
    t = weights_for("topk", x, k=8)
    legacy = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "hook_point": "blocks.9.hook_resid_post",
              "model_name": "google/gemma-3-270m", "context_size": 1024, "activation_fn_str": "topk",
              "activation_fn_kwargs": {"k": 8}, "normalize_activations": False, "apply_b_dec_to_input": True}
    write_saelens(tmp_path / "legacy", legacy, t)
    sae = sf.load_sae(tmp_path / "legacy")
    assert sae.architecture == "topk" and sae.k == 8 and sae.meta.site == "blocks.9.resid_post"
    with torch.no_grad():
        f_ref = saelens_encode({"architecture": "topk", "k": 8}, t, x)
        assert_same(f_ref, sae.encode(x), saelens_decode({"architecture": "topk"}, t, f_ref), sae(x))
    # An older JumpReLU checkpoint with log_threshold, and a legacy finetuning scaling factor.
    t = weights_for("jumprelu", x)
    t["threshold"] = t["threshold"].clamp_min(1e-3)
    logged = {**{k: v for k, v in t.items() if k != "threshold"}, "log_threshold": t["threshold"].log()}
    write_saelens(tmp_path / "log", saelens_cfg("jumprelu"), logged)
    sae = sf.load_sae(tmp_path / "log")
    with torch.no_grad():
        f_ref = saelens_encode(saelens_cfg("jumprelu"), t, x)
        assert_same(f_ref, sae.encode(x), saelens_decode(saelens_cfg("jumprelu"), t, f_ref), sae(x))
    t = weights_for("standard", x)
    sf_ = torch.linspace(0.5, 2.0, D_SAE)
    write_saelens(tmp_path / "sf", saelens_cfg("standard", finetuning_scaling_factor=True),
                  {**t, "scaling_factor": sf_})
    sae = sf.load_sae(tmp_path / "sf")
    with torch.no_grad():
        f_ref = saelens_encode(saelens_cfg("standard"), t, x)
        assert_same(f_ref, sae.encode(x), (f_ref * sf_) @ t["W_dec"] + t["b_dec"], sae(x))


@pytest.mark.parametrize("cfg_edit, tensors_edit, message", [
    (lambda c: {**c, "architecture": "abstopk"}, None, "has no counterpart"),
    (lambda c: {**c, "architecture": "jumprelu_transcoder"}, None, "a transcoder"),
    (lambda c: {**c, "metadata": {**c["metadata"], "hook_head_index": 3}}, None, "one attention head"),
    (None, lambda t: {**t, "W_extra": torch.zeros(3)}, "unexpected tensor"),
    (None, lambda t: {**t, "W_enc": t["W_enc"][:, :-1].contiguous()}, "has shape"),
    (None, lambda t: {k: v for k, v in t.items() if k != "b_enc"}, "missing tensor"),
    (lambda c: {**c, "normalize_activations": "whatever"}, None, "unknown normalize_activations"),
    (lambda c: {**c, "dtype": "int8"}, None, "unknown dtype"),
])
def test_saelens_directories_saeforge_refuses_say_why(tmp_path, x, cfg_edit, tensors_edit, message):
    cfg, t = saelens_cfg("standard"), weights_for("standard", x)
    write_saelens(tmp_path / "bad", cfg_edit(cfg) if cfg_edit else cfg, tensors_edit(t) if tensors_edit else t)
    with pytest.raises(InteropError, match=message):
        sf.load_sae(tmp_path / "bad")


def test_fold_decoder_norm_makes_unit_rows_and_refuses_an_unfair_topk(tmp_path, x):
    t = weights_for("standard", x)
    norms = torch.linspace(0.3, 3.0, D_SAE)
    t["W_dec"] = t["W_dec"] * norms[:, None]
    write_saelens(tmp_path / "s", saelens_cfg("standard"), t)
    sae = read_sae(tmp_path / "s", fold_decoder_norm=True)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(D_SAE), atol=1e-6)
    with torch.no_grad():
        f_ref = saelens_encode(saelens_cfg("standard"), t, x)
        assert_same(f_ref * norms, sae.encode(x), saelens_decode(saelens_cfg("standard"), t, f_ref), sae(x))
    t = weights_for("topk", x, k=8)
    t["W_dec"] = t["W_dec"] * norms[:, None]
    write_saelens(tmp_path / "t", saelens_cfg("topk", k=8), t)
    with pytest.raises(InteropError, match="change which latents are selected"):
        read_sae(tmp_path / "t", fold_decoder_norm=True)
