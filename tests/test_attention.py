"""The attention of the model layer's CPU copy (fastalign.models.attention): SDPA's grouped-query attention in
place of transformers' copies of the key-value heads, the same bits; a few queries per row by the native cache
attention (csrc/attention.cpp, fastalign.models.native.cache_attention) against SDPA."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from fastalign.models import attention, cpu_linear, native

F = torch.nn.functional


class Grouped(torch.nn.Module):
    """What transformers' attention functions read from the attention module."""

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def heads(B=3, H=6, Hkv=2, T=4, S=9, D=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=gen)
    k, v = torch.randn(B, Hkv, S, D, generator=gen), torch.randn(B, Hkv, S, D, generator=gen)
    visible = torch.rand(B, 1, T, S, generator=gen) > 0.3
    visible[..., 0] = True  # every query sees a slot
    return q, k, v, visible


def spy_on_the_fallback(monkeypatch) -> list[int]:
    """Query lengths of the calls ``grouped_sdpa`` hands to transformers' own function."""
    calls = []
    real = attention.sdpa_attention_forward
    monkeypatch.setattr(attention, "sdpa_attention_forward",
                        lambda *a, **kw: calls.append(a[1].shape[2]) or real(*a, **kw))
    return calls


@pytest.fixture
def no_cache_loop():
    """Where the cache loop does not run: its query limit 0, for the ops' Python and C++ kernels alike."""
    previous = native.set_loop_limits(cache_attention_queries=0)
    yield
    native.set_loop_limits(*previous)


def copied_heads(x, groups):  # transformers' repeat_kv: query head h reads key-value head h // groups
    return x.repeat_interleave(groups, dim=1)


@pytest.mark.parametrize("T", [1, 4, 5])
@pytest.mark.parametrize("additive", [False, True])
def test_grouped_attention_is_sdpa_over_copied_heads_bit_for_bit(T, additive, monkeypatch, no_cache_loop):
    q, k, v, visible = heads(T=T)
    mask = visible if not additive else torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)
    fallback = spy_on_the_fallback(monkeypatch)
    out, weights = attention.grouped_sdpa(Grouped(3), q, k, v, mask, scaling=0.3)
    assert fallback == []  # the grouped call itself
    expected = F.scaled_dot_product_attention(q, copied_heads(k, 3), copied_heads(v, 3), attn_mask=mask, scale=0.3)
    assert weights is None and out.shape == (3, T, 6, 8)
    assert torch.equal(out, expected.transpose(1, 2))
    if T > 1:  # transformers' own function copies the heads here: the same bits
        theirs, _ = sdpa_attention_forward(Grouped(3), q, k, v, mask, scaling=0.3)
        assert torch.equal(out, theirs)
    # the other plausible grouping (head h reads key-value head h % Hkv) is told apart
    tiled = F.scaled_dot_product_attention(q, k.repeat(1, 3, 1, 1), v.repeat(1, 3, 1, 1), attn_mask=mask, scale=0.3)
    assert not torch.allclose(out, tiled.transpose(1, 2))


def test_without_a_mask_or_groups_it_is_transformers_function(monkeypatch, no_cache_loop):
    q, k, v, visible = heads()
    fallback = spy_on_the_fallback(monkeypatch)
    for args in ((Grouped(3), q, k, v, None), (Grouped(1), q, torch.cat([k] * 3, 1), torch.cat([v] * 3, 1), visible)):
        ours, _ = attention.grouped_sdpa(*args)
        theirs, _ = sdpa_attention_forward(*args)
        assert torch.equal(ours, theirs)  # (no mask: causal, as transformers decides)
    assert fallback == [4, 4]


# ---------------------------------------------------------------------------------------------- cache attention
requires_cache_loop = pytest.mark.skipif(
    not (native.native_available() and getattr(native._C, "has_cache_attention", False)),
    reason="fastalign._C is not built here or this CPU has no AVX2")


def cache_heads(B=3, H=6, Hkv=2, T=1, S=37, D=20, seed=0, mask="bool"):
    """A query made as a model makes it (a transposed view), keys and values as views of a cache with spare
    columns, and a mask of ``mask``'s kind ("bool", "additive", "shared" across rows, or None)."""
    q, k, v, visible = heads(B, H, Hkv, T, S, D, seed)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, H, T, D] with the strides of [B, T, H, D]
    cache = torch.randn(2, B, Hkv, S + 3, D)
    cache[0, :, :, :S], cache[1, :, :, :S] = k, v
    k, v = cache[0, :, :, :S], cache[1, :, :, :S]
    if mask == "additive":
        visible = torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)
    elif mask == "shared":
        visible = visible[:1, :, :1]
    return q, k, v, (None if mask is None else visible)


@requires_cache_loop
@pytest.mark.parametrize("T,mask", [(1, "bool"), (1, "additive"), (1, "shared"), (2, None), (3, "additive"),
                                    (4, "bool")])
