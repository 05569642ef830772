"""Where the time of a compiled ``sample`` token goes, at batch 1 (``Engine(compile=True)``, one thread).

Per world (``bench_engine``'s ``toy`` and ``100m``), after a warm-up decode (which compiles the decode step),
each part is timed as the minimum over ``--repeats`` rounds (the parts interleaved in each; loops of
``--max-new-tokens`` steps):

* ``step, called directly``: the compiled step alone, as the engine calls a known shape: the code torch.compile
  runs for it, called as a plain function (``slots.compiled_code``) on a decode step's inputs, the same column
  rewritten: the compiled graph plus the bytecode that gathers its inputs;
* ``model layer around the step``: ``CausalLM.extend`` of one token per row (positions, the step's padded
  inputs, the live mask, the finiteness check of the logits) minus the step alone;
* ``sampling and the method's loop``: a whole ``Engine.decode`` per token minus ``extend`` per token, less the
  fixed per-call part below: the sampling kernel, the token's copy to the host and the loop's Python;
* ``per call (prefill, set-up), per token``: ``decode`` of 1 new token, divided by the tokens of a decode.

The parts add up to the decode's time per token by construction. Of the sampling part, the sampling kernel alone
(``kernels.sample`` on one row of random logits with a decode's per-prompt stream, in a loop) is shown too, and
below the table the number of torch operations a token calls outside the compiled step. Apart, not in the total:
what calling the step through ``torch.compile``'s wrapper would add per token, with guards skipped
(``skip_guard_eval_unsafe``) and with guards evaluated in full (the same step loop, minus the direct call: what
``StaticOptions.skip_guards`` saves). Next to them, the floor is the target's bytes per token over the streaming
bandwidth measured in the same run (``bench_engine.measure_bandwidth``).

    python bench/bench_step_breakdown.py                    # toy and 100m (CPU: a few minutes, compiling)

Writes ``bench/results/step_breakdown_cpu.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench_engine import (  # noqa: E402
    engines, measure_bandwidth, random_world, sample_work, toy_world,
)
from bench.common import command_line, device_info, markdown_table, write_results  # noqa: E402
from fastalign.models.slots import compiled_code  # noqa: E402


def best(fn, repeats: int) -> float:
    """Minimum wall time of ``fn()`` over ``repeats`` calls, in seconds."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def step_inputs(lm, prompt):
    """The compiled step's arguments in a real decode step (one token after ``prompt``), recorded by wrapping
    the store's compiled step for one ``extend`` call (the benchmark reaches into ``SlotStore`` on purpose)."""
    store, seen = lm.store, []
    compiled = store._compiled_step

    def record(*args):
        seen.append(args)
        return compiled(*args)

    lm.prefill([prompt], 8)
    store._direct.clear()  # this call through the compiled function (later ones of the shape call its code)
    store._compiled_step = record
    try:
        lm.extend(torch.tensor([[prompt[-1]]]), live=torch.ones(1, 1, dtype=torch.bool))
    finally:
        store._compiled_step = compiled
    if len(seen) != 1:
        raise RuntimeError("the decode step did not run compiled")
    return store, seen[0]


def torch_calls_per_token(decode, n: int) -> float:
    """The torch operations a decode token calls outside the compiled step: top-level ``aten`` calls (an operation
    called inside another, or inside the compiled step, is not counted) of ``decode(n)`` minus ``decode(1)``, per
    later token (``torch.profiler``)."""
    from torch.profiler import ProfilerActivity, profile

    def count(k):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            decode(k)
        total = 0
        for event in prof.events():
            parent = event.cpu_parent
            while parent is not None and not parent.name.startswith(("aten::", "## Call CompiledFxGraph")):
                parent = parent.cpu_parent
            total += parent is None and event.name.startswith("aten::")
        return total
    return (count(n) - count(1)) / (n - 1)


