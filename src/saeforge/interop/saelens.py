"""SAELens, both ways: cfg.json + sae_weights.safetensors (SAELens 6.x layout; older configs are read too).

Writing. saeforge's tensors already carry SAELens's names and shapes, so the weights are a copy; the config is
SAELens 6's: the architecture's fields (`k` and `rescale_acts_by_decoder_norm` for TopK), `sae_lens_version` in
`metadata` (6.x: without it SAELens takes its pre-6 path), and the metadata block with the model name
(TransformerLens's: saeforge's embedded model is written as google/gemma-3-270m, the model it was quantised from),
the TransformerLens hook name (`blocks.9.hook_resid_post`; `reshape_activations = "hook_z"` for attn_z), the
Hugging Face module name (`hf_hook_name`), context size, prepend_bos and dataset. `sae_lens_version` is "6.0.0",
the config layout's version: saeforge never imports sae_lens.

    saeforge              SAELens                  notes
    relu                  standard                 either sparsity penalty (inference is the same)
    gated (tied)          gated                    SAELens computes x @ (W_enc * exp(r_mag)), saeforge
                                                   (x @ W_enc) * exp(r_mag): equal up to float rounding
    topk                  topk                     rescale_acts_by_decoder_norm = False
    jumprelu              jumprelu                 thresholds must be >= 0 (SAELens applies a ReLU first)
    an SAE with           jumprelu                 BatchTopK / Matryoshka: the exported SAE is its JumpReLU
      to_jumprelu()                                (metadata.training_architecture names the original)
    gated (untied)        refused                  W_mag is not tied to W_gate; SAELens's gated SAE has no W_mag
    gradient_topk         refused                  its selection reads the LM's gradient; SAELens's TopK cannot
    jumprelu, some        refused                  SAELens's JumpReLU is ReLU(pre) * 1[pre > t]: a negative
      threshold < 0                                threshold would change features

saeforge's own save (`SAE.save`) writes the same config plus a top-level `saeforge` block; an SAE SAELens has no
counterpart for is saved with architecture "saeforge:<name>", which SAELens refuses to load (KeyError) instead of
loading a different SAE. `export_saelens` writes the pure SAELens directory and keeps saeforge's facts (architecture,
options, model and site names, activation scale, outlier threshold) in `metadata.saeforge`, from which reading it
back restores them.

Reading. Architectures standard, gated, topk (with rescale_acts_by_decoder_norm folded in: exact), jumprelu
(thresholds below 0 read as 0: the same function), batchtopk / matryoshka_batchtopk training checkpoints (as SAELens
saves them for inference: a JumpReLU with the uniform threshold topk_threshold). Normalisation:
`apply_b_dec_to_input = False` is folded into the encoder biases; `normalize_activations = "expected_average_only_in"`
needs the factor (activation_scaler.json in the directory, as SAELens's checkpoints have, or `activation_scale=`)
and folds it in; "covariance_whitening" folds activation_whitening.safetensors; "constant_norm_rescale" and
"layer_norm" (a per-token normalisation inside the SAE) are refused. Decoder rows keep their norms (features equal
SAELens's) unless `fold_decoder_norm=True`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from saeforge.config import ConfigError
from saeforge.files import atomic_target, write_atomic
from saeforge.interop import hooks
from saeforge.interop.build import (InteropError, build_sae, check_tensors, dtype_of, float64, fold_decoder_norm,
                                    fold_input_bias, fold_input_scale, fold_whitening, record)
from saeforge.saes.base import REGISTRY, SAE
from saeforge.saes.metadata import SAEMetadata

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SCALER_FILE = "activation_scaler.json"
WHITENING_FILE = "activation_whitening.safetensors"
CONFIG_LAYOUT_VERSION = "6.0.0"

# SAELens's inference architectures saeforge writes, with the tensors each loads (strictly).
SAELENS_TENSORS = {
    "standard": {"W_enc", "b_enc", "W_dec", "b_dec"},
    "topk": {"W_enc", "b_enc", "W_dec", "b_dec"},
    "gated": {"W_enc", "b_gate", "b_mag", "r_mag", "W_dec", "b_dec"},
    "jumprelu": {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"},
}
READ_ARCHITECTURES = ("standard", "gated", "topk", "jumprelu", "batchtopk", "matryoshka_batchtopk")


# ------------------------------------------------------------------------------------------------ writing
def _silent_difference(sae: SAE) -> str | None:
    """Why SAELens would load this SAE's saeforge directory without an error but with other features: the
    architecture's own declaration, or a JumpReLU with negative thresholds."""
    declared = sae.saelens_refusal()
    if declared:
        return declared
    if sae.saelens_architecture == "jumprelu" and isinstance(getattr(sae, "threshold", None), torch.Tensor):
        negative = int((sae.threshold.detach() < 0).sum())
        if negative:
            return (f"{negative} of its {sae.d_sae} thresholds are negative: saeforge's JumpReLU passes "
                    "pre-activations between such a threshold and 0 (as negative features), SAELens's computes "
                    "ReLU(pre) * 1[pre > threshold] and drops them, so the features would differ")
    return None