@pytest.mark.parametrize("D", [8, 20, 64])
def test_cache_attention_is_attention(T, mask, D, one_thread_native_on):
    q, k, v, m = cache_heads(T=T, D=D, mask=mask)
    assert native.cache_attention_ok(q, k, v, m)
    out = native.cache_attention(q, k, v, m, 0.3)
    expected = F.scaled_dot_product_attention(q, copied_heads(k, 3), copied_heads(v, 3), attn_mask=m, scale=0.3)
    assert out.shape == (3, T, 6, D) and out.is_contiguous()
    torch.testing.assert_close(out, expected.transpose(1, 2), rtol=1e-5, atol=2e-6)
    # the plausible wrong variants are told apart: the other grouping, the mask ignored, the scale ignored
    tiled = F.scaled_dot_product_attention(q, k.repeat(1, 3, 1, 1), v.repeat(1, 3, 1, 1), attn_mask=m, scale=0.3)
    wrong = [tiled, F.scaled_dot_product_attention(q, copied_heads(k, 3), copied_heads(v, 3), attn_mask=m)]
    if m is not None:
        wrong.append(F.scaled_dot_product_attention(q, copied_heads(k, 3), copied_heads(v, 3), scale=0.3))
    for variant in wrong:
        assert not torch.allclose(out, variant.transpose(1, 2), atol=1e-4)


@requires_cache_loop
@pytest.mark.parametrize("B,T,S,D,mask", [(2, 3, 19, 16, "shared"), (2, 2, 11, 8, "rows"), (1, 1, 1, 1, "bool"),
                                          (2, 2, 3, 7, "additive"), (1, 4, 5, 1, None)])
def test_cache_attention_shapes_and_broadcast_masks(B, T, S, D, mask, one_thread_native_on):
    """Masks shared by the rows and the queries of a block, a mask per row shared by its queries; one column,
    a partial group of four keys, heads narrower than a vector."""
    q, k, v, m = cache_heads(B=B, T=T, S=S, D=D, mask="bool" if mask == "rows" else mask)
    if mask == "rows":
        m = m[:, :, :1]
    assert native.cache_attention_ok(q, k, v, m)
    expected = F.scaled_dot_product_attention(q, copied_heads(k, 3), copied_heads(v, 3), attn_mask=m, scale=0.3)
    torch.testing.assert_close(native.cache_attention(q, k, v, m, 0.3), expected.transpose(1, 2),
                               rtol=1e-5, atol=2e-6)


@requires_cache_loop
def test_cache_attention_weights_over_exps_whole_range(one_thread_native_on):
    """Scores spread over [-87, 0] below the largest (every weight exp's polynomial makes, down to the smallest
    normal float), against float64: the weights stay within a few float roundings."""
    S = 256
    q = torch.ones(1, 3, 1, 1)
    k = torch.cat([torch.zeros(1), -torch.linspace(0.01, 87.2, S - 1)]).view(1, 1, S, 1)
    v = torch.rand(1, 1, S, 1, generator=torch.Generator().manual_seed(0)) + 0.5
    out = native.cache_attention(q, k, v, None, 1.0)
    weights = torch.softmax(k.double().view(S), 0)
    want = (weights * v.double().view(S)).sum()
    assert abs(out[0, 0, 0, 0].double() - want) < 4e-7 * want
    torch.testing.assert_close(out.view(3), want.float().expand(3), rtol=4e-7, atol=0)
    # each weight: one column of values at a time
    for s in (1, 40, 120, 200, 254):
        one = torch.zeros_like(v)
        one[0, 0, s] = 1.0
        got = native.cache_attention(q, k, one, None, 1.0)[0, 0, 0, 0].double()
        assert abs(got - weights[s]) <= 3 * 2**-23 * weights[s], s


@requires_cache_loop
@pytest.mark.parametrize("mask", ["bool", "additive"])
def test_cache_attention_masked_columns_and_other_rows_change_no_bit(mask, one_thread_native_on):
    """A wider view of the cache (more columns, masked, holding other values) and the other rows of the batch
    change no bit of a row's result."""
    q, k, v, m = cache_heads(B=4, T=2, S=37, D=24, mask=mask)
    out = native.cache_attention(q, k, v, m, 0.3)
    extra = torch.randn(2, 4, 2, 27, 24)
    wider = torch.cat([m, torch.zeros(4, 1, 2, 27, dtype=m.dtype).fill_(False if mask == "bool" else
                                                                        torch.finfo(torch.float32).min)], 3)
    assert torch.equal(native.cache_attention(q, torch.cat([k, extra[0]], 2), torch.cat([v, extra[1]], 2), wider,
                                              0.3), out)
    for b in range(4):
        alone = native.cache_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], m[b:b + 1], 0.3)
        assert torch.equal(alone, out[b:b + 1])


