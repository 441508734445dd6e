"""Gemma Scope 1 and 2, dictionary_learning and sparsify, built from their documented names and shapes on small
random weights at a language model's activation scale; each format's own equations are written out here and
compared with what load_sae reads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import saeforge as sf
from saeforge.interop import InteropError, detect_format

from interop_helpers import D_IN, D_SAE, assert_same, realistic

relu = torch.relu


def jumprelu_weights(x, seed=0) -> dict:
    """A JumpReLU that reads x directly (no b_dec at the input), as Gemma Scope and dictionary_learning store it."""
    t = {k: v.clone() for k, v in realistic(sf.JumpReLUSAE(D_IN, D_SAE), x, seed).state_dict().items()}
    t["b_enc"] = t["b_enc"] - t["b_dec"] @ t["W_enc"]
    return t


def reads_x_directly(t, x):
    pre = x @ t["W_enc"] + t["b_enc"]
    f = relu(pre) * (pre > t["threshold"]).float()
    return f, f @ t["W_dec"] + t["b_dec"]


# ------------------------------------------------------------------------------------------------ Gemma Scope 1
def test_gemma_scope_1_npz_reads_with_its_path_facts(tmp_path, x):
    t = jumprelu_weights(x)
    t["threshold"][:7] = -1.0  # ReLU first: read as 0
    d = tmp_path / "gemma-scope-2b-pt-res" / "layer_12" / "width_16k" / "average_l0_82"
    d.mkdir(parents=True)
    np.savez(d / "params.npz", **{k: v.numpy() for k, v in t.items()})
    assert detect_format(d) == "gemma_scope_1" and detect_format(d / "params.npz") == "gemma_scope_1"
    sae = sf.load_sae(d)
    f, x_hat = reads_x_directly(t, x)
    with torch.no_grad():
        assert_same(f, sae.encode(x), x_hat, sae(x))
    assert sae.architecture == "jumprelu"
    assert (sae.meta.model_name, sae.meta.site, sae.meta.context_size) == (
        "google/gemma-2-2b", "blocks.12.resid_post", 1024)
    imported = sae.meta.imported
    assert imported["width"] == 16384 and imported["average_l0"] == 82
    assert any("b_dec @ W_enc" in c for c in imported["conversions"])
    assert any("7 negative threshold" in c for c in imported["conversions"])


def test_gemma_scope_1_attention_site_unknown_paths_and_refusals(tmp_path, x):
    t = jumprelu_weights(x)
    d = tmp_path / "gemma-scope-9b-it-att" / "layer_20" / "width_131k" / "average_l0_50"
    d.mkdir(parents=True)
    np.savez(d / "params.npz", **{k: v.numpy() for k, v in t.items()})
    sae = sf.load_sae(d)
    assert (sae.meta.model_name, sae.meta.site) == ("google/gemma-2-9b-it", "blocks.20.attn_z")
    plain = tmp_path / "plain"
    plain.mkdir()
    np.savez(plain / "params.npz", **{k: v.numpy() for k, v in t.items()})
    sae = sf.load_sae(plain)
    assert sae.meta.model_name is None and sae.meta.site is None
    assert any(m.startswith("saeforge site") for m in sae.meta.imported["missing"])
    from saeforge.interop import read_sae

    given = read_sae(plain, model="google/gemma-2-2b", site="blocks.3.resid_post")
    assert given.meta.site == "blocks.3.resid_post"
    assert not any(m.startswith("saeforge site") for m in given.meta.imported["missing"])
    transcoder = tmp_path / "gemma-scope-2b-pt-transcoders" / "layer_3" / "width_16k" / "average_l0_76"
    transcoder.mkdir(parents=True)
    np.savez(transcoder / "params.npz", **{k: v.numpy() for k, v in t.items()})
    with pytest.raises(InteropError, match="transcoder"):
        sf.load_sae(transcoder)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    np.savez(pickled / "params.npz", W_enc=np.array([{"a": 1}], dtype=object))
    with pytest.raises(InteropError, match="pickled"):
        sf.load_sae(pickled)


# ------------------------------------------------------------------------------------------------ Gemma Scope 2
GS2_CONFIG = {"width": D_SAE, "model_name": "google/gemma-3-270m-pt", "architecture": "jump_relu", "l0": 60,
              "affine_connection": False, "type": "sae"}


def write_gs2(d, t, config):
    d.mkdir(parents=True, exist_ok=True)
    save_file({k.replace("W_", "w_"): v.contiguous() for k, v in t.items()}, str(d / "params.safetensors"))
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("hook, site", [("model.layers.9.output", "blocks.9.resid_post"),
                                        ("model.layers.4.self_attn.o_proj.input", "blocks.4.attn_z"),
                                        ("model.layers.5.post_feedforward_layernorm.output", "blocks.5.mlp_out")])
def test_gemma_scope_2_maps_hook_points_to_sites_of_gemma_3_270m(tmp_path, x, hook, site):
    t = jumprelu_weights(x)
    write_gs2(tmp_path / "gs2", t, {**GS2_CONFIG, "hf_hook_point_in": hook, "hf_hook_point_out": hook})
    assert detect_format(tmp_path / "gs2") == "gemma_scope_2"
    sae = sf.load_sae(tmp_path / "gs2")
    f, x_hat = reads_x_directly(t, x)
    with torch.no_grad():
        assert_same(f, sae.encode(x), x_hat, sae(x))
    assert (sae.meta.model_name, sae.meta.site) == ("google/gemma-3-270m", site)
    assert sae.meta.imported["l0"] == 60


def test_gemma_scope_2_without_config_and_its_refusals(tmp_path, x):
    t = jumprelu_weights(x)
    d = tmp_path / "gemma-scope-2-270m-pt" / "resid_post" / "layer_5_width_16k_l0_small"
    write_gs2(d, t, None)
    sae = sf.load_sae(d)
    assert (sae.meta.model_name, sae.meta.site) == ("google/gemma-3-270m", "blocks.5.resid_post")
    hook = "model.layers.5.pre_feedforward_layernorm.output"
    out = "model.layers.5.post_feedforward_layernorm.output"
    for config, message in (({**GS2_CONFIG, "hf_hook_point_in": hook, "hf_hook_point_out": out,
                              "type": "transcoder"}, "transcoder"),
                            ({**GS2_CONFIG, "hf_hook_point_in": hook, "affine_connection": True}, "affine skip"),
                            ({**GS2_CONFIG, "architecture": "topk"}, "architecture 'topk'")):
        write_gs2(tmp_path / "bad", t, config)
        with pytest.raises(InteropError, match=message):
            sf.load_sae(tmp_path / "bad")


# ------------------------------------------------------------------------------------------------ dictionary_learning
def _linear(w):  # nn.Linear stores [out, in]
    return w.T.contiguous()


def dl_layout(name, x, seed=0):
    """(state dict, config dict_class, reference encode) for each dictionary_learning class."""
    if name == "GatedAutoEncoder":
        g = realistic(sf.GatedSAE(D_IN, D_SAE), x, seed)
        state = {"decoder_bias": g.b_dec, "encoder.weight": _linear(g.W_enc), "r_mag": g.r_mag,
                 "gate_bias": g.b_gate, "mag_bias": g.b_mag, "decoder.weight": _linear(g.W_dec)}

        def encode(x):
            x_enc = (x - state["decoder_bias"]) @ state["encoder.weight"].T
            gate = (x_enc + state["gate_bias"] > 0).float()
            return gate * relu(state["r_mag"].exp() * x_enc + state["mag_bias"])
        return {k: v.detach().clone() for k, v in state.items()}, encode, lambda f: f @ state["decoder.weight"].T + \
            state["decoder_bias"]
    if name == "JumpReluAutoEncoder":
        t = jumprelu_weights(x, seed)
        t["threshold"][:5] = -2.0
        return t, lambda x: reads_x_directly(t, x)[0], lambda f: f @ t["W_dec"] + t["b_dec"]
    r = realistic(sf.ReluSAE(D_IN, D_SAE), x, seed)
    W_enc, b_enc, W_dec, b_dec = (r.state_dict()[k].clone() for k in ("W_enc", "b_enc", "W_dec", "b_dec"))
    if name == "AutoEncoder":
        state = {"bias": b_dec, "encoder.weight": _linear(W_enc), "encoder.bias": b_enc,
                 "decoder.weight": _linear(W_dec)}
        return state, lambda x: relu((x - b_dec) @ W_enc + b_enc), lambda f: f @ W_dec + b_dec
    if name == "AutoEncoderNew":
        b = b_enc - b_dec @ W_enc  # reads x directly
        state = {"encoder.weight": _linear(W_enc), "encoder.bias": b, "decoder.weight": _linear(W_dec),
                 "decoder.bias": b_dec}
        return state, lambda x: relu(x @ W_enc + b), lambda f: f @ W_dec + b_dec
    post = lambda x: relu((x - b_dec) @ W_enc + b_enc)  # noqa: E731
    theta = float(b_enc.abs().median())
    if name == "AutoEncoderTopK":
        state = {"encoder.weight": _linear(W_enc), "encoder.bias": b_enc, "decoder.weight": _linear(W_dec),
                 "b_dec": b_dec, "k": torch.tensor(8, dtype=torch.int), "threshold": torch.tensor(theta)}

        def encode(x):
            top = post(x).topk(8, dim=-1)
            return torch.zeros(len(x), D_SAE).scatter(-1, top.indices, top.values)
        return state, encode, lambda f: f @ W_dec + b_dec
    if name == "BatchTopKSAE":
        state = {"encoder.weight": _linear(W_enc), "encoder.bias": b_enc, "decoder.weight": _linear(W_dec),
                 "b_dec": b_dec, "k": torch.tensor(8, dtype=torch.int), "threshold": torch.tensor(theta)}
        return state, lambda x: post(x) * (post(x) > theta).float(), lambda f: f @ W_dec + b_dec
    assert name == "MatryoshkaBatchTopKSAE"
    state = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, "k": torch.tensor(8, dtype=torch.int),
             "threshold": torch.tensor(theta), "group_sizes": torch.tensor([32, 32, D_SAE - 64])}
    return state, lambda x: post(x) * (post(x) > theta).float(), lambda f: f @ W_dec + b_dec


DL_EXPECT = {"AutoEncoder": "relu", "AutoEncoderNew": "relu", "GatedAutoEncoder": "gated",
             "JumpReluAutoEncoder": "jumprelu", "AutoEncoderTopK": "topk", "BatchTopKSAE": "jumprelu",
             "MatryoshkaBatchTopKSAE": "jumprelu"}


@pytest.mark.parametrize("name", list(DL_EXPECT))
def test_dictionary_learning_layouts(tmp_path, x, name):
    state, encode, decode = dl_layout(name, x)
    d = tmp_path / "ae"
    d.mkdir()
    torch.save(state, d / "ae.pt")
    (d / "config.json").write_text(json.dumps({
        "trainer": {"dict_class": name, "activation_dim": D_IN, "dict_size": D_SAE, "layer": 6,
                    "lm_name": "EleutherAI/pythia-70m-deduped", "submodule_name": "resid_post_layer_6"},
        "buffer": {"ctx_len": 128}}))
    assert detect_format(d) == "dictionary_learning"
    sae = sf.load_sae(d)
    assert sae.architecture == DL_EXPECT[name]
    with torch.no_grad():
        f = encode(x)
        assert_same(f, sae.encode(x), decode(f), sae(x), what=name)
    assert (sae.meta.model_name, sae.meta.site, sae.meta.context_size) == (
        "EleutherAI/pythia-70m-deduped", "blocks.6.resid_post", 128)


def test_dictionary_learning_refusals_and_assumptions(tmp_path, x):
    state, _, _ = dl_layout("AutoEncoderTopK", x)
    d = tmp_path / "ae"
    d.mkdir()
    torch.save(state, d / "ae.pt")
    with pytest.raises(InteropError, match="trainer.dict_class"):  # TopK and BatchTopK share their tensors
        sf.load_sae(d)
    (d / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoderTopK", "layer": 3,
                                                           "lm_name": "gpt2"}}))
    sae = sf.load_sae(d)
    assert sae.meta.site == "blocks.3.resid_post"
    assert any("assumed" in c for c in sae.meta.imported["conversions"])
    torch.save({"encoder.weight": torch.zeros(3, 2)}, d / "ae.pt")
    with pytest.raises(InteropError, match="no dictionary_learning layout"):
        sf.load_sae(d)
    torch.save({"W_enc": torch.zeros(2, 3), "code": _NotAWeight()}, d / "ae.pt")
    with pytest.raises(InteropError, match="weights_only"):
        sf.load_sae(d)


class _NotAWeight:
    pass


# ------------------------------------------------------------------------------------------------ sparsify
def write_sparsify(d, x, cfg_extra=None, seed=0, k=8):
    r = realistic(sf.TopKSAE(D_IN, D_SAE, k=k), x, seed)
    d.mkdir(parents=True, exist_ok=True)
    W_enc, b_enc, W_dec, b_dec = (r.state_dict()[n].clone() for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    save_file({"encoder.weight": W_enc.T.contiguous(), "encoder.bias": b_enc, "W_dec": W_dec, "b_dec": b_dec},
              str(d / "sae.safetensors"))
    cfg = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": D_SAE, "k": k,
           "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D_IN, **(cfg_extra or {})}
    (d / "cfg.json").write_text(json.dumps(cfg))

    def encode(x):  # sparsify: the k largest of ReLU((x - b_dec) @ encoder.weight^T + encoder.bias)
        top = relu((x - b_dec) @ W_enc + b_enc).topk(k, dim=-1)
        return torch.zeros(len(x), D_SAE).scatter(-1, top.indices, top.values)
    return encode, lambda f: f @ W_dec + b_dec


@pytest.mark.parametrize("model, hookpoint, site", [("EleutherAI/pythia-70m", "layers.4", "blocks.4.resid_post"),
                                                    ("EleutherAI/pythia-70m", "layers.2.mlp", "blocks.2.mlp_out"),
                                                    ("gpt2", "h.3", "blocks.3.resid_post"),
                                                    ("google/gemma-3-270m", "layers.1.mlp", "model.layers.1.mlp")])
def test_sparsify_hookpoints(tmp_path, x, model, hookpoint, site):
    run = tmp_path / "run"
    encode, decode = write_sparsify(run / hookpoint, x)
    (run / "config.json").write_text(json.dumps({"model": model, "dataset": "EleutherAI/SmolLM2-135M-10B",
                                                 "ctx_len": 2048}))
    assert detect_format(run / hookpoint) == "sparsify"
    sae = sf.load_sae(run / hookpoint)
    assert sae.architecture == "topk" and sae.k == 8
    with torch.no_grad():
        f = encode(x)
        assert_same(f, sae.encode(x), decode(f), sae(x))
    assert (sae.meta.model_name, sae.meta.site, sae.meta.context_size) == (model, site, 2048)


def test_sparsify_refusals_and_a_run_directory(tmp_path, x):
    for extra, message in (({"transcode": True}, "transcoder"), ({"skip_connection": True}, "skip connection"),
                           ({"activation": "groupmax"}, "groupmax")):
        write_sparsify(tmp_path / "bad" / "layers.0", x, extra)
        with pytest.raises(InteropError, match=message):
            sf.load_sae(tmp_path / "bad" / "layers.0")
    write_sparsify(tmp_path / "run" / "layers.0", x)
    write_sparsify(tmp_path / "run" / "layers.1", x)
    with pytest.raises(InteropError, match=r"holds SAE directories: layers\.0, layers\.1"):
        sf.load_sae(tmp_path / "run")
