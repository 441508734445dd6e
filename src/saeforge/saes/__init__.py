"""SAE architectures, one file each, on the base in `base.py`. `create_sae(name, ...)` and `load_sae(dir)`."""

from saeforge.saes.base import REGISTRY, SAE, SAELoadError, SAELoss, architecture_class, create_sae, load_sae
from saeforge.saes.relu import ReluSAE
from saeforge.saes.gated import GatedSAE
from saeforge.saes.topk import TopKSAE
from saeforge.saes.gradient_topk import GradientTopKSAE
from saeforge.saes.jumprelu import JumpReLUSAE
from saeforge.saes.batchtopk import BatchTopKSAE
from saeforge.saes.matryoshka import MatryoshkaBatchTopKSAE

__all__ = ["REGISTRY", "architecture_class", "SAE", "SAELoadError", "SAELoss", "create_sae", "load_sae", "ReluSAE", "GatedSAE", "TopKSAE",
           "GradientTopKSAE", "JumpReLUSAE", "BatchTopKSAE", "MatryoshkaBatchTopKSAE"]
