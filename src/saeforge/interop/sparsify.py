"""EleutherAI sparsify: one directory per hookpoint holding cfg.json + sae.safetensors, the training run's
config.json one level up.

    sae.safetensors: encoder.weight [n, d], encoder.bias [n], W_dec [n, d], b_dec [d] (W_skip [d, d] with a skip
                     connection)
    cfg.json:        d_in, k, num_latents (or expansion_factor: n = d_in * expansion_factor), activation ("topk" or
                     "groupmax"), normalize_decoder, multi_topk, skip_connection, transcode
    encode:          pre = (x - b_dec) @ encoder.weight^T + encoder.bias; the k largest of ReLU(pre); x_hat = f @ W_dec
                     + b_dec

That is saeforge's TopK SAE with W_enc = encoder.weight^T (multi_topk only changes training). Refused: transcoders
(transcode: the encoder reads another site than the decoder writes, and b_dec is not subtracted), a skip connection
(x @ W_skip^T added to the output), "groupmax" activations, and the old "signed" TopK. The directory name is the
hookpoint, a module path relative to the base model (layers.9 -> blocks.9.resid_post, h.9 for GPT-2); the model,
dataset and context come from the run's config.json when it is there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from saeforge.interop import hooks
from saeforge.interop.build import InteropError, build_sae, check_tensors, float64, record
from saeforge.saes.base import SAE

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
RUN_CONFIG = "config.json"
_PREFIX = {"gpt2": "transformer.", "gpt_neox": "gpt_neox."}


def read_sparsify(directory: str | os.PathLike, cfg: dict | None = None, **_) -> SAE:
    directory = Path(directory)
    cfg_path, path = directory / CFG_FILE, directory / WEIGHTS_FILE
    if cfg is None:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    d_in = cfg.get("d_in")
    if isinstance(d_in, bool) or not isinstance(d_in, int) or d_in < 1:
        raise InteropError(f"{cfg_path}: d_in must be a positive integer, got {d_in!r}")
    n = cfg.get("num_latents") or d_in * (cfg.get("expansion_factor") or 0)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InteropError(f"{cfg_path}: needs num_latents or expansion_factor (got {cfg.get('num_latents')!r}, "
                           f"{cfg.get('expansion_factor')!r})")
    for flag, why in (("transcode", "a transcoder (its encoder reads another site than its decoder writes)"),
                      ("skip_connection", "a skip connection (x @ W_skip^T is added to the output)"),
                      ("signed", "a signed TopK (selects on |pre|)")):
        if cfg.get(flag):
            raise InteropError(f"{cfg_path}: {flag} = true: {why}; saeforge's SAEs have no such part")
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise InteropError(f"{cfg_path}: activation {activation!r}; saeforge reads sparsify's 'topk'")
    k = cfg.get("k")
    if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= n:
        raise InteropError(f"{cfg_path}: k must be an integer in 1..{n}, got {k!r}")
    try:
        raw = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise InteropError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e
    shapes = {"encoder.weight": (n, d_in), "encoder.bias": (n,), "W_dec": (n, d_in), "b_dec": (d_in,)}
    check_tensors(raw, shapes, str(path))
    if set(raw) - set(shapes):
        raise InteropError(f"{path}: unexpected tensors {sorted(set(raw) - set(shapes))} for a sparsify TopK SAE")
    p = {"W_enc": float64(raw["encoder.weight"]).T.contiguous(), "b_enc": float64(raw["encoder.bias"]),
         "W_dec": float64(raw["W_dec"]), "b_dec": float64(raw["b_dec"])}
    dtype = raw["encoder.weight"].dtype
    if dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        dtype = torch.float32
    sae = build_sae("topk", p, dtype, {"k": k}, str(path))

    run: dict = {}
    run_path = directory.parent / RUN_CONFIG
    if run_path.is_file():
        try:
            run = json.loads(run_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            run = {}
        run = run if isinstance(run, dict) else {}
    model = run.get("model") if isinstance(run.get("model"), str) else None
    hookpoint = directory.name
    family = hooks.model_family(model)
    module = _PREFIX.get(family, "model.") + hookpoint
    site = hooks.site_from_hf(f"{module}.output", model)
    conversions = ["encoder.weight transposed into W_enc (nn.Linear stores [out, in])"]
    if cfg.get("multi_topk"):
        conversions.append("multi_topk only changes sparsify's training loss; inference is the plain TopK")
    missing = [] if run else [f"the run's {RUN_CONFIG} (model, dataset, context) beside the hookpoint directories"]
    ctx = run.get("ctx_len")
    return record(sae, fmt="sparsify", path=directory, source_architecture="topk", model_name=model, site=site,
                  source_hook=hookpoint, context_size=ctx if isinstance(ctx, int) else None,
                  dataset=run.get("dataset") if isinstance(run.get("dataset"), str) else None,
                  conversions=conversions, missing=missing)
