"""Save random-initialised Llama-style models of realistic size for the GPU end-to-end benchmarks.

The GPU machine cannot download weights, so the benchmarks that take model paths (``bench_cards.py``) get
these: a ~1B-parameter causal LM (hidden 2048, 16 layers, vocab 32000) and a ~0.3B reward model (hidden 1024,
16 layers), both with the toy world's word-level tokenizer (its ids are a subset of the vocabulary). Random
weights make the timings realistic (the same shapes and FLOPs), not the rewards.

    python bench/gpu/make_models.py /tmp/fastalign_models
"""

import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from fastalign.eval.toyworld import build_tokenizer


def main(out: str) -> None:
    out = Path(out)
    tokenizer = build_tokenizer()
    common = dict(vocab_size=32000, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    target = LlamaForCausalLM(LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                                          num_attention_heads=16, num_key_value_heads=4, **common))
    reward = LlamaForSequenceClassification(LlamaConfig(hidden_size=1024, intermediate_size=2816,
                                                        num_hidden_layers=16, num_attention_heads=16,
                                                        num_key_value_heads=4, num_labels=1, **common))
    for name, model in (("target", target), ("reward", reward)):
        model.to(torch.bfloat16).save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
        print(name, sum(p.numel() for p in model.parameters()) / 1e6, "M parameters ->", out / name)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/fastalign_models")
