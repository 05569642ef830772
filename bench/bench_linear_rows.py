"""The native few-row linear loop (``fastalign.models.native.linear_rows``, csrc/linear.cpp) against ``F.linear``.

    python bench/bench_linear_rows.py                 # the 82M model's weights, 1..16 rows, one thread

The weights are those of one decode step of the 82M model of the ``100m`` world (12 layers of q/k/v/o and a
gated MLP, hidden 768, intermediate 2048, 4 of 12 heads for keys and values, and the 8192 x 768 output layer):
about 330 MB of fp32, so they stream from memory. Per row count, GB/s of weights read by ``F.linear`` (BLAS)
and by the native loop, and a streaming read (``x.sum()`` over 1 GB) as the limit. The loop runs where it wins
(``native.LINEAR_MAX_ROWS`` rows); this table is the reason for that number. Writes
``bench/results/linear_rows_cpu.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import torch  # noqa: E402

from bench.common import command_line, device_info, markdown_table, time_fn, write_results  # noqa: E402
from fastalign.models import native  # noqa: E402

HIDDEN, INTERMEDIATE, LAYERS, VOCAB, KV_FRACTION = 768, 2048, 12, 8192, 4 / 12


def step_weights() -> list[torch.Tensor]:
    """The weight matrices one decode step of the 82M model reads, in the order it reads them."""
    kv = int(HIDDEN * KV_FRACTION)
    layer = [(HIDDEN, HIDDEN), (kv, HIDDEN), (kv, HIDDEN), (HIDDEN, HIDDEN),
             (INTERMEDIATE, HIDDEN), (INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)]
    return [torch.randn(o, i) for o, i in layer * LAYERS + [(VOCAB, HIDDEN)]]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8, 16])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not native.native_linear_supported():
        sys.exit(f"no native linear loop here: {native.native_info()}")
    cpu = torch.device("cpu")
    weights = step_weights()
    mb = sum(w.numel() for w in weights) * 4 / 1e6
    big = torch.ones(2**28)  # 1 GiB
    stream = 2**30 / (time_fn(big.sum, cpu, warmup=2, iters=5, stat="min") / 1e3) / 1e9

    rows_out = []
    for rows in args.rows:
        xs = [torch.randn(rows, w.shape[1]) for w in weights]
        blas = time_fn(lambda: [torch.nn.functional.linear(x, w) for x, w in zip(xs, weights)], cpu,
                       warmup=2, iters=args.repeats, stat="min")
        # the loop itself, whatever LINEAR_MAX_ROWS says
        loop = time_fn(lambda: [native.native_linear(x, w) for x, w in zip(xs, weights)], cpu, warmup=2, iters=args.repeats,
                       stat="min")
        rows_out.append(dict(rows=rows, blas_ms=blas, native_ms=loop, blas_gbps=mb / blas, native_gbps=mb / loop,
                             speedup=blas / loop, used=rows <= native.LINEAR_MAX_ROWS))
        print(f"rows {rows}: F.linear {mb / blas:.1f} GB/s, native {mb / loop:.1f} GB/s ({blas / loop:.2f}x)",
              flush=True)

    payload = dict(command=command_line(), device=device_info(cpu), threads=args.threads,
                   isa=native.native_info().get("linear_isa"), weights_mb=mb, stream_gbps=stream,
                   max_rows=native.LINEAR_MAX_ROWS, results=rows_out)
    write_results("linear_rows_cpu", payload, to_markdown(payload))


def to_markdown(p: dict) -> str:
    rows = [[r["rows"], f"{r['blas_gbps']:.1f}", f"{r['native_gbps']:.1f}", f"{r['speedup']:.2f}x",
             f"{r['native_gbps'] / p['stream_gbps']:.0%}", "yes" if r["used"] else "no"] for r in p["results"]]
    return (f"# Few-row fp32 linear layers: native loop vs F.linear ({p['threads']} thread(s), {p['isa']})\n\n"
            f"`{p['command']}`\n\n"
            f"torch {p['device'].get('torch')}; the 82M model's step weights ({p['weights_mb']:.0f} MB); streaming "
            f"read in this run {p['stream_gbps']:.1f} GB/s; best of the timed passes.\n\n"
            + markdown_table(["rows", "F.linear GB/s", "native GB/s", "native / F.linear", "native of streaming read",
                              "used (rows <= LINEAR_MAX_ROWS)"], rows))


if __name__ == "__main__":
    main()
