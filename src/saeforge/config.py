"""Typed run configuration, loaded from TOML.

A run file has one table per section ([model], [data], [train], [eval]) and a list of SAEs ([[sae]]). Every
section is a dataclass with defaults; `from_dict` checks names and types field by field, so a typo or a wrong
type is one error naming the file, the section and the field.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration field is unknown, missing or invalid."""


def _check_type(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {args}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        inner = args[0] if args else Any
        out = [_check_type(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__} {value!r}")
        return from_dict(tp, value, where)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{where}: expected a path, got {type(value).__name__} {value!r}")
        return Path(value)
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls: type, data: dict, where: str = "config") -> Any:
    """Build dataclass `cls` from a plain dict, refusing unknown fields and wrong types by name."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r}; valid fields are {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _check_type(data[name], hints[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing required field {name!r}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: {e}") from e


def to_dict(obj: Any) -> Any:
    """A dataclass as plain TOML/JSON-friendly values (paths as strings)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


# ----------------------------------------------------------------------------------------------------------------
# Sections. Each package owns the fields of its own section.


@dataclass
class ModelConfig:
    """Which language model, and where to read activations from it."""

    name: str = "embedded"  # "embedded", a hub id, a local directory or a .gguf path
    site: str = "blocks.9.resid_post"  # canonical site name (see DESIGN.md) or a raw module path
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"


@dataclass
class DataConfig:
    """Text source, packing and activation batching."""

    source: str = "embedded"  # "embedded", a .txt/.jsonl/.parquet path, or "hf:<dataset id>[:<config>]"
    text_field: str = "text"
    context_len: int = 128
    keep_bos: bool = False
    cache_dir: Optional[str] = None  # read activations from a harvested cache instead of running the LM
    buffer_tokens: int = 65536  # shuffle buffer size in tokens
    lm_batch_size: int = 16  # contexts per LM forward pass

    def __post_init__(self):
        if self.context_len < 2:
            raise ConfigError(f"data.context_len: must be at least 2, got {self.context_len}")
        if self.buffer_tokens < 1 or self.lm_batch_size < 1:
            raise ConfigError("data.buffer_tokens and data.lm_batch_size must be positive")


@dataclass
class SAESpec:
    """One SAE to train on the shared activation stream."""

    architecture: str = "gated"  # relu, gated, topk, gradient_topk, jumprelu
    name: Optional[str] = None  # directory name under the run; defaults to architecture + coefficient
    d_sae: Optional[int] = None
    expansion: Optional[float] = 8.0  # d_sae = expansion * d_in when d_sae is not given
    sparsity_coeff: float = 1e-3  # lambda for relu/gated
    k: Optional[int] = None  # topk, gradient_topk
    lr: Optional[float] = None
    options: dict = field(default_factory=dict)  # architecture switches, e.g. {tied = false} or {beta = 1e5}


@dataclass
class TrainConfig:
    """Optimisation, schedules, checkpoints, logging."""

    tokens: int = 2_000_000
    batch_size: int = 4096
    lr: float = 3e-4
    adam_betas: tuple[float, float] = (0.0, 0.999)
    lr_warmup_steps: int = 100
    lr_decay: Literal["none", "linear", "cosine"] = "none"
    lr_decay_start_frac: float = 0.8
    sparsity_warmup_steps: int = 0
    autocast_bf16: bool = False
    seed: int = 0
    out_dir: str = "runs/default"
    checkpoint_every: int = 1000
    log_every: int = 20
    tensorboard: bool = True
    wandb_project: Optional[str] = None
    resample_every: int = 2500
    resample_until: int = 10000  # no resampling after this step
    dead_window_steps: int = 2500
    aux_k_dead_tokens: int = 10_000_000


@dataclass
class EvalConfig:
    """Held-out evaluation (saeforge.evaluation), and the compact grid that `saeforge sweep` expands.

    Grid: when `grid_architectures` is set, the [[sae]] list is replaced by one SAE per architecture and value:
    relu/gated get one per entry of `grid_sparsity_coeffs`, topk/gradient_topk one per entry of `grid_k`; every
    other field (width, lr, options) is copied from the first [[sae]] entry (or SAESpec's defaults).
    """

    tokens: int = 32768  # held-out tokens (split="eval"); BOS positions are not spliced or scored by the SAE
    batch_size: int = 8  # contexts per LM forward pass
    ablation: tuple[str, ...] = ("zero", "mean")  # loss recovered against each of these ablations
    dense_threshold: float = 0.1  # a latent is dense when it fires on more than this fraction of tokens
    analyses: bool = True  # paper B: decoder max-cosine histogram, directional derivatives
    analysis_batches: int = 4  # eval batches whose site gradients feed the directional-derivative analysis
    ito: tuple[int, ...] = ()  # L0 targets for inference-time optimisation (gradient pursuit)
    steering: bool = False  # paper B section 4.2 steering measurement
    steering_latents: int = 32  # alive latents sampled per SAE
    steering_top_tokens: int = 10  # n: the tokens with largest W_U^T d_i count as on-target
    steering_alpha: Optional[float] = None  # added norm; None = the mean activation norm at the site
    steering_contexts: int = 10  # eval contexts the probability change is averaged over
    grid_architectures: tuple[str, ...] = ()
    grid_sparsity_coeffs: tuple[float, ...] = ()
    grid_k: tuple[int, ...] = ()
    out_dir: Optional[str] = None  # where eval/sweep write JSON, CSV and figures; None = <train.out_dir>/eval

    def __post_init__(self):
        bad = [a for a in self.ablation if a not in ("zero", "mean")]
        if bad or not self.ablation:
            raise ConfigError(f"eval.ablation: each entry must be 'zero' or 'mean', got {list(self.ablation)}")
        if self.tokens < 1 or self.batch_size < 1 or self.analysis_batches < 0:
            raise ConfigError("eval.tokens and eval.batch_size must be positive, eval.analysis_batches >= 0")
        if not 0.0 < self.dense_threshold < 1.0:
            raise ConfigError(f"eval.dense_threshold: must lie in (0, 1), got {self.dense_threshold}")
        if any(k < 1 for k in self.ito + self.grid_k):
            raise ConfigError("eval.ito and eval.grid_k: every k must be a positive integer")
        if self.steering_latents < 1 or self.steering_top_tokens < 1 or self.steering_contexts < 1:
            raise ConfigError("eval.steering_latents, steering_top_tokens and steering_contexts must be positive")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sae: list[SAESpec] = field(default_factory=lambda: [SAESpec()])


def load_config(path: str | Path) -> RunConfig:
    """Read a TOML run file; every bad field is one ConfigError naming file, section and field."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    return from_dict(RunConfig, data, where=str(path))
