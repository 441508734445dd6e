"""Language models addressed by site name: loading, capture (with loss gradients), edits."""

from .lm import LanguageModel
from .loading import EMBEDDED_NAME, load_lm, site_width_before_loading
from .precision import Precision, choose_precision
from .sites import SITE_KINDS
from .tiny import TINY_FAMILIES, tiny_lm

__all__ = ["LanguageModel", "load_lm", "EMBEDDED_NAME", "tiny_lm", "SITE_KINDS", "TINY_FAMILIES", "Precision",
           "choose_precision", "site_width_before_loading"]
