"""Tiny randomly initialised models of each supported family, with an in-memory byte-level tokenizer (for tests)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from .lm import LanguageModel

TINY_FAMILIES = ("gemma", "gemma2", "gemma3", "llama", "qwen2", "mistral", "gpt2", "gpt_neox")

_SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD, BOS, EOS = 0, 1, 2


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer without merges: one token per UTF-8 byte, so it encodes any text; adds BOS like Gemma's."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(list(_SPECIALS) + alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", BOS)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def _config(family: str, vocab_size: int):
    import transformers as tf

    ids = dict(vocab_size=vocab_size, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    llama_like = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, **ids,
    )
    gemma = dict(llama_like, head_dim=16)
    if family == "llama":
        return tf.LlamaConfig(**llama_like, tie_word_embeddings=False)
    if family == "qwen2":
        return tf.Qwen2Config(**llama_like, tie_word_embeddings=False)
    if family == "mistral":
        return tf.MistralConfig(**llama_like, sliding_window=16)
    if family == "gemma":
        return tf.GemmaConfig(**gemma)
    if family == "gemma2":
        return tf.Gemma2Config(
            **gemma, sliding_window=8, query_pre_attn_scalar=16, attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
        )
    if family == "gemma3":
        return tf.Gemma3TextConfig(
            **gemma, sliding_window=8, query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        )
    if family == "gpt2":
        return tf.GPT2Config(n_embd=64, n_layer=3, n_head=4, n_positions=256, **ids)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=256, rotary_pct=0.25, use_parallel_residual=True, **ids,
        )
    raise ValueError(f"unknown tiny model family {family!r}; choose one of {list(TINY_FAMILIES)}")


def tiny_lm(family: str = "gemma3", seed: int = 0) -> LanguageModel:
    """A 3-block, d_model=64 randomly initialised model of `family` with a byte-level tokenizer. No download."""
    tokenizer = byte_tokenizer()
    config = _config(family, vocab_size=len(tokenizer))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.requires_grad_(False)
    return LanguageModel(model, tokenizer, name=f"tiny-{family}-seed{seed}")
