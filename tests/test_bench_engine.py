"""The byte and FLOP accounting of ``bench/bench_engine.py`` (its limit columns), on a tiny Llama with counts
worked out by hand: the timings themselves are not tested."""

import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench_engine import (  # noqa: E402
    add_fractions, attention_flops, kv_bytes, matmul_params, sample_work, weight_bytes_per_step,
)

# hidden 16, 4 heads of 4, 2 KV heads, 2 layers, MLP 24, vocabulary 32. Per layer: q and o 16x16 = 256 each,
# k and v 16x8 = 128 each, gate, up, down 16x24 = 384 each: 1920 matrix parameters, two norms of 16.
LAYER_MATRICES, LAYER_NORMS, FINAL_NORM, TABLE = 1920, 32, 16, 32 * 16


def tiny(tied: bool, dtype=torch.float32):
    cfg = LlamaConfig(hidden_size=16, intermediate_size=24, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=32, tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).to(dtype)


def test_tied_embeddings_count_once_as_the_output_layer():
    m = tiny(tied=True)
    assert sum(p.numel() for p in m.parameters()) == 2 * (LAYER_MATRICES + LAYER_NORMS) + FINAL_NORM + TABLE
    # The shared table is read whole by the output layer at every step, whatever the batch.
    for rows in (1, 16):
        assert weight_bytes_per_step(m, rows) == 4 * (2 * (LAYER_MATRICES + LAYER_NORMS) + FINAL_NORM + TABLE)
    assert matmul_params(m) == 2 * LAYER_MATRICES + TABLE


def test_untied_input_table_counts_one_row_per_row():
    m = tiny(tied=False)
    # lm_head (32x16) read whole; the input table only at the rows' tokens: 16 floats each.
    body = 2 * (LAYER_MATRICES + LAYER_NORMS) + FINAL_NORM + TABLE
    assert weight_bytes_per_step(m, 1) == 4 * (body + 16)
    assert weight_bytes_per_step(m, 3) == 4 * (body + 3 * 16)
    assert matmul_params(m) == 2 * LAYER_MATRICES + TABLE  # lm_head; not the lookup


def test_kv_and_attention_at_a_context_length():
    m = tiny(tied=True)
    # keys and values: 2 layers x 2 KV heads x head_dim 4 x 10 positions, twice (k, v), 4 bytes
    assert kv_bytes(m, 10) == 2 * 2 * 2 * 4 * 10 * 4
    # scores and weighted values: 2 FLOPs per multiply-add each, 2 layers x 4 query heads x head_dim 4 x 10
    assert attention_flops(m, 10) == 4 * 2 * 4 * 4 * 10
    assert kv_bytes(tiny(tied=True, dtype=torch.bfloat16), 10) == kv_bytes(m, 10) / 2


def test_sample_work_per_token():
    m = tiny(tied=True)
    weights = 4 * (2 * (LAYER_MATRICES + LAYER_NORMS) + FINAL_NORM + TABLE)
    w = sample_work(m, rows=2, prompt_len=5, new_tokens=9)
    assert w["mean_length"] == 9  # 5 + (9 - 1) / 2
    assert w["bytes_per_token"] == weights / 2 + 2 * 2 * 2 * 4 * 9 * 4
    assert w["flops_per_token"] == 2 * (2 * LAYER_MATRICES + TABLE) + 4 * 2 * 4 * 4 * 9


def test_fractions_of_the_limits():
    case = {"compiled": {"tokens_per_s": 50.0}, "eager": {"tokens_per_s": 25.0}, "work": {}}
    work = {"bytes_per_token": 2e8, "flops_per_token": 1e9}
    limits = {"bandwidth_gbps": 20.0, "gemv_gbps": 10.0, "flop_rate_gflops": 100.0}
    add_fractions(case, work, limits, rows=16)
    assert case["compiled"]["bandwidth_fraction"] == pytest.approx(0.5)  # 2e8 B x 50 /s over 20e9 B/s
    assert case["compiled"]["gemv_fraction"] == pytest.approx(1.0)  # 2e8 B x 50 /s over 10e9 B/s
    assert case["compiled"]["flop_fraction"] == pytest.approx(0.5)  # 1e9 x 50 over 100e9
    assert case["eager"]["bandwidth_fraction"] == pytest.approx(0.25)
    single = {"compiled": {"tokens_per_s": 50.0}}
    add_fractions(single, work, limits, rows=1)
    assert "flop_fraction" not in single["compiled"]  # batch 1: bandwidth-bound, no FLOP column
