"""Splicing into a tiny real model: loss recovered is 1 for an identity "SAE" and 0 for the ablation itself."""

from __future__ import annotations

import pytest
import torch
from stand_ins import AffineMap, random_contexts

from saeforge import create_sae
from saeforge.config import EvalConfig
from saeforge.evaluation import evaluate_saes
from saeforge.evaluation.splice import baseline_losses, splice_mask
from saeforge.models import tiny_lm
from saeforge.models.splice import CleanDistribution

SITE = "blocks.1.resid_post"


@pytest.fixture(scope="module")
def lm():
    return tiny_lm("gemma3", seed=0)


@pytest.fixture(scope="module")
def contexts(lm):
    return random_contexts(lm, 6, 12, seed=0)


def test_identity_recovers_all_and_ablations_recover_nothing(lm, contexts):
    d = lm.site_dim(SITE)
    eye = torch.eye(d)
    identity = AffineMap(eye, eye, torch.zeros(d))
    zero = AffineMap(torch.zeros(d, d), eye, torch.zeros(d))
    mean = AffineMap(torch.zeros(d, d), eye, torch.zeros(d))
    base = baseline_losses(lm, SITE, list(contexts.split(4)))
    mean.b_dec = base.stats.mean.clone()
    rows = evaluate_saes(lm, [identity, zero, mean], SITE, contexts, batch_size=4, analyses=False, progress=False)
    ident, z, m = rows
    # float32 CE agrees to about 1e-6 relative whatever the CPU's kernels and summation order; loss recovered
    # divides such a difference by the ablation's CE gap, so its tolerance is that relative error over the gap.
    gap = min(abs(base.ce_ablated[kind] - base.ce_clean) for kind in ("zero", "mean"))
    tol = 1e-5 * base.ce_clean / gap
    assert ident["ce_spliced"] == pytest.approx(base.ce_clean, rel=1e-5)
    assert ident["loss_recovered_zero"] == pytest.approx(1.0, abs=tol)
    assert ident["loss_recovered_mean"] == pytest.approx(1.0, abs=tol)
    assert ident["kl_div"] == pytest.approx(0.0, abs=1e-5)
    assert ident["l_added"] == pytest.approx(0.0, abs=1e-5)
    assert ident["gamma"] == pytest.approx(1.0) and ident["fvu"] == pytest.approx(0.0, abs=1e-6)
    assert z["loss_recovered_zero"] == pytest.approx(0.0, abs=tol)
    assert m["loss_recovered_mean"] == pytest.approx(0.0, abs=tol)
    # The ablations change this random model's loss, so the 0 and 1 above are not an accident of equal losses.
    assert abs(base.ce_ablated["zero"] - base.ce_clean) > 1e-3
    assert abs(base.ce_ablated["mean"] - base.ce_clean) > 1e-3
    # Every non-BOS position was scored.
    assert ident["eval_tokens"] == int(splice_mask(lm, contexts).sum()) == contexts.numel() - contexts.shape[0]


def test_clean_loss_matches_the_models_own_loss(lm, contexts):
    base = baseline_losses(lm, SITE, list(contexts.split(4)))
    with torch.no_grad():  # the full logits of the model's own forward pass, scored in one call
        logits = lm.forward(contexts)[:, :-1].flatten(0, 1).float()
        expected = torch.nn.functional.cross_entropy(logits, contexts[:, 1:].flatten()).item()
    assert base.ce_clean == pytest.approx(expected, rel=1e-5)


class ForwardCounter:
    """Counts the full forward passes of a real model, to the logits or to the loss (capture passes are not
    counted)."""

    METHODS = ("forward", "next_token_loss")

    def __init__(self, lm):
        self.lm, self.calls = lm, 0

    def __enter__(self):
        for name in self.METHODS:
            original = getattr(self.lm, name)

            def counted(*args, _original=original, **kwargs):
                self.calls += 1
                return _original(*args, **kwargs)

            setattr(self.lm, name, counted)
        return self

    def __exit__(self, *exc):
        for name in self.METHODS:
            delattr(self.lm, name)


def test_baselines_are_cached_per_model_site_and_tokens(lm, contexts):
    batches = list(contexts.split(4))  # two batches
    with ForwardCounter(lm) as count:
        first = baseline_losses(lm, "blocks.2.resid_post", batches)
    assert count.calls == 2 * 3  # clean, zero- and mean-ablated
    with ForwardCounter(lm) as count:
        again = baseline_losses(lm, "blocks.2.resid_post", batches)
    assert count.calls == 0 and again == first
    with ForwardCounter(lm) as count:
        baseline_losses(lm, "blocks.0.resid_post", batches)
        other = contexts.clone()
        other[:, -1] = (other[:, -1] + 1) % lm.vocab_size
        baseline_losses(lm, "blocks.2.resid_post", list(other.split(4)))
    assert count.calls == 2 * 2 * 3