def saelens_refusal(sae: SAE) -> str | None:
    """Why SAELens cannot hold this SAE (None: it can, with identical features)."""
    silent = _silent_difference(sae)
    if silent:
        return silent
    arch = sae.saelens_architecture
    if arch not in SAELENS_TENSORS:
        return f"its SAELens architecture {arch!r} is not one saeforge writes ({sorted(SAELENS_TENSORS)})"
    keys = set(sae.state_dict())
    if keys != SAELENS_TENSORS[arch]:
        return (f"its tensors {sorted(keys)} are not those of SAELens's {arch} SAE ({sorted(SAELENS_TENSORS[arch])}), "
                "so SAELens would refuse or misread them")
    return None


def saelens_metadata(sae: SAE) -> dict[str, Any]:
    """SAELens 6's metadata block for an SAE, from sae.meta (saeforge's model name and site)."""
    import saeforge

    model, site = sae.meta.model_name, sae.meta.site
    tl = hooks.tl_hook_name(site)
    meta = {
        "sae_lens_version": CONFIG_LAYOUT_VERSION,
        "model_name": hooks.saelens_model_name(model),
        "hook_name": tl if tl is not None else site,
        "hf_hook_name": hooks.hf_hook_name(site, model),
        "hook_head_index": None,
        "context_size": sae.meta.context_size,
        "prepend_bos": True,
        "dataset_path": sae.meta.dataset,
        "written_by": f"saeforge {saeforge.__version__}",
    }
    if model in hooks.EMBEDDED_NAMES:
        meta["model_note"] = ("trained on saeforge's embedded model: the Q4_K_M GGUF of google/gemma-3-270m, "
                              "dequantised to float (activations are close to, not equal to, the original's)")
    return meta


def saelens_config(sae: SAE) -> dict[str, Any]:
    """SAELens 6's cfg.json for an SAE. When SAELens would load it without an error but compute other features, the
    architecture is written as "saeforge:<name>" (SAELens then refuses to load it); metadata.saelens_refusal says
    why whenever SAELens cannot hold it."""
    refusal = saelens_refusal(sae)
    silent = _silent_difference(sae)
    parts = hooks.split_site(sae.meta.site)
    cfg: dict[str, Any] = {
        "architecture": sae.saelens_architecture if silent is None else f"saeforge:{sae.architecture}",
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": str(sae.W_dec.dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "hook_z" if parts is not None and parts[1] == "attn_z" else "none",
        **sae.saelens_fields(),
    }
    if cfg["architecture"] == "topk":
        cfg.setdefault("rescale_acts_by_decoder_norm", False)
    cfg["metadata"] = saelens_metadata(sae)
    if refusal is not None:
        cfg["metadata"]["saelens_refusal"] = refusal
    return cfg


def export_saelens(sae: SAE, directory: str | os.PathLike) -> Path:
    """Write `sae` as a SAELens directory (cfg.json + sae_weights.safetensors, atomically); InteropError when SAELens
    has no SAE with the same features (the message says why)."""
    source = sae
    if callable(getattr(sae, "to_jumprelu", None)) and sae.architecture != "jumprelu":
        sae = sae.to_jumprelu()  # BatchTopK and relatives: their inference form is a JumpReLU
    refusal = saelens_refusal(sae)
    if refusal is not None:
        raise InteropError(f"cannot write this {source.variant()} SAE in SAELens's format: {refusal}")
    cfg = saelens_config(sae)
    if sae is not source:
        cfg["metadata"]["training_architecture"] = source.architecture
    top, own = source.meta.to_cfg_json()
    # saeforge's own facts ride along in SAELens's metadata, so reading the directory back restores them.
    cfg["metadata"]["saeforge"] = {"architecture": source.architecture, "options": source.options(),
                                   "model_name": source.meta.model_name, "site": source.meta.site,
                                   "cfg": top, "saeforge": own}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in sae.state_dict().items()}
    with atomic_target(directory / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp))
    write_atomic(directory / CFG_FILE, json.dumps(_jsonable(cfg), indent=2))
    return directory


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


