"""saeforge <-> SAELens, checked against the real sae-lens (6.x), on inputs at a language model's activation scale.

Run in the peers' virtual environment (benchmarks/.venv-peers, made by benchmarks/peer_quality.py; it has sae-lens and
a CPU torch, no torchvision), with saeforge from the source tree:

    PYTHONPATH=src benchmarks/.venv-peers/bin/python benchmarks/interop_check.py [--d-in 640 --d-sae 2048
        --tokens 2048 --seed 0] > interop_check.json

Prints one JSON object: versions; `to_saelens` (each saeforge architecture saved by saeforge, and exported by
saeforge.interop.export_saelens, loaded with SAELens's SAE.load_from_disk: largest feature and reconstruction
differences, relative); `refused` (what SAELens cannot hold: saeforge's message, and what SAELens does with the
saeforge directory); `from_saelens` (SAEs built and saved by SAELens itself, save_model / save_inference_model,
read with saeforge.load_sae); `gated_rounding` (where the tied Gated SAE's differences come from); `passed`.
tests/interop/test_saelens_real.py runs the same checks (smaller) wherever sae_lens imports.

Inputs: x = r * u, u a unit vector near a common mean direction (median cosine ~0.9, like a residual stream's large
mean), norms r log-uniform in [50, 6000]. Weights are random but sized for those inputs: unit decoder rows,
b_dec near the data's mean, encoder biases and thresholds set from pre-activation quantiles so that tens of latents
fire per token. Relative differences: features max|f_a - f_b| / max|f_a|; reconstructions max_t ||x_hat_a -
x_hat_b|| / ||x_hat_a||. The criterion is 1e-5.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import torch

# The interop tests' inputs and weights: activations at a language model's scale, SAE weights sized for them.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "interop"))
import interop_helpers  # noqa: E402
from interop_helpers import activations  # noqa: E402

TOLERANCE = 1e-5


# ------------------------------------------------------------------------------------------------ data and weights
def realistic(sae, x: torch.Tensor, seed: int):
    """Weights that make sense for inputs x, about 2% of the latents firing per token (interop_helpers.realistic)."""
    return interop_helpers.realistic(sae, x, seed, fire=0.02)


def compare(fa: torch.Tensor, fb: torch.Tensor, xa: torch.Tensor, xb: torch.Tensor,
            ties: torch.Tensor | None = None) -> dict:
    """Largest relative differences of features and reconstructions. `ties` marks (token, latent) entries whose
    pre-activation lies within float32 rounding of a JumpReLU threshold: there the two sides may round to different
    decisions, so such entries (and their tokens' reconstructions) are counted, not compared."""
    fa, fb, xa, xb = (t.double() for t in (fa, fb, xa, xb))
    differs = (fa != 0) != (fb != 0)
    tied = differs & ties if ties is not None else torch.zeros_like(differs)
    keep_tokens = ~tied.any(-1)
    feat = float(((fa - fb).abs() * ~tied).max() / fa.abs().max().clamp_min(1e-30))
    recon = float(((xa - xb).norm(dim=-1) / xa.norm(dim=-1).clamp_min(1e-30))[keep_tokens].max())
    return {"feature_max_rel": feat, "recon_max_rel": recon, "firing_differs": int(differs.sum()),
            "firing_differs_at_threshold_ties": int(tied.sum()), "l0": float((fa != 0).float().sum(-1).mean()),
            "ok": feat <= TOLERANCE and recon <= TOLERANCE and int((differs & ~tied).sum()) == 0}


def ties_of(sae, x: torch.Tensor, rel: float = 1e-5) -> torch.Tensor:
    """Entries of a saeforge SAE at a decision boundary, within rel (of the largest |pre-activation|): a JumpReLU's
    pre-activation at its threshold, a gate's at 0, a TopK's at the k-th largest value, a ReLU's at 0."""
    if callable(getattr(sae, "to_jumprelu", None)):
        sae = sae.to_jumprelu()
    with torch.no_grad():
        if sae.architecture == "gated":
            pre = (x - sae.b_dec) @ sae.W_enc + sae.b_gate
            edge = torch.zeros_like(pre)
        else:
            pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
            if sae.architecture == "jumprelu":
                edge = sae.threshold.expand_as(pre)
            elif sae.sparsity == "k":
                top = pre.topk(sae.k + 1, dim=-1).values
                edge = ((top[:, -2] + top[:, -1]) / 2)[:, None].expand_as(pre)
            else:
                edge = torch.zeros_like(pre)
        return (pre - edge).abs() <= rel * pre.abs().max()


# ------------------------------------------------------------------------------------------------ the checks
def to_saelens(x: torch.Tensor, d_in: int, d_sae: int, seed: int, tmp: Path) -> list[dict]:
    import saeforge as sf
    from saeforge.interop import export_saelens
    from sae_lens import SAE

    cases = [("relu", "relu", {}), ("relu (l1_decoder_norm, decoder rows not unit norm)", "relu",
                                    {"sparsity_penalty": "l1_decoder_norm"}),
             ("gated (tied)", "gated", {}), ("gated (use_r_mag=False)", "gated", {"use_r_mag": False}),
             ("topk", "topk", {"k": 32}), ("jumprelu", "jumprelu", {}),
             ("jumprelu (JumpReLUSAE.from_gated)", "from_gated", {})]
    from saeforge.saes import REGISTRY
    for name in ("batchtopk", "matryoshka_batchtopk"):
        if name in REGISTRY:
            cases.append((f"{name} (exported as its JumpReLU)", name, {"k": 32}))
    rows = []
    for i, (label, arch, opts) in enumerate(cases):
        if arch == "from_gated":
            sae = sf.JumpReLUSAE.from_gated(realistic(sf.GatedSAE(d_in, d_sae), x, seed + i))
        else:
            sae = realistic(sf.create_sae(arch, d_in=d_in, d_sae=d_sae, **opts), x, seed + i)
            if opts.get("sparsity_penalty") == "l1_decoder_norm":
                with torch.no_grad():
                    sae.W_dec.mul_(torch.empty(d_sae, 1).uniform_(0.2, 3.0))
        sae.eval()
        sae.meta = sf.SAEMetadata(model_name="gemma-3-270m-q4_k_m", site="blocks.9.resid_post", context_size=1024)
        with torch.no_grad():
            f_ours = sae.encode(x)
            x_ours = sae.decode(f_ours)
        row = {"case": label}
        for how in ("saeforge save", "export_saelens"):
            d = tmp / f"to_{i}_{how.replace(' ', '_')}"
            if how == "saeforge save":
                sae.save(d)
            else:
                export_saelens(sae, d)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    theirs = SAE.load_from_disk(str(d))
                with torch.no_grad():
                    f_theirs = theirs.encode(x)
                    x_theirs = theirs.decode(f_theirs)
                row[how] = {"architecture": type(theirs).__name__,
                            **compare(f_ours, f_theirs, x_ours, x_theirs, ties=ties_of(sae, x))}
                row[how]["hook_name"] = theirs.cfg.metadata.hook_name
                row[how]["model_name"] = theirs.cfg.metadata.model_name
            except Exception as e:  # noqa: BLE001 - recorded
                row[how] = {"error": f"{type(e).__name__}: {e}", "ok": False}
        if callable(getattr(sae, "to_jumprelu", None)) and arch != "from_gated":
            # Its saeforge directory holds the training form (one threshold, SAELens's training architecture name):
            # SAELens's inference SAE must refuse it rather than misread it; the export is the JumpReLU.
            row["saeforge save"]["ok"] = "error" in row["saeforge save"]
        row["ok"] = all(row[h]["ok"] for h in ("saeforge save", "export_saelens"))
        rows.append(row)
    # attn_z: SAELens reads [..., n_heads, d_head] and flattens it (reshape_activations = "hook_z")
    heads = 4 if d_in % 4 == 0 else 1
    sae = realistic(sf.ReluSAE(d_in, d_sae), x, seed + 99)
    sae.meta = sf.SAEMetadata(model_name="gpt2", site="blocks.3.attn_z")
    export_saelens(sae, tmp / "attn_z")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = SAE.load_from_disk(str(tmp / "attn_z"))
    with torch.no_grad():
        f_ours, f_theirs = sae.encode(x), theirs.encode(x.view(len(x), heads, d_in // heads))
        x_ours, x_theirs = sae.decode(f_ours), theirs.decode(f_theirs).reshape(len(x), d_in)
    rows.append({"case": "relu at attn_z (hook_z reshaping)", "hook_name": theirs.cfg.metadata.hook_name,
                 "reshape_activations": theirs.cfg.reshape_activations,
                 "export_saelens": compare(f_ours, f_theirs.reshape(len(x), -1), x_ours, x_theirs)})
    rows[-1]["ok"] = rows[-1]["export_saelens"]["ok"] and theirs.cfg.metadata.hook_name == "blocks.3.attn.hook_z"
    return rows


def refused(x: torch.Tensor, d_in: int, d_sae: int, seed: int, tmp: Path) -> list[dict]:
    import saeforge as sf
    from saeforge.interop import InteropError, export_saelens
    from sae_lens import SAE

    neg = realistic(sf.JumpReLUSAE(d_in, d_sae), x, seed)
    with torch.no_grad():
        neg.threshold[: d_sae // 4] = -1.0
    cases = [("gradient_topk", realistic(sf.GradientTopKSAE(d_in, d_sae, k=32), x, seed)),
             ("gated (tied=False)", realistic(sf.GatedSAE(d_in, d_sae, tied=False), x, seed)),
             ("jumprelu with negative thresholds", neg)]
    rows = []
    for i, (label, sae) in enumerate(cases):
        row = {"case": label}
        try:
            export_saelens(sae, tmp / f"refused_{i}")
            row["export"] = "written (NOT refused)"
            row["ok"] = False
        except InteropError as e:
            row["export"] = f"refused: {e}"
            row["ok"] = True
        sae.save(tmp / f"refused_native_{i}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                SAE.load_from_disk(str(tmp / f"refused_native_{i}"))
            row["saelens_on_saeforge_dir"] = "loaded (silently different)"
            row["ok"] = False
        except Exception as e:  # noqa: BLE001 - the point: SAELens must not load it
            row["saelens_on_saeforge_dir"] = f"refused: {type(e).__name__}: {e}"
        rows.append(row)
    return rows


def _saelens_sae(kind: str, d_in: int, d_sae: int, x: torch.Tensor, seed: int, **cfg):
    """A SAELens SAE of `kind` with weights copied from a saeforge SAE made for x (same layout)."""
    import saeforge as sf
    from sae_lens import (GatedSAE, GatedSAEConfig, JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig,
                          TopKSAE, TopKSAEConfig)
    from sae_lens.saes.sae import SAEMetadata

    meta = SAEMetadata(model_name="google/gemma-3-270m", hook_name="blocks.9.hook_resid_post", context_size=1024,
                       dataset_path="monology/pile-uncopyrighted", prepend_bos=True)
    if kind == "standard":
        src = sf.ReluSAE(d_in, d_sae)
        theirs = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=meta, **cfg))
    elif kind == "gated":
        src, theirs = sf.GatedSAE(d_in, d_sae), GatedSAE(GatedSAEConfig(d_in=d_in, d_sae=d_sae, metadata=meta, **cfg))
    elif kind == "topk":
        k = cfg.pop("k", 32)
        src = sf.TopKSAE(d_in, d_sae, k=k)
        theirs = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, metadata=meta, **cfg))
    else:
        src = sf.JumpReLUSAE(d_in, d_sae)
        theirs = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, metadata=meta, **cfg))
    realistic(src, x, seed)
    theirs.load_state_dict({k: v.clone() for k, v in src.state_dict().items()})
    return theirs


