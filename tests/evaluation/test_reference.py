"""The PCA reference and outlier positions, on a tiny real model."""

from __future__ import annotations

import pytest
import torch
from stand_ins import AffineMap, random_contexts

from saeforge.evaluation import evaluate
from saeforge.evaluation.splice import splice_mask
from saeforge.models import tiny_lm

SITE = "blocks.1.resid_post"


@pytest.fixture(scope="module")
def lm():
    return tiny_lm("gemma3", seed=1)


@pytest.fixture(scope="module")
def contexts(lm):
    return random_contexts(lm, 12, 16, seed=1)


def _site_activations(lm, contexts):
    with torch.no_grad():
        act = lm.capture(contexts, [SITE])[SITE]
    return act, splice_mask(lm, contexts)


def test_pca_reference_splices_the_rank_k_reconstruction(lm, contexts):
    d = lm.site_dim(SITE)
    result = evaluate(lm, [], SITE, contexts, batch_size=4, pca_ranks=(4, 16, d), progress=False)
    ref = {r["rank"]: r for r in result.pca_reference}
    assert sorted(ref) == [4, 16, d] and result.rows == []
    # Full rank reproduces the activations: the clean model's loss, nothing lost.
    assert ref[d]["loss_recovered_mean"] == pytest.approx(1.0, abs=1e-4)
    assert ref[d]["loss_recovered_zero"] == pytest.approx(1.0, abs=1e-4)
    assert ref[d]["kl_div"] == pytest.approx(0.0, abs=1e-5) and ref[d]["fvu"] == pytest.approx(0.0, abs=1e-5)
    # Lower ranks lose more, and carry less of the variance. (KL, not loss recovered, orders them: ablating this
    # random model's site barely changes its loss on random tokens, so loss recovered is noisy between ranks.)
    assert ref[4]["kl_div"] > ref[16]["kl_div"] > 1e-4
    assert ref[4]["loss_recovered_mean"] < 0.9
    assert ref[4]["fvu"] > ref[16]["fvu"] > 1e-3
    assert ref[4]["explained_variance"] < ref[16]["explained_variance"] < ref[d]["explained_variance"]
    assert ref[16]["explained_variance"] == pytest.approx(1 - ref[16]["fvu"], abs=1e-4)  # fitted on this very set
    assert "evaluation set" in ref[16]["fit"] and len(ref[16]["per_context"]["ce_spliced"]) == contexts.shape[0]
    lo, hi = ref[16]["delta_ce_ci"]
    assert lo <= ref[16]["delta_ce"] <= hi

    # The same rank-16 reconstruction built independently (SVD of the centred activations) as an "SAE".
    act, mask = _site_activations(lm, contexts)
    x = act[mask].double()
    mu = x.mean(0)
    U = torch.linalg.svd(x - mu, full_matrices=False).Vh[:16].T.float()
    pca16 = AffineMap(U, U.T.contiguous(), mu.float(), center=mu.float())
    row = evaluate(lm, [pca16], SITE, contexts, batch_size=4, pca_ranks=(), analyses=False, progress=False).rows[0]
    assert row["ce_spliced"] == pytest.approx(ref[16]["ce_spliced"], rel=1e-5)
    assert row["kl_div"] == pytest.approx(ref[16]["kl_div"], rel=1e-3, abs=1e-7)


def test_pca_fitted_on_another_sample_says_so(lm, contexts):
    fit = random_contexts(lm, 8, 16, seed=7)
    own = evaluate(lm, [], SITE, contexts, batch_size=4, pca_ranks=(8,), progress=False).pca_reference[0]
    other = evaluate(lm, [], SITE, contexts, batch_size=4, pca_ranks=(8,), pca_fit_contexts=fit,
                     progress=False).pca_reference[0]
    assert "training-split sample" in other["fit"] and "evaluation set" in own["fit"]
    assert other["fvu"] > own["fvu"]  # directions fitted elsewhere explain this set's variance less well


def test_positions_above_max_input_norm_are_not_spliced(lm, contexts):
    d = lm.site_dim(SITE)
    act, mask = _site_activations(lm, contexts)
    norms = act.float().norm(dim=-1)
    threshold = float(norms[mask].quantile(0.9))
    outliers = int((mask & (norms > threshold)).sum())
    assert outliers > 0
    eye = torch.eye(d)
    zero_sae = AffineMap(torch.zeros(d, d), eye, torch.zeros(d), max_input_norm=threshold)
    plain_zero = AffineMap(torch.zeros(d, d), eye, torch.zeros(d))
    identity = AffineMap(eye, eye, torch.zeros(d), max_input_norm=threshold)
    rows = evaluate(lm, [zero_sae, plain_zero, identity], SITE, contexts, batch_size=4, analyses=False,
                    pca_ranks=(8,), progress=False)
    z, plain, ident = rows.rows
    assert z["eval_excluded_positions"] == ident["eval_excluded_positions"] == outliers
    assert plain["eval_excluded_positions"] == 0 and z["max_input_norm"] == threshold
    assert z["eval_tokens"] == int(mask.sum()) - outliers and plain["eval_tokens"] == int(mask.sum())
    # The zero ablation it is compared with leaves the same outliers in place: the zero "SAE" recovers exactly 0,
    # and its CE differs from zeroing every position.
    assert z["loss_recovered_zero"] == pytest.approx(0.0, abs=1e-5)  # float32 CEs of two separate forward passes
    assert z["ce_zero_ablation"] != pytest.approx(plain["ce_zero_ablation"], rel=1e-4)
    assert ident["loss_recovered_mean"] == pytest.approx(1.0, abs=1e-5)
    # One PCA reference per threshold, each labelled with it.
    assert sorted(r["max_input_norm"] or 0.0 for r in rows.pca_reference) == [0.0, threshold]


def test_a_bad_threshold_is_refused(lm, contexts):
    d = lm.site_dim(SITE)
    eye = torch.eye(d)
    with pytest.raises(ValueError, match="max_input_norm"):
        evaluate(lm, [AffineMap(eye, eye, torch.zeros(d), max_input_norm=float("nan"))], SITE, contexts,
                 progress=False)
