"""The native linear loop (``fastalign.models.native.linear_rows``, csrc/linear.cpp) against ``F.linear``.

    python bench/bench_linear_rows.py                 # the 82M model's weights, 1..256 rows, one thread

The weights are those of one decode step of the 82M model of the ``100m`` world (12 layers of q/k/v/o and a
gated MLP, hidden 768, intermediate 2048, 4 of 12 heads for keys and values, and the 8192 x 768 output layer):
about 330 MB of fp32, so they stream from memory. Per row count, GB/s of weights read by ``F.linear`` (BLAS)
and by the native loop, with a streaming read (``x.sum()`` over 1 GB) as the limit with a few rows, and the
GFLOP/s of both (what bounds the case of more rows: the dot loop runs up to four rows, the column loop beyond).
The loop runs where it wins (up to
``native.MAX_ROWS_BY_ISA`` rows for its instruction set); this table is the reason for those numbers
(``--isa avx2`` measures the AVX2 loop on a CPU that has AVX-512 too). Where the OS has transparent huge pages,
everything is measured three times: on 4 KiB pages, as torch allocates; on huge pages where each tensor, as
allocated, holds whole ones (``native.collapse_huge_pages``); and moved into one mapping aligned to a huge page in
the order the step reads them, all of it on huge pages (``cpu_linear.into_one_mapping``, what the model layer does
to the weights it turns). Writes ``bench/results/linear_rows_cpu.json`` and ``.md`` (``linear_rows_cpu_<isa>``
for a loop other than the widest).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import torch  # noqa: E402

from bench.common import command_line, device_info, markdown_table, time_fn, write_results  # noqa: E402
from fastalign.models import cpu_linear, native  # noqa: E402

HIDDEN, INTERMEDIATE, LAYERS, VOCAB, KV_FRACTION = 768, 2048, 12, 8192, 4 / 12


def step_weights() -> list[torch.Tensor]:
    """The weight matrices one decode step of the 82M model reads, in the order it reads them."""
    kv = int(HIDDEN * KV_FRACTION)
    layer = [(HIDDEN, HIDDEN), (kv, HIDDEN), (kv, HIDDEN), (HIDDEN, HIDDEN),
             (INTERMEDIATE, HIDDEN), (INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)]
    return [torch.randn(o, i) for o, i in layer * LAYERS + [(VOCAB, HIDDEN)]]


def allocated_pages() -> str:
    """The pages torch's allocations get: 4 KiB, unless transparent huge pages are "always" on (Linux)."""
    return "as allocated (THP always)" if native.huge_page_mode() == "always" else "4 KiB"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8, 16, 32, 64, 128, 256])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--isa", default="", help="the loop's instruction set (avx512f, avx2; default: the widest "
                        "here); another than the widest writes linear_rows_cpu_<isa>")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not native.native_linear_supported():
        sys.exit(f"no native linear loop here: {native.native_info()}")
    cpu = torch.device("cpu")
    weights = step_weights()
    pages = {allocated_pages(): (weights, torch.ones(2**28))}  # the weights and a 1 GiB buffer to stream
    big = torch.ones(2**28)
    if native.collapse_huge_pages(big):
        scattered = step_weights()
        for w in scattered:  # (only whole huge pages inside each tensor)
            native.collapse_huge_pages(w)
        pages["huge, scattered"] = scattered, big
        mapped = step_weights()
        mapping = cpu_linear.into_one_mapping(mapped)
        if mapping is not None:
            native.collapse_huge_pages(mapping)
            pages["huge, one mapping"] = mapped, big
    mb = sum(w.numel() for w in weights) * 4 / 1e6
    stream = {kind: 2**30 / (time_fn(big.sum, cpu, warmup=2, iters=5, stat="min") / 1e3) / 1e9
              for kind, (_, big) in pages.items()}

    isa = args.isa or native.native_info().get("linear_isa")
    max_rows = native.MAX_ROWS_BY_ISA.get(isa, 0)
    rows_out = []
    for rows in args.rows:
        row = dict(rows=rows, used=rows <= max_rows)
        calls = {}  # (kind, what) -> a pass over the step's weights
        for kind, (weights, _) in pages.items():
            xs = [torch.randn(rows, w.shape[1]) for w in weights]
            calls[kind, "blas"] = lambda xs=xs, ws=weights: [torch.nn.functional.linear(x, w) for x, w in zip(xs, ws)]
            # the loop itself, whatever LINEAR_MAX_ROWS says
            calls[kind, "native"] = lambda xs=xs, ws=weights: [native.native_linear(x, w, isa=args.isa)
                                                               for x, w in zip(xs, ws)]
            # the loop alone, layer after layer with nothing between
            calls[kind, "raw"] = native.loop_calls(xs, weights, isa=args.isa)
        # the passes interleaved, repeat by repeat: a drift of the shared machine's speed reaches every kind alike
        best = {key: time_fn(call, cpu, warmup=2, iters=1, stat="min") for key, call in calls.items()}
        for _ in range(args.repeats - 1):
            for key, call in calls.items():
                best[key] = min(best[key], time_fn(call, cpu, warmup=0, iters=1, stat="min"))
        for kind in pages:
            blas, loop, raw = best[kind, "blas"], best[kind, "native"], best[kind, "raw"]
            mflop = 2 * rows * mb / 4  # (mb / 4: millions of weights)
            row[kind] = dict(blas_ms=blas, native_ms=loop, raw_ms=raw, blas_gbps=mb / blas, native_gbps=mb / loop,
                             raw_gbps=mb / raw, blas_gflops=mflop / blas, native_gflops=mflop / loop,
                             raw_gflops=mflop / raw, speedup=blas / loop)
            print(f"rows {rows}, {kind} pages: F.linear {mb / blas:.1f} GB/s {mflop / blas:.1f} GFLOP/s, native "
                  f"{mb / loop:.1f} GB/s {mflop / loop:.1f} GFLOP/s ({blas / loop:.2f}x), back to back "
                  f"{mb / raw:.1f} GB/s", flush=True)
        rows_out.append(row)

    payload = dict(command=command_line(), device=device_info(cpu), threads=args.threads,
                   isa=isa, weights_mb=mb, stream_gbps=stream, pages=list(pages),
                   max_rows=max_rows, results=rows_out)
    widest = native.native_info().get("linear_isa")
    write_results("linear_rows_cpu" + (f"_{isa}" if isa != widest else ""), payload, to_markdown(payload))