def from_saelens(x: torch.Tensor, d_in: int, d_sae: int, seed: int, tmp: Path) -> list[dict]:
    import saeforge as sf
    from saeforge.interop import InteropError
    from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.training.activation_scaler import ActivationScaler

    rows = []

    def check(label: str, theirs, d: Path, x_in: torch.Tensor = x, scale: float = 1.0):
        theirs.save_model(str(d))
        ours = sf.load_sae(d)
        with torch.no_grad():
            # SAELens's SAE reads s * x (normalize_activations expected_average_only_in, not applied at inference);
            # saeforge's reads x, with s folded in.
            f_theirs = theirs.encode(x_in * scale)
            x_theirs = theirs.decode(f_theirs) / scale
            f_ours = ours.encode(x_in)
            x_ours = ours.decode(f_ours)
        imported = ours.meta.imported
        rows.append({"case": label, "saeforge": ours.variant(), "site": ours.meta.site,
                     "model": ours.meta.model_name, "conversions": imported["conversions"],
                     **compare(f_theirs, f_ours, x_theirs, x_ours, ties=ties_of(ours, x_in))})

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check("standard", _saelens_sae("standard", d_in, d_sae, x, seed), tmp / "sl_standard")
        check("gated", _saelens_sae("gated", d_in, d_sae, x, seed + 1), tmp / "sl_gated")
        check("topk", _saelens_sae("topk", d_in, d_sae, x, seed + 2), tmp / "sl_topk")
        t = _saelens_sae("topk", d_in, d_sae, x, seed + 3, rescale_acts_by_decoder_norm=True)
        with torch.no_grad():
            t.W_dec.mul_(torch.empty(d_sae, 1).uniform_(0.3, 3.0))
        check("topk (rescale_acts_by_decoder_norm, decoder norms 0.3..3)", t, tmp / "sl_topk_rescale")
        j = _saelens_sae("jumprelu", d_in, d_sae, x, seed + 4)
        with torch.no_grad():
            j.threshold[: d_sae // 8] = -0.5
        check("jumprelu (some thresholds < 0)", j, tmp / "sl_jumprelu")
        s = _saelens_sae("standard", d_in, d_sae, x, seed + 5, apply_b_dec_to_input=False)
        check("standard, apply_b_dec_to_input = False", s, tmp / "sl_no_bdec")
        # A checkpoint trained with expected_average_only_in: weights act on s * x; the factor beside it.
        s = _saelens_sae("standard", d_in, d_sae, x * (d_in ** 0.5 / float(x.norm(dim=1).mean())), seed + 6,
                         normalize_activations="expected_average_only_in")
        factor = d_in ** 0.5 / float(x.norm(dim=1).mean())
        d = tmp / "sl_scaled"
        d.mkdir()
        ActivationScaler(scaling_factor=factor).save(str(d / "activation_scaler.json"))
        check("standard, expected_average_only_in + activation_scaler.json", s, d, scale=factor)
        # BatchTopK (SAELens's training default rescale_acts_by_decoder_norm = True; decoder norms 0.3..3): saved for
        # inference (SAELens folds the norms: a JumpReLU) and as a training checkpoint (architecture batchtopk, its
        # topk_threshold). Both against SAELens's own inference SAE, loaded from the inference directory.
        from sae_lens import SAE as SLSAE
        b = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=32))
        src = realistic(sf.ReluSAE(d_in, d_sae), x, seed + 7)
        b.load_state_dict({**{k: v.clone() for k, v in src.state_dict().items()},
                           "topk_threshold": torch.tensor(float(src.b_enc.abs().median()), dtype=torch.double)})
        with torch.no_grad():
            b.W_dec.mul_(torch.empty(d_sae, 1).uniform_(0.3, 3.0))
        b.save_inference_model(str(tmp / "sl_btk_inference"))
        b.save_model(str(tmp / "sl_btk_training"))
        inference = SLSAE.load_from_disk(str(tmp / "sl_btk_inference"))
        for label, d in (("batchtopk, save_inference_model (a JumpReLU file)", tmp / "sl_btk_inference"),
                         ("batchtopk, training checkpoint (save_model: architecture batchtopk)",
                          tmp / "sl_btk_training")):
            ours = sf.load_sae(d)
            with torch.no_grad():
                f_theirs, f_ours = inference.encode(x), ours.encode(x)
                rows.append({"case": label + ", against SAELens's inference SAE", "saeforge": ours.variant(),
                             "conversions": ours.meta.imported["conversions"],
                             **compare(f_theirs, f_ours, inference.decode(f_theirs), ours.decode(f_ours),
                                       ties=ties_of(ours, x))})
        # Refused: per-token normalisation inside the SAE.
        for norm in ("constant_norm_rescale", "layer_norm"):
            s = _saelens_sae("standard", d_in, d_sae, x, seed + 8, normalize_activations=norm)
            d = tmp / f"sl_{norm}"
            s.save_model(str(d))
            try:
                sf.load_sae(d)
                rows.append({"case": f"standard, {norm}", "ok": False, "error": "loaded (NOT refused)"})
            except InteropError as e:
                rows.append({"case": f"standard, {norm}", "ok": True, "refused": str(e)})
    return rows


