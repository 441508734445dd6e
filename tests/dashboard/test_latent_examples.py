"""The streaming collector against a brute-force pass over every context at once, on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from saeforge import create_sae
from saeforge.data import training_mask
from saeforge.evaluation.latent_examples import (
    HIST_BINS_PER_DECADE,
    HIST_LOG10_RANGE,
    LatentExamples,
    LatentExamplesError,
    collect_latent_examples,
)
from saeforge.models import tiny_lm

SITE = "blocks.1.resid_post"
WINDOW = (3, 2)


def _contexts(n: int, length: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    contexts = torch.randint(4, 260, (n, length), generator=gen)
    contexts[:, 0] = 1  # BOS
    return contexts


def _sparse_relu(d_in: int = 64, d_sae: int = 48) -> torch.nn.Module:
    """A ReLU SAE whose encoder biases fall from 0 to very negative: latents from frequent to rare to dead."""
    torch.manual_seed(1)
    sae = create_sae("relu", d_in=d_in, d_sae=d_sae)
    with torch.no_grad():
        sae.b_enc.copy_(-torch.linspace(0, 4.5, d_sae))
        sae.b_enc[-3:] = -1e4
    return sae


def _brute_force(lm, sae, contexts, *, max_norm=None):
    """Features [n, S, M] of every context in one pass (0 where not counted), the counted mask, and the gradient
    projection grad . d_i [n, S, M] for SAEs that read the gradient."""
    if sae.needs_grad:
        acts, grads = lm.capture(contexts, [SITE], grad=True)
        x, g = acts[SITE].float(), grads[SITE].float()
    else:
        x, g = lm.capture(contexts, [SITE])[SITE].float(), None
    keep = training_mask(contexts, lm.bos_token_id, lm.pad_token_id)
    if max_norm is not None:
        keep &= x.norm(dim=-1) <= max_norm
    with torch.no_grad():
        f = (sae.encode(x, grad=g) if sae.needs_grad else sae.encode(x)) * keep[..., None]
    return f, keep, None if g is None else g @ sae.W_dec.detach().T


def _window(row: torch.Tensor, position: int, fill) -> list:
    left, right = WINDOW
    return [row[p].item() if 0 <= p < row.shape[0] else fill for p in range(position - left, position + right + 1)]


def test_top_contexts_histogram_and_density_equal_a_brute_force_pass(tiny_lm):
    contexts = _contexts(13, 20)
    sae = _sparse_relu()
    norms = tiny_lm.capture(contexts, [SITE])[SITE].float().norm(dim=-1)[:, 1:]
    max_norm = float(norms.quantile(0.9))  # the top tenth of positions are outliers this SAE was not trained on
    sae.meta.max_input_norm = max_norm
    top_n = 5
    ex = collect_latent_examples(tiny_lm, sae, contexts, site=SITE, top_n=top_n, window=WINDOW, batch_size=4)
    f, keep, _ = _brute_force(tiny_lm, sae, contexts, max_norm=max_norm)

    assert ex.info["n_tokens"] == int(keep.sum()) < contexts.numel() - contexts.shape[0]
    assert ex.info["n_contexts"] == 13
    assert torch.equal(ex.firing_counts, (f > 0).sum((0, 1)))
    torch.testing.assert_close(ex.max_activation, f.amax((0, 1)), rtol=1e-5, atol=1e-6)
    assert ex.dead() == torch.nonzero((f > 0).sum((0, 1)) == 0).flatten().tolist()
    assert len(ex.dead()) >= 3 and len(ex.dead()) < sae.d_sae - 10
    # The histogram: log10 bins of every non-zero activation.
    values = f[f > 0]
    latent = torch.nonzero(f > 0)[:, 2]
    bins = ((values.log10() - HIST_LOG10_RANGE[0]) * HIST_BINS_PER_DECADE).floor().long().clamp(0, ex.histogram.shape[1] - 1)
    expected = torch.zeros_like(ex.histogram)
    expected.index_put_((latent, bins), torch.ones_like(bins), accumulate=True)
    assert torch.equal(ex.histogram, expected)

    peak, peak_at = f.max(dim=1)  # [n, M]: each context's highest activation of each latent, and where
    rare_seen = False
    for m in range(sae.d_sae):
        firing = torch.nonzero(peak[:, m] > 0).flatten()
        order = firing[peak[firing, m].argsort(descending=True)][:top_n].tolist()
        shown = ex.top.slot(m)
        assert [int(e["context"]) for e in shown] == order, m
        rare_seen |= 0 < len(order) < top_n
        for e, c in zip(shown, order):
            p = int(peak_at[c, m])
            assert int(e["position"]) == p
            assert float(e["value"]) == pytest.approx(float(peak[c, m]), rel=1e-5, abs=1e-6)
            assert e["tokens"].tolist() == _window(contexts[c], p, -1)
            torch.testing.assert_close(e["acts"], torch.tensor(_window(f[c, :, m], p, 0.0)), rtol=1e-5, atol=1e-6)
    assert rare_seen  # some latents fire in fewer contexts than top_n: they show only those


def _band_of(value: float, maximum: float, n_bands: int) -> int:
    return min(n_bands - 1, max(0, math.ceil(value / maximum * n_bands) - 1))


@pytest.mark.parametrize("batch_size", [40, 3])
def test_band_samples_lie_in_their_band_of_the_final_max(tiny_lm, batch_size):
    """One batch: each band holds min(band_size, members) distinct members. Streaming in small batches: every kept
    example is still a member of its band under the final max, and its window is the brute-force one."""
    contexts = _contexts(40, 12, seed=2)
    sae = _sparse_relu()
    n_bands, band_size = 3, 4
    ex = collect_latent_examples(tiny_lm, sae, contexts, site=SITE, n_bands=n_bands, band_size=band_size,
                                 window=WINDOW, batch_size=batch_size, seed=5)
    f, _, _ = _brute_force(tiny_lm, sae, contexts)
    peak, peak_at = f.max(dim=1)
    filled = 0
    for m in range(sae.d_sae):
        maximum = float(f[..., m].max())
        members = [[] for _ in range(n_bands)]
        for c in torch.nonzero(peak[:, m] > 0).flatten().tolist():
            members[_band_of(float(peak[c, m]), maximum, n_bands)].append(c)
        for b in range(n_bands):
            shown = ex.bands.slot((m, b))
            chosen = [int(e["context"]) for e in shown]
            assert len(set(chosen)) == len(chosen) and set(chosen) <= set(members[b]), (m, b)
            if batch_size >= len(contexts):
                assert len(chosen) == min(band_size, len(members[b])), (m, b)
            for e, c in zip(shown, chosen):
                assert int(e["position"]) == int(peak_at[c, m])
                # float32 products of another batch shape (and other CPU kernels) than the brute-force pass
                torch.testing.assert_close(e["acts"], torch.tensor(_window(f[c, :, m], int(e["position"]), 0.0)),
                                           rtol=1e-4, atol=1e-5)
            filled += len(chosen)
    assert filled > sae.d_sae  # the bands are not trivially empty


def test_random_band_samples_depend_on_the_seed(tiny_lm):
    contexts = _contexts(40, 12, seed=2)
    sae = _sparse_relu()
    runs = [collect_latent_examples(tiny_lm, sae, contexts, site=SITE, band_size=2, batch_size=40, seed=s)
            for s in (0, 0, 1)]
    assert torch.equal(runs[0].bands.context, runs[1].bands.context)
    assert not torch.equal(runs[0].bands.context, runs[2].bands.context)


def test_gradient_sae_examples_carry_the_gradient_attribution(tiny_lm):
    contexts = _contexts(9, 16, seed=3)
    torch.manual_seed(2)
    sae = create_sae("gradient_topk", d_in=64, d_sae=32, k=3, beta=10.0)
    ex = collect_latent_examples(tiny_lm, sae, contexts, site=SITE, top_n=4, window=WINDOW, batch_size=4)
    f, _, grad_proj = _brute_force(tiny_lm, sae, contexts)
    assert ex.info["attribution"] and ex.top.attribution is not None
    checked = 0
    for m in range(sae.d_sae):
        for e in ex.top.slot(m):
            c, p = int(e["context"]), int(e["position"])
            assert float(e["value"]) == pytest.approx(float(f[c, :, m].max()), rel=1e-5)
            # f_i (d_i . grad L) on each token of the window
            expected = torch.tensor(_window(f[c, :, m] * grad_proj[c, :, m], p, 0.0))
            torch.testing.assert_close(e["attribution"], expected, rtol=1e-4,
                                       atol=1e-3 * float(expected.abs().max()))  # another batch's float32 backward
            checked += int((expected != 0).sum())
    assert checked > 20


def test_neighbours_and_output_tokens(tiny_lm):
    sae = _sparse_relu()
    ex = collect_latent_examples(tiny_lm, sae, _contexts(4, 12), site=SITE, n_neighbours=5, n_output_tokens=7)
    W = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=1, keepdim=True)
    cos = W @ W.T
    cos.fill_diagonal_(-2)
    assert torch.equal(ex.neighbours, cos.topk(5, dim=1).indices)
    torch.testing.assert_close(ex.neighbour_cosines, cos.topk(5, dim=1).values)
    logits = tiny_lm.direction_logits(sae.W_dec.detach())
    assert torch.equal(ex.promoted, logits.topk(7, dim=1).indices)
    assert torch.equal(ex.suppressed, (-logits).topk(7, dim=1).indices)
    assert set(ex.promoted.flatten().tolist()) <= set(ex.token_strings)
    # At a site outside the residual stream a decoder direction has no direct effect on the logits.
    mlp = create_sae("relu", d_in=tiny_lm.site_dim("blocks.1.mlp_post"), d_sae=16)
    assert collect_latent_examples(tiny_lm, mlp, _contexts(2, 8), site="blocks.1.mlp_post").promoted is None


@pytest.mark.parametrize("family", ["gemma3", "gpt2"])
def test_direction_logits_read_through_the_final_norm(family):
    """RMSNorm (Gemma: gain 1 + w) scales d by its gain; LayerNorm centres d, then scales by its gain (its bias
    cancels). Either way each row is a positive multiple of W_U^T applied to that."""
    lm = tiny_lm(family, seed=4)
    gen = torch.Generator().manual_seed(0)
    norm = lm.model.base_model.norm if family == "gemma3" else lm.model.base_model.ln_f
    with torch.no_grad():
        norm.weight.copy_(torch.rand(norm.weight.shape, generator=gen) * 2)
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_(torch.randn(norm.bias.shape, generator=gen))
    d = torch.randn(6, lm.d_model, generator=gen)
    gain = 1 + norm.weight if family == "gemma3" else norm.weight
    through = (d if family == "gemma3" else d - d.mean(1, keepdim=True)) * gain
    expected = through @ lm.unembed()
    got = lm.direction_logits(d)
    ratio = got.norm(dim=1) / expected.norm(dim=1)
    torch.testing.assert_close(got, expected * ratio[:, None], rtol=1e-4, atol=1e-5)
    assert (ratio > 0).all()


def test_save_and_load_round_trip_and_refuse_a_broken_file(tiny_lm, tmp_path):
    torch.manual_seed(3)
    sae = create_sae("gradient_topk", d_in=64, d_sae=40, k=3)
    ex = collect_latent_examples(tiny_lm, sae, _contexts(5, 12), site=SITE, top_n=3)
    ex.save(tmp_path / "ex")
    back = LatentExamples.load(tmp_path / "ex")
    assert back.info == ex.info and back.token_strings == ex.token_strings
    for name in ("firing_counts", "max_activation", "histogram", "neighbours", "neighbour_cosines", "promoted",
                 "promoted_logits", "suppressed", "suppressed_logits"):
        assert torch.equal(getattr(back, name), getattr(ex, name)), name
    for part in ("top", "bands"):
        for name, t in getattr(ex, part).tensors().items():
            assert torch.equal(getattr(getattr(back, part), name), t), (part, name)
    tensors = tmp_path / "ex" / "latent_examples.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:100])
    with pytest.raises(LatentExamplesError, match="latent_examples.safetensors"):
        LatentExamples.load(tmp_path / "ex")
    with pytest.raises(LatentExamplesError, match="no saved latent examples"):
        LatentExamples.load(tmp_path / "nothing")


def test_bad_input_is_one_clear_error(tiny_lm):
    contexts = _contexts(2, 8)
    with pytest.raises(LatentExamplesError, match="d_in = 32.*width 64"):
        collect_latent_examples(tiny_lm, create_sae("relu", d_in=32, d_sae=8), contexts, site=SITE)
    with pytest.raises(LatentExamplesError, match="top_n"):
        collect_latent_examples(tiny_lm, _sparse_relu(), contexts, site=SITE, top_n=0)
    broken = tiny_lm_with_nan()
    with pytest.raises(LatentExamplesError, match="non-finite activations"):
        collect_latent_examples(broken, _sparse_relu(), contexts, site=SITE)


def tiny_lm_with_nan():
    lm = tiny_lm("gemma3", seed=7)
    with torch.no_grad():
        lm.model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    return lm
