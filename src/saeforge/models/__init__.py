"""Language models addressed by site name: loading, capture (with loss gradients), edits."""

from .lm import LanguageModel
from .loading import load_lm
from .sites import SITE_KINDS
from .tiny import TINY_FAMILIES, tiny_lm

__all__ = ["LanguageModel", "load_lm", "tiny_lm", "SITE_KINDS", "TINY_FAMILIES"]
