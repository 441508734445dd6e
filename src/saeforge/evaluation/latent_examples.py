"""What a feature dashboard shows of each latent, collected for all latents at once in one streaming pass over
held-out contexts (the LM up to the site, then the SAE), with memory that does not grow with the number of tokens.

Per latent:
- top examples: the `top_n` contexts whose highest activation of the latent is largest, each kept as a window of
  tokens around that position with the latent's activation on every token (exactly what a brute-force pass over
  all contexts gives; tests/dashboard/test_latent_examples.py holds the two together);
- band samples: `band_size` contexts drawn at random from each of `n_bands` bands of the latent's activation range,
  band b holding the contexts whose highest activation lies in (b / n_bands, (b + 1) / n_bands] x the latent's max.
  One pass cannot know the max in advance, so bands follow the running max: each context gets a uniform random key,
  each band keeps the largest keys among its members (a reservoir), and when the max grows the kept examples are
  put back into the bands the new max assigns them. Every kept example therefore sits in its band of the final max;
  a band may miss contexts seen before the latent's max last grew (the max settles within the first batches). A
  second pass would be exact but doubles the LM's cost, and the collection must stay within 1.5x of one forward;
- the histogram of its non-zero activations on a fixed log10 grid (`HIST_LOG10_RANGE`, `HIST_BINS_PER_DECADE`),
  its firing count and its max activation;
- for SAEs whose encoder reads the LM-loss gradient (`needs_grad`), the gradient attribution of each shown token,
  f_i (d_i . grad_x L): the first-order change of the LM's loss that the latent's contribution f_i d_i makes there.
After the pass: the latents with the most similar decoder rows (cosine), and at residual-stream sites the output
tokens each decoder direction promotes and suppresses most (`LanguageModel.direction_logits`: the unembedding
applied to d_i after the final norm).

Positions are those an SAE is spliced at (`evaluation.splice`): BOS, padding and activations above the SAE's
`max_input_norm` are not counted (their activation is taken as 0), though they show in a window as context.
`LatentExamples.save` / `load` keep it as safetensors + JSON, with the text of every token it refers to, so a
dashboard can be drawn again without the LM.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from saeforge.errors import UserError
from saeforge.evaluation.evaluate import context_batches
from saeforge.evaluation.splice import splice_mask, spliced_positions
from saeforge.files import atomic_target, write_atomic
from saeforge.models.lm import position_chunks

HIST_LOG10_RANGE = (-4.0, 6.0)  # activations below / above land in the first / last bin
HIST_BINS_PER_DECADE = 8
TENSORS_FILE = "latent_examples.safetensors"
INFO_FILE = "latent_examples.json"
_NEIGHBOUR_ROWS = 1024  # decoder rows compared with all others at once


class LatentExamplesError(UserError, ValueError):
    """Activations that cannot be shown (non-finite), bad collection settings, or a saved collection that cannot
    be read."""


def histogram_edges() -> Tensor:
    """The log10 edges of the activation histogram's bins (n_bins + 1)."""
    lo, hi = HIST_LOG10_RANGE
    return torch.linspace(lo, hi, round((hi - lo) * HIST_BINS_PER_DECADE) + 1)


@dataclass
class ExampleWindows:
    """Examples, each a window of tokens around the position where a latent peaks in one context. Leading shape
    [d_sae, top_n] (top examples) or [d_sae, n_bands, band_size] (band samples); an empty slot has context -1."""

    value: Tensor  # float32: the latent's highest activation in the context
    context: Tensor  # int64: the context's index in the order the contexts were given
    position: Tensor  # int64: where in the context that activation is
    tokens: Tensor  # int32 [..., width]: token ids from position - left to position + right (-1 past the ends)
    acts: Tensor  # float32 [..., width]: the latent's activation on each of them
    attribution: Optional[Tensor] = None  # float32 [..., width]: f_i (d_i . grad_x L) on each (needs_grad SAEs)

    @classmethod
    def empty(cls, shape: tuple[int, ...], width: int, attribution: bool, device=None) -> "ExampleWindows":
        out = cls(value=torch.zeros(shape, device=device), context=torch.zeros(shape, dtype=torch.long, device=device),
                  position=torch.zeros(shape, dtype=torch.long, device=device),
                  tokens=torch.zeros((*shape, width), dtype=torch.int32, device=device),
                  acts=torch.zeros((*shape, width), device=device),
                  attribution=torch.zeros((*shape, width), device=device) if attribution else None)
        out.clear(torch.ones(shape, dtype=torch.bool, device=device))
        return out

    def clear(self, slots: Tensor) -> None:
        """Empty the slots where the bool mask `slots` (of the leading shape) is set."""
        for name, t in self.tensors().items():
            t[slots] = -1 if name in ("context", "tokens") else 0

    def tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    def map(self, fn) -> "ExampleWindows":
        return ExampleWindows(**{name: fn(t) for name, t in self.tensors().items()})

    def slot(self, index) -> list[dict]:
        """The filled slots of one latent (or one band of it) as dicts, in slot order."""
        part = self.map(lambda t: t[index])
        return [{name: t[j] for name, t in part.tensors().items()}
                for j in range(part.context.shape[0]) if part.context[j] >= 0]