def to_markdown(p: dict) -> str:
    kinds = p["pages"]
    header, rows = ["rows"], []
    for kind in kinds:
        header += [f"F.linear GB/s ({kind})", f"native GB/s ({kind})", f"native / F.linear ({kind})",
                   f"back to back GB/s ({kind})", f"back to back of streaming read ({kind})",
                   f"F.linear GFLOP/s ({kind})", f"back to back GFLOP/s ({kind})"]
    for r in p["results"]:
        cells = [r["rows"]]
        for kind in kinds:
            m = r[kind]
            cells += [f"{m['blas_gbps']:.1f}", f"{m['native_gbps']:.1f}", f"{m['speedup']:.2f}x",
                      f"{m['raw_gbps']:.1f}", f"{m['raw_gbps'] / p['stream_gbps'][kind]:.0%}",
                      f"{m['blas_gflops']:.1f}", f"{m['raw_gflops']:.1f}"]
        rows.append(cells + ["yes" if r["used"] else "no"])
    streams = ", ".join(f"{p['stream_gbps'][kind]:.1f} GB/s on {kind} pages" for kind in kinds)
    return (f"# fp32 linear layers of a batch of rows: native loop vs F.linear ({p['threads']} thread(s), "
            f"{p['isa']})\n\n"
            f"`{p['command']}`\n\n"
            f"torch {p['device'].get('torch')}; the 82M model's step weights ({p['weights_mb']:.0f} MB), on the pages "
            f"torch allocates, on huge pages where each tensor holds whole ones, and moved into one mapping on huge "
            f"pages in the step's order (`cpu_linear.into_one_mapping`, as the model layer does; the huge kinds are "
            f"absent where the OS has none); streaming read in this run {streams}; best of the timed passes, the "
            f"kinds interleaved pass by pass. "
            f"native: a call of `native.native_linear` per layer (its checks and Python between layers); back to "
            f"back: the loop alone, layer after layer with nothing between (`native.loop_calls`).\n\n"
            + markdown_table(header + [f"used (rows <= {p['max_rows']}, this loop's limit)"], rows))


if __name__ == "__main__":
    main()
