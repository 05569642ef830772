"""The attention of the model layer's CPU copy (fastalign.models.attention): SDPA's grouped-query attention in
place of transformers' copies of the key-value heads, the same bits."""

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


def copied_heads(x, groups):  # transformers' repeat_kv: query head h reads key-value head h // groups
    return x.repeat_interleave(groups, dim=1)


@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("additive", [False, True])
def test_grouped_attention_is_sdpa_over_copied_heads_bit_for_bit(T, additive, monkeypatch):
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


def test_without_a_mask_or_groups_it_is_transformers_function(monkeypatch):
    q, k, v, visible = heads()
    fallback = spy_on_the_fallback(monkeypatch)
    for args in ((Grouped(3), q, k, v, None), (Grouped(1), q, torch.cat([k] * 3, 1), torch.cat([v] * 3, 1), visible)):
        ours, _ = attention.grouped_sdpa(*args)
        theirs, _ = sdpa_attention_forward(*args)
        assert torch.equal(ours, theirs)  # (no mask: causal, as transformers decides)
    assert fallback == [4, 4]


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
