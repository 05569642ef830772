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
                   init_range: float = 0.02, dtype=torch.float32):
    """A tiny causal LM of the given architecture with random weights (deterministic in ``seed``).

    A larger ``init_range`` gives peakier next-token distributions (useful for distribution tests).
    """
    torch.manual_seed(seed)
    eos = vocab_size - 1 if eos_token_id is None else eos_token_id
    common = dict(vocab_size=vocab_size, eos_token_id=eos, bos_token_id=0, pad_token_id=0,
                  initializer_range=init_range)
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


# ------------------------------------------------------------------ exact laws of tiny models
def next_token_probs(model, tokens: list[int], temperature: float = 1.0, top_k: int | None = None,
                     top_p: float | None = None) -> torch.Tensor:
    """The truncated tempered next-token distribution of ``model`` after ``tokens`` (full recompute). [V] fp64."""
    from fastalign.kernels import truncate_logits

    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0, -1].float()
    return torch.softmax(truncate_logits(logits, temperature, top_k, top_p).double(), dim=-1)


def enumerate_law(next_probs, prompt: list[int], max_new_tokens: int, eos_ids) -> dict[tuple, float]:
    """Exact law of responses under per-token distributions ``next_probs(prefix) -> [V]``.

    A response ends at an EOS token (kept) or at ``max_new_tokens`` tokens. Returns {response: probability}.
    """
    law: dict[tuple, float] = {}

    def walk(response: tuple, prob: float):
        probs = next_probs(list(prompt) + list(response))
        for tok in torch.nonzero(probs > 0).flatten().tolist():
            p = prob * float(probs[tok])
            y = response + (tok,)
            if tok in eos_ids or len(y) == max_new_tokens:
                law[y] = law.get(y, 0.0) + p
            else:
                walk(y, p)

    walk((), 1.0)
    return law


def empirical_law(sequences) -> dict[tuple, float]:
    """Frequencies of the given responses. {response: frequency}."""
    law: dict[tuple, float] = {}
    for s in sequences:
        law[tuple(s)] = law.get(tuple(s), 0.0) + 1.0 / len(sequences)
    return law


def total_variation(p: dict, q: dict) -> float:
    """Total-variation distance between two laws given as {outcome: probability}."""
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


def tiny_tokenizer(vocab_size: int = 64):
    """A word-level tokenizer over the words ``w0 .. w{V-1}`` (``w{V-1}`` is EOS), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w0",
                                   eos_token=f"w{vocab_size - 1}")


def hf_greedy(model, prompts: list[list[int]], max_new_tokens: int, pad_token_id: int, stop_ids) -> list[list[int]]:
    """Greedy responses of Hugging Face ``generate`` for token-id prompts, as one left-padded batch; each response
    is cut after its first token in ``stop_ids`` (kept), like fastalign's sequences."""
    width = max(len(p) for p in prompts)
    tokens = torch.tensor([[pad_token_id] * (width - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(tokens.to(model.device), attention_mask=mask.to(model.device), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad_token_id, eos_token_id=sorted(stop_ids))
    responses = []
    for row in out[:, width:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))
        responses.append(row[:end])
    return responses
