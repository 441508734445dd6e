"""What an SAE knows about where it came from, typed: the model and site it reads, how it was trained, what
evaluation needs (the outlier threshold), and where an imported SAE came from. `sae.meta` holds it; cfg.json stores
it in SAELens's layout (model, site, context and dataset at the top level) with saeforge's own facts under
"saeforge". Reading checks every field's type and names the one that is wrong; top-level fields saeforge does not
know are kept as they were (`extra`), so a file edited by hand loses nothing on a round trip, while an unknown field
in saeforge's own block is an error naming it (a typo there would otherwise be silently dropped).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from saeforge.config import ConfigError, from_dict, to_dict


@dataclass
class TrainingRecord:
    """What the trainer did: tokens and steps, the final lambda (None for the k family) and the L0 it reached."""

    tokens: int
    steps: int
    lr: float
    sparsity_coeff: Optional[float] = None
    target_l0: Optional[float] = None  # the L0 target lambda was steered to, when one was given
    l0_ema_at_freeze: Optional[float] = None  # the controller's L0 estimate when lambda was frozen
    l0: Optional[float] = None  # mean L0 of the last logged steps
    train_mse: Optional[float] = None
    heldout_mse: Optional[float] = None
    excluded_tokens: int = 0  # outlier (attention-sink) tokens left out of training
    last_epoch: int = 0  # 0 = the first pass over the cache


@dataclass
class Normalization:
    """How training scaled activations: mode, the scale c (x * c is what the SAE saw) and ||mean|| in raw units."""

    mode: str
    scale: float
    mean_norm: Optional[float] = None


# cfg.json's top-level names of the fields SAELens also reads.
_TOP_LEVEL_NAMES = {"model_name": "model_name", "site": "hook_name", "context_size": "context_size",
                    "dataset": "dataset_path"}
# Fields stored under cfg.json's "saeforge" block (the rest of SAEMetadata is top level).
_OWN_BLOCK = ("max_input_norm", "normalization", "imported", "converted_from")


@dataclass
class SAEMetadata:
    model_name: Optional[str] = None
    site: Optional[str] = None  # saeforge's canonical site name (SAELens's hook_name field)
    context_size: Optional[int] = None
    dataset: Optional[str] = None  # the cache directory or text source trained on
    name: Optional[str] = None  # the SAE's name in its run
    activation_scale: Optional[float] = None  # the training scale c, folded into the weights when saved
    activation_scale_folded: bool = False
    precision: Optional[dict[str, Any]] = None  # {"sae_compute": {dtype, reason}, "lm": {dtype, reason}}
    training: Optional[TrainingRecord] = None
    max_input_norm: Optional[float] = None  # raw-norm threshold of the tokens left out of training (evaluation too)
    normalization: Optional[Normalization] = None
    imported: Optional[dict[str, Any]] = None  # saeforge.interop's record: source format, path, conversions, missing
    converted_from: Optional[str] = None  # the variant this SAE was converted from (e.g. BatchTopK -> JumpReLU)
    extra: dict[str, Any] = field(default_factory=dict)  # cfg.json fields saeforge does not know, kept as they were

    def __post_init__(self):
        if self.max_input_norm is not None and not 0 < self.max_input_norm < math.inf:
            raise ValueError(f"max_input_norm must be a finite positive number, got {self.max_input_norm!r}")

    def where_it_runs(self, model: Optional[str] = None, site: Optional[str] = None,
                      context_len: Optional[int] = None, where: str = "the SAE") -> tuple[str, str, int]:
        """(model, site, context length) to run the SAE at: what is given, else what it was trained at (context
        128 when unrecorded); ConfigError naming `where` when the model or site is known from neither."""
        model, site = model or self.model_name, site or self.site
        if not model or not site:
            raise ConfigError(f"{where} records no model_name/hook_name; pass --model and --site")
        ctx = context_len or self.context_size or 128
        if isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 2:
            raise ConfigError(f"{where}: context_size must be an integer of at least 2, got {ctx!r}; "
                              "pass --context-len")
        return model, site, ctx

    # ------------------------------------------------------------------------------------------ cfg.json
    def to_cfg_json(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(top-level fields, fields of the "saeforge" block) as JSON values; None fields are left out."""
        top, own = dict(self.extra), {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or value is None:
                continue
            if f.name in _OWN_BLOCK:
                own[f.name] = to_dict(value)
            else:
                top[_TOP_LEVEL_NAMES.get(f.name, f.name)] = to_dict(value)
        return top, own

    @classmethod
    def from_cfg_json(cls, top: dict[str, Any], own: dict[str, Any], where: str) -> "SAEMetadata":
        """From cfg.json's top-level fields (SAELens's own ones already removed) and its "saeforge" block (without
        architecture/options/version); a field of the wrong type is a ConfigError naming it."""
        by_file_name = {v: k for k, v in _TOP_LEVEL_NAMES.items()}
        known = {f.name for f in fields(cls)} - {"extra", *_OWN_BLOCK}
        data, extra = {}, {}
        for key, value in top.items():
            name = by_file_name.get(key, key)
            if name in known:
                data[name] = value
            else:
                extra[key] = value
        unknown_own = sorted(set(own) - set(_OWN_BLOCK))
        if unknown_own:
            raise ConfigError(f"{where}: saeforge block: unknown field {unknown_own[0]!r}; valid fields are "
                              f"{sorted(_OWN_BLOCK)}")
        data.update(own)
        # A legacy file wrote `dataset` beside `dataset_path`; the two name the same thing.
        if "dataset" in extra and data.get("dataset") in (None, extra["dataset"]):
            data["dataset"] = extra.pop("dataset")
        meta = from_dict(cls, data, where)
        meta.extra = extra
        return meta

