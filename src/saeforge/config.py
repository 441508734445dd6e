"""Typed run configuration, loaded from TOML.

A run file has one table per section ([model], [data], [train], [eval]) and a list of SAEs ([[sae]]). Every
section is a dataclass with defaults; `from_dict` checks names and types field by field, so a typo or a wrong
type is one error naming the file, the section and the field.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from saeforge.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(UserError, ValueError):
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
    except (ValueError, TypeError) as e:  # ConfigError included: the checks of __post_init__ do not know `where`
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
    # "auto": bf16 where the hardware runs it fast (CUDA with bf16; a CPU where a sub-second probe measures bf16
    # products faster than fp32, e.g. AMX), float32 elsewhere (an AVX2-only CPU runs bf16 ~20x slower)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "cpu"


@dataclass
class DataConfig:
    """Text source, packing and activation batching."""

    source: str = "embedded"  # "embedded", a .txt/.jsonl/.parquet path, or "hf:<dataset id>[:<config>]"
    text_field: str = "text"
    context_len: int = 128
    keep_bos: bool = False  # keep BOS positions (attention sinks) in SAE training data; left out by default
    cache_dir: Optional[str] = None  # read activations from a harvested cache instead of running the LM
    # A cache is read again, reshuffled each epoch, while train.tokens asks for more; None = no limit on epochs.
    max_epochs: Optional[int] = None
    # Held-out activations for the train vs held-out MSE (train.heldout_every): a cache harvested with
    # split "eval"; None = the eval split of the live LM (or nothing, when training from a cache).
    heldout_cache_dir: Optional[str] = None
    buffer_tokens: int = 65536  # shuffle buffer: tokens of contexts (or cache shards) held and mixed at once
    lm_batch_size: int = 16  # contexts per LM forward pass
    # Outlier (attention-sink) tokens: a token whose raw norm ||x|| exceeds max_norm_ratio x the median raw norm (of
    # the stream's statistics sample) is left out of training, like BOS, unless keep_outliers; the threshold in raw
    # units is saved in each SAE's cfg.json (saeforge.max_input_norm). Measured on blocks.9.resid_post of the
    # embedded Gemma 3 270M (60,385 train tokens): every ordinary token lies below 1.67x the median raw norm, and 24
    # tokens (397 ppm, nearly all the apostrophe token, up to 9.3x) lie above 3x and carry 27.6% of the centred
    # variance. The centred norm ||x - mu|| singles out the same 24 (above 4x; ordinary ones reach 3.4x, the sinks
    # 25-40x), but the raw norm needs no estimate of mu (which the sinks themselves shift) and is one number in raw
    # units that evaluation can apply as it is. 3 sits well inside the gap.
    max_norm_ratio: float = 3.0
    keep_outliers: bool = False

    def __post_init__(self):
        if self.context_len < 2:
            raise ConfigError(f"data.context_len: must be at least 2, got {self.context_len}")
        if self.buffer_tokens < 1 or self.lm_batch_size < 1:
            raise ConfigError("data.buffer_tokens and data.lm_batch_size must be positive")
        if self.max_epochs is not None and self.max_epochs < 1:
            raise ConfigError(f"data.max_epochs: must be positive (or unset), got {self.max_epochs}")
        if not (math.isfinite(self.max_norm_ratio) and self.max_norm_ratio > 1.0):
            raise ConfigError(f"data.max_norm_ratio: must be a finite number above 1, got {self.max_norm_ratio}")


# The L0 an SAE spec that gives neither lambda nor target aims at: mid-range of paper A's Pareto plots (L0 ~ 10-150)
# and of the review's runs on Gemma 3 270M (Gated L0 21-80).
DEFAULT_TARGET_L0 = 40.0


@dataclass
class SAESpec:
    """One SAE to train on the shared activation stream."""

    architecture: str = "gated"  # any trainable registered architecture (saeforge.saes.REGISTRY)
    name: Optional[str] = None  # directory name under the run; defaults to architecture + coefficient or k
    d_sae: Optional[int] = None
    expansion: Optional[float] = 8.0  # d_sae = expansion * d_in when d_sae is not given
    # Architectures whose sparsity is a coefficient (SAE.sparsity): either a fixed lambda (sparsity_coeff), or an L0 target that a controller reaches by adjusting
    # lambda during the first train.l0_control_frac of the steps (then lambda is frozen); with both, the controller
    # starts from sparsity_coeff. Neither: target_l0 = DEFAULT_TARGET_L0.
    sparsity_coeff: Optional[float] = None
    target_l0: Optional[float] = None
    k: Optional[int] = None  # architectures whose sparsity is k (k is their L0 already)
    lr: Optional[float] = None  # overrides train.lr
    adam_betas: Optional[tuple[float, float]] = None  # overrides train.adam_betas
    resample: Optional[bool] = None  # dead-latent resampling (architectures that resample); None = train.resample
    options: dict = field(default_factory=dict)  # architecture switches, e.g. {tied = false} or {beta = 1e5}

    def __post_init__(self):
        from saeforge.saes import architecture_class

        try:
            cls = architecture_class(self.architecture)
        except ValueError as e:
            raise ConfigError(f"sae.architecture: {e}") from None
        takes_k = cls.sparsity == "k"
        if self.d_sae is not None and self.d_sae < 1:
            raise ConfigError(f"sae.d_sae: must be positive, got {self.d_sae}")
        if self.d_sae is None and not (self.expansion is not None and math.isfinite(self.expansion)
                                       and self.expansion > 0):
            raise ConfigError(f"sae.expansion: must be a finite positive number when d_sae is not given, got "
                              f"{self.expansion}")
        if self.sparsity_coeff is not None and not (math.isfinite(self.sparsity_coeff) and self.sparsity_coeff >= 0):
            raise ConfigError(f"sae.sparsity_coeff: must be a finite non-negative number, got {self.sparsity_coeff}")
        if self.target_l0 is not None:
            if not (math.isfinite(self.target_l0) and self.target_l0 > 0):
                raise ConfigError(f"sae.target_l0: must be a finite positive number, got {self.target_l0}")
            if takes_k:
                raise ConfigError(f"sae.target_l0: {self.architecture!r} takes k (its L0 already), not target_l0")
        if self.target_l0 is not None and self.sparsity_coeff == 0:
            raise ConfigError("sae.sparsity_coeff: an L0 target needs a positive starting lambda, got 0")
        if cls.sparsity == "coefficient" and self.sparsity_coeff is None and self.target_l0 is None:
            self.target_l0 = DEFAULT_TARGET_L0
        if takes_k and self.k is None:
            raise ConfigError(f"sae.k: required for architecture {self.architecture!r}")
        if self.k is not None and not takes_k:
            raise ConfigError(f"sae.k: {self.architecture!r} does not take k (its sparsity is set by "
                              f"{'target_l0 or sparsity_coeff' if cls.sparsity == 'coefficient' else 'nothing'})")
        if self.k is not None and self.k < 1:
            raise ConfigError(f"sae.k: must be positive, got {self.k}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"sae.lr: must be a finite positive number, got {self.lr}")
        if self.adam_betas is not None and (
            len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas)
        ):
            raise ConfigError(f"sae.adam_betas: must be two numbers in [0, 1), got {list(self.adam_betas)}")
        if self.name is not None and (not self.name or "/" in self.name or self.name.startswith(".")):
            raise ConfigError(f"sae.name: must be a plain directory name, got {self.name!r}")


@dataclass
class TrainConfig:
    """Optimisation, schedules, checkpoints, logging."""

    tokens: int = 2_000_000
    batch_size: int = 4096
    lr: float = 3e-4
    # None = per architecture (SAE.adam_betas): e.g. (0, 0.999) for relu/gated (paper A), (0.9, 0.999) for TopK (Gao)
    adam_betas: Optional[tuple[float, float]] = None
    # Step counts given as None are sized to the run: a fraction of its total steps (training/schedules.py,
    # `StepPlan`), so a run of thousands of steps gets warm-ups of hundreds; an explicit number of steps is kept.
    lr_warmup_steps: Optional[int] = None  # None = 5% of the steps (linear warm-up from lr/warmup to lr)
    lr_decay: Literal["none", "linear", "cosine"] = "none"
    lr_decay_start_frac: float = 0.8  # decay to 0 over the last (1 - frac) of the steps
    sparsity_warmup_steps: Optional[int] = None  # lambda rises linearly from 0; None = 5% of the steps
    # dtype of the SAEs' matrix products (parameters, optimizer state and sums stay float32). "auto": bf16 where
    # the hardware runs it fast, as for model.dtype
    compute_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # CPU: glibc keeps freed memory for reuse (saeforge.training.memory); the whole process, memory never returned
    keep_freed_memory: bool = True
    # Activation normalisation (METHODS.md "Activation scale"): the SAEs train on c * x with
    #   "centered":   E||c (x - mu)||^2 = d_in  (b_dec starts at the data's centre and carries the mean), or
    #   "uncentered": E||c x||^2 = d_in         (paper A).
    # On blocks.9.resid_post of Gemma 3 270M the uncentred c leaves ~6% of the budget to the centred part (one
    # dimension's mean dominates), so the same lambda meant very different L0 at different sites; centred makes it
    # comparable. c and mu come from the stream's statistics sample (outliers left out); c is folded into the saves.
    normalize: Literal["centered", "uncentered"] = "centered"
    b_dec_init: Literal["geometric_median", "mean", "zeros"] = "geometric_median"  # from the first batch
    seed: int = 0
    device: Optional[str] = None  # where the SAEs train; None = model.device
    out_dir: str = "runs/default"
    checkpoint_every: int = 1000  # steps; a final checkpoint is always written
    keep_checkpoints: int = 2
    log_every: int = 20
    tensorboard: bool = True
    wandb_project: Optional[str] = None
    # Train vs held-out MSE (over-fitting check): every heldout_every steps (None = 5% of the steps) each SAE's MSE
    # on a fixed sample of heldout_tokens held-out activations (data.heldout_cache_dir or the live eval split) and
    # on a fixed sample of training activations; 0 tokens = off.
    heldout_every: Optional[int] = None
    heldout_tokens: int = 8192
    resample: bool = True  # dead-latent resampling where the architecture resamples (METHODS.md)
    resample_every: Optional[int] = None  # None = 1/8 of the steps (so 4 resamples in the first half)
    resample_until: Optional[int] = None  # no resampling after this step; None = half of the steps
    dead_window_steps: Optional[int] = None  # resampling: dead = no firing in this many steps; None = resample_every
    resample_sample_tokens: int = 65536  # inputs drawn (loss^p-weighted) from this many fresh tokens
    # Draw probability ~ loss^p. Anthropic/paper A: p = 2; on Gemma 3 270M that put 99.5% of the mass on 10 of
    # 16,384 tokens (effective sample size 4.6); p = 1 (with outliers left out of the stream) tempers it.
    resample_loss_power: float = 1.0
    resample_lr_drop: float = 0.1  # paper A: LR to 0.1x after a resample ...
    # ... and back to 1x on a cosine over this many steps (paper A: 1000); None = a quarter of resample_every
    resample_lr_warmup_steps: Optional[int] = None
    aux_k_dead_tokens: int = 10_000_000  # AuxK (topk/gradient_topk): dead = no firing in this many tokens
    # L0 targets (sae.target_l0): lambda follows log lambda += rate * (EMA of log L0 - log target) each step, after
    # the sparsity warm-up and until l0_control_frac of the steps; then it is frozen (training/l0_target.py). At a fixed
    # lambda the L0 keeps falling while the encoder sharpens: frozen at half of a 384-step demo run, Gated and ReLU
    # SAEs on blocks.6.resid_post ended at 0.5x their targets; 0.8 (where lr_decay starts) leaves little time to drift.
    l0_control_frac: float = 0.8
    l0_control_rate: float = 0.01

    def __post_init__(self):
        positive = ("tokens", "batch_size", "checkpoint_every", "keep_checkpoints", "log_every",
                    "resample_sample_tokens", "aux_k_dead_tokens")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}: must be positive, got {getattr(self, name)}")
        for name in ("resample_every", "dead_window_steps", "heldout_every"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"train.{name}: must be positive (or unset), got {getattr(self, name)}")
        for name in ("lr_warmup_steps", "sparsity_warmup_steps", "resample_until", "resample_lr_warmup_steps",
                     "heldout_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ConfigError(f"train.{name}: must be non-negative, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"train.lr: must be a finite positive number, got {self.lr}")
        if self.adam_betas is not None and (
            len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas)
        ):
            raise ConfigError(f"train.adam_betas: must be two numbers in [0, 1), got {list(self.adam_betas)}")
        for name in ("lr_decay_start_frac", "l0_control_frac"):
            if not 0.0 <= getattr(self, name) <= 1.0:  # a NaN fails the comparison too
                raise ConfigError(f"train.{name}: must lie in [0, 1], got {getattr(self, name)}")
        if not 0.0 < self.resample_lr_drop <= 1.0:
            raise ConfigError(f"train.resample_lr_drop: must lie in (0, 1], got {self.resample_lr_drop}")
        for name in ("resample_loss_power", "l0_control_rate"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ConfigError(f"train.{name}: must be a finite non-negative number, got {getattr(self, name)}")


@dataclass
class EvalConfig:
    """Held-out evaluation (saeforge.evaluation), and the compact grid that `saeforge sweep` expands.

    Grid: when `grid_architectures` is set, the [[sae]] list is replaced by one SAE per architecture and value:
    coefficient architectures get one per entry of `grid_target_l0` (an L0 target each) or of `grid_sparsity_coeffs`
    (a fixed lambda each), k architectures one per entry of `grid_k` (else of `grid_target_l0`, rounded: k is their L0);
    every other field (width, lr, options) is copied from the first [[sae]] entry (or SAESpec's defaults).
    """

    tokens: int = 32768  # held-out tokens (split="eval"); BOS positions are not spliced or scored by the SAE
    batch_size: int = 4  # contexts per LM forward pass (memory: keeps contexts x len x vocab clean probabilities)
    ablation: tuple[str, ...] = ("zero", "mean")  # loss recovered against each of these ablations
    dense_threshold: float = 0.1  # a latent is dense when it fires on more than this fraction of tokens
    analyses: bool = True  # paper B: decoder max-cosine histogram, directional derivatives
    analysis_batches: int = 2  # eval batches whose site gradients feed the directional-derivative analysis
    ito: tuple[int, ...] = ()  # L0 targets for inference-time optimisation (gradient pursuit)
    steering: bool = False  # paper B section 4.2 steering measurement
    steering_latents: int = 16  # alive latents sampled per SAE (each costs steering_contexts forward passes)
    steering_top_tokens: int = 10  # n: the tokens with largest W_U^T d_i count as on-target
    # Push sizes, as multiples of the site's RMS centred norm sqrt(tr Cov x): a residual stream's raw norm is mostly
    # its mean (one massive dimension), which says nothing about how far a feature direction can be moved.
    steering_alphas: tuple[float, ...] = (0.1, 0.3, 1.0)
    steering_contexts: int = 4  # eval contexts the probability change is averaged over
    # Bootstrap CIs over held-out contexts for every loss-based metric (delta-CE, KL, loss recovered, L_added).
    ci_level: float = 0.95  # confidence level of the intervals
    bootstrap_resamples: int = 2000  # context resamples (BCa); 0 = no intervals. ~0.1 s per SAE at 256 contexts
    # PCA reference: the rank-k reconstruction spliced in at the same site, once per evaluation set (one forward
    # pass over it per rank); ranks above the site dimension are skipped; () = none.
    pca_ranks: tuple[int, ...] = (8, 16, 32, 64, 128, 256)
    pca_fit_tokens: int = 32768  # training-split tokens the principal directions are fitted on; 0 = the eval set
    grid_architectures: tuple[str, ...] = ()
    grid_sparsity_coeffs: tuple[float, ...] = ()
    grid_target_l0: tuple[float, ...] = ()  # sweeps written in L0 (e.g. [20, 40, 80, 160]); see above
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
        if not all(math.isfinite(t) and t > 0 for t in self.grid_target_l0):
            raise ConfigError(f"eval.grid_target_l0: every target must be a finite positive number, got "
                              f"{list(self.grid_target_l0)}")
        if self.steering_latents < 1 or self.steering_top_tokens < 1 or self.steering_contexts < 1:
            raise ConfigError("eval.steering_latents, steering_top_tokens and steering_contexts must be positive")
        if not (isinstance(self.ci_level, (int, float)) and math.isfinite(self.ci_level) and 0 < self.ci_level < 1):
            raise ConfigError(f"eval.ci_level: must be a finite number in (0, 1), got {self.ci_level}")
        if not self.steering_alphas or not all(math.isfinite(a) and a > 0 for a in self.steering_alphas):
            raise ConfigError(f"eval.steering_alphas: must be finite positive numbers (at least one), got "
                              f"{list(self.steering_alphas)}")
        if self.bootstrap_resamples < 0:
            raise ConfigError(f"eval.bootstrap_resamples: must be >= 0, got {self.bootstrap_resamples}")
        if any(k < 1 for k in self.pca_ranks):
            raise ConfigError(f"eval.pca_ranks: every rank must be a positive integer, got {list(self.pca_ranks)}")
        if self.pca_fit_tokens < 0:
            raise ConfigError(f"eval.pca_fit_tokens: must be >= 0, got {self.pca_fit_tokens}")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sae: list[SAESpec] = field(default_factory=lambda: [SAESpec()])


def load_config(path: str | Path) -> RunConfig:
    """Read a TOML run file; every bad field is one ConfigError naming file, section and field ([[sae]] entries by
    index, from 0). A file that lists no SAEs is refused (unless eval.grid_architectures makes them), so an empty or
    mistyped file never starts a default run."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if not path.is_file():
        raise ConfigError(f"{path}: is a directory, but a TOML run file was expected")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file (byte {e.start} is not UTF-8); a TOML run file was expected") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    if not data:
        raise ConfigError(f"{path}: the file is empty; a run file needs at least [model] and one [[sae]] table")
    cfg = from_dict(RunConfig, data, where=str(path))
    if "sae" not in data and not cfg.eval.grid_architectures:
        raise ConfigError(f"{path}: no [[sae]] table; list at least one SAE to train (or set eval.grid_architectures)")
    if not cfg.sae and not cfg.eval.grid_architectures:
        raise ConfigError(f"{path}: sae: the list of SAEs is empty; list at least one [[sae]] table")
    return cfg
