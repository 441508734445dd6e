"""SAE architectures, one file each, on the base in `base.py`. `create_sae(name, ...)` and `load_sae(dir)`.

Adding an architecture touches one file plus its tests: subclass `SAE`, decorate it with `@register("name")`,
declare what the rest of the library asks about it on the class (trainable, sparsity "coefficient" or "k",
dead_latents, adam_betas, needs_grad, needs_lm, saelens_architecture, option_names), implement `encode`, `loss` (the
paper's equations, autograd; `lm_loss` instead for a loss that runs through the LM, as e2e_topk's) and
`latent_params`, and for speed `grads_by_hand` (add cases to tests/saes/test_backward.py; an architecture whose
latents are sparse after the encoder can run the rest of the step on its active set with `active.ActiveEntries`
below the density `sparse_below`: see relu.py, and tests/saes/test_sparse_steps.py).
Config validation, the trainer, sweeps, evaluation, figures and save/load then work through the registry;
tests/evaluation/test_new_architecture.py does exactly this with an architecture defined in a test module. Import
the new file below so that it registers."""

from saeforge.saes.base import REGISTRY, SAE, SAELoadError, SAELoss, architecture_class, create_sae, load_sae
from saeforge.saes.metadata import Normalization, SAEMetadata, TrainingRecord
from saeforge.saes.relu import ReluSAE
from saeforge.saes.gated import GatedSAE
from saeforge.saes.topk import TopKSAE
from saeforge.saes.gradient_topk import GradientTopKSAE
from saeforge.saes.jumprelu import JumpReLUSAE
from saeforge.saes.batchtopk import BatchTopKSAE
from saeforge.saes.matryoshka import MatryoshkaBatchTopKSAE
from saeforge.saes.e2e_topk import E2ETopKSAE

__all__ = ["REGISTRY", "architecture_class", "SAE", "SAELoadError", "SAELoss", "create_sae", "load_sae",
           "SAEMetadata", "TrainingRecord", "Normalization", "ReluSAE", "GatedSAE", "TopKSAE",
           "GradientTopKSAE", "JumpReLUSAE", "BatchTopKSAE", "MatryoshkaBatchTopKSAE", "E2ETopKSAE"]
