"""What one call of fastalign's op ``linear_rows`` costs beyond its loop: its C++ kernel against its Python one.

    python bench/bench_op_calls.py            # one thread; each kernel in its own process

A compiled decode step calls ``torch.ops.fastalign.linear_rows`` once per large linear layer (85 times a step on
the 82M model). Here a function calls it ``--calls`` times in a chain on one row of 16 inputs and a 16 x 16
weight, where the loop itself takes a few tens of nanoseconds, so the time per call is the call's overhead: once
compiled as the engine compiles a step (``torch.compile`` with inductor's C++ wrapper), and once eagerly from
Python. Each kernel runs in a process of its own: the C++ one (``fastalign/_torch_ops.so``, the default) and the
Python one (``FASTALIGN_TORCH_OPS=0``, read at import). Writes ``bench/results/op_calls_cpu.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import torch  # noqa: E402

from bench.common import command_line, device_info, markdown_table, time_fn, write_results  # noqa: E402


def measure(calls: int, repeats: int) -> dict:
    """Microseconds per call of the op in this process's kernel, compiled and eager."""
    from fastalign.models import native

    torch.set_num_threads(1)
    x, w = torch.randn(1, 16), torch.randn(16, 16) / 4

    def chain(x):
        for _ in range(calls):
            x = native.linear_rows_op(x, w, None)
        return x

    compiled = torch.compile(chain, dynamic=False, fullgraph=True, options={"cpp_wrapper": True})
    cpu = torch.device("cpu")
    runs = native.loop_runs()["linear"][1]
    assert torch.equal(compiled(x), chain(x))
    assert native.loop_runs()["linear"][1] - runs == 2 * calls or not native.native_linear_supported()
    per_call = {name: time_fn(lambda f=f: f(x), cpu, warmup=20, iters=repeats, stat="min") * 1e3 / calls
                for name, f in (("compiled", compiled), ("eager", chain))}
    return dict(kernels=native.op_kernels, **per_call)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=100, help="op calls per timed function call")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # (the child process)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.calls, args.repeats)))
        return
    results = []
    for switch in ("1", "0"):
        env = dict(os.environ, FASTALIGN_TORCH_OPS=switch, OMP_NUM_THREADS="1")
        done = subprocess.run([sys.executable, __file__, "--measure", "--calls", str(args.calls), "--repeats",
                               str(args.repeats)], env=env, capture_output=True, text=True, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(results[-1], flush=True)
    payload = dict(command=command_line(), device=device_info(torch.device("cpu")), calls=args.calls,
                   results=results)
    write_results("op_calls_cpu", payload, to_markdown(payload))


def to_markdown(p: dict) -> str:
    rows = [[r["kernels"], f"{r['compiled']:.2f}", f"{r['eager']:.2f}"] for r in p["results"]]
    return (f"# One call of fastalign::linear_rows: its C++ kernel against its Python one (1 thread)\n\n"
            f"`{p['command']}`\n\n"
            f"torch {p['device'].get('torch')}; a chain of {p['calls']} calls on one row of 16 inputs and a 16 x 16 "
            f"weight (the loop itself: tens of nanoseconds), best of the timed chains, divided by the calls; each "
            f"kernel in its own process.\n\n"
            + markdown_table(["kernels", "us per call, compiled (C++ wrapper)", "us per call, eager from Python"],
                             rows))


if __name__ == "__main__":
    main()
