"""A causal LM with named sites: capture activations (and loss gradients) and splice edits into the forward pass."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .sites import HookPoint, SiteResolver

Edit = Callable[[torch.Tensor], torch.Tensor]

# Logit elements materialised at once when computing the loss; bounds memory for large vocabularies.
_LOGIT_CHUNK_ELEMENTS = 1 << 25
# Canonical site kinds that are the residual stream or are added to it: a direction there reaches the logits.
_RESIDUAL_KINDS = ("resid_pre", "resid_post", "attn_out", "mlp_out")
# Where transformers keeps the norm applied to the last block's output (Llama/Gemma/Qwen/Mistral, GPT-2, GPT-NeoX).
_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm")


def position_chunks(n_positions: int, vocab_size: int) -> Iterator[slice]:
    """Slices over positions whose vocabulary-sized float32 temporaries stay near 128 MB whatever the vocabulary:
    the one chunking of logits in the library (LM losses and gradients, evaluation's CE and KL, steering)."""
    size = max(1, _LOGIT_CHUNK_ELEMENTS // vocab_size)
    for start in range(0, n_positions, size):
        yield slice(start, min(n_positions, start + size))


class _StopForward(Exception):
    """Raised from a hook once every requested site is captured, to skip the rest of the forward pass."""


def _first(value):
    return value[0] if isinstance(value, (tuple, list)) else value


def _hook(module: nn.Module, point: HookPoint, fn: Callable[[torch.Tensor], torch.Tensor | None]):
    """Register `fn` on the site tensor; if fn returns a tensor it replaces the site tensor in the forward pass."""
    if point.where == "output":

        def on_output(_module, _args, output):
            new = fn(_first(output))
            if new is None:
                return None
            if isinstance(output, tuple):
                return (new, *output[1:])
            if isinstance(output, list):
                return [new, *output[1:]]
            return new

        return module.register_forward_hook(on_output)

    def on_input(_module, args, kwargs):
        if args:
            new = fn(args[0])
            return None if new is None else ((new, *args[1:]), kwargs)
        name = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
        new = fn(kwargs[name])
        return None if new is None else (args, {**kwargs, name: new})

    return module.register_forward_pre_hook(on_input, with_kwargs=True)


class LanguageModel:
    """A frozen causal LM from transformers, addressed through site names (see `saeforge.models.sites`)."""

    def __init__(self, model: nn.Module, tokenizer=None, name: str | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        config = model.config
        self.name = name or getattr(config, "_name_or_path", "") or type(model).__name__
        self._sites = SiteResolver(model, config.model_type)
        self.family = self._sites.family
        self.n_layers = self._sites.n_layers
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.d_model = text_config.hidden_size
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self._backbone = model.base_model
        self._head = model.get_output_embeddings()
        self._final_norm = next((m for m in (getattr(self._backbone, n, None) for n in _FINAL_NORM_NAMES)
                                 if isinstance(m, nn.Module)), None)
        self._softcap = getattr(text_config, "final_logit_softcapping", None)
        self.bos_token_id = _special_id(tokenizer, text_config, "bos")
        eos = _special_id(tokenizer, text_config, "eos")
        pad = _special_id(tokenizer, text_config, "pad")
        self.pad_token_id = pad if pad is not None else eos
        self._dims: dict[str, int] = {}
        self.precision = None  # set by load_lm: the saeforge.models.precision.Precision it was loaded in

    def __repr__(self) -> str:
        return f"LanguageModel({self.name!r}, family={self.family}, n_layers={self.n_layers}, d_model={self.d_model})"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # ---------------------------------------------------------------------------------------------------------
    # Sites

    def sites(self) -> list[str]:
        """Canonical site names for every block."""
        return self._sites.sites()

    def resolve(self, site: str) -> HookPoint:
        return self._sites.resolve(site)

    def writes_residual(self, site: str) -> bool:
        """Whether `site` is the residual stream or a sub-block's output added to it, so that a direction there
        acts on the logits directly (`direction_logits`)."""
        return self.resolve(site).block is not None and site.endswith(_RESIDUAL_KINDS)

    def site_dim(self, site: str) -> int:
        """Width d of the activation at `site`."""
        if site not in self._dims:
            point = self.resolve(site)
            module = self._sites.module(point)
            if self.writes_residual(site):
                self._dims[site] = self.d_model
            elif point.where == "input" and isinstance(module, nn.Linear):
                self._dims[site] = module.in_features
            elif point.where == "input" and type(module).__name__ == "Conv1D":  # GPT-2 stores W as [in, out]
                self._dims[site] = module.weight.shape[0]
            else:  # a raw module path: run one token and look
                probe = torch.tensor([[self.bos_token_id or 0]], device=self.device)
                self._dims[site] = self.capture(probe, [site])[site].shape[-1]
        return self._dims[site]

    # ---------------------------------------------------------------------------------------------------------
    # Forward passes

    def _inputs(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None) -> dict:
        if tokens.dim() != 2 or tokens.dtype != torch.long:
            raise ValueError(f"tokens must be a LongTensor [batch, seq], got {tuple(tokens.shape)} {tokens.dtype}")
        inputs = {"input_ids": tokens.to(self.device), "use_cache": False}
        if attention_mask is not None:
            if attention_mask.shape != tokens.shape:
                raise ValueError(
                    f"attention_mask shape {tuple(attention_mask.shape)} differs from tokens {tuple(tokens.shape)}"
                )
            mask = attention_mask.to(self.device).long()
            inputs["attention_mask"] = mask
            # Positions count only real tokens, so a left-padded sequence is computed as if unpadded.
            inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        return inputs

    @contextlib.contextmanager
    def _hooks(self, fns: dict[str, Callable[[torch.Tensor], torch.Tensor | None]]) -> Iterator[None]:
        handles = []
        try:
            for site, fn in fns.items():
                point = self.resolve(site)
                handles.append(_hook(self._sites.module(point), point, fn))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _edit_hooks(self, edits: dict[str, Edit] | None) -> dict:
        def make(site: str, edit: Edit):
            def apply(x: torch.Tensor) -> torch.Tensor:
                new = edit(x)
                if new.shape != x.shape:
                    raise ValueError(f"edit at {site} returned shape {tuple(new.shape)}, expected {tuple(x.shape)}")
                return new.to(x.dtype)

            return apply

        return {site: make(site, edit) for site, edit in (edits or {}).items()}

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's own head on final hidden states (with Gemma 2's final-logit soft-capping), float32."""
        logits = self._head(hidden)
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits.float()

    def _chunks(self, n: int) -> Iterator[slice]:
        return position_chunks(n, self.vocab_size)

    def _valid(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """[B, S-1] bool: position t predicts t+1 and both are real tokens."""
        if attention_mask is None:
            return torch.ones(tokens.shape[0], tokens.shape[1] - 1, dtype=torch.bool, device=self.device)
        mask = attention_mask.to(self.device).bool()
        return mask[:, :-1] & mask[:, 1:]

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        edits: dict[str, Edit] | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, S, V] of the model's own forward pass, each edit replacing the activation at its site."""
        with self._hooks(self._edit_hooks(edits)):
            return self.model(**self._inputs(tokens, attention_mask)).logits

    __call__ = forward

    def next_token_loss(
        self,
        tokens: torch.Tensor,
        *,
        edits: dict[str, Edit] | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-token next-token cross-entropy [B, S-1] in float32; 0 where the input or target is padding."""
        with self._hooks(self._edit_hooks(edits)):
            hidden = self._backbone(**self._inputs(tokens, attention_mask)).last_hidden_state
        tokens = tokens.to(self.device)
        valid = self._valid(tokens, attention_mask)
        hidden, targets = hidden[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()
        losses = torch.cat(
            [F.cross_entropy(self._logits(hidden[c]), targets[c], reduction="none") for c in self._chunks(len(targets))]
        )
        return losses.view_as(valid) * valid

    def unembed(self) -> torch.Tensor:
        """W_U [d_model, vocab] in float32 (the transpose of the output embedding)."""
        return self._head.weight.detach().float().t()

    @torch.no_grad()
    def direction_logits(self, directions: torch.Tensor) -> torch.Tensor:
        """[n, vocab] in the model's dtype: how much each residual-stream direction [n, d_model] raises each token's logit,
        read through the final norm and then the unembedding. The norm's response to a direction d is
        norm(d) - norm(0): RMSNorm's gain times d, LayerNorm's gain times d centred (its bias cancels), each divided
        by d's own scale, a positive factor per row, so the order of tokens within a row is exact. The model's own
        head computes it."""
        d = directions.to(device=self.device, dtype=self.dtype)
        if self._final_norm is not None:
            d = self._final_norm(d) - self._final_norm(torch.zeros_like(d))
        return self._head(d)

    # ---------------------------------------------------------------------------------------------------------
    # Capture

    def capture(
        self,
        tokens: torch.Tensor,
        sites: list[str],
        *,
        attention_mask: torch.Tensor | None = None,
        grad: bool = False,
    ):
        """Activations at `sites`, dict site -> [B, S, d] (in the model's dtype).

        Without grad, the forward pass stops as soon as the last requested site has been computed.
        With grad=True returns (acts, grads): grads[site] = d(sum of next-token CE over valid positions) / d(act),
        taken at the unmodified activation; the total derivative, so an earlier site's gradient includes every path
        through later sites. The model's weights are not touched.
        """
        sites = list(dict.fromkeys(sites))
        if not sites:
            raise ValueError("capture needs at least one site")
        for site in sites:
            self.resolve(site)
        inputs = self._inputs(tokens, attention_mask)
        if grad:
            return self._capture_with_grad(tokens, sites, inputs, attention_mask)

        acts: dict[str, torch.Tensor] = {}

        def make(site: str):
            def record(x: torch.Tensor) -> None:
                acts[site] = x.detach()
                if len(acts) == len(sites):
                    raise _StopForward

            return record

        with torch.no_grad(), self._hooks({site: make(site) for site in sites}):
            try:
                self.model(**inputs)  # the whole model, so a raw path such as lm_head is reachable too
            except _StopForward:
                pass
        _check_reached(sites, acts)
        return acts

    def _capture_with_grad(self, tokens, sites, inputs, attention_mask):
        acts: dict[str, torch.Tensor] = {}

        def make(site: str):
            def record(x: torch.Tensor) -> torch.Tensor | None:
                # The first site reached becomes a leaf that requires grad; later sites then depend on it and stay
                # in the graph, so autograd.grad w.r.t. an earlier site follows the paths through later ones.
                if x.requires_grad:
                    acts[site] = x
                    return None
                acts[site] = x.detach().requires_grad_()
                return acts[site]

            return record

        with torch.enable_grad():
            with self._hooks({site: make(site) for site in sites}):
                hidden = self._backbone(**inputs).last_hidden_state
            _check_reached(sites, acts)
            grad_hidden = self._loss_grad_wrt_hidden(hidden.detach(), tokens.to(self.device), attention_mask)
            grads = torch.autograd.grad(
                hidden, [acts[s] for s in sites], grad_outputs=grad_hidden, allow_unused=True
            )
        out_acts = {s: acts[s].detach() for s in sites}
        out_grads = {s: torch.zeros_like(out_acts[s]) if g is None else g for s, g in zip(sites, grads)}
        return out_acts, out_grads

    def _loss_grad_wrt_hidden(self, hidden, tokens, attention_mask) -> torch.Tensor:
        """d(sum of valid next-token CE)/d(final hidden state), computed a chunk of positions at a time."""
        valid = self._valid(tokens, attention_mask).flatten()
        grad = torch.zeros_like(hidden)
        flat, grad_flat = hidden[:, :-1].flatten(0, 1), grad[:, :-1]
        targets = tokens[:, 1:].flatten()
        pieces = []
        for c in self._chunks(len(targets)):
            h = flat[c].detach().requires_grad_()
            loss = (F.cross_entropy(self._logits(h), targets[c], reduction="none") * valid[c]).sum()
            pieces.append(torch.autograd.grad(loss, h)[0])
        grad_flat.copy_(torch.cat(pieces).view_as(grad_flat))
        return grad


def _check_reached(sites: list[str], acts: dict) -> None:
    missing = [s for s in sites if s not in acts]
    if missing:
        raise RuntimeError(f"sites {missing} were never reached in the forward pass (module not executed)")


def _special_id(tokenizer, config, which: str) -> int | None:
    value = getattr(tokenizer, f"{which}_token_id", None) if tokenizer is not None else None
    if value is None:
        value = getattr(config, f"{which}_token_id", None)
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return value