# ------------------------------------------------------------------------------------------------ reading
def _legacy(cfg: dict) -> dict:
    """A pre-6 SAELens config in 6.x form: renamed keys, a TopK told by its activation function, the metadata block
    from top-level keys. A 6.x config is returned as it is."""
    version = cfg.get("sae_lens_version") or (cfg.get("metadata") or {}).get("sae_lens_version")
    if version and str(version).split(".")[0].isdigit() and int(str(version).split(".")[0]) >= 6:
        return cfg
    renames = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index",
               "activation_fn_str": "activation_fn"}
    new = {renames.get(k, k): v for k, v in cfg.items()}
    act = new.get("activation_fn", "relu")
    new.setdefault("architecture", "standard")
    if act == "topk":
        k = (new.get("activation_fn_kwargs") or {}).get("k")
        if k is None:
            raise InteropError("a pre-6 SAELens config with activation_fn 'topk' but no activation_fn_kwargs.k")
        new["architecture"], new["k"] = "topk", k
    elif act not in (None, "relu") and new["architecture"] == "standard":
        raise InteropError(f"a pre-6 SAELens standard SAE with activation_fn {act!r}: saeforge reads 'relu' and "
                           "'topk' only")
    if isinstance(new.get("normalize_activations"), bool) or new.get("normalize_activations") is None:
        new["normalize_activations"] = "expected_average_only_in" if new.get("normalize_activations") else "none"
    keys = ("model_name", "hook_name", "hook_head_index", "context_size", "dataset_path", "prepend_bos",
            "hf_hook_name")
    meta = dict(new.get("metadata") or {})
    meta.update({k: new[k] for k in keys if k in new and k not in meta})
    new["metadata"] = meta
    return new