def breakdown(engine, prompt, n: int, repeats: int, seed: int) -> dict:
    """The parts of a decode's time per token (module docstring), in seconds."""
    lm = engine.target
    def decode(k):
        return engine.decode([prompt], method="sample", max_new_tokens=k, seed=seed, temperature=1.0)
    decode(n)  # compiles the decode step (the prefill runs eager)

    def extend_loop():
        lm.prefill([prompt], n)
        tok, live = torch.tensor([[prompt[-1]]]), torch.ones(1, 1, dtype=torch.bool)
        return best(lambda: [lm.extend(tok, live=live) for _ in range(n - 1)], 1)

    def step_loop(how):
        store, args = step_inputs(lm, prompt)  # afresh: the store's state as in a decode step
        if how == "direct":
            with torch.no_grad():  # the global state the store calls it in (its guards check it)
                compiled = compiled_code(store._step_function, args)
            if compiled is None:
                raise RuntimeError("no compiled code found for the decode step")
        else:
            compiled = store._compiled_step

        def loop():
            with torch.no_grad(), torch.compiler.set_stance(skip_guard_eval_unsafe=how == "skip"):  # as the store
                for _ in range(n - 1):
                    compiled(*args)
        return best(loop, 1)

    from fastalign import kernels
    from fastalign.methods.base import Randomness

    logits = torch.randn(1, lm.vocab_size)
    seeds = Randomness(seed, 1).streams([0], "token")

    def sample_loop():  # the sampling kernel as Context.sample calls it, on one row of logits
        return best(lambda: [kernels.sample(logits, 1.0, None, None, seed=seeds, validate=False)
                             for _ in range(n - 1)], 1)

    parts = dict(decode=lambda: best(lambda: decode(n), 1), call=lambda: best(lambda: decode(1), 1),
                 extend=extend_loop, direct=lambda: step_loop("direct"), skip=lambda: step_loop("skip"),
                 guards=lambda: step_loop("guards"),
                 sample=sample_loop)
    t = {k: [] for k in parts}
    for _ in range(repeats):  # interleaved: a busy machine slows every part alike
        for k, fn in parts.items():
            t[k].append(fn())
    t = {k: min(v) for k, v in t.items()}
    t_decode, t_call = t["decode"], t["call"]
    extend = t["extend"] / (n - 1)
    t_direct, t_skip, t_guards = (t[k] / (n - 1) for k in ("direct", "skip", "guards"))
    # decode(n) = decode(1) + (n - 1) * (extend + sampling and loop): n - 1 steps follow the prefill
    steps = (n - 1) / n
    parts = {
        "step, called directly": t_direct * steps,
        "model layer around the step": (extend - t_direct) * steps,
        "sampling and the method's loop": ((t_decode - t_call) / (n - 1) - extend) * steps,
        "per call (prefill, set-up), per token": t_call / n,
    }
    return dict(torch_calls_per_token=torch_calls_per_token(decode, n), sample_kernel_s=t["sample"] / (n - 1) * steps, wrapper_s=(t_skip - t_direct) * steps,
                guards_saved_s=(t_guards - t_direct) * steps, decode_s_per_token=t_decode / n, extend_s=extend,
                step_direct_s=t_direct, step_guards_skipped_s=t_skip, step_full_guards_s=t_guards,
                decode_1_token_s=t_call, parts_s=parts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worlds", default="toy,100m", help="comma-separated, of toy, 100m")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--acceptance", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    args.device, args.dtype = torch.device("cpu"), torch.float32
    torch.set_num_threads(1)
    info = device_info(args.device)
    info["cpu_count"] = os.cpu_count()
    payload = dict(command=command_line(), device=info, max_new_tokens=args.max_new_tokens, repeats=args.repeats,
                   load_before=os.getloadavg(), worlds={})
    for world in args.worlds.split(","):
        if world not in ("toy", "100m"):
            ap.error(f"unknown world {world}; choose from toy, 100m")
        models, prompts, _ = toy_world(args) if world == "toy" else random_world(args, world)
        engine = engines(models, True)["plain"]
        res = breakdown(engine, prompts[0], args.max_new_tokens, args.repeats, args.seed)
        work = sample_work(models["target"], 1, len(prompts[0]), args.max_new_tokens)
        res["bandwidth_gbps"] = measure_bandwidth(args.device)
        res["floor_s_per_token"] = work["bytes_per_token"] / (res["bandwidth_gbps"] * 1e9)
        payload["worlds"][world] = res
        print(world, {k: f"{v * 1e3:.3f} ms" for k, v in res["parts_s"].items()}, flush=True)
        del models, engine
    payload["load_after"] = os.getloadavg()
    print("wrote", *write_results("step_breakdown_cpu", payload, to_markdown(payload), args.out_dir))


def to_markdown(payload) -> str:
    lines = [f"# Where a compiled sample token's time goes (batch 1, {payload['device']['name']}, 1 thread)\n",
             f"`{payload['command']}`\n",
             f"torch {payload['device']['torch']}; {payload['max_new_tokens']} new tokens, minimum of "
             f"{payload['repeats']} repeats per part. Load average before / after: "
             f"{', '.join(f'{x:.1f}' for x in payload['load_before'])} / "
             f"{', '.join(f'{x:.1f}' for x in payload['load_after'])}.\n"]
    worlds = payload["worlds"]
    names = list(next(iter(worlds.values()))["parts_s"])
    header = ["part (ms per token)"] + [f"{w}" for w in worlds] + [f"{w} share" for w in worlds]
    rows = []
    for name in names:
        rows.append([name] + [f"{r['parts_s'][name] * 1e3:.3f}" for r in worlds.values()]
                    + [f"{r['parts_s'][name] / r['decode_s_per_token']:.0%}" for r in worlds.values()])
    rows.append(["decode, total"] + [f"{r['decode_s_per_token'] * 1e3:.3f}" for r in worlds.values()]
                + ["100%" for _ in worlds])
    rows.append(["of the sampling and loop: the sampling kernel alone"]
                + [f"{r['sample_kernel_s'] * 1e3:.3f}" for r in worlds.values()]
                + [f"{r['sample_kernel_s'] / r['decode_s_per_token']:.0%}" for r in worlds.values()])
    rows.append(["apart: torch.compile's wrapper, guards skipped, would add"]
                + [f"{r['wrapper_s'] * 1e3:.3f}" for r in worlds.values()]
                + [f"{r['wrapper_s'] / r['decode_s_per_token']:.0%}" for r in worlds.values()])
    rows.append(["apart: torch.compile's wrapper, full guards, would add"]
                + [f"{r['guards_saved_s'] * 1e3:.3f}" for r in worlds.values()]
                + [f"{r['guards_saved_s'] / r['decode_s_per_token']:.0%}" for r in worlds.values()])
    rows.append(["floor: bytes per token / streaming bandwidth"]
                + [f"{r['floor_s_per_token'] * 1e3:.3f}" for r in worlds.values()]
                + [f"{r['floor_s_per_token'] / r['decode_s_per_token']:.0%}" for r in worlds.values()])
    lines.append(markdown_table(header, rows))
    if all("torch_calls_per_token" in r for r in worlds.values()):
        lines.append("\nTorch operations a token calls outside the compiled step (top-level `aten` calls, "
                     "`torch.profiler`): " + ", ".join(f"{w} {r['torch_calls_per_token']:.1f}" for w, r in worlds.items())
                     + ".")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
