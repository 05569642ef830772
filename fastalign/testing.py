"""Tiny randomly initialised models for tests and examples (built locally, never downloaded)."""

from __future__ import annotations

import torch
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    OPTConfig,
    OPTForCausalLM,
)

ARCHITECTURES = ("llama", "gpt2", "opt")


def tiny_causal_lm(arch: str = "llama", vocab_size: int = 64, seed: int = 0, hidden: int = 32,
                   layers: int = 2, heads: int = 4, context: int = 128, eos_token_id: int | None = None,
                   dtype=torch.float32):
    """A tiny causal LM of the given architecture with random weights (deterministic in ``seed``)."""
    torch.manual_seed(seed)
    eos = vocab_size - 1 if eos_token_id is None else eos_token_id
    common = dict(vocab_size=vocab_size, eos_token_id=eos, bos_token_id=0, pad_token_id=0)
    if arch == "llama":
        cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                          max_position_embeddings=context, **common)
        model = LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=context, **common)
        model = GPT2LMHeadModel(cfg)
    elif arch == "opt":
        cfg = OPTConfig(hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, max_position_embeddings=context,
                        word_embed_proj_dim=hidden, **common)
        model = OPTForCausalLM(cfg)
    else:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHITECTURES}")
    return model.to(dtype).eval()


def tiny_reward_model(arch: str = "llama", vocab_size: int = 64, seed: int = 1, hidden: int = 32,
                      layers: int = 2, heads: int = 4, context: int = 128):
    """A tiny sequence-classification model with one output (a reward), random weights."""
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, num_labels=1, pad_token_id=0)
    if arch == "llama":
        cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=heads,
                          max_position_embeddings=context, **common)
        model = LlamaForSequenceClassification(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=context, **common)
        model = GPT2ForSequenceClassification(cfg)
    else:
        raise ValueError(f"unknown reward architecture {arch!r}")
    return model.eval()
