"""The real embedded model: Gemma 3 270M from the bundled GGUF, via the converted cache (converted on first use)."""

from __future__ import annotations

import pytest
import torch

from saeforge.models import EMBEDDED_NAME, load_lm

SENTENCES = [
    "The Eiffel Tower is a wrought-iron lattice tower in Paris, France.",
    "Photosynthesis converts light energy into chemical energy.",
]


@pytest.mark.slow
def test_embedded_model_captures_a_real_batch():
    lm = load_lm("embedded", dtype=torch.bfloat16)
    assert (lm.family, lm.n_layers, lm.d_model, lm.vocab_size) == ("gemma3", 18, 640, 262144)
    assert lm.name == EMBEDDED_NAME
    assert lm.site_dim("blocks.9.attn_z") == 4 * 256 and lm.site_dim("blocks.9.mlp_post") == 2048
    lm.tokenizer.padding_side = "right"
    enc = lm.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    tokens, mask = enc.input_ids, enc.attention_mask
    assert (tokens[:, 0] == lm.bos_token_id).all()

    acts, grads = lm.capture(tokens, ["blocks.9.resid_post"], attention_mask=mask, grad=True)
    x, g = acts["blocks.9.resid_post"], grads["blocks.9.resid_post"]
    assert x.shape == g.shape == (*tokens.shape, 640)
    assert torch.isfinite(x).all() and torch.isfinite(g).all()
    with torch.no_grad():
        hidden = lm.model(**enc, output_hidden_states=True).hidden_states[10]
    real = mask.bool()
    assert torch.equal(x[real], hidden[real])
    assert (g[~real] == 0).all() and g[real].abs().sum() > 0

    # A trained model, not noise: English text is far more predictable than uniform over 262k tokens (12.5 nats).
    loss = lm.next_token_loss(tokens, attention_mask=mask)
    valid = (mask[:, :-1] * mask[:, 1:]).bool()
    assert loss[valid].mean() < 5.0
