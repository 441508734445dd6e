"""Bootstrap confidence intervals over held-out contexts (METHODS.md, "Metrics": "give bootstrap CIs over held-out
contexts").

The resampling unit is the context, not the position: positions of one context share their text and are
correlated, so resampling positions would give intervals that are too narrow. Every loss-based metric is a
function of per-context means (clean, spliced and ablated CE; KL); every context of an evaluation set has the same
number of predicted positions, so the mean of per-context means is the mean over positions. All metrics of one SAE
are computed on the same context resample (one `scipy.stats.bootstrap` call, paired), so the interval of a ratio
such as loss recovered accounts for the correlation of its numerator and denominator.
"""

from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
from scipy import stats

from saeforge.evaluation.metrics import loss_added, loss_recovered

# Row key -> the per-context array (row["per_context"][key]) it is computed from.
PER_CONTEXT_KEYS = {"ce_clean": "ce_clean", "ce_spliced": "ce_spliced", "kl_div": "kl",
                    "ce_zero_ablation": "ce_zero_ablation", "ce_mean_ablation": "ce_mean_ablation"}


def loss_metrics(means: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The loss-based metrics from mean CEs and KL (floats, or arrays of resamples):
    delta_ce = CE_spliced - CE_clean; kl_div; l_added (paper B); loss_recovered_<kind> for each ablation present."""
    out = {"delta_ce": means["ce_spliced"] - means["ce_clean"], "kl_div": means["kl"],
           "l_added": loss_added(means["ce_clean"], means["ce_spliced"])}
    for kind in ("zero", "mean"):
        if f"ce_{kind}_ablation" in means:
            out[f"loss_recovered_{kind}"] = loss_recovered(means["ce_clean"], means["ce_spliced"],
                                                           means[f"ce_{kind}_ablation"])
    return out


def context_bootstrap_ci(per_context: dict[str, np.ndarray],
                         statistic: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], *,
                         level: float = 0.95, resamples: int = 2000, seed: int = 0) -> dict[str, list[float]]:
    """BCa intervals for each output of statistic(means over contexts), all from one paired resample of contexts.

    per_context: name -> [n_contexts] array (all of the same length). statistic: the dict of means (arrays of
    resamples) -> a dict of metrics. Returns metric -> [lo, hi]. Where BCa is undefined (a metric constant over
    contexts: its jackknife has no spread) the percentile interval of the same resamples is used, which is then
    [value, value]."""
    keys = list(per_context)
    data = tuple(np.asarray(per_context[k], dtype=np.float64) for k in keys)
    if len({d.shape for d in data}) != 1 or data[0].ndim != 1:
        raise ValueError(f"per-context arrays must be 1-D and of one length; got {[d.shape for d in data]}")
    names = list(statistic({k: d[:1] for k, d in zip(keys, data)}))
    if data[0].size < 2:  # one context: nothing to resample
        return {name: [float("nan"), float("nan")] for name in names}

    def stacked(*samples, axis):
        metrics = statistic({k: s.mean(axis=axis) for k, s in zip(keys, samples)})
        return np.stack([np.asarray(metrics[n], dtype=np.float64) for n in names])

    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        result = stats.bootstrap(data, stacked, paired=True, vectorized=True, n_resamples=resamples,
                                 confidence_level=level, method="BCa", rng=np.random.default_rng(seed))
        low, high = np.atleast_1d(result.confidence_interval.low), np.atleast_1d(result.confidence_interval.high)
        out = {}
        for i, name in enumerate(names):
            lo, hi = float(low[i]), float(high[i])
            if not (np.isfinite(lo) and np.isfinite(hi)):
                draws = result.bootstrap_distribution[i]
                draws = draws[np.isfinite(draws)]
                lo, hi = ((float(np.quantile(draws, (1 - level) / 2)), float(np.quantile(draws, (1 + level) / 2)))
                          if draws.size else (float("nan"), float("nan")))
            out[name] = [lo, hi]
    return out


def loss_metric_cis(per_context: dict[str, list[float]], *, level: float = 0.95, resamples: int = 2000,
                    seed: int = 0) -> dict[str, list[float]]:
    """`<metric>_ci: [lo, hi]` for every loss-based metric of one evaluated SAE (see loss_metrics)."""
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in per_context.items() if k in PER_CONTEXT_KEYS.values()}
    cis = context_bootstrap_ci(arrays, loss_metrics, level=level, resamples=resamples, seed=seed)
    return {f"{name}_ci": ci for name, ci in cis.items()}