def gated_rounding(x: torch.Tensor, d_in: int, d_sae: int, seed: int, tmp: Path) -> dict:
    """Where a tied Gated SAE's saeforge/SAELens differences come from: each side against a float64 reference,
    and saeforge's float32 product rewritten in SAELens's order of operations."""
    import saeforge as sf
    from sae_lens import SAE

    sae = realistic(sf.GatedSAE(d_in, d_sae), x, seed)
    sae.save(tmp / "gated_rounding")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = SAE.load_from_disk(str(tmp / "gated_rounding"))
    with torch.no_grad():
        f_ours, f_theirs = sae.encode(x), theirs.encode(x)
        p = {k: v.double() for k, v in sae.state_dict().items()}
        xc = x.double() - p["b_dec"]
        gate = xc @ p["W_enc"] + p["b_gate"]
        mag = (xc @ p["W_enc"]) * p["r_mag"].exp() + p["b_mag"]
        ref = (gate > 0) * mag.relu()
        # Entries whose gate pre-activation rounds to the other side of 0 in float32 are no rounding of the value:
        # counted apart.
        same_gate = (gate > 0) == ((x - sae.b_dec) @ sae.W_enc + sae.b_gate > 0)
        # saeforge in SAELens's order, float32: (x - b_dec) @ (W_enc * exp(r_mag)) + b_mag
        xc32 = x - sae.b_dec
        mag_theirs_order = (xc32 @ (sae.W_enc * sae.r_mag.exp()) + sae.b_mag).relu()
        gate32 = xc32 @ sae.W_enc + sae.b_gate
        f_reordered = (gate32 > 0).float() * mag_theirs_order
        # float32 rounding of the product: unit roundoff times sum_i |x_i W_ij| exp(r_j)
        bound = 2 ** -24 * (xc.abs() @ p["W_enc"].abs()) * p["r_mag"].exp() * d_in ** 0.5
    active = ref != 0
    return {
        "max_abs_saeforge_vs_saelens": float((f_ours - f_theirs).abs().max()),
        "max_feature": float(f_theirs.abs().max()),
        "max_abs_saeforge_vs_float64": float(((f_ours.double() - ref).abs() * same_gate).max()),
        "max_abs_saelens_vs_float64": float(((f_theirs.double() - ref).abs() * same_gate).max()),
        "float32_gates_differing_from_float64": int((~same_gate).sum()),
        "max_abs_saeforge_in_saelens_order_vs_saelens": float((f_reordered - f_theirs).abs().max()),
        "gate_decisions_differ": int(((f_ours != 0) != (f_theirs != 0)).sum()),
        "max_diff_over_rounding_scale": float(((f_ours.double() - f_theirs.double()).abs()[active]
                                               / bound[active].clamp_min(1e-30)).max()) if active.any() else 0.0,
        "median_rounding_scale": float(bound[active].median()) if active.any() else 0.0,
    }


def run_checks(d_in: int = 640, d_sae: int = 2048, tokens: int = 2048, seed: int = 0) -> dict:
    import sae_lens

    torch.manual_seed(seed)
    x = activations(d_in, tokens, seed)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        out = {
            "versions": {"sae_lens": sae_lens.__version__, "torch": torch.__version__},
            "settings": {"d_in": d_in, "d_sae": d_sae, "tokens": tokens, "seed": seed, "tolerance": TOLERANCE,
                         "input_norms": [float(x.norm(dim=1).min()), float(x.norm(dim=1).max())]},
            "to_saelens": to_saelens(x, d_in, d_sae, seed, tmp),
            "refused": refused(x, d_in, d_sae, seed, tmp),
            "from_saelens": from_saelens(x, d_in, d_sae, seed, tmp),
            "gated_rounding": gated_rounding(x, d_in, d_sae, seed, tmp),
        }
    out["passed"] = all(r["ok"] for key in ("to_saelens", "refused", "from_saelens") for r in out[key])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-in", type=int, default=640)
    p.add_argument("--d-sae", type=int, default=2048)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    result = run_checks(args.d_in, args.d_sae, args.tokens, args.seed)
    json.dump(result, sys.stdout, indent=2)
    print()
    raise SystemExit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