@requires_cache_loop
def test_cache_attention_edges(one_thread_native_on):
    """A query that sees nothing gets zeros; a non-finite key it sees spreads; beyond the loop's reach (more
    queries, two threads) the result is SDPA's."""
    q, k, v, m = cache_heads(T=1)
    m = m.clone()
    m[1] = False
    out = native.cache_attention(q, k, v, m, 0.3)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and out[0].abs().sum() > 0
    k = k.clone()
    k[0, 0, 0] = float("nan")  # slot 0 is seen by every query (heads())
    out = native.cache_attention(q, k, v, m, 0.3)
    assert out[0, :, :3].isnan().all() and not out[0, :, 3:].isnan().any()  # key-value head 0: query heads 0-2
    q, k, v, m = cache_heads(T=native.CACHE_ATTENTION_MAX_QUERIES + 1)
    assert not native.cache_attention_ok(q, k, v, m)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.3, enable_gqa=True).transpose(1, 2)
    assert torch.equal(native.cache_attention(q, k, v, m, 0.3), sdpa)
    q, k, v, m = cache_heads(T=1)
    torch.set_num_threads(2)
    assert not native.cache_attention_ok(q, k, v, m)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.3, enable_gqa=True).transpose(1, 2)
    assert torch.equal(native.cache_attention(q, k, v, m, 0.3), sdpa)


@requires_cache_loop
def test_a_few_queries_go_to_the_cache_loop_as_one_op_also_compiled(one_thread_native_on, monkeypatch):
    """``grouped_sdpa`` hands a few queries with a mask to the op (also without groups), and the op compiles."""
    calls = []
    real = attention.cache_attention_op
    monkeypatch.setattr(attention, "cache_attention_op", lambda *a: calls.append(a[0].shape[2]) or real(*a))
    fallback = spy_on_the_fallback(monkeypatch)
    q, k, v, m = cache_heads(T=1)
    out, _ = attention.grouped_sdpa(Grouped(3), q, k, v, m, scaling=0.3)
    assert torch.equal(out, native.cache_attention(q, k, v, m, 0.3))
    attention.grouped_sdpa(Grouped(1), q, copied_heads(k, 3), copied_heads(v, 3), m, scaling=0.3)
    q5, k5, v5, m5 = cache_heads(T=native.CACHE_ATTENTION_MAX_QUERIES + 1)
    attention.grouped_sdpa(Grouped(3), q5, k5, v5, m5, scaling=0.3)  # grouped SDPA
    assert calls == [1, 1] and fallback == []
    compiled = torch.compile(lambda *a: real(*a, 0.3), dynamic=False, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, m), out, rtol=0, atol=0)
    # a traced model's attention: the op in the graph, the loop at the call
    monkeypatch.undo()
    start = native.loop_runs()["attention"]
    traced = torch.compile(lambda *a: attention.grouped_sdpa(Grouped(3), *a, scaling=0.3)[0], dynamic=False,
                           fullgraph=True)
    torch.testing.assert_close(traced(q, k, v, m), out, rtol=0, atol=0)
    assert native.loop_runs()["attention"] - start == {1: 1}  # one run of the loop, of one query


@pytest.mark.skipif(not native.native_linear_supported(), reason="no native loop here: no CPU copy of the model")
def test_the_cpu_copy_runs_grouped_attention_and_the_model_keeps_its_own(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.delenv("FASTALIGN_NATIVE", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(hidden_size=256, intermediate_size=512, num_attention_heads=8,
                                             num_key_value_heads=2, num_hidden_layers=2, vocab_size=300)).eval()
        twin = cpu_linear.native_twin(model)
        ran = []
        real = attention.grouped_sdpa
        monkeypatch.setitem(attention.AttentionInterface._global_mapping, attention.NAME,
                            lambda *a, **kw: ran.append(a[1].shape) or real(*a, **kw))
        fallback = spy_on_the_fallback(monkeypatch)
        assert twin is not model and model.config._attn_implementation == "sdpa"
        assert twin.config._attn_implementation == attention.NAME
        ids = torch.randint(0, 300, (3, 7), generator=torch.Generator().manual_seed(1))
        padding = torch.ones(3, 7, dtype=torch.long)
        padding[0, :3] = 0  # a left-padded row: a mask reaches the attention
        with torch.no_grad():
            theirs = model(ids, attention_mask=padding).logits
            assert ran == []
            ours = twin(ids, attention_mask=padding).logits
        assert len(ran) == 2 and fallback == []  # one grouped call per layer, through the copy's implementation
        assert torch.allclose(ours[padding.bool()], theirs[padding.bool()], atol=1e-5)
    finally:
        torch.set_num_threads(threads)


def test_models_outside_the_known_families_keep_transformers_attention():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=64, num_attention_heads=4,
                                         num_key_value_heads=2, num_hidden_layers=1, vocab_size=50))
    model.config.model_type = "gemma4"  # a family whose modeling code compares the name with "sdpa"
    assert not attention.use_grouped_sdpa(model) and model.config._attn_implementation == "sdpa"
    model.config.model_type = "llama"
    model.config._attn_implementation = "eager"
    assert not attention.use_grouped_sdpa(model) and model.config._attn_implementation == "eager"
    model.config._attn_implementation = "sdpa"
    assert attention.use_grouped_sdpa(model) and model.config._attn_implementation == attention.NAME