def test_evaluation_shares_clean_and_ablated_passes_between_saes(lm, contexts):
    d = lm.site_dim("blocks.0.mlp_out")
    torch.manual_seed(0)
    saes = [create_sae("relu", d_in=d, d_sae=2 * d) for _ in range(3)]
    kwargs = dict(batch_size=3, analyses=False, progress=False)
    with ForwardCounter(lm) as count:
        evaluate_saes(lm, saes, "blocks.0.mlp_out", contexts, **kwargs)
    n_ranks = len([rank for rank in EvalConfig().pca_ranks if rank <= d])
    assert n_ranks >= 2
    # per batch: 2 ablations, 1 clean (acts and KL), 1 per SAE, 1 per PCA rank
    assert count.calls == 2 * (2 + 1 + 3 + n_ranks)
    with ForwardCounter(lm) as count:
        evaluate_saes(lm, saes[:1], "blocks.0.mlp_out", contexts, **kwargs)
    assert count.calls == 2 * (1 + 1)  # the ablations and the PCA reference come from the cache


def test_real_saes_report_every_metric_and_bad_width_is_refused(lm, contexts):
    d = lm.site_dim(SITE)
    torch.manual_seed(0)
    saes = [create_sae("relu", d_in=d, d_sae=4 * d), create_sae("topk", d_in=d, d_sae=4 * d, k=4)]
    rows = evaluate_saes(lm, saes, SITE, contexts, batch_size=3, ito=(2,), progress=False)
    assert [r["architecture"] for r in rows] == ["relu", "topk", "ito:relu", "ito:topk"]
    topk = rows[1]
    assert topk["l0"] <= 4 + 1e-9 and topk["k"] == 4
    for r in rows:
        for key in ("l0", "loss_recovered_zero", "loss_recovered_mean", "kl_div", "l_added", "nmse", "fvu",
                    "cosine", "gamma", "dead_fraction", "dense_fraction"):
            assert isinstance(r[key], float) and r[key] == r[key], (r["name"], key)
    assert all(r["l0"] <= 2 + 1e-9 for r in rows[2:])
    dd = rows[0]["directional_derivative"]
    assert dd["decoder"] > 0 and dd["random"] > 0 and dd["covariance_matched"] > 0
    assert sum(rows[0]["decoder_max_cos"]["counts"]) == 4 * d
    with pytest.raises(ValueError, match="d_in"):
        evaluate_saes(lm, [create_sae("relu", d_in=d + 1, d_sae=8)], SITE, contexts, progress=False)


def test_gradient_topk_gets_site_gradients(lm, contexts):
    d = lm.site_dim(SITE)
    torch.manual_seed(0)
    gsae = create_sae("gradient_topk", d_in=d, d_sae=4 * d, k=3)
    row = evaluate_saes(lm, [gsae], SITE, contexts, batch_size=3, analyses=False, progress=False)[0]
    assert row["architecture"] == "gradient_topk" and 0 < row["l0"] <= 3


def test_ce_and_kl_match_torch_on_random_logits():
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(2, 5, 50, generator=g) * 3
    spliced = clean + torch.randn(2, 5, 50, generator=g)
    tokens = torch.randint(0, 50, (2, 5), generator=g)
    dist = CleanDistribution(clean, tokens)
    ce, kl = dist.ce_and_kl(spliced, tokens)
    targets = tokens[:, 1:].reshape(-1)
    ref_ce = torch.nn.functional.cross_entropy(spliced[:, :-1].reshape(-1, 50), targets, reduction="none")
    lp_c = torch.log_softmax(clean[:, :-1].reshape(-1, 50).double(), -1)
    lp_s = torch.log_softmax(spliced[:, :-1].reshape(-1, 50).double(), -1)
    ref_kl = (lp_c.exp() * (lp_c - lp_s)).sum(-1)
    assert torch.allclose(ce.reshape(-1), ref_ce, atol=1e-5)
    assert torch.allclose(kl.reshape(-1).double(), ref_kl, atol=1e-5)
    assert torch.allclose(dist.ce.reshape(-1), torch.nn.functional.cross_entropy(
        clean[:, :-1].reshape(-1, 50), targets, reduction="none"), atol=1e-5)
    assert torch.allclose(dist.ce_and_kl(clean, tokens)[1], torch.zeros(2, 4), atol=1e-5)