@dataclass
class LatentExamples:
    """Everything a dashboard shows of every latent of one SAE (see the module docstring)."""

    info: dict  # the SAE (name, path, architecture, variant, d_in, d_sae), model, site, and the settings used
    firing_counts: Tensor  # int64 [d_sae]: counted positions where the latent is non-zero
    max_activation: Tensor  # float32 [d_sae]
    histogram: Tensor  # int64 [d_sae, n_bins]: non-zero activations per log10 bin (histogram_edges())
    top: ExampleWindows  # [d_sae, top_n], highest first
    bands: ExampleWindows  # [d_sae, n_bands, band_size]
    neighbours: Tensor  # int64 [d_sae, n]: the latents whose decoder rows are most similar, most similar first
    neighbour_cosines: Tensor  # float32 [d_sae, n]
    token_strings: dict[int, str]  # the text of every token id referred to
    promoted: Optional[Tensor] = None  # int64 [d_sae, n]: tokens whose logits d_i raises most (residual sites)
    promoted_logits: Optional[Tensor] = None  # float32 [d_sae, n]
    suppressed: Optional[Tensor] = None  # int64 [d_sae, n]: tokens whose logits d_i lowers most
    suppressed_logits: Optional[Tensor] = None  # float32 [d_sae, n]

    @property
    def d_sae(self) -> int:
        return self.firing_counts.shape[0]

    @property
    def density(self) -> Tensor:
        """float64 [d_sae]: the fraction of counted positions where each latent fires."""
        return self.firing_counts.double() / max(1, self.info["n_tokens"])

    def dead(self) -> list[int]:
        """Latents that never fired on the collected tokens."""
        return torch.nonzero(self.firing_counts == 0).flatten().tolist()

    def token_text(self, token_id: int) -> str:
        return self.token_strings.get(int(token_id), f"<{int(token_id)}>")

    # ---------------------------------------------------------------- files
    _OPTIONAL = ("promoted", "promoted_logits", "suppressed", "suppressed_logits")

    def save(self, directory) -> Path:
        """Write latent_examples.safetensors and latent_examples.json into `directory`, each atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"firing_counts": self.firing_counts, "max_activation": self.max_activation,
                   "histogram": self.histogram, "neighbours": self.neighbours,
                   "neighbour_cosines": self.neighbour_cosines,
                   **{f"top.{k}": v for k, v in self.top.tensors().items()},
                   **{f"bands.{k}": v for k, v in self.bands.tensors().items()},
                   **{k: getattr(self, k) for k in self._OPTIONAL if getattr(self, k) is not None}}
        with atomic_target(directory / TENSORS_FILE) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        payload = {"info": self.info, "token_strings": {str(k): v for k, v in self.token_strings.items()}}
        write_atomic(directory / INFO_FILE, json.dumps(payload, indent=1))
        return directory

    @classmethod
    def load(cls, directory) -> "LatentExamples":
        """Read what `save` wrote; a missing, truncated or inconsistent file is one LatentExamplesError."""
        directory = Path(directory)
        info_path, tensors_path = directory / INFO_FILE, directory / TENSORS_FILE
        for path in (info_path, tensors_path):
            if not path.is_file():
                raise LatentExamplesError(f"{directory} holds no saved latent examples (no {path.name})")
        try:
            payload = json.loads(info_path.read_text(encoding="utf-8"))
            info, strings = payload["info"], {int(k): v for k, v in payload["token_strings"].items()}
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise LatentExamplesError(f"{info_path}: not a latent-examples file ({e})") from e
        try:
            t = load_file(str(tensors_path))
        except (SafetensorError, OSError) as e:
            raise LatentExamplesError(f"{tensors_path}: not a readable safetensors file ({e})") from e

        def windows(prefix: str) -> ExampleWindows:
            return ExampleWindows(**{f.name: t.get(f"{prefix}.{f.name}") for f in dataclasses.fields(ExampleWindows)})

        try:
            examples = cls(info=info, firing_counts=t["firing_counts"], max_activation=t["max_activation"],
                           histogram=t["histogram"], top=windows("top"), bands=windows("bands"),
                           neighbours=t["neighbours"], neighbour_cosines=t["neighbour_cosines"],
                           token_strings=strings, **{k: t.get(k) for k in cls._OPTIONAL})
        except (KeyError, TypeError) as e:
            raise LatentExamplesError(f"{tensors_path}: a tensor is missing ({e})") from e
        d_sae = examples.d_sae
        for name, tensor in {**examples.top.tensors(), **examples.bands.tensors(), "histogram": examples.histogram,
                             "neighbours": examples.neighbours}.items():
            if tensor is None or tensor.shape[0] != d_sae:
                raise LatentExamplesError(f"{tensors_path}: {name} does not have {d_sae} latents")
        return examples


# -------------------------------------------------------------------------------------------------------------
# Collection


class _Batch:
    """One batch's features [B, S, M] (0 at positions not counted), each context's peak per latent, and what a
    window around a peak needs."""

    def __init__(self, tokens: Tensor, feats: Tensor, offset: int, grad_proj: Tensor | None):
        self.tokens, self.feats, self.offset, self.grad_proj = tokens, feats, offset, grad_proj
        peak = feats.max(dim=1)
        self.peak, self.peak_at = peak.values, peak.indices  # [B, M]

    def fill(self, out: ExampleWindows, slots: tuple[Tensor, ...], latent: Tensor, context: Tensor,
             offsets: Tensor) -> None:
        """Write the examples (latent, batch context) into `out` at `slots` (index tensors of out's leading dims)."""
        if latent.numel() == 0:
            return
        position = self.peak_at[context, latent]
        out.value[slots] = self.peak[context, latent]
        out.context[slots] = self.offset + context
        out.position[slots] = position
        at = position[:, None] + offsets
        inside = (at >= 0) & (at < self.tokens.shape[1])
        at = at.clamp(0, self.tokens.shape[1] - 1)
        rows = context[:, None]
        out.tokens[slots] = self.tokens[rows, at].to(torch.int32).masked_fill(~inside, -1)
        acts = self.feats[rows, at, latent[:, None]].masked_fill(~inside, 0.0)
        out.acts[slots] = acts
        if out.attribution is not None:
            out.attribution[slots] = acts * self.grad_proj[rows, at, latent[:, None]]


class _Reservoir:
    """Up to k examples per (latent, group), the ones with the largest keys among each group's members."""

    def __init__(self, d_sae: int, groups: int, k: int, width: int, attribution: bool, device):
        self.key = torch.full((d_sae, groups, k), -math.inf, device=device)
        self.kept = ExampleWindows.empty((d_sae, groups, k), width, attribution, device)

    def merge(self, pool_key: Tensor, batch: _Batch, offsets: Tensor) -> None:
        """pool_key [M, G, G*k + B]: for each group, the key of each kept example (flattened over groups) and of
        each context of the batch, -inf where it is not a member of the group."""
        m, groups, k = self.key.shape
        stored = groups * k
        key, source = pool_key.topk(k, dim=-1)
        from_store = source.clamp(max=stored - 1).reshape(m, stored)

        def take(t: Tensor) -> Tensor:
            flat = t.reshape(m, stored, *t.shape[3:])
            index = from_store.view(m, stored, *([1] * (t.dim() - 3))).expand_as(flat)
            return flat.gather(1, index).view(t.shape)

        kept = self.kept.map(take)
        empty = key == -math.inf
        kept.clear(empty)
        fresh = (source >= stored) & ~empty
        slots = fresh.nonzero(as_tuple=True)
        batch.fill(kept, slots, slots[0], source[slots] - stored, offsets)
        self.key, self.kept = key, kept


def _bands(values: Tensor, max_activation: Tensor, n_bands: int) -> Tensor:
    """The band of each value [M, n] in (b / n_bands, (b + 1) / n_bands] x its latent's max; -1 for values <= 0."""
    scaled = values / max_activation.clamp_min(1e-30)[:, None] * n_bands
    band = (scaled.ceil().long() - 1).clamp(0, n_bands - 1)
    return band.masked_fill(values <= 0, -1)


def _in_groups(keys: Tensor, groups: Tensor, n_groups: int) -> Tensor:
    """[M, n] keys and group indices -> [M, n_groups, n]: each key in its own group's row, -inf elsewhere."""
    rows = torch.arange(n_groups, device=keys.device)[None, :, None]
    return torch.where(groups[:, None, :] == rows, keys[:, None, :], -math.inf)


def _token_text(tokenizer, token_id: int) -> str:
    """A token's text as it reads inside running text (a SentencePiece word start keeps its leading space)."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    text = tokenizer.decode([token_id], clean_up_tokenization_spaces=False)
    if isinstance(piece, str) and piece.startswith("\u2581") and not text.startswith(" "):
        text = " " + text
    return text


@torch.no_grad()
def _decoder_neighbours(W_dec: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """For each decoder row, the n others with the highest cosine, most similar first."""
    rows = W_dec.float()
    rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
    n = min(n, rows.shape[0] - 1)
    index, cosine = [], []
    for start in range(0, rows.shape[0], _NEIGHBOUR_ROWS):
        block = rows[start : start + _NEIGHBOUR_ROWS] @ rows.T
        block[torch.arange(block.shape[0]), torch.arange(start, start + block.shape[0])] = -math.inf
        top = block.topk(n, dim=1)
        index.append(top.indices)
        cosine.append(top.values)
    return torch.cat(index).cpu(), torch.cat(cosine).cpu()


@torch.no_grad()
def _output_tokens(lm, W_dec: Tensor, n: int) -> dict[str, Tensor]:
    """The n tokens each decoder direction promotes and suppresses most, with their logit effects."""
    parts: dict[str, list[Tensor]] = {"promoted": [], "promoted_logits": [], "suppressed": [], "suppressed_logits": []}
    n = min(n, lm.vocab_size)
    for rows in position_chunks(W_dec.shape[0], lm.vocab_size):
        logits = lm.direction_logits(W_dec[rows])
        for name, largest in (("promoted", True), ("suppressed", False)):
            top = logits.topk(n, dim=1, largest=largest)
            parts[name].append(top.indices.cpu())
            parts[f"{name}_logits"].append(top.values.float().cpu())
    return {name: torch.cat(chunks) for name, chunks in parts.items()}


def collect_latent_examples(lm, sae, contexts, *, site: str, top_n: int = 20, n_bands: int = 4,
                            band_size: int = 5, window: tuple[int, int] = (24, 8), batch_size: int = 16,
                            keep_bos: bool = False, n_neighbours: int = 10, n_output_tokens: int = 10,
                            seed: int = 0, name: str | None = None, progress: bool = False) -> LatentExamples:
    """One pass of `lm` and `sae` over `contexts` (token ids [n_contexts, context_len]) at `site`: the
    LatentExamples of every latent (module docstring). window = (tokens before, tokens after) the peak."""
    left, right = window
    for label, value in (("top_n", top_n), ("n_bands", n_bands), ("band_size", band_size),
                         ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LatentExamplesError(f"{label} must be a positive integer, got {value!r}")
    if min(left, right) < 0:
        raise LatentExamplesError(f"window must be two counts of tokens >= 0, got {window!r}")
    d_site = lm.site_dim(site)
    name = name or sae.meta.name or sae.architecture
    if sae.d_in != d_site:
        raise LatentExamplesError(f"SAE {name!r} has d_in = {sae.d_in}, but site {site!r} of {lm.name} has width "
                                  f"{d_site}: the SAE was trained on another site or model")
    max_norm = sae.meta.max_input_norm
    device = lm.device
    sae = sae.to(device).eval()
    M, width = sae.d_sae, left + right + 1
    offsets = torch.arange(-left, right + 1, device=device)
    attribution = bool(sae.needs_grad)
    top = _Reservoir(M, 1, top_n, width, attribution, device)
    bands = _Reservoir(M, n_bands, band_size, width, attribution, device)
    firing = torch.zeros(M, dtype=torch.long, device=device)
    max_activation = torch.zeros(M, device=device)
    lowest = HIST_LOG10_RANGE[0]
    n_bins = histogram_edges().numel() - 1
    hist = torch.zeros(M * n_bins, dtype=torch.long, device=device)
    gen = torch.Generator().manual_seed(seed)
    n_tokens = n_contexts = 0
    W_dec = sae.W_dec.detach()

    for tokens in tqdm(context_batches(contexts, batch_size, lm.device), desc="dashboard: examples",
                       disable=not progress, file=sys.stderr):
        if sae.needs_grad:
            acts, grads = lm.capture(tokens, [site], grad=True)
            grad = grads[site].to(W_dec.dtype)
        else:
            acts, grad = lm.capture(tokens, [site]), None
        x = acts[site]
        if not torch.isfinite(x).all():
            raise LatentExamplesError(
                f"site {site!r} of {lm.name} gave non-finite activations (NaN or Inf) in contexts "
                f"{n_contexts}..{n_contexts + tokens.shape[0] - 1}; load the model in float32 (--dtype float32)")
        keep = spliced_positions(splice_mask(lm, tokens, keep_bos), x, max_norm)
        with torch.no_grad():
            x = x.to(W_dec.dtype)
            feats = (sae.encode(x, grad=grad) if sae.needs_grad else sae.encode(x)).float()
            feats.masked_fill_(~keep[..., None], 0.0)
            batch = _Batch(tokens, feats, n_contexts, None if grad is None else (grad @ W_dec.T).float())
            peak_max = batch.peak.max(dim=0).values
            if not torch.isfinite(peak_max).all():
                raise LatentExamplesError(f"SAE {name!r} gave non-finite activations on contexts {n_contexts}.."
                                          f"{n_contexts + tokens.shape[0] - 1}")
            where = feats.nonzero()
            values, latent = feats[where[:, 0], where[:, 1], where[:, 2]], where[:, 2]
            firing += torch.bincount(latent, minlength=M)
            bins = ((values.log10() - lowest) * HIST_BINS_PER_DECADE).floor().long().clamp(0, n_bins - 1)
            hist += torch.bincount(latent * n_bins + bins, minlength=M * n_bins)
            max_activation = torch.maximum(max_activation, peak_max)

            peak = batch.peak.T  # [M, B]
            top.merge(torch.cat([top.key, torch.where(peak > 0, peak, -math.inf)[:, None]], dim=2), batch, offsets)
            kept_values = bands.kept.value.reshape(M, -1)
            kept_keys = bands.key.reshape(M, -1)
            candidate_keys = torch.rand(peak.shape, generator=gen).to(device)
            pool = _in_groups(torch.cat([kept_keys, candidate_keys], dim=1),
                              _bands(torch.cat([kept_values, peak], dim=1), max_activation, n_bands), n_bands)
            bands.merge(pool, batch, offsets)
        n_tokens += int(keep.sum())
        n_contexts += tokens.shape[0]

    neighbours, cosines = _decoder_neighbours(W_dec, n_neighbours)
    outputs = _output_tokens(lm, W_dec, n_output_tokens) if lm.writes_residual(site) else {}
    ids = torch.cat([top.kept.tokens.flatten(), bands.kept.tokens.flatten(),
                     *(outputs[k].flatten() for k in ("promoted", "suppressed") if k in outputs)])
    strings = {int(i): _token_text(lm.tokenizer, int(i)) for i in torch.unique(ids[ids >= 0]).tolist()}
    info = {"sae": {"name": name, "architecture": sae.architecture,
                    "variant": sae.variant() if hasattr(sae, "variant") else sae.architecture,
                    "d_in": sae.d_in, "d_sae": M},
            "model": lm.name, "site": site, "n_contexts": n_contexts, "n_tokens": n_tokens,
            "context_len": int(contexts.shape[-1]) if isinstance(contexts, Tensor) else None,
            "top_n": top_n, "n_bands": n_bands, "band_size": band_size, "window": [left, right],
            "keep_bos": keep_bos, "max_input_norm": max_norm, "seed": seed, "attribution": attribution,
            "histogram_log10_range": list(HIST_LOG10_RANGE), "histogram_bins_per_decade": HIST_BINS_PER_DECADE}
    return LatentExamples(info=info, firing_counts=firing.cpu(), max_activation=max_activation.cpu(),
                          histogram=hist.view(M, n_bins).cpu(), top=top.kept.map(lambda t: t[:, 0].cpu()),
                          bands=bands.kept.map(lambda t: t.cpu()), neighbours=neighbours, neighbour_cosines=cosines,
                          token_strings=strings, **outputs)
