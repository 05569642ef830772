"""Microbenchmark: ``spec_verify`` / ``tree_verify`` against the plain PyTorch a researcher writes.

The baseline materialises ``softmax`` of every logits tensor, forms ``pi`` by division, and loops over draft
positions with ``gather`` / ``clamp`` / ``multinomial`` (and, for trees, walks each row's tree in Python).
``fastalign`` is the public function (``validate=False``, as the methods call it in their loops): the fused Triton
kernels on CUDA, the vectorised PyTorch reference on CPU. Bandwidth counts one read of every logits tensor
(target, draft and, for sss, ref) over the kernel's time.

    python bench/bench_verify.py                    # small CPU grid, < 2 min
    python bench/bench_verify.py --full             # realistic grid (meant for CUDA)
    python bench/bench_verify.py --vocab 32000 --batch 1 8 --k 4 --dtype bf16

Writes ``bench/results/verify_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (DTYPES, command_line, device_info, device_tag, env_backend, markdown_table,  # noqa: E402
                          time_fn, write_results)
from fastalign.kernels import spec_verify, tree_verify  # noqa: E402



# ----------------------------------------------------------------------------------------- baselines


def naive_spec_verify(target, draft, ref, tokens, mode, lam, temperature, u):
    """What a researcher writes: probabilities, a ratio by division, a loop over positions, multinomial."""
    B, K1, V = target.shape
    K = K1 - 1
    p = torch.softmax(target.float() / temperature, dim=-1)
    qr = torch.softmax(draft.float() / temperature, dim=-1)
    if mode != "sd" and ref is not None:
        q = torch.softmax(ref.float() / temperature, dim=-1)
        pi = p * (qr / q) ** lam
        pi = pi / pi.sum(-1, keepdim=True)
    else:
        pi = p
    t = pi if mode == "sss_exact" else p
    accepted = torch.zeros(B, dtype=torch.long, device=target.device)
    active = torch.ones(B, dtype=torch.bool, device=target.device)
    next_token = torch.full((B,), -1, dtype=torch.long, device=target.device)
    for i in range(K):
        x = tokens[:, i:i + 1]
        ratio = (t[:, i].gather(-1, x) / qr[:, i].gather(-1, x)).clamp(max=1.0).squeeze(-1)
        ok = u[:, i] <= ratio
        rej = active & ~ok
        if mode == "sss_paper":
            res = pi[:, i]
        else:
            res = (t[:, i] - qr[:, i]).clamp(min=0)
            res = res / res.sum(-1, keepdim=True)
        draw = torch.multinomial(res, 1).squeeze(-1)
        next_token = torch.where(rej, draw, next_token)
        accepted += (active & ok).long()
        active = active & ok
    bonus = torch.multinomial(pi[:, K] if mode == "sss_paper" else t[:, K], 1).squeeze(-1)
    return accepted, torch.where(active, bonus, next_token)


def naive_tree_verify(target, draft, tokens, parents, temperature, u):
    """SD over a sampled tree, one row at a time in Python (the research-code style)."""
    B, N1, V = target.shape
    p = torch.softmax(target.float() / temperature, dim=-1)
    qr = torch.softmax(draft.float() / temperature, dim=-1)
    par = parents.tolist()
    tok = tokens.tolist()
    uu = u.tolist()
    out = []
    for b in range(B):
        cur, path = -1, []
        while True:
            res = p[b, cur + 1]
            children = [n for n in range(N1 - 1) if par[b][n] == cur]
            moved = False
            for c in children:
                x = tok[b][c]
                if uu[b][c] * qr[b, cur + 1, x] <= res[x]:
                    path.append(c)
                    cur = c
                    moved = True
                    break
                res = (res - qr[b, cur + 1]).clamp(min=0)
                res = res / res.sum()
            if not moved:
                out.append((path, int(torch.multinomial(res, 1))))
                break
    return out


# ----------------------------------------------------------------------------------------- runs


def chain_case(B, K, V, dtype, mode, device, gen):
    tgt = (torch.randn(B, K + 1, V, device=device, generator=gen) * 2).to(dtype)
    drf = (tgt.float() + 0.5 * torch.randn(B, K + 1, V, device=device, generator=gen)).to(dtype)
    ref = (drf.float() + 0.5 * torch.randn(B, K + 1, V, device=device, generator=gen)).to(dtype)
    tok = torch.randint(0, V, (B, K), device=device, generator=gen)
    u = torch.rand(B, K, device=device, generator=gen)
    return tgt, drf, ref if mode != "sd" else None, tok, u


def bench_chain(args, device, info):
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    for V in args.vocab:
        for B in args.batch:
            for K in args.k:
                for dt in args.dtype:
                    for mode in args.modes:
                        tgt, drf, ref, tok, u = chain_case(B, K, V, DTYPES[dt], mode, device, gen)
                        fast = lambda: spec_verify(tgt, drf, ref, tok, mode, 1.0, 1.0, u, 0, validate=False)  # noqa
                        base = lambda: naive_spec_verify(tgt, drf, ref, tok, mode, 1.0, 1.0, u)  # noqa
                        t_fast = time_fn(fast, device, args.warmup, args.iters)
                        t_base = time_fn(base, device, args.warmup, args.iters)
                        n_tensors = 3 if ref is not None else 2
                        nbytes = B * (K + 1) * V * tgt.element_size() * n_tensors
                        gbps = nbytes / (t_fast * 1e-3) / 1e9
                        rec = {"kernel": "spec_verify", "mode": mode, "B": B, "K": K, "V": V, "dtype": dt,
                               "fastalign_ms": round(t_fast, 4), "baseline_ms": round(t_base, 4),
                               "speedup": round(t_base / t_fast, 2), "fastalign_gbps": round(gbps, 1)}
                        if info.get("peak_gbps"):
                            rec["fraction_of_peak"] = round(gbps / info["peak_gbps"], 3)
                        rows.append(rec)
                        print(rec, flush=True)
    return rows


def tree_case(B, branching, V, device, gen):
    parents, level, n = [], [-1], 0
    for k in branching:
        nxt = []
        for node in level:
            for _ in range(k):
                parents.append(node)
                nxt.append(n)
                n += 1
        level = nxt
    N = len(parents)
    par = torch.tensor(parents, device=device).expand(B, N).contiguous()
    tgt = torch.randn(B, N + 1, V, device=device, generator=gen) * 2
    drf = tgt + 0.5 * torch.randn(B, N + 1, V, device=device, generator=gen)
    tok = torch.randint(0, V, (B, N), device=device, generator=gen)
    u = torch.rand(B, N, device=device, generator=gen)
    return tgt, drf, tok, par, u


def bench_tree(args, device, info):
    rows = []
    gen = torch.Generator(device=device).manual_seed(1)
    branching = tuple(args.tree)
    for V in args.vocab:
        for B in args.tree_batch:
            tgt, drf, tok, par, u = tree_case(B, branching, V, device, gen)
            fast = lambda: tree_verify(tgt, drf, None, tok, par, "sd", 1.0, 1.0, u, 0, "sampled", validate=False)  # noqa
            base = lambda: naive_tree_verify(tgt, drf, tok, par, 1.0, u)  # noqa
            t_fast = time_fn(fast, device, args.warmup, args.iters)
            t_base = time_fn(base, device, max(1, args.warmup // 2), max(3, args.iters // 4))
            rec = {"kernel": "tree_verify", "mode": "sd", "tree": list(branching), "N": tok.shape[1], "B": B,
                   "V": V, "dtype": "fp32", "fastalign_ms": round(t_fast, 4), "baseline_ms": round(t_base, 4),
                   "speedup": round(t_base / t_fast, 2)}
            rows.append(rec)
            print(rec, flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--full", action="store_true", help="realistic grid: V 32000/128256/152064, B 1..256, K 1/4/8")
    ap.add_argument("--vocab", type=int, nargs="+")
    ap.add_argument("--batch", type=int, nargs="+")
    ap.add_argument("--k", type=int, nargs="+")
    ap.add_argument("--dtype", nargs="+", choices=list(DTYPES))
    ap.add_argument("--modes", nargs="+", default=["sd", "sss_exact"])
    ap.add_argument("--tree", type=int, nargs="+", default=[2, 2, 2], help="branching per depth")
    ap.add_argument("--tree-batch", type=int, nargs="+")
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--iters", type=int)
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    full = args.full
    args.vocab = args.vocab or ([32000, 128256, 152064] if full else [4096, 32000])
    args.batch = args.batch or ([1, 8, 64, 256] if full else [1, 8])
    args.k = args.k or ([1, 4, 8] if full else [4])
    args.dtype = args.dtype or (["fp32", "bf16"] if full else ["fp32"])
    args.tree_batch = args.tree_batch or ([1, 8, 64] if full else [1, 4])
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    args.iters = args.iters if args.iters is not None else (20 if cuda else 11)
    if cuda and not full and args.vocab == [4096, 32000]:
        args.vocab = [32000, 128256, 152064]

    info = device_info(device)
    info["backend"] = env_backend()
    if hasattr(__import__("os"), "getloadavg"):
        info["load_average_at_start"] = [round(x, 2) for x in __import__("os").getloadavg()]
    rows = bench_chain(args, device, info) + bench_tree(args, device, info)
    payload = {"device": info, "command": command_line(), "results": rows}
    header = ["kernel", "mode", "B", "K/N", "V", "dtype", "fastalign ms", "baseline ms", "speedup", "GB/s"]
    table = [[r["kernel"], r["mode"], r["B"], r.get("K", r.get("N")), r["V"], r["dtype"], r["fastalign_ms"],
              r["baseline_ms"], r["speedup"], r.get("fastalign_gbps", "")] for r in rows]
    what = ("fused Triton kernels" if cuda else "the vectorised PyTorch reference (CPU dispatch; the Triton "
            "kernels need a GPU for meaningful timings)")
    md = (f"# verify kernels: {info['name']} ({device.type})\n\n"
          f"fastalign = `spec_verify` / `tree_verify` with `validate=False`, here {what}; baseline = the plain "
          f"PyTorch loop in `bench/bench_verify.py`. Median of {args.iters} runs.\n\n"
          f"torch {info['torch']}, triton {info['triton']}, python {info['python']}, backend {info['backend']}\n\n"
          f"command: `{payload['command']}`\n\n"
          + (f"CPU load average at start: {info.get('load_average_at_start')} on {info.get('cpu_threads')} threads "
             "(CPU timings taken on a shared machine are only indicative; the GPU grid is the one that "
             "measures the kernels).\n\n" if not cuda else "")
          + markdown_table(header, table))
    stem = f"verify_{device_tag(info)}"
    paths = write_results(stem, payload, md, args.out_dir)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
