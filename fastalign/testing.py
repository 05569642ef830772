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


def tilted_next_probs(target, draft, ref, tokens: list[int], temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, lam: float = 1.0, max_log_ratio: float | None = None,
                      ratio_inf: float = 20.0) -> torch.Tensor:
    """``trunc(pi)`` after ``tokens`` (full recompute, fp64): ``pi = normalize(p * (q_r / q) ** lam)`` from the
    *untruncated* tempered target, draft and ref, then top-k / top-p on the tilted logits (docs/design.md section 1).
    Where exactly one of ``q_r``, ``q`` is zero the log-ratio is ``+-ratio_inf`` (or ``+-max_log_ratio``). [V]"""
    from fastalign.kernels import truncate_logits

    p, q_r, q = (next_token_probs(m, tokens, temperature) for m in (target, draft, ref))
    r = ratio_inf if max_log_ratio is None else max_log_ratio
    d = torch.where((q_r > 0) & (q > 0), q_r.log() - q.log(),
                    torch.where(q_r > 0, r, torch.where(q > 0, -r, 0.0)).double())
    if max_log_ratio is not None:
        d = d.clamp(-max_log_ratio, max_log_ratio)
    s = p.log() + lam * d
    return torch.softmax(truncate_logits(s, 1.0, top_k, top_p).double(), dim=-1)


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


def tv_threshold(law, n: int, quantile: float = 0.995, simulations: int = 2000, seed: int = 0) -> float:
    """The ``quantile`` of ``TV(law, empirical law of n draws from it)``, by simulation: the sampling noise a law
    test at sample size ``n`` must tolerate (a correct sampler exceeds it with probability ``1 - quantile``).

    ``law``: {outcome: probability} or a probability vector.
    """
    probs = torch.tensor(list(law.values()) if isinstance(law, dict) else law, dtype=torch.float64).flatten()
    probs = probs / probs.sum()
    gen = torch.Generator().manual_seed(seed)
    counts = _multinomial_counts(probs, n, simulations, gen)
    tv = 0.5 * (counts / n - probs).abs().sum(-1)
    # outcomes of probability 0 never appear, so the sum over the law's support is the whole TV
    return float(torch.quantile(tv, quantile))


def _multinomial_counts(probs: torch.Tensor, n: int, simulations: int, gen) -> torch.Tensor:
    """``[simulations, len(probs)]`` multinomial counts of ``n`` draws (sequential binomials, seeded)."""
    counts = torch.zeros(simulations, len(probs), dtype=torch.float64)
    left = torch.full((simulations,), float(n), dtype=torch.float64)
    mass = 1.0
    for i, p in enumerate(probs.tolist()):
        if i == len(probs) - 1 or mass <= 0:
            counts[:, i] = left
            break
        share = min(max(p / mass, 0.0), 1.0)
        c = torch.binomial(left, torch.full_like(left, share), generator=gen)
        counts[:, i] = c
        left = left - c
        mass -= p
    return counts


def law_of(tokens: torch.Tensor, size: int) -> torch.Tensor:
    """Empirical law ``[size]`` of the integer ``tokens`` (1-D)."""
    return torch.bincount(tokens.flatten().long(), minlength=size).double() / max(tokens.numel(), 1)


def tiny_tokenizer(vocab_size: int = 64):
    """A word-level tokenizer over the words ``w0 .. w{V-1}`` (``w{V-1}`` is EOS), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w0",
                                   eos_token=f"w{vocab_size - 1}")
