"""Microbenchmark of the fused kernels against the plain PyTorch a researcher would write.

    python bench/bench_kernels.py                    # default grid for the device (small on CPU)
    python bench/bench_kernels.py --ops entropy sample --rows 1 64 --vocab 128256 --dtypes bf16
    python bench/bench_kernels.py --peak-gbps 3350   # fraction of peak for an unlisted GPU

Every op is a ``BenchOp`` in ``OPS``: how to build inputs for ``(rows, vocab, dtype)``, the fused call (the
public ``fastalign.kernels`` function, which dispatches to Triton on CUDA and to the PyTorch reference on CPU
unless ``--backend`` says otherwise), the baseline, and the bytes the op must read at least (the logits,
once). Achieved bandwidth = those bytes / time; on a GPU with a known (or given) peak it is also reported as
a fraction of peak. Ops whose kernels are present are added by ``register_verify_ops``; another op is one
more ``BenchOp`` appended to ``OPS``.

The fused calls run with ``validate=False`` (the finiteness check costs a host sync and several passes over
the logits, more than the kernels read); ``with_check_ms`` reports the default ``validate=True`` call.
Sizes below the L2 cache (a few MB) are partly served from it, so their bandwidth can exceed HBM peak.
Writes ``bench/results/kernels_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import torch  # noqa: E402

from bench.common import (  # noqa: E402
    DTYPES, command_line, device_info, device_tag, env_backend, markdown_table, time_fn, write_results,
)


CPU_GRID = dict(rows=[1, 8], vocab=[4096, 32000], dtypes=["fp32", "bf16"])
GPU_GRID = dict(rows=[1, 8, 64, 256], vocab=[32000, 128256, 152064], dtypes=["fp32", "bf16"])


@dataclass
class BenchOp:
    """One benchmarked op. ``make(R, V, dtype, device, args)`` returns the inputs (a dict) passed to
    ``fused``, ``baseline`` and ``bytes_read``; ``checked`` (optional) is the fused call with validation."""

    name: str
    make: Callable
    fused: Callable
    baseline: Callable
    bytes_read: Callable
    baseline_name: str
    checked: Callable | None = None
    notes: str = ""
    extra: dict = field(default_factory=dict)


def _logits(R, V, dtype, device):
    return (torch.randn(R, V, device=device) * 2.0).to(dtype)


# ---------------------------------------------------------------- entropy


def _entropy_make(R, V, dtype, device, args):
    return {"logits": _logits(R, V, dtype, device), "T": args.temperature}


def _entropy_naive(inp):
    # what research code does: two softmax passes and a full probability tensor
    x = inp["logits"].float() / inp["T"]
    p = torch.softmax(x, dim=-1)
    logp = torch.log_softmax(x, dim=-1)
    return -(p * logp).sum(-1)


def _entropy_ops():
    from fastalign.kernels import entropy

    return BenchOp(
        name="entropy",
        make=_entropy_make,
        fused=lambda i: entropy(i["logits"], i["T"], validate=False),
        checked=lambda i: entropy(i["logits"], i["T"]),
        baseline=_entropy_naive,
        baseline_name="softmax + log_softmax + sum",
        bytes_read=lambda i: i["logits"].numel() * i["logits"].element_size(),
    )


# ---------------------------------------------------------------- sample


def _sample_make(top_k, top_p):
    def make(R, V, dtype, device, args):
        return {"logits": _logits(R, V, dtype, device), "T": args.temperature, "k": top_k, "p": top_p}

    return make


def _sample_naive(inp):
    # the usual HF-style pipeline: scale, top-k filter, sort for top-p, softmax, multinomial
    x = inp["logits"].float() / inp["T"]
    if inp["k"] is not None:
        kth = torch.topk(x, inp["k"], dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if inp["p"] is not None:
        sorted_x, idx = torch.sort(x, dim=-1, descending=True)
        cum = torch.softmax(sorted_x, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_x, dim=-1) >= inp["p"]
        x = x.scatter(-1, idx, sorted_x.masked_fill(drop, float("-inf")))
    return torch.multinomial(torch.softmax(x, dim=-1), 1).squeeze(-1)


def _sample_ops(args):
    from fastalign.kernels import sample

    ops = []
    for name, k, p in [("sample", None, None), (f"sample_k{args.top_k}_p{args.top_p}", args.top_k, args.top_p)]:
        ops.append(BenchOp(
            name=name,
            make=_sample_make(k, p),
            fused=lambda i: sample(i["logits"], i["T"], i["k"], i["p"], seed=1, validate=False),
            checked=lambda i: sample(i["logits"], i["T"], i["k"], i["p"], seed=1),
            baseline=_sample_naive,
            baseline_name="softmax" + (" + topk + sort" if k else "") + " + multinomial",
            bytes_read=lambda i: i["logits"].numel() * i["logits"].element_size(),
            notes="" if k is None else "the fused kernel reads the logits several times (threshold search)",
        ))
    return ops


# ---------------------------------------------------------------- spec_verify / tree_verify (hook)


def _verify_inputs(R, N, V, dtype, device) -> dict:
    """Target/draft/ref logits ``[R, N+1, V]`` of ``dtype``, draft tokens ``[R, N]`` and uniforms ``[R, N]``."""
    def logits():
        return (torch.randn(R, N + 1, V, device=device) * 2).to(dtype)

    return {"t": logits(), "d": logits(), "r": logits(), "tok": torch.randint(V, (R, N), device=device),
            "u": torch.rand(R, N, device=device)}


def _verify_bytes(inp) -> int:
    return sum(inp[k].numel() * inp[k].element_size() for k in ("t", "d", "r"))


def register_verify_ops(args) -> list[BenchOp]:
    """``spec_verify`` / ``tree_verify`` when their modules exist; their baseline is the project's plain
    PyTorch reference (``*_torch``). Rows = batch ``B``; ``K = --draft-tokens`` positions (chain) or a
    complete binary tree of ``--draft-tokens`` nodes."""
    ops = []
    K = args.draft_tokens
    try:
        from fastalign.kernels.spec_verify import spec_verify, spec_verify_torch
    except ImportError:
        spec_verify = None
    if spec_verify is not None:
        def make_chain(R, V, dtype, device, a):
            return _verify_inputs(R, K, V, dtype, device)

        def chain_args(i):
            return (i["t"], i["d"], i["r"], i["tok"], "sss_exact", 1.0, 1.0, i["u"], 3)

        ops.append(BenchOp(
            name=f"spec_verify_sss_K{K}",
            make=make_chain,
            fused=lambda i: spec_verify(*chain_args(i), validate=False),
            checked=lambda i: spec_verify(*chain_args(i)),
            baseline=lambda i: spec_verify_torch(*chain_args(i), validate=False),
            baseline_name="spec_verify_torch (reference)",
            bytes_read=_verify_bytes,
        ))
    try:
        from fastalign.kernels.tree_verify import tree_verify, tree_verify_torch
    except ImportError:
        tree_verify = None
    if tree_verify is not None:
        def make_tree(R, V, dtype, device, a):  # a complete binary tree of K nodes
            parents = torch.tensor([(n - 1) // 2 if n else -1 for n in range(K)], device=device)
            return {**_verify_inputs(R, K, V, dtype, device), "par": parents.expand(R, K).contiguous()}

        def tree_args(i):
            return (i["t"], i["d"], i["r"], i["tok"], i["par"], "sss_exact", 1.0, 1.0, i["u"], 3)

        ops.append(BenchOp(
            name=f"tree_verify_sss_N{K}",
            make=make_tree,
            fused=lambda i: tree_verify(*tree_args(i), validate=False),
            checked=lambda i: tree_verify(*tree_args(i)),
            baseline=lambda i: tree_verify_torch(*tree_args(i), validate=False),
            baseline_name="tree_verify_torch (reference)",
            bytes_read=_verify_bytes,
        ))
    return ops


def build_ops(args) -> list[BenchOp]:
    ops = [_entropy_ops(), *_sample_ops(args), *register_verify_ops(args)]
    if args.ops:
        ops = [op for op in ops if any(op.name.startswith(sel) for sel in args.ops)]
    return ops


# ---------------------------------------------------------------- driver


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ops", nargs="*", default=None,
                    help="op name prefixes (entropy, sample, spec_verify, tree_verify); default all")
    ap.add_argument("--rows", nargs="*", type=int, help="rows (batch); default by device")
    ap.add_argument("--vocab", nargs="*", type=int, help="vocabulary sizes; default by device")
    ap.add_argument("--dtypes", nargs="*", choices=sorted(DTYPES), help="logit dtypes; default fp32 bf16")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--draft-tokens", type=int, default=4, help="K of spec_verify / nodes of tree_verify")
    ap.add_argument("--warmup", type=int, default=None, help="default 10 on GPU, 3 on CPU")
    ap.add_argument("--iters", type=int, default=None, help="default 50 on GPU, 10 on CPU")
    ap.add_argument("--stat", choices=["median", "min"], default=None,
                    help="summary of the timed calls: default median on GPU, min on CPU (shared cores)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default 1 on CPU: on shared cores a multi-threaded op waits for "
                         "descheduled threads, which dominates small timings)")
    ap.add_argument("--backend", choices=["auto", "triton", "torch"], default=None,
                    help="FASTALIGN_KERNELS for the fused calls (auto: Triton on CUDA, reference on CPU)")
    ap.add_argument("--peak-gbps", type=float, default=None,
                    help="peak memory bandwidth in GB/s (default: known value for the GPU, if any)")
    ap.add_argument("--no-check", action="store_true", help="skip timing the validate=True call")
    ap.add_argument("--out-dir", type=Path, default=None, help="default bench/results")
    ap.add_argument("--no-write", action="store_true", help="print only")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.backend is not None:
        os.environ["FASTALIGN_KERNELS"] = args.backend
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    grid = GPU_GRID if on_gpu else CPU_GRID
    rows = args.rows or grid["rows"]
    vocab = args.vocab or grid["vocab"]
    dtypes = args.dtypes or grid["dtypes"]
    warmup = args.warmup if args.warmup is not None else (10 if on_gpu else 3)
    iters = args.iters if args.iters is not None else (50 if on_gpu else 10)
    stat = args.stat or ("median" if on_gpu else "min")
    threads = args.threads or (None if on_gpu else 1)
    if threads:
        torch.set_num_threads(threads)
    info = device_info(device)
    peak = args.peak_gbps or info.get("peak_gbps")
    ops = build_ops(args)

    from fastalign.kernels import use_triton

    results = []
    for op in ops:
        for dt in dtypes:
            for V in vocab:
                for R in rows:
                    torch.manual_seed(0)
                    inp = op.make(R, V, DTYPES[dt], device, args)
                    probe = next(v for v in inp.values() if isinstance(v, torch.Tensor))
                    backend = "triton" if use_triton(probe) else "torch"
                    fused_ms = time_fn(lambda: op.fused(inp), device, warmup, iters, stat)
                    base_ms = time_fn(lambda: op.baseline(inp), device, warmup, iters, stat)
                    check_ms = None
                    if op.checked is not None and not args.no_check:
                        check_ms = time_fn(lambda: op.checked(inp), device, warmup, iters, stat)
                    nbytes = op.bytes_read(inp)
                    gbps = nbytes / (fused_ms * 1e-3) / 1e9
                    row = {
                        "op": op.name, "rows": R, "vocab": V, "dtype": dt, "backend": backend,
                        "fused_ms": round(fused_ms, 4), "baseline_ms": round(base_ms, 4),
                        "with_check_ms": None if check_ms is None else round(check_ms, 4),
                        "speedup": round(base_ms / fused_ms, 2), "bytes_read": nbytes,
                        "achieved_gbps": round(gbps, 3),
                        "fraction_of_peak": None if not peak else round(gbps / peak, 3),
                    }
                    results.append(row)
                    print(f"{op.name:>22} R={R:<4} V={V:<7} {dt:<5} {backend:<6} fused {fused_ms:8.3f} ms  "
                          f"base {base_ms:8.3f} ms  x{row['speedup']:<6} {gbps:8.1f} GB/s"
                          + (f" ({row['fraction_of_peak']:.0%} of peak)" if peak else ""), flush=True)

    payload = {
        "command": command_line(),
        "device": info,
        "peak_gbps": peak,
        "backend_env": env_backend(),
        "settings": {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
                     "draft_tokens": args.draft_tokens, "warmup": warmup, "iters": iters, "stat": stat,
                     "cpu_threads": torch.get_num_threads() if not on_gpu else None},
        "ops": {op.name: {"baseline": op.baseline_name, "notes": op.notes} for op in ops},
        "results": results,
    }
    md = render_markdown(payload)
    print(md)
    if not args.no_write:
        paths = write_results(f"kernels_{device_tag(info)}", payload, md, args.out_dir)
        print("wrote", *paths)
    return payload


def render_markdown(payload: dict) -> str:
    info = payload["device"]
    lines = [
        f"# Kernel microbenchmark: {info['name']} ({info['device_type']})",
        "",
        f"- command: `{payload['command']}`",
        f"- torch {info['torch']}, triton {info['triton']}, python {info['python']}",
        f"- peak bandwidth: {payload['peak_gbps'] or 'unknown'} GB/s; backend setting `{payload['backend_env']}`",
        f"- times: {payload['settings']['stat']} of {payload['settings']['iters']} calls after "
        f"{payload['settings']['warmup']} warm-up calls"
        + (f", {payload['settings']['cpu_threads']} torch thread(s)" if payload["settings"]["cpu_threads"] else ""),
        "- fused = the public `fastalign.kernels` call with `validate=False`; `with_check` = default call "
        "(runs `check_finite`); bandwidth = bytes of logits read once / fused time",
        "",
    ]
    if info["device_type"] != "cuda":
        lines += ["On CPU the fused calls dispatch to the PyTorch references (Triton needs a GPU; the "
                  "interpreter is for tests only), so these numbers compare the references with the naive "
                  "PyTorch code, not the Triton kernels.", ""]
    for name, meta in payload["ops"].items():
        lines.append(f"- `{name}`: baseline = {meta['baseline']}" + (f"; {meta['notes']}" if meta["notes"] else ""))
    lines.append("")
    header = ["op", "rows", "vocab", "dtype", "backend", "fused ms", "with_check ms", "baseline ms", "speedup",
              "GB/s", "of peak"]
    table = [[r["op"], r["rows"], r["vocab"], r["dtype"], r["backend"], r["fused_ms"], r["with_check_ms"],
              r["baseline_ms"], r["speedup"], r["achieved_gbps"],
              "" if r["fraction_of_peak"] is None else f"{r['fraction_of_peak']:.0%}"] for r in payload["results"]]
    return "\n".join(lines) + "\n" + markdown_table(header, table)


if __name__ == "__main__":
    main()
