"""Evaluation of SAEs spliced into their language model: metrics, ITO, steering, paper B's analyses, sweeps."""

from saeforge.evaluation.evaluate import Evaluation, evaluate, evaluate_saes
from saeforge.evaluation.ito import GradientPursuitSAE, gradient_pursuit

__all__ = ["evaluate", "Evaluation", "evaluate_saes", "gradient_pursuit", "GradientPursuitSAE"]
