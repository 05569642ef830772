"""The native cache attention (``fastalign.models.native.cache_attention``, csrc/attention.cpp) against SDPA.

    python bench/bench_cache_attention.py            # the 82M model's heads, one thread

A decode step's attention: a few queries per row and head (``T``) over ``S`` cached columns, with the 82M model's
heads of the ``100m`` world (12 query heads reading 4 key-value heads of 64), keys and values as views of a
static cache, an added mask hiding a quarter of the columns. Per case, microseconds per call of the native loop
and of ``F.scaled_dot_product_attention(..., enable_gqa=True)`` (what the model layer's CPU copy runs without
the loop), both with the output in the layout the layer reads (``[B, T, H, D]``, contiguous). The loop runs up to
``native.CACHE_ATTENTION_MAX_QUERIES`` queries; this table is the reason for that number. Writes
``bench/results/cache_attention_cpu.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import torch  # noqa: E402

from bench.common import command_line, device_info, markdown_table, time_fn, write_results  # noqa: E402
from fastalign.models import native  # noqa: E402

HEADS, KV_HEADS, HEAD_SIZE = 12, 4, 64


def inputs(rows: int, queries: int, columns: int, seed: int = 0):
    """``query [B, H, T, D]`` (a transposed view, as a model makes it), ``key``/``value [B, Hkv, S, D]`` (views of
    a cache with a spare column) and an added mask ``[B, 1, T, S]`` hiding the last quarter of the columns."""
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(rows, queries, HEADS, HEAD_SIZE, generator=gen).transpose(1, 2)
    cache = torch.randn(2, rows, KV_HEADS, columns + 1, HEAD_SIZE, generator=gen)
    mask = torch.zeros(rows, 1, queries, columns)
    mask[..., 3 * columns // 4:] = torch.finfo(torch.float32).min
    return query, cache[0, :, :, :columns], cache[1, :, :, :columns], mask


def sdpa(query, key, value, mask, scale):
    return torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scale, enable_gqa=True).transpose(1, 2).contiguous()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--queries", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--columns", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the loop's only setting
    cpu = torch.device("cpu")
    probe = inputs(1, 1, 8)
    if not native.cache_attention_ok(*probe):
        sys.exit(f"no native cache attention here: {native.native_info()}")
    scale = HEAD_SIZE ** -0.5
    results = []
    for rows in args.rows:
        for queries in args.queries:
            for columns in args.columns:
                q, k, v, m = inputs(rows, queries, columns)
                ours = time_fn(lambda: native.cache_attention_loop(q, k, v, m, scale), cpu, warmup=10,
                               iters=args.repeats, stat="min") * 1e3
                theirs = time_fn(lambda: sdpa(q, k, v, m, scale), cpu, warmup=10, iters=args.repeats,
                                 stat="min") * 1e3
                err = (native.cache_attention_loop(q, k, v, m, scale) - sdpa(q, k, v, m, scale)).abs().max().item()
                results.append(dict(rows=rows, queries=queries, columns=columns, native_us=ours, sdpa_us=theirs,
                                    speedup=theirs / ours, max_abs_diff=err,
                                    used=queries <= native.CACHE_ATTENTION_MAX_QUERIES))
                print(f"rows {rows}, queries {queries}, columns {columns}: native {ours:.1f} us, SDPA {theirs:.1f} "
                      f"us ({theirs / ours:.2f}x), max |diff| {err:.1e}", flush=True)
    payload = dict(command=command_line(), device=device_info(cpu), heads=HEADS, kv_heads=KV_HEADS,
                   head_size=HEAD_SIZE, max_queries=native.CACHE_ATTENTION_MAX_QUERIES, results=results)
    write_results("cache_attention_cpu", payload, to_markdown(payload))


def to_markdown(p: dict) -> str:
    header = ["rows", "queries", "columns", "native us", "SDPA us", "SDPA / native", "max abs diff",
              f"used (queries <= {p['max_queries']})"]
    rows = [[r["rows"], r["queries"], r["columns"], f"{r['native_us']:.1f}", f"{r['sdpa_us']:.1f}",
             f"{r['speedup']:.2f}x", f"{r['max_abs_diff']:.1e}", "yes" if r["used"] else "no"] for r in p["results"]]
    return (f"# Cache attention of a few queries: native loop vs SDPA (1 thread, {p['heads']} query heads reading "
            f"{p['kv_heads']} key-value heads of {p['head_size']})\n\n"
            f"`{p['command']}`\n\n"
            f"torch {p['device'].get('torch')}; keys and values as views of a static cache, an added mask hiding the "
            f"last quarter of the columns; best of the timed calls, each with the output in the layout the layer "
            f"reads.\n\n" + markdown_table(header, rows))


if __name__ == "__main__":
    main()
