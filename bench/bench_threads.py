"""CPU threads: how decoding time depends on ``torch.set_num_threads`` with and without competing processes.

For each thread count (1, 2, ..., and torch's default, one per core) the toy world's ``sample`` (batch 1 and
16) and ``cards`` (batch 1) are timed as they are and while ``--busy`` other processes spin on the CPU
(started by this script: the situation of a shared machine, or of a server whose tokenizer or reward runs
beside the model). Each setting is timed ``--repeats`` times, interleaved, keeping the minimum; EOS is
disabled, so the work is the same in every setting. The machine's load average is recorded: on a machine
already shared, "as is" is not idle.

    python bench/bench_threads.py

Writes ``bench/results/threads_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import command_line, device_info, device_tag, markdown_table, write_results  # noqa: E402
import fastalign  # noqa: E402

CASES = {"sample_b1": ("sample", 1), "sample_b16": ("sample", 16), "cards_b1": ("cards", 1)}


def spin(stop):
    while not stop.is_set():
        sum(range(10000))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default=f"1,2,{torch.get_num_threads()}")
    ap.add_argument("--busy", type=int, default=2, help="competing processes (default 2: one per core here)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    from fastalign.eval.toyworld import load_toy_world

    default_threads = torch.get_num_threads()
    w = load_toy_world()
    engine = fastalign.Engine(target=w.target, reward=w.reward, tokenizer=w.tokenizer)
    engine.target.eos_token_ids, engine.target.eos_tensor = set(), engine.target.eos_tensor[:0]
    threads = sorted({int(t) for t in args.threads.split(",")})
    info = device_info(torch.device("cpu"))
    info.update(cpu_count=os.cpu_count(), torch_default_threads=default_threads)
    results, load = {}, {}
    for busy in (0, args.busy):
        stop = mp.Event()
        procs = [mp.Process(target=spin, args=(stop,), daemon=True) for _ in range(busy)]
        for p in procs:
            p.start()
        time.sleep(1.0)
        load[busy] = os.getloadavg()
        times = {(c, t): [] for c in CASES for t in threads}
        for r in range(args.repeats + 1):  # the first round warms up
            for (case, t) in times:
                method, batch = CASES[case]
                torch.set_num_threads(t)
                start = time.perf_counter()
                engine.decode(w.prompts[:batch], method=method, max_new_tokens=args.max_new_tokens, seed=r,
                              **({"reward_threshold": 0.0} if method == "cards" else {}))
                if r:
                    times[(case, t)].append(time.perf_counter() - start)
        stop.set()
        for p in procs:
            p.join()
        for (case, t), v in times.items():
            results[f"{case}|threads={t}|busy={busy}"] = min(v)
        print(f"busy={busy}:", {f"{c} t={t}": round(min(v), 3) for (c, t), v in times.items()}, flush=True)
    torch.set_num_threads(default_threads)
    payload = dict(command=command_line(), device=info, max_new_tokens=args.max_new_tokens, repeats=args.repeats,
                   busy_processes=args.busy, load_average=load, wall_s=results)
    rows = []
    for case in CASES:
        for busy in (0, args.busy):
            base = results[f"{case}|threads=1|busy={busy}"]
            rows.append([case, busy] + [f"{results[f'{case}|threads={t}|busy={busy}']:.3f} "
                                        f"({results[f'{case}|threads={t}|busy={busy}'] / base:.2f}x)"
                                        for t in threads])
    md = (f"# CPU threads ({info['name']}, {os.cpu_count()} CPUs, torch default {default_threads} threads)\n\n"
          f"`{payload['command']}`\n\nWall seconds of one decode (toy world, {args.max_new_tokens} new tokens, "
          f"EOS disabled; minimum of {args.repeats}), and the ratio to one thread. Load average (1, 5, 15 min) "
          f"at the start of each part: " + "; ".join(f"busy={b}: {', '.join(f'{x:.1f}' for x in v)}"
                                                     for b, v in load.items()) + ".\n\n"
          + markdown_table(["case", "busy processes"] + [f"threads={t}" for t in threads], rows))
    print("wrote", *write_results(f"threads_{device_tag(info)}", payload, md, args.out_dir))


if __name__ == "__main__":
    main()
