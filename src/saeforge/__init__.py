"""saeforge: sparse autoencoders (Gated, gradient TopK, TopK, ReLU, JumpReLU,
BatchTopK, Matryoshka BatchTopK) on language-model activations."""

from saeforge.saes import (
    BatchTopKSAE,
    GatedSAE,
    GradientTopKSAE,
    JumpReLUSAE,
    MatryoshkaBatchTopKSAE,
    ReluSAE,
    SAE,
    SAEMetadata,
    TopKSAE,
    create_sae,
    load_sae,
)

__version__ = "0.1.0"


def __getattr__(name):
    # transformers is slow to import; load it only when a language model is asked for.
    if name == "load_lm":
        from saeforge.models import load_lm

        return load_lm
    raise AttributeError(f"module 'saeforge' has no attribute {name!r}")


__all__ = [
    "SAE", "ReluSAE", "GatedSAE", "TopKSAE", "GradientTopKSAE", "JumpReLUSAE", "BatchTopKSAE",
    "MatryoshkaBatchTopKSAE", "SAEMetadata", "create_sae", "load_sae", "load_lm",
]
