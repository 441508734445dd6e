"""Text sources, packing, the shuffled activation stream, harvesting and the on-disk activation cache."""

from saeforge.data.cache import ActivationCache, CacheError
from saeforge.data.harvest import harvest
from saeforge.data.packing import context_batches, eval_contexts, pack_contexts, source_contexts, training_mask
from saeforge.data.sources import is_eval_document, text_source
from saeforge.data.store import ActivationStream, NonFiniteActivationsError, open_stream

__all__ = [
    "ActivationCache", "ActivationStream", "CacheError", "NonFiniteActivationsError", "context_batches",
    "eval_contexts", "harvest",
    "is_eval_document", "open_stream", "pack_contexts", "source_contexts", "text_source", "training_mask",
]
