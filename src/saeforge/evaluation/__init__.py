"""Evaluation of SAEs spliced into their language model: metrics, ITO, steering, paper B's analyses, comparisons.

Adding a metric: a reconstruction metric (from x and x_hat) goes into metrics.ReconstructionStats, which
`evaluate_saes` fills batch by batch; a loss-based one (from per-context CEs or KLs) into bootstrap.loss_metrics,
which also gives it a CI over held-out contexts; either appears in the row of every SAE. To show it in the terminal
table and the CSV, add its key to commands/output.py's TABLE_COLUMNS / CSV_COLUMNS; to plot it against L0,
to viz/pareto.py. Metrics never name an architecture: they see only an SAE's encode/decode."""

from saeforge.evaluation.evaluate import Evaluation, evaluate, evaluate_saes
from saeforge.evaluation.ito import GradientPursuitSAE, gradient_pursuit

__all__ = ["evaluate", "Evaluation", "evaluate_saes", "gradient_pursuit", "GradientPursuitSAE"]