def read_saelens(directory: str | os.PathLike, cfg: dict | None = None, *, activation_scale: float | None = None,
                 fold_decoder_norms: bool = False, **_) -> SAE:
    """A SAELens directory as a saeforge SAE with the same features and reconstructions (see the module's notes)."""
    directory = Path(directory)
    cfg_path, weights_path = directory / CFG_FILE, directory / WEIGHTS_FILE
    if cfg is None:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg = _legacy(cfg)
    arch = cfg.get("architecture", "standard")
    if arch not in READ_ARCHITECTURES:
        what = ("a transcoder (it maps one site to another; saeforge's SAEs reconstruct their input)"
                if "transcoder" in str(arch) else "an architecture saeforge has no counterpart for")
        raise InteropError(f"{cfg_path}: SAELens architecture {arch!r} is {what}; saeforge reads "
                           f"{list(READ_ARCHITECTURES)}")
    meta = cfg.get("metadata") or {}
    if meta.get("hook_head_index") is not None:
        raise InteropError(f"{cfg_path}: an SAE on one attention head (hook_head_index = {meta['hook_head_index']}); "
                           "saeforge's sites have no single-head site")
    for key in ("d_in", "d_sae"):
        if isinstance(cfg.get(key), bool) or not isinstance(cfg.get(key), int) or cfg[key] < 1:
            raise InteropError(f"{cfg_path}: {key} must be a positive integer, got {cfg.get(key)!r}")
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    dtype = dtype_of(cfg.get("dtype"), str(cfg_path))
    if not weights_path.is_file():
        raise InteropError(f"{directory}: a SAELens config without {WEIGHTS_FILE}")
    try:
        raw = load_file(str(weights_path))
    except (SafetensorError, OSError) as e:
        raise InteropError(f"{weights_path}: not a readable safetensors file (truncated or corrupt?): {e}") from e
    conversions: list[str] = []
    if "log_threshold" in raw and "threshold" not in raw:
        raw["threshold"] = torch.exp(raw.pop("log_threshold").double())
        conversions.append("threshold = exp(log_threshold) (an older SAELens JumpReLU checkpoint)")
    gated = arch == "gated"
    names = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    names.update({"b_gate": (d_sae,), "b_mag": (d_sae,), "r_mag": (d_sae,)} if gated else {"b_enc": (d_sae,)})
    if arch == "jumprelu":
        names["threshold"] = (d_sae,)
    if arch in ("batchtopk", "matryoshka_batchtopk"):
        names["topk_threshold"] = ()
    check_tensors(raw, names, str(weights_path))
    known = set(names) | {"scaling_factor", "finetuning_scaling_factor"}
    if set(raw) - known:
        raise InteropError(f"{weights_path}: unexpected tensor(s) {sorted(set(raw) - known)} for a SAELens {arch} "
                           f"SAE (expected {sorted(names)})")
    p = {k: float64(raw[k]) for k in names}

    # 1. TopK's selection on pre-activations times decoder norms: fold the norms in (SAELens does the same when it
    #    saves a TopK for inference); afterwards the plain selection is the same one.
    if arch in ("topk", "batchtopk", "matryoshka_batchtopk") and cfg.get("rescale_acts_by_decoder_norm"):
        fold_decoder_norm(p, "topk")
        conversions.append("rescale_acts_by_decoder_norm folded in (decoder rows made unit norm, the norms moved "
                           "into W_enc and b_enc; selection and features unchanged)")
    # 2. A legacy per-latent scale applied to features before the decoder.
    for name in ("scaling_factor", "finetuning_scaling_factor"):
        if name in raw:
            sf = float64(raw[name]).reshape(-1)
            if sf.shape != (d_sae,) and sf.numel() != 1:
                raise InteropError(f"{weights_path}: {name} has shape {tuple(raw[name].shape)}, expected ({d_sae},)")
            if not torch.allclose(sf, torch.ones_like(sf)):
                p["W_dec"] = p["W_dec"] * sf.reshape(-1, 1)
                conversions.append(f"{name} folded into W_dec's rows")
    # 3. Normalisation before the SAE.
    b_dec_at_input = cfg.get("apply_b_dec_to_input", True) is not False
    norm = cfg.get("normalize_activations") or "none"
    if norm == "expected_average_only_in":
        scale, source = _scaling_factor(directory, activation_scale)
        if scale is None:
            raise InteropError(
                f"{cfg_path}: normalize_activations = 'expected_average_only_in': the weights act on activations "
                "scaled by sqrt(d_in) / E||x||, a factor SAELens keeps beside a checkpoint (activation_scaler.json, "
                "not found here) or in its pretrained-SAE list, never in cfg.json; pass it (activation_scale=, or "
                "--activation-scale to saeforge convert) to fold it in")
        fold_input_scale(p, scale)
        conversions.append(f"activation scaling factor {scale:.6g} ({source}) folded in: the SAE reads raw "
                           "activations")
    elif norm == "covariance_whitening":
        whitening = directory / WHITENING_FILE
        if not whitening.is_file():
            raise InteropError(f"{cfg_path}: normalize_activations = 'covariance_whitening' needs {WHITENING_FILE} "
                               "(mean, matrix, inverse_matrix) beside it to fold the whitening in; not found")
        w = load_file(str(whitening))
        check_tensors(w, {"mean": (d_in,), "matrix": (d_in, d_in), "inverse_matrix": (d_in, d_in)}, str(whitening))
        fold_whitening(p, float64(w["mean"]), float64(w["matrix"]), float64(w["inverse_matrix"]), b_dec_at_input,
                       gated)
        conversions.append(f"covariance whitening ({WHITENING_FILE}) folded in")
    elif norm in ("constant_norm_rescale", "layer_norm"):
        raise InteropError(f"{cfg_path}: normalize_activations = {norm!r} normalises each token inside the SAE and "
                           "undoes it on the way out, a per-token nonlinearity saeforge's SAEs do not have (no "
                           "saeforge SAE gives the same features)")
    elif norm != "none":
        raise InteropError(f"{cfg_path}: unknown normalize_activations {norm!r}")
    # 4. b_dec not subtracted at the input.
    if not b_dec_at_input:
        fold_input_bias(p, gated=gated)
        conversions.append("apply_b_dec_to_input = False: b_dec @ W_enc folded into the encoder bias")

    options: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    if arch == "standard":
        target = "relu"
    elif arch == "gated":
        target = "gated"
    elif arch == "topk":
        target, k = "topk", cfg.get("k")
        if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= d_sae:
            raise InteropError(f"{cfg_path}: a TopK SAE needs an integer k in 1..{d_sae}, got {k!r}")
        options["k"] = k
    else:  # jumprelu, or a BatchTopK training checkpoint in its inference form
        target = "jumprelu"
        if arch != "jumprelu":
            t = float(p.pop("topk_threshold"))
            p["threshold"] = torch.full((d_sae,), t, dtype=torch.float64)
            conversions.append(f"{arch} (a training checkpoint) read as SAELens saves it for inference: a JumpReLU "
                               f"with the uniform threshold topk_threshold = {t:.6g}")
            extra["training_architecture"] = arch
        elif meta.get("training_architecture"):
            extra["training_architecture"] = meta["training_architecture"]
        negative = int((p["threshold"] < 0).sum())
        if negative:
            p["threshold"] = p["threshold"].clamp(min=0)
            conversions.append(f"{negative} negative threshold(s) read as 0 (SAELens applies a ReLU before the "
                               "threshold, so this is the same function)")
    if fold_decoder_norms:
        norms = p["W_dec"].norm(dim=1)
        if target == "topk" and norms.max() - norms.min() > 1e-6 * norms.max():
            raise InteropError(f"{cfg_path}: fold_decoder_norm on a TopK SAE with unequal decoder norms would "
                               "change which latents are selected")
        fold_decoder_norm(p, target)
        conversions.append("decoder norms folded into the encoder (unit-norm rows; features scale by the norms)")

    # A directory saeforge exported: its architecture and options (when the tensors are that architecture's) and
    # its facts come back.
    mine = meta.get("saeforge") if isinstance(meta.get("saeforge"), dict) else {}
    if mine.get("architecture") == target and isinstance(mine.get("options"), dict):
        options = dict(mine["options"])
    sae = None
    if target == "jumprelu" and mine.get("architecture") in REGISTRY and mine["architecture"] != "jumprelu":
        sae = _restore_from_jumprelu(REGISTRY[mine["architecture"]], mine.get("options"), p, dtype)
    if sae is None:
        sae = build_sae(target, p, dtype, options, str(weights_path))
    model = mine.get("model_name") or meta.get("model_name")
    source_hook = meta.get("hook_name")
    site = mine.get("site") or hooks.site_from_tl(source_hook) or hooks.site_from_hf(meta.get("hf_hook_name"), model)
    if cfg.get("reshape_activations") == "hook_z":
        conversions.append("reshape_activations = 'hook_z': saeforge's attn_z site is the same heads-concatenated "
                           "vector")
    facts = mine.get("cfg") if isinstance(mine.get("cfg"), dict) else {}
    record(sae, fmt="saelens", path=directory, source_architecture=arch, model_name=model, site=site,
           source_hook=source_hook, context_size=meta.get("context_size"), dataset=meta.get("dataset_path"),
           conversions=conversions, extra=extra, scale_known="activation_scale" in facts)
    if mine:
        own = mine.get("saeforge") if isinstance(mine.get("saeforge"), dict) else {}
        try:
            restored = SAEMetadata.from_cfg_json(facts, {k: v for k, v in own.items() if k != "imported"},
                                                 f"{cfg_path}: metadata.saeforge")
        except ConfigError as e:
            raise InteropError(str(e)) from e
        # The writer's facts (training, scale, outlier threshold) come back; what this import recorded stays.
        restored.imported = sae.meta.imported
        restored.model_name, restored.site = sae.meta.model_name, sae.meta.site
        sae.meta = restored
    return sae


