"""The shared base of every SAE: input checks, initialisation, save/load in SAELens's layout, the registry.

An architecture is one file that subclasses `SAE`, declares its parameters and implements `encode` and `loss`
(the paper's equations, differentiated by autograd), and, for training speed, `grads_by_hand` (the same loss with
its gradients derived by hand; add the architecture to tests/saes/test_backward.py, which holds the two together).
Tensor names and shapes follow SAELens (`W_enc [d_in, d_sae]`, `W_dec [d_sae, d_in]`, ...), so export is a copy.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from saeforge.config import ConfigError
from saeforge.errors import UserError
from saeforge.files import atomic_target, read_json, write_atomic
from saeforge.saes.active import ActiveEntries
from saeforge.saes.metadata import SAEMetadata

WEIGHTS_FILE = "sae_weights.safetensors"
CFG_FILE = "cfg.json"


class SAELoadError(UserError, ValueError):
    """A saved SAE directory that cannot be loaded: a missing, truncated or malformed file, or non-finite weights."""
SPARSITY_FILE = "sparsity.safetensors"

REGISTRY: dict[str, type["SAE"]] = {}


def register(name: str):
    def wrap(cls):
        cls.architecture = name
        REGISTRY[name] = cls
        return cls

    return wrap


class SAELoss:
    """Scalars (`total`, `recon`, `sparsity`, `aux`) are batch means of per-token sums over dimensions.

    `feats` [batch, d_sae] is built on first use when the SAE gave its active latents sparsely: `active` is a pair
    (values [batch, k], indices [batch, k]), or (values [entries], an `ActiveEntries`) from a hand-derived step on
    the active set; `fired()` counts firings per latent without building it, or returns the counts a hand-derived
    backward already made (`fired_counts`)."""

    def __init__(self, total: Tensor, recon: Tensor, sparsity: Tensor, aux: Tensor, feats: Tensor | None,
                 x_hat: Tensor, active: tuple[Tensor, Tensor | ActiveEntries] | None = None,
                 d_sae: int | None = None, fired_counts: Tensor | None = None):
        self.total, self.recon, self.sparsity, self.aux, self.x_hat = total, recon, sparsity, aux, x_hat
        self._feats, self.active, self._d_sae, self._fired = feats, active, d_sae, fired_counts
        self.lead_shape: tuple[int, ...] | None = None  # the leading dimensions of x, where feats is built later

    @property
    def feats(self) -> Tensor:
        if self._feats is None:
            vals, where = self.active
            with torch.no_grad():
                if isinstance(where, ActiveEntries):
                    feats = vals.new_zeros(where.n, self._d_sae)
                    feats[where.tok, where.lat] = vals.detach()
                else:
                    feats = vals.new_zeros(*vals.shape[:-1], self._d_sae).scatter_(-1, where, vals.detach())
            self._feats = feats if self.lead_shape is None else feats.reshape(*self.lead_shape, self._d_sae)
        return self._feats

    @torch.no_grad()
    def fired(self) -> Tensor:
        """Per-latent count of tokens on which the latent is non-zero in this batch, int32 [d_sae]."""
        if self._fired is not None:
            return self._fired
        if self._feats is None and self.active is not None:
            vals, where = self.active
            if isinstance(where, ActiveEntries):
                return where.fired(vals)
            return torch.bincount(where[vals != 0], minlength=self._d_sae).to(torch.int32)
        return (self.feats != 0).reshape(-1, self.feats.shape[-1]).sum(0, dtype=torch.int32)


def encoder_pre_acts(x: Tensor, W: Tensor, b: Tensor | None, b_dec: Tensor) -> Tensor:
    """(x - b_dec) @ W + b (b may be None), one fused product.

    The product runs on x - sg(b_dec), and b_dec's gradient enters through the zero-valued bias term
    -(b_dec - sg(b_dec)) @ W: the same values and gradients as the plain expression, but autograd then gets b_dec's
    gradient from a vector-matrix product instead of a full [batch, d_sae] x [d_sae, d_in] one."""
    bias = -((b_dec - b_dec.detach()) @ W)
    if b is not None:
        bias = bias + b
    x_c = (x - b_dec.detach()).reshape(-1, x.shape[-1])
    return torch.addmm(bias, x_c, W).reshape(*x.shape[:-1], W.shape[1])


def add_grad(param: Tensor, grad: Tensor) -> None:
    """Accumulate into param.grad as backward() would; frozen parameters are skipped."""
    if not param.requires_grad:
        return
    if param.grad is None:
        # One copy at most: a transposed or lower-precision gradient is converted into param's layout directly.
        param.grad = grad.to(param.dtype) if grad.is_contiguous() else torch.empty_like(param).copy_(grad)
    else:
        param.grad.add_(grad)


def add_linear_grads(sae: "SAE", w_dec_grad: Tensor, w_enc_grad: Tensor, b_enc_grad: Tensor, g_sum: Tensor) -> None:
    """Accumulate the gradients of an SAE with x_hat = f W_dec + b_dec and pre-activations W_enc^T (x - b_dec) +
    b_enc: b_dec's is the output's gradient summed over tokens (g_sum) minus b_enc's through the encoder, since
    b_dec is added at the output and subtracted at the input."""
    add_grad(sae.W_dec, w_dec_grad)
    add_grad(sae.W_enc, w_enc_grad)
    add_grad(sae.b_enc, b_enc_grad)
    add_grad(sae.b_dec, g_sum - b_enc_grad.float() @ sae.W_enc.T)


def relu_backward_(grad: Tensor, out: Tensor) -> Tensor:
    """In place: grad where out > 0, else 0 (the ReLU's backward; one pass, no mask tensor)."""
    return torch.ops.aten.threshold_backward.grad_input(grad, out, 0, grad_input=grad)


def with_ones_column(a: Tensor, dtype: torch.dtype) -> Tensor:
    """[rows, k] -> [rows, k + 1] in dtype, the last column ones. The hand-derived backwards multiply by these
    instead of adding a bias or summing over rows afterwards: the bias (a last row of the other operand), or the
    column sums (the last row of a^T @ b), then cost one more column of a product instead of a pass over
    [rows, d_sae]."""
    out = a.new_empty(a.shape[0], a.shape[1] + 1, dtype=dtype)
    out[:, :-1] = a
    out[:, -1] = 1
    return out


def with_bias_row(w: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """[k, n], [n] -> [k + 1, n] in dtype, b the last row: with_ones_column(x) @ this = x @ w + b. For a transposed
    w (a decoder as W_dec.T) the result is a transposed view too, which costs no transposing copy."""
    if not w.is_contiguous() and w.T.is_contiguous():
        out = w.new_empty(w.shape[1], w.shape[0] + 1, dtype=dtype)
        out[:, :-1] = w.T
        out[:, -1] = b
        return out.T
    out = w.new_empty(w.shape[0] + 1, w.shape[1], dtype=dtype)
    out[:-1] = w
    out[-1] = b
    return out


def decoder_grad(f: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """(f^T @ g, f summed over rows): W_dec's gradient [d_sae, d_in] (a transposed view) for features f
    [rows, d_sae] and the gradient g [rows, d_in] at the output. Made as [g | 1]^T @ f, the layout in which the
    product runs at full speed (with f^T as the left operand it runs at about half on the CPUs measured); the width
    is padded to a multiple of 16, as a ragged one slows it too."""
    rows, d_in = g.shape
    g_t = g.new_zeros(-(-(d_in + 1) // 16) * 16, rows)
    g_t[:d_in] = g.T
    g_t[d_in] = 1
    out = g_t @ f
    return out[:d_in].T, out[d_in]


def decoder_norm_penalty_grad(W_dec: Tensor, sums: Tensor, norms: Tensor, coeff: float) -> Tensor:
    """W_dec's gradient from coeff * sum_i sums[i] * ||W_dec[i]|| (the decoder-norm-weighted L1, with sums the
    per-latent sums of the penalised activations): d ||W_dec[i]|| = W_dec[i] / ||W_dec[i]||, and 0 for a zero row,
    as torch's norm gives."""
    return (coeff * torch.where(norms > 0, sums / norms, 0.0))[:, None] * W_dec


def count_fired(f: Tensor) -> Tensor:
    """Per-latent count of positive entries of f [rows, d_sae] (f >= 0), int32: column sums of sign(f) as products
    with ones, which is cheaper than comparing and summing. A bfloat16 product is exact up to 256, so the rows go in
    blocks of 256."""
    signs = torch.sign(f)
    rows, d_sae = signs.shape
    whole = rows - rows % 256
    counts = torch.zeros(d_sae, dtype=torch.int32, device=f.device)
    if whole:
        blocks = signs[:whole].view(-1, 256, d_sae)
        counts += torch.bmm(blocks.new_ones(blocks.shape[0], 1, 256), blocks).sum((0, 1), dtype=torch.int32)
    if whole < rows:
        counts += signs[whole:].sum(0, dtype=torch.int32)
    return counts


def squared_error(x: Tensor, x_hat: Tensor) -> Tensor:
    """||x - x_hat||^2 summed over dimensions, averaged over tokens (computed in fp32)."""
    return (x.float() - x_hat.float()).pow(2).sum(-1).mean()


class SAE(nn.Module):
    # What the rest of the library asks about an architecture, declared here and read from the class (through
    # `architecture_class`): no code outside saes/ names an architecture.
    architecture: ClassVar[str] = ""
    saelens_architecture: ClassVar[str] = "standard"  # how the export labels it
    trainable: ClassVar[bool] = True  # False: inference only, made as `made_by` says
    made_by: ClassVar[str] = ""
    sparsity: ClassVar[Literal["coefficient", "k", "none"]] = "coefficient"  # lambda (or an L0 target), or k
    dead_latents: ClassVar[Literal["resample", "aux_k", "none"]] = "none"  # how training revives dead latents
    adam_betas: ClassVar[tuple[float, float]] = (0.0, 0.999)  # default Adam betas (paper A: beta1 = 0)
    needs_grad: ClassVar[bool] = False  # its encoder reads the LM-loss gradient at the site
    # Its loss runs the live LM from the site to the logits in every step (`lm_loss`): training then reads whole
    # contexts from text (no cache) and runs them through the LM, clean and with this SAE's reconstruction spliced in.
    needs_lm: ClassVar[bool] = False
    # The density of active latents (fraction of [batch, d_sae] entries) below which `grads_by_hand` runs on the
    # active set (saes/active.py): the measured break-even of its sparse and dense steps. 0: always dense.
    sparse_below: ClassVar[float] = 0.0
    # Names of constructor options saved in cfg.json and passed back by load_sae.
    option_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, d_in: int, d_sae: int, *, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        for name, value in (("d_in", d_in), ("d_sae", d_sae)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{type(self).__name__}: {name} must be a positive integer, got {value!r}")
        self.d_in, self.d_sae = d_in, d_sae
        # Unit-norm decoder rows, encoder = decoder transposed, zero biases.
        w_dec = torch.randn(d_sae, d_in, dtype=torch.float32)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec.to(dtype=dtype, device=device))
        self.b_dec = nn.Parameter(torch.zeros(d_in, dtype=dtype, device=device))
        # Where the SAE came from (model, site, training, import record), typed; saved in cfg.json.
        self.meta = SAEMetadata()

    @property
    def uses_sparsity_coeff(self) -> bool:
        """Whether this SAE's loss takes a lambda (an instance may switch it off, e.g. a gate held fixed)."""
        return self.sparsity == "coefficient"

    @property
    def supports_resampling(self) -> bool:
        return self.dead_latents == "resample"

    @classmethod
    def for_training(cls, d_in: int, d_sae: int, options: dict, activation_scale: float) -> "SAE":
        """The SAE a run trains (on activation_scale * x) from a spec's options; an architecture may read options
        of its own here (e.g. gated's rescale_shift_from, a saved SAE to start from)."""
        return cls(d_in=d_in, d_sae=d_sae, **options)

    # ---------------------------------------------------------------- the interface each architecture fills in
    def encode(self, x: Tensor, grad: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def loss(self, x: Tensor, sparsity_coeff: float | None = None, grad: Tensor | None = None,
             dead_mask: Tensor | None = None) -> SAELoss:
        raise NotImplementedError

    def loss_and_grads(self, x: Tensor, sparsity_coeff: float | None = None, grad: Tensor | None = None,
                       dead_mask: Tensor | None = None, compute_dtype: torch.dtype | None = None) -> SAELoss:
        """`loss`, with the gradient of its total accumulated into each parameter's .grad (as total.backward()).

        compute_dtype=torch.bfloat16 runs the matrix products in bfloat16, as autocast would. With float32
        parameters (the trainer's master weights) an architecture's hand-derived backward (`grads_by_hand`) does
        the work: the same values as autograd (tests/saes/test_backward.py) without an autograd graph. Otherwise
        this is autograd."""
        if compute_dtype not in (None, torch.bfloat16, self.W_dec.dtype):
            raise ValueError(f"{type(self).__name__}: compute_dtype must be None (the parameters' dtype) or "
                             f"torch.bfloat16, got {compute_dtype}")
        if self.W_dec.dtype == torch.float32:
            self.check_input(x)
            if x.numel() == 0:
                raise ValueError(f"{type(self).__name__}: x has no tokens (shape {tuple(x.shape)})")
            with torch.no_grad():
                out = self.grads_by_hand(x.reshape(-1, self.d_in).float(), sparsity_coeff, grad, dead_mask,
                                         compute_dtype or torch.float32)
            if out is not None:
                out.x_hat = out.x_hat.reshape(x.shape)
                out.lead_shape = tuple(x.shape[:-1])
                if out._feats is not None:
                    out._feats = out._feats.reshape(*x.shape[:-1], self.d_sae)
                return out
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=compute_dtype == torch.bfloat16):
            out = self.loss(x, sparsity_coeff=sparsity_coeff, grad=grad, dead_mask=dead_mask)
        out.total.backward()
        return out

    def lm_loss(self, x: Tensor, through_lm: Callable[..., tuple[Tensor, Tensor | None]],
                dead_mask: Tensor | None = None) -> SAELoss:
        """The loss of a `needs_lm` architecture on x [tokens, d_in] (autograd; the trainer calls total.backward()).

        through_lm(x_hat, downstream=False) -> (kl, downstream_error) splices x_hat [tokens, d_in] (x's units) into
        the LM in place of x and runs the LM on from the site: kl is the mean KL(P_clean || P_spliced) of the
        next-token distributions over the batch's predicted positions; downstream_error (downstream=True, else None)
        the mean squared difference of the later residual streams from their clean values, in x's units. Both carry
        gradients back to x_hat through every block after the site."""
        raise NotImplementedError(f"{type(self).__name__} does not train through the LM (needs_lm is False)")

    def grads_by_hand(self, x: Tensor, sparsity_coeff: float | None, grad: Tensor | None,
                      dead_mask: Tensor | None, compute_dtype: torch.dtype) -> SAELoss | None:
        """The architecture's hand-derived backward, if it has one (else None: autograd). x is checked, [tokens,
        d_in], float32, and gradients are off; compute_dtype is the dtype of the products."""
        return None

    def latent_params(self) -> dict[str, int]:
        """Parameter name -> the dimension that indexes latents (for Adam-state resets and resampling)."""
        raise NotImplementedError

    def fold_activation_scale(self, c: float) -> None:
        """Trained on c*x: make the SAE work on raw x. Decoder rows stay unit norm; feature values scale by 1/c."""
        with torch.no_grad():
            self.b_dec.div_(c)
        # Recorded for reference only: the saved weights already act on raw activations.
        self.meta.activation_scale = float(c)
        self.meta.activation_scale_folded = True

    def saelens_fields(self) -> dict[str, Any]:
        """Architecture-specific fields of SAELens's config (e.g. TopK's `k`)."""
        return {}

    def saelens_refusal(self) -> str | None:
        """Why SAELens has no SAE with this one's features (None: `saelens_architecture` holds it); saeforge.interop
        then refuses to export it, and `save` marks cfg.json so that SAELens refuses to load it."""
        return None

    def options(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.option_names}

    def variant(self) -> str:
        """The architecture and its non-default switches, e.g. "gated (tied=False)"; k is not a switch."""
        defaults = {n: p.default for n, p in inspect.signature(type(self).__init__).parameters.items()}
        changed = [f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                   for k, v in self.options().items() if k not in ("k", "k_aux") and v != defaults.get(k)]
        return f"{self.architecture} ({', '.join(changed)})" if changed else self.architecture

    # ---------------------------------------------------------------- shared behaviour
    def decode(self, f: Tensor) -> Tensor:
        """x_hat = W_dec^T f + b_dec (paper A eq. 3)."""
        return f @ self.W_dec + self.b_dec

    def forward(self, x: Tensor, grad: Tensor | None = None) -> Tensor:
        return self.decode(self.encode(x, grad=grad) if self.needs_grad else self.encode(x))

    def check_input(self, x: Tensor, what: str = "x") -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{type(self).__name__}: {what} must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim == 0 or x.shape[-1] != self.d_in:
            raise ValueError(
                f"{type(self).__name__}: {what} has shape {tuple(x.shape)}; its last dimension must be d_in={self.d_in}"
            )
        # NaN and Inf carry through a sum, so a finite sum clears x in one cheap reduction; only a non-finite sum
        # (bad values, or finite ones overflowing) needs the elementwise check.
        if not torch.isfinite(x.sum()) and not torch.isfinite(x).all():
            n_nan = int(torch.isnan(x).sum())
            n_inf = int(torch.isinf(x).sum())
            raise ValueError(f"{type(self).__name__}: {what} contains non-finite values ({n_nan} NaN, {n_inf} Inf)")

    def resample_latents(self, idx: Tensor, directions: Tensor) -> None:
        """METHODS.md: decoder row = the normalised direction (the trainer passes centred inputs x - b_dec);
        encoder row = same times 0.2 times the mean live encoder norm; the latent's biases = 0. `directions`
        [len(idx), d_in] need not be normalised."""
        if not self.supports_resampling:
            raise NotImplementedError(f"{type(self).__name__} does not resample dead latents")
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.W_dec.device)
        if idx.numel() == 0:
            return
        dirs = directions.to(self.W_dec.dtype)
        dirs = dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        with torch.no_grad():
            live = torch.ones(self.d_sae, dtype=torch.bool, device=idx.device)
            live[idx] = False
            enc_norms = self.W_enc.norm(dim=0)
            mean_live = enc_norms[live].mean() if live.any() else torch.ones((), device=idx.device)
            self.W_dec[idx] = dirs
            self.W_enc[:, idx] = (dirs * 0.2 * mean_live).T.to(self.W_enc.dtype)
            for name, dim in self.latent_params().items():
                if name not in ("W_enc", "W_dec"):
                    getattr(self, name).index_fill_(dim, idx, 0.0)

    def init_b_dec(self, x: Tensor, method: str = "geometric_median", iters: int = 50) -> None:
        """Set b_dec from data: the geometric median (Weiszfeld iterations) or the mean of a sample."""
        self.check_input(x)
        x = x.reshape(-1, self.d_in).float()
        if method == "mean":
            center = x.mean(0)
        elif method == "geometric_median":
            center = x.mean(0)
            for _ in range(iters):
                w = 1.0 / (x - center).norm(dim=1).clamp_min(1e-8)
                new = (w[:, None] * x).sum(0) / w.sum()
                if (new - center).norm() < 1e-6 * center.norm().clamp_min(1e-12):
                    center = new
                    break
                center = new
        else:
            raise ValueError(f"init_b_dec: unknown method {method!r}; use 'geometric_median' or 'mean'")
        with torch.no_grad():
            self.b_dec.copy_(center.to(self.b_dec.dtype))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    # ---------------------------------------------------------------- files
    def cfg_dict(self) -> dict[str, Any]:
        """cfg.json: SAELens 6's config (so the directory opens there; saeforge.interop.saelens writes it) plus
        saeforge's own names at the top level and its facts under `saeforge`."""
        from saeforge.interop.saelens import saelens_config  # lazy: interop imports saes

        cfg = saelens_config(self)
        top, own = self.meta.to_cfg_json()
        # saeforge's own model and site names (SAELens 6 reads its names from `metadata`), then its other facts.
        cfg.update({"model_name": None, "hook_name": None, "context_size": None, "dataset_path": None,
                    "prepend_bos": True})
        cfg.update({k: v for k, v in top.items() if k not in cfg or cfg[k] is None})
        cfg["saeforge"] = {**own, "architecture": self.architecture, "options": self.options(), "version": 1}
        return cfg

    def save(self, directory: str | os.PathLike, sparsity: Tensor | None = None, n_tokens: int | None = None) -> Path:
        """Write cfg.json and sae_weights.safetensors (+ sparsity.safetensors with firing counts).

        Each file is written under a temporary name and renamed, so a kill never leaves a half-written file."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        with atomic_target(directory / WEIGHTS_FILE) as tmp:
            save_file(tensors, str(tmp))
        if sparsity is not None:
            counts = sparsity.detach().float().cpu().contiguous()
            if counts.shape != (self.d_sae,):
                raise ValueError(f"sparsity (firing counts) must have shape ({self.d_sae},), got {tuple(counts.shape)}")
            extra = {"firing_counts": counts}
            if n_tokens:
                # SAELens reads `sparsity` as log10 firing frequency.
                extra["sparsity"] = torch.log10(counts / n_tokens + 1e-10)
                extra["n_tokens"] = torch.tensor([float(n_tokens)])
            with atomic_target(directory / SPARSITY_FILE) as tmp:
                save_file(extra, str(tmp))
        text = json.dumps(self.cfg_dict(), indent=2)
        write_atomic(directory / CFG_FILE, text)
        return directory




def architecture_class(name: str) -> type[SAE]:
    """The registered class of an architecture name; ValueError naming the valid ones otherwise."""
    if name not in REGISTRY:
        raise ValueError(f"unknown SAE architecture {name!r}; valid architectures are {sorted(REGISTRY)}")
    return REGISTRY[name]


def create_sae(name: str, d_in: int, d_sae: int, **options) -> SAE:
    """Make an SAE by architecture name (any registered one: `sorted(REGISTRY)`)."""
    return architecture_class(name)(d_in=d_in, d_sae=d_sae, **options)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def load_sae(directory: str | os.PathLike, device=None) -> SAE:
    """Restore an SAE saved by `SAE.save` (cfg.json + sae_weights.safetensors). Never unpickles anything. Whatever
    is wrong with the directory (a missing, truncated or malformed file, wrong shapes, non-finite weights) is one
    SAELoadError naming the file. A directory in another format (SAELens, Gemma Scope 1/2, dictionary_learning,
    sparsify) is read by `saeforge.interop.read_sae`; one in no known format is an error listing the formats tried."""
    directory = Path(directory)
    cfg_path, weights_path = directory / CFG_FILE, directory / WEIGHTS_FILE
    if not cfg_path.is_file():
        return _load_foreign(directory, device)
    cfg = read_json(cfg_path, SAELoadError)
    meta = cfg.get("saeforge")
    if not isinstance(meta, dict) or "architecture" not in meta:
        return _load_foreign(directory, device)  # SAELens, sparsify, ...: saeforge.interop reads them
    if not weights_path.is_file():
        raise SAELoadError(f"{directory} is not a saved SAE (no {weights_path.name})")
    for key in ("d_in", "d_sae", "dtype"):
        if key not in cfg:
            raise SAELoadError(f"{cfg_path}: missing field {key!r}")
    for key in ("d_in", "d_sae"):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < 1:
            raise SAELoadError(f"{cfg_path}: {key} must be a positive integer, got {cfg[key]!r}")
    name = meta["architecture"]
    if name not in REGISTRY:
        raise SAELoadError(f"{cfg_path}: unknown SAE architecture {name!r}; valid architectures are "
                           f"{sorted(REGISTRY)}")
    if cfg["dtype"] not in _DTYPES:
        raise SAELoadError(f"{cfg_path}: unknown dtype {cfg['dtype']!r}; valid dtypes are {sorted(_DTYPES)}")
    options = meta.get("options", {})
    if not isinstance(options, dict):
        raise SAELoadError(f"{cfg_path}: saeforge.options must be an object, got {options!r}")
    try:
        sae = REGISTRY[name](d_in=cfg["d_in"], d_sae=cfg["d_sae"], dtype=_DTYPES[cfg["dtype"]], **options)
    except (TypeError, ValueError) as e:
        raise SAELoadError(f"{cfg_path}: not a valid {name} SAE: {e}") from e
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as e:
        raise SAELoadError(f"{weights_path}: not a readable safetensors file (truncated or corrupt?): {e}") from e
    expected = sae.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise SAELoadError(f"{weights_path}: tensors do not match a {name} SAE: missing {missing}, "
                           f"unexpected {unexpected}")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise SAELoadError(f"{weights_path}: tensor {k!r} has shape {tuple(v.shape)}, "
                               f"expected {tuple(expected[k].shape)}")
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise SAELoadError(f"{weights_path}: tensor {k!r} holds {int((~torch.isfinite(v)).sum())} non-finite "
                               "values (NaN or Inf); the SAE is broken (retrain it or use an earlier save)")
    sae.load_state_dict(state)
    saelens_only = {"architecture", "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "k",
                    "normalize_activations", "prepend_bos", "saeforge", "reshape_activations", "metadata",
                    "sae_lens_version", "rescale_acts_by_decoder_norm"}
    try:
        sae.meta = SAEMetadata.from_cfg_json(
            {k: v for k, v in cfg.items() if k not in saelens_only},
            {k: v for k, v in meta.items() if k not in ("architecture", "options", "version")}, str(cfg_path))
    except ConfigError as e:
        raise SAELoadError(str(e)) from e
    return sae.to(device) if device is not None else sae


def _load_foreign(directory: Path, device) -> SAE:
    """Any other format saeforge reads (SAELens, Gemma Scope, dictionary_learning, sparsify), or one error listing
    the formats tried."""
    from saeforge.interop import read_sae  # lazy: interop imports saes

    sae = read_sae(directory)
    return sae.to(device) if device is not None else sae


def check_k(k, d_sae: int, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ValueError(f"{name} must be a positive integer, got {k!r}")
    if k > d_sae:
        raise ValueError(f"{name}={k} is larger than d_sae={d_sae}")
    return k
