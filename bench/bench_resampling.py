"""The cost of resampling (row copies of the KV cache) per step against a decode step (issue 21).

A random ``LlamaForCausalLM`` of ~110M parameters (hidden 768, 12 layers, 12 heads, MLP 2048, vocabulary
32000, tied embeddings; fp32) holds a batch of ``N`` particles (``--particles``, default 4 and 16) whose caches
hold ``--context`` (256) tokens each: the random prompts are prefilled once. Per store, the eager
``RaggedStore`` and the ``SlotStore`` run uncompiled (``StaticOptions(compile=False)``), it times

* a decode step: ``CausalLM.extend`` of one token per row (the cache grows by one column per call: the
  prompts leave room for every timed call, so the slot store never reallocates);
* a resampling: ``CausalLM.select_rows`` with random ancestors (``N`` draws with replacement, sorted, as
  systematic resampling gives them), a fresh draw per call; the batch size stays ``N``.

Each figure is the minimum over ``--iters`` calls after ``--warmup`` calls (``bench.common.time_fn``,
``stat="min"``: on a shared CPU scheduling only adds time); ``--threads`` (1) torch threads.

    python bench/bench_resampling.py                 # ~1-2 minutes on one CPU thread

Writes ``bench/results/resampling_<device>.json`` and ``.md`` (or under ``--out-dir``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (  # noqa: E402
    DTYPES, command_line, device_info, device_tag, markdown_table, time_fn, write_results,
)
from fastalign.models.causal_lm import CausalLM  # noqa: E402
from fastalign.models.ragged import RaggedStore  # noqa: E402
from fastalign.models.slots import SlotStore, StaticOptions  # noqa: E402

SIZE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
            intermediate_size=2048, vocab_size=32000)
STORES = {"ragged": RaggedStore, "slot (uncompiled)": lambda: SlotStore(StaticOptions(compile=False))}


def build_model(device, dtype, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SIZE, max_position_embeddings=4096, tie_word_embeddings=True, eos_token_id=None,
                      bos_token_id=None, pad_token_id=0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    return model


def measure(model, store, n: int, args, g: torch.Generator) -> dict:
    """Milliseconds of one decode step and one resampling of ``n`` rows with ``args.context`` cached tokens."""
    lm = CausalLM(model, store())
    prompts = torch.randint(0, SIZE["vocab_size"], (n, args.context), generator=g).tolist()
    lm.prefill(prompts, max_new_tokens=args.warmup + args.iters + 8)
    token = torch.randint(0, SIZE["vocab_size"], (n, 1), generator=g).to(args.device)
    decode_ms = time_fn(lambda: lm.extend(token), args.device, args.warmup, args.iters, stat="min")

    def resample():
        ancestors = torch.randint(0, n, (n,), generator=g).sort().values
        lm.select_rows(ancestors.to(args.device))

    resample_ms = time_fn(resample, args.device, args.warmup, args.iters, stat="min")
    layer_bytes = 2 * n * SIZE["num_key_value_heads"] * (SIZE["hidden_size"] // SIZE["num_attention_heads"]) \
        * lm.live.shape[1] * torch.finfo(args.dtype).bits // 8
    return {"decode_ms": decode_ms, "resample_ms": resample_ms, "ratio": resample_ms / decode_ms,
            "cache_columns": int(lm.live.shape[1]), "kv_mb": layer_bytes * SIZE["num_hidden_layers"] / 2**20}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--particles", default="4,16", help="comma-separated batch sizes N")
    p.add_argument("--context", type=int, default=256, help="cached tokens per row")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=None, help="folder for the results (default: bench/results)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.device, args.dtype = torch.device(args.device), DTYPES[args.dtype]
    model = build_model(args.device, args.dtype, args.seed)
    params = sum(t.numel() for t in model.parameters())
    info = device_info(args.device)
    g = torch.Generator().manual_seed(args.seed)
    rows = []
    with torch.no_grad():
        for n in [int(x) for x in args.particles.split(",")]:
            for name, store in STORES.items():
                r = measure(model, store, n, args, g)
                rows.append({"particles": n, "store": name, **r})
                print(f"N={n:3d} {name:18s} decode {r['decode_ms']:8.2f} ms  resample {r['resample_ms']:7.3f} ms"
                      f"  ratio {r['ratio']:.4f}", flush=True)
    payload = {"command": command_line(), "device": info, "params": params, "size": SIZE,
               "context": args.context, "threads": args.threads, "dtype": str(args.dtype),
               "warmup": args.warmup, "iters": args.iters, "load_avg": os.getloadavg(), "rows": rows}
    table = markdown_table(
        ["N", "store", "decode step (ms)", "resampling (ms)", "resampling / decode", "KV cache (MiB)"],
        [[r["particles"], r["store"], f"{r['decode_ms']:.2f}", f"{r['resample_ms']:.3f}", f"{r['ratio']:.4f}",
          f"{r['kv_mb']:.1f}"] for r in rows])
    md = (f"# Resampling (row copies) against a decode step\n\n"
          f"`{payload['command']}`\n\n"
          f"Device: {info['name']} ({info['device_type']}), {args.threads} torch thread(s), torch {info['torch']}; "
          f"load average {payload['load_avg'][0]:.2f} at the end.\n\n"
          f"Model: random LlamaForCausalLM, {params / 1e6:.1f}M parameters (hidden 768, 12 layers, vocabulary "
          f"32000), {args.dtype}; {args.context} cached tokens per row. Minimum of {args.iters} calls after "
          f"{args.warmup} warm-up calls. A decode step is `CausalLM.extend` of one token per row; a resampling "
          f"is `CausalLM.select_rows` with N sorted random ancestors (drawn with replacement).\n\n" + table
          + "\nA resampling moves every layer's keys and values of the N rows once: the ragged store gathers them "
          "into new tensors, the slot store gathers and writes them back into its preallocated buffers (two "
          "passes over the cache). A decode step reads the weights once for the batch and each row's cache "
          "once, so the ratio depends on N and on the context. The CPU is shared: repeated runs vary by up to "
          "~1.7x (the load average above).\n")
    json_path, md_path = write_results(f"resampling_{device_tag(info)}", payload, md, args.out_dir)
    print(md)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