def _restore_from_jumprelu(cls, options, p: dict, dtype: torch.dtype) -> SAE | None:
    """The saeforge SAE (BatchTopK and relatives) that `export_saelens` wrote as its JumpReLU, when its to_jumprelu()
    gives back exactly these weights; None otherwise (the JumpReLU is then read as a JumpReLU)."""
    threshold = p["threshold"]
    if not callable(getattr(cls, "to_jumprelu", None)) or not isinstance(options, dict):
        return None
    if not bool((threshold == threshold[0]).all()):
        return None
    try:
        sae = cls(d_in=int(p["W_enc"].shape[0]), d_sae=int(p["W_enc"].shape[1]), dtype=dtype, **options)
        state = sae.state_dict()
        if set(state) != set(p) or tuple(state["threshold"].shape) != ():
            return None
        sae.load_state_dict({k: (v[0] if k == "threshold" else v).to(dtype) for k, v in p.items()})
        jr = sae.to_jumprelu()
    except (TypeError, ValueError, RuntimeError):
        return None
    same = all(torch.equal(jr.state_dict()[k], v.to(dtype)) for k, v in p.items())
    return sae if same else None


def _scaling_factor(directory: Path, given: float | None) -> tuple[float | None, str]:
    if given is not None:
        if not (isinstance(given, (int, float)) and math.isfinite(given) and given > 0):
            raise InteropError(f"activation_scale must be a finite positive number, got {given!r}")
        return float(given), "given"
    path = directory / SCALER_FILE
    if path.is_file():
        try:
            value = json.loads(path.read_text(encoding="utf-8")).get("scaling_factor")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise InteropError(f"{path}: not a SAELens activation scaler: {e}") from e
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
            return float(value), SCALER_FILE
    return None, ""
