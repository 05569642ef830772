"""Layer 2: the attention that the model layer's CPU copy of a model runs (``cpu_linear.native_twin``):
transformers' ``"sdpa"`` attention, with SDPA's own grouped-query attention on a CPU, and a decode step's few
queries per row by ``native.cache_attention`` (``torch.ops.fastalign.cache_attention``).

With an attention mask under torch.compile, transformers' SDPA attention copies each key-value head to every
query head of its group (``repeat_kv``) before the kernel; with a static cache that is the cache's whole view, for
every layer and step. On the 82M model of ``bench/bench_engine.py`` at batch 16 (4 key-value heads for 12 query heads,
128 slots) the copies cost more than the step's matrix products. The CPU kernel of
``torch.nn.functional.scaled_dot_product_attention(..., enable_gqa=True)`` reads each shared head where it is and
gives the same bits. Elsewhere (CUDA, where a masked grouped call falls back to the slow math kernel, no mask,
position biases, soft caps) the call is transformers' own.

A decode step asks a handful of queries per row and head of a cache; SDPA's CPU kernel then runs two small matrix
products per row and head, ~2 us each, which at batch 16 costs several times the reading of the keys and values.
``native.cache_attention`` (one pass over each key-value head for all the queries of its group) runs the 82M
model's attention at 16 rows over 128 columns 2.4x faster than SDPA (``bench/results/cache_attention_cpu.md``,
``bench/bench_cache_attention.py``); it runs where ``native.cache_attention_ok``
says (one torch thread, fp32, at most ``native.CACHE_ATTENTION_MAX_QUERIES`` queries), as an op that
torch.compile calls as one kernel.

Only text models of the families in ``MODEL_TYPES`` switch: a few modeling files compare the implementation's
name with ``"sdpa"`` (to skip a mask, or to pick a mask's kind), and a multimodal model's towers have their own
implementations; those models keep transformers' attention.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from . import native

# The name registered in transformers' AttentionInterface. (It contains "sdpa": transformers then checks, as for
# its own "sdpa", that torch's SDPA is available.)
NAME = "fastalign_grouped_sdpa"
# Model types whose modeling code reads the implementation only through the interfaces (no comparison with "sdpa")
# and that have no sub-models: checked against transformers 5.25's modeling files.
MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "smollm3",
                         "olmo2", "granite"})


cache_attention_op = native.cache_attention_op  # ``native.cache_attention`` as a torch op


def grouped_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                 is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """An attention function of transformers' interface: ``query [B, H, T, D]``, ``key``/``value [B, Hkv, S, D]``
    (``H`` a multiple of ``Hkv``), ``attention_mask [B, 1, T, S]`` (bool, or additive float) -> ``([B, T, H, D],
    None)``, as ``sdpa_attention_forward`` returns it: a few queries by ``native.cache_attention``, more grouped
    in place on a CPU with a mask, else that function."""
    plain = (dropout == 0.0 and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
             and not kwargs.get("output_attentions", False) and getattr(module, "sliding_window", None) is None)
    # (the op checks the rest at each call, where a traced model cannot: the extension, one torch thread)
    if plain and attention_mask is not None and native.cache_attention_fits(query, key, value, attention_mask):
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        return cache_attention_op(query, key, value, attention_mask, scale), None
    grouped = (query.device.type == "cpu" and attention_mask is not None
               and getattr(module, "num_key_value_groups", 1) > 1 and key.shape[1] != query.shape[1]
               and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
               and not kwargs.get("output_attentions", False))
    if not grouped:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           dropout_p=dropout, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, grouped_sdpa)
AttentionMaskInterface.register(NAME, sdpa_mask)  # the masks transformers makes for "sdpa"


def use_grouped_sdpa(model: torch.nn.Module) -> bool:
    """Switch ``model`` (a transformers model of ``MODEL_TYPES`` whose config is not shared with another's) from
    ``"sdpa"`` to ``grouped_sdpa``; True when it did. Other implementations (eager, flash, a kernel) and other
    models stay as they are."""
    config = getattr(model, "config", None)
    if (getattr(config, "_attn_implementation", None) != "sdpa"
            or getattr(config, "model_type", None) not in MODEL_TYPES or getattr(config, "sub_configs", None)
            or not hasattr(model, "set_attn_implementation")):
        return False
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, ImportError):  # a model that cannot switch: it runs as it is
        return False
    return config._attn_implementation == NAME
