"""sae.meta: the typed record of where an SAE came from, through cfg.json and back."""

import json

import pytest

from saeforge.saes import Normalization, SAELoadError, SAEMetadata, TrainingRecord, create_sae, load_sae


def full_meta() -> SAEMetadata:
    return SAEMetadata(
        model_name="tiny", site="blocks.1.resid_post", context_size=32, dataset="runs/cache", name="relu_a",
        activation_scale=0.25, activation_scale_folded=True,
        precision={"sae_compute": {"dtype": "float32", "reason": "asked"}},
        training=TrainingRecord(tokens=4096, steps=8, lr=1e-3, sparsity_coeff=2.5, target_l0=40.0, l0=41.5,
                                excluded_tokens=3, last_epoch=1),
        max_input_norm=123.0, normalization=Normalization(mode="centered", scale=0.25, mean_norm=7.0))


def test_round_trip_through_cfg_json(tmp_path):
    sae = create_sae("relu", d_in=8, d_sae=16)
    sae.meta = full_meta()
    back = load_sae(sae.save(tmp_path / "sae"))
    assert back.meta == sae.meta
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    # SAELens's names at the top level, saeforge's own facts in its block.
    assert (cfg["model_name"], cfg["hook_name"], cfg["dataset_path"]) == ("tiny", "blocks.1.resid_post", "runs/cache")
    assert cfg["saeforge"]["max_input_norm"] == 123.0 and cfg["saeforge"]["normalization"]["mode"] == "centered"
    assert cfg["training"]["sparsity_coeff"] == 2.5


def test_unknown_top_level_fields_are_kept(tmp_path):
    sae = create_sae("topk", d_in=8, d_sae=16, k=2)
    d = sae.save(tmp_path / "sae")
    cfg = json.loads((d / "cfg.json").read_text())
    cfg["lab_notebook"] = {"run": 7}
    (d / "cfg.json").write_text(json.dumps(cfg))
    back = load_sae(d)
    assert back.meta.extra == {"lab_notebook": {"run": 7}}
    back.save(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "cfg.json").read_text())["lab_notebook"] == {"run": 7}


@pytest.mark.parametrize("where, key, value, named", [
    ("top", "context_size", "long", "context_size"),
    ("top", "training", {"tokens": 10, "steps": 1}, "lr"),  # a required field missing
    ("top", "training", {"tokens": "many", "steps": 1, "lr": 1e-3}, "training.tokens"),
    ("own", "max_input_norm", -1.0, "max_input_norm"),
    ("own", "normalization", {"mode": "centered"}, "scale"),
    ("own", "colour", "blue", "colour"),
])
def test_a_wrong_field_is_named(tmp_path, where, key, value, named):
    d = create_sae("relu", d_in=8, d_sae=16).save(tmp_path / "sae")
    cfg = json.loads((d / "cfg.json").read_text())
    (cfg if where == "top" else cfg["saeforge"])[key] = value
    (d / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAELoadError, match=named):
        load_sae(d)


def test_a_file_from_before_the_typed_record_loads(tmp_path):
    """cfg.json as saeforge wrote it before: `dataset` beside `dataset_path`, training as a plain table."""
    d = create_sae("relu", d_in=8, d_sae=16).save(tmp_path / "sae")
    cfg = json.loads((d / "cfg.json").read_text())
    cfg.update(model_name="tiny", hook_name="blocks.0.resid_post", dataset_path="cache", dataset="cache",
               training={"tokens": 512, "steps": 2, "lr": 0.001, "sparsity_coeff": 1.0, "excluded_tokens": 0,
                         "last_epoch": 0, "l0": 3.0, "train_mse": None, "heldout_mse": None})
    (d / "cfg.json").write_text(json.dumps(cfg))
    meta = load_sae(d).meta
    assert meta.dataset == "cache" and meta.extra == {}
    assert meta.training.sparsity_coeff == 1.0 and meta.site == "blocks.0.resid_post"
