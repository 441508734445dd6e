"""`saeforge convert`, load_sae's dispatch over formats, and `saeforge eval` on foreign directories."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import saeforge as sf
from saeforge.cli import main
from saeforge.interop import FORMATS, InteropError, as_jumprelu, detect_format, read_sae
from saeforge.saes import SAEMetadata

from interop_helpers import D_IN, D_SAE, assert_same, realistic


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_convert_between_saeforge_saelens_and_jumprelu(tmp_path, capsys, x):
    gated = realistic(sf.GatedSAE(D_IN, D_SAE), x)
    gated.meta = SAEMetadata(model_name="gemma-3-270m-q4_k_m", site="blocks.9.resid_post", context_size=128)
    gated.save(tmp_path / "gated")
    code, out, err = run_cli(capsys, "convert", str(tmp_path / "gated"), str(tmp_path / "sl"), "--to", "saelens")
    assert code == 0, err
    assert "wrote:" in out and json.loads((tmp_path / "sl" / "cfg.json").read_text())["architecture"] == "gated"
    code, out, err = run_cli(capsys, "convert", str(tmp_path / "sl"), str(tmp_path / "back"))
    assert code == 0, err
    back = sf.load_sae(tmp_path / "back")
    assert back.architecture == "gated" and back.meta.imported["format"] == "saelens"
    code, out, err = run_cli(capsys, "convert", str(tmp_path / "sl"), str(tmp_path / "jr"), "--to", "jumprelu")
    assert code == 0, err
    jr = sf.load_sae(tmp_path / "jr")
    assert jr.architecture == "jumprelu" and jr.meta.site == "blocks.9.resid_post"
    with torch.no_grad():
        assert_same(gated.encode(x), jr.encode(x), gated(x), jr(x), tol=1e-4)  # from_gated: exact up to rounding
        assert_same(gated.encode(x), back.encode(x), gated(x), back(x), tol=0)
    # A non-empty output needs --overwrite; the input is never the output.
    code, _, err = run_cli(capsys, "convert", str(tmp_path / "sl"), str(tmp_path / "jr"))
    assert code == 2 and "--overwrite" in err
    code, _, err = run_cli(capsys, "convert", str(tmp_path / "sl"), str(tmp_path / "sl"))
    assert code == 2 and "input directory" in err


def test_convert_refusals_are_one_line_errors(tmp_path, capsys, x):
    realistic(sf.GradientTopKSAE(D_IN, D_SAE, k=8), x).save(tmp_path / "g")
    code, _, err = run_cli(capsys, "convert", str(tmp_path / "g"), str(tmp_path / "out"), "--to", "saelens")
    assert code == 2 and "loss gradient" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "convert", str(tmp_path / "g"), str(tmp_path / "out2"), "--to", "jumprelu")
    assert code == 2 and "not a threshold" in err
    realistic(sf.GatedSAE(D_IN, D_SAE, tied=False), x).save(tmp_path / "u")
    code, _, err = run_cli(capsys, "convert", str(tmp_path / "u"), str(tmp_path / "out3"), "--to", "jumprelu")
    assert code == 2 and "untied" in err


def test_relu_and_batchtopk_have_exact_jumprelu_forms(x):
    relu = realistic(sf.ReluSAE(D_IN, D_SAE), x)
    jr = as_jumprelu(relu)
    with torch.no_grad():
        assert_same(relu.encode(x), jr.encode(x), relu(x), jr(x), tol=0)
    if "batchtopk" in sf.saes.REGISTRY:
        b = realistic(sf.create_sae("batchtopk", D_IN, D_SAE, k=8), x).eval()
        jr = as_jumprelu(b)
        with torch.no_grad():
            assert_same(b.encode(x), jr.encode(x), b(x), jr(x), tol=0)


def test_a_directory_in_no_known_format_lists_the_formats_tried(tmp_path, capsys):
    (tmp_path / "cfg.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(InteropError) as e:
        detect_format(tmp_path)
    message = str(e.value)
    for name in FORMATS:
        assert f"  {name} (" in message
    assert "cfg.json has no saeforge block" in message and "no ae.pt" in message
    code, _, err = run_cli(capsys, "convert", str(tmp_path), str(tmp_path / "out"))
    assert code == 2 and "tried:" in err and "params.npz" in err
    with pytest.raises(InteropError, match="no cfg.json: the directory does not exist"):
        sf.load_sae(tmp_path / "nope")
    # A saeforge directory missing its weights still says so.
    sf.ReluSAE(4, 8).save(tmp_path / "sae")
    (tmp_path / "sae" / "sae_weights.safetensors").unlink()
    with pytest.raises(sf.saes.SAELoadError, match="no sae_weights.safetensors"):
        sf.load_sae(tmp_path / "sae")


def test_weights_files_and_format_override(tmp_path, x):
    t = {k: v.clone() for k, v in realistic(sf.TopKSAE(D_IN, D_SAE, k=8), x).state_dict().items()}
    d = tmp_path / "layers.3"
    d.mkdir()
    save_file({"encoder.weight": t["W_enc"].T.contiguous(), "encoder.bias": t["b_enc"], "W_dec": t["W_dec"],
               "b_dec": t["b_dec"]}, str(d / "sae.safetensors"))
    (d / "cfg.json").write_text(json.dumps({"d_in": D_IN, "k": 8, "num_latents": D_SAE}))
    assert read_sae(d / "sae.safetensors").k == 8
    with pytest.raises(InteropError, match="unknown format"):
        read_sae(d, format="onnx")


# ------------------------------------------------------------------------------------------------ eval
def test_eval_reads_foreign_directories(tmp_path, tiny_lm, tiny_model_dir, corpus_txt):
    from saeforge.commands.evaluate import eval_command

    model_dir, corpus, d = tiny_model_dir, corpus_txt, tiny_lm.site_dim("blocks.1.resid_post")
    torch.manual_seed(0)
    relu = sf.ReluSAE(d, 96)
    relu.meta = SAEMetadata(model_name=str(model_dir), site="blocks.1.resid_post", context_size=32)
    sf.interop.export_saelens(relu, tmp_path / "saelens")
    # dictionary_learning's AutoEncoder of the same weights
    ae = tmp_path / "dictionary_learning"
    ae.mkdir()
    torch.save({"bias": relu.b_dec.detach(), "encoder.weight": relu.W_enc.detach().T.contiguous(),
                "encoder.bias": relu.b_enc.detach(), "decoder.weight": relu.W_dec.detach().T.contiguous()},
               ae / "ae.pt")
    (ae / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder", "lm_name": str(model_dir),
                                                            "submodule_name": "resid_post_layer_1"},
                                                "buffer": {"ctx_len": 32}}))
    out = tmp_path / "eval"
    eval_command([tmp_path / "saelens", ae], out=out, tokens=64, source=str(corpus), analyses=False, pca_ranks=(),
                 bootstrap_resamples=0, progress=False)
    rows = json.loads((out / "eval.json").read_text())["results"]
    assert [r["name"] for r in rows] == ["saelens", "dictionary_learning"]
    assert rows[0]["site"] == rows[1]["site"] == "blocks.1.resid_post"
    assert rows[0]["delta_ce"] == pytest.approx(rows[1]["delta_ce"], rel=1e-5, abs=1e-6)
    assert rows[0]["l0"] == pytest.approx(rows[1]["l0"])
