"""``sd`` with a fixed draft length K against ``num_draft_tokens="auto"`` and plain ``sample``, on the toy world
(or, ``--world 100m``, on ``bench_engine``'s ~82M target and ~13M draft, calibrated to SD acceptance
``--acceptance``, where a draft call costs a fraction of a target call and drafting pays).

The toy world's draft costs about what its target costs (both overhead-bound), so speculation cannot pay
there: ``"auto"`` should measure that before decoding and sample from the target alone (K=0), at the speed of
``sample``. Batch 1 (the prompts one call each: the batched path mixes rows at different K), EOS disabled,
temperature 1, one thread; per case the minimum over ``--repeats`` of the wall time of all prompts, every
repeat with the same seeds (the same work: the minimum filters the machine's noise; with other seeds per repeat
it would pick each case's luckiest text, and the text moves a case by more than the cases differ: at 8 prompts
of 48 tokens on the 100m world, auto against K=8 went from 0.91x to 1.12x between two sets of seeds), after an
untimed warm-up call (compilation on the compiled path; the cost measurement of ``"auto"`` is made once per
process and engine, on its first call, like a long-running server would); the cases are interleaved in each
repeat, so that a loaded machine slows them alike.

The text is the larger noise: each case samples its own text (K changes which draws a token uses), and on the
100m world one set of 16 prompts of 96 tokens moves a case by about 3% (sd) from its draws alone, so auto
against the best fixed K from one set is itself a draw (``bench_adaptive_replay.py`` replays it on recorded
acceptance, without the machine's noise). ``--seed-sets S`` runs every case on ``S`` sets of seeds (the minimum
over repeats per set, tokens/s over all sets) and reports auto against each fixed K per set. ``sd auto:1`` (a
draft as dear as the target: K=0 throughout) shows what the plain-sampling fallback of ``sd`` costs against
``sample``.

    python bench/bench_adaptive.py                    # eager, about a minute
    python bench/bench_adaptive.py --compile          # + Engine(compile=True) (compilation: minutes)
    python bench/bench_adaptive.py --cost 0.3         # also "auto:0.3": the schedule when drafting would pay

    python bench/bench_adaptive.py --world 100m --prompts 4 --max-new-tokens 32 --repeats 2   # ~5 minutes
    python bench/bench_adaptive.py --world 100m --prompts 16 --max-new-tokens 96 --repeats 2 --ks 4 6 8 12
    python bench/bench_adaptive.py --world 100m --prompts 16 --max-new-tokens 96 --repeats 2 --ks 6 8 12 --seed-sets 3

Writes ``bench/results/adaptive_cpu_<world>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import command_line, device_info, markdown_table, timed, write_results  # noqa: E402
import fastalign  # noqa: E402
from fastalign.models import cpu_linear  # noqa: E402


def engine(w, compile_):
    eng = fastalign.Engine(target=w.target, draft=w.draft, compile=compile_)
    for lm in (eng.target, eng.draft):
        lm.eos_token_ids = set()
        lm.eos_tensor = lm.eos_tensor[:0]
    cpu_linear.wait_for_huge_pages()  # time the weights as they will stay (backed with huge pages by the model layer)
    return eng


def set_seed(seed: int, s: int) -> int:
    """The first prompt's seed in seed set ``s`` (prompt ``i`` of the set: this plus ``i``; ``run``)."""
    return seed + 100 * (s + 1)


MEANS = ("acceptance_rate", "mean_draft_tokens", "draft_cost")  # stats averaged over prompts (the others: summed)


def run(eng, prompts, method, options, max_new, seed):
    stats = []
    for i, p in enumerate(prompts):
        out = eng.decode([p], method=method, max_new_tokens=max_new, seed=[seed + i], temperature=1.0, **options)
        stats.append(out.stats)
    keys = ("acceptance_rate", "mean_draft_tokens", "row_rounds_k0", "rounds_without_draft", "draft_cost",
            "target_calls", "draft_calls")
    merged = {k: [s[k] for s in stats] for k in keys if k in stats[0]}
    agg = {k: (sum(v) / len(v) if k in MEANS else sum(v)) for k, v in merged.items()}
    if "target_costs" in stats[0]:  # measured once per process: the same for every prompt
        agg["target_costs"] = stats[0]["target_costs"]
    return dict(tokens=sum(s["generated_tokens"] for s in stats), **agg)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seed-sets", type=int, default=1,
                    help="run every case on this many sets of seeds (more text: the text is the larger noise)")
    ap.add_argument("--compile", action="store_true", help="also the compiled path, Engine(compile=True)")
    ap.add_argument("--cost", type=float, default=None, help="also auto with this fixed cost ratio")
    ap.add_argument("--tag", default="")
    ap.add_argument("--world", choices=["toy", "100m"], default="toy",
                    help="toy: the shipped toy world; 100m: bench_engine's ~82M target and ~13M draft")
    ap.add_argument("--prompts", type=int, default=None, help="use only the first N prompts")
    ap.add_argument("--acceptance", type=float, default=0.8, help="100m: the draft's calibrated SD acceptance")
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8], help="the fixed draft lengths to run")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.world == "toy":
        from fastalign.eval.toyworld import load_toy_world

        w = load_toy_world()
        prompts = w.tokenizer(w.prompts)["input_ids"]
    else:
        from bench.bench_engine import random_world

        world_args = argparse.Namespace(device=torch.device("cpu"), dtype=torch.float32, seed=args.seed,
                                        acceptance=args.acceptance)
        models, prompts, settings = random_world(world_args, "100m")
        w = argparse.Namespace(target=models["target"], draft=models["draft"])
    prompts = prompts[: args.prompts] if args.prompts else prompts
    cases = [("sample", "sample", {})] + [(f"sd K={k}", "sd", dict(num_draft_tokens=k)) for k in args.ks]
    cases.append(("sd auto", "sd", dict(num_draft_tokens="auto")))
    if args.cost is not None:
        cases.append((f"sd auto:{args.cost:g}", "sd", dict(num_draft_tokens=f"auto:{args.cost:g}")))
    cases.append(("sd auto:1", "sd", dict(num_draft_tokens="auto:1")))  # K=0 throughout: the K=0 path's cost
    paths = ["eager"] + (["compiled"] if args.compile else [])
    results = {}
    dev = torch.device("cpu")
    for path in paths:
        eng = engine(w, path == "compiled")
        for name, method, options in cases:  # warm-up (compilation; the cost measurement of "auto")
            run(eng, prompts, method, options, args.max_new_tokens, args.seed)
        sets = range(args.seed_sets)
        walls = {(name, s): [] for name, _, _ in cases for s in sets}
        info = {}
        for _ in range(args.repeats):  # cases interleaved: a noisy machine slows them alike
            for s in sets:
                for name, method, options in cases:
                    info[name, s], t = timed(lambda: run(eng, prompts, method, options, args.max_new_tokens,
                                                         set_seed(args.seed, s)), dev)
                    walls[name, s].append(t)
        for name, _, _ in cases:
            best = [min(walls[name, s]) for s in sets]  # per set: the minimum over repeats
            merged = {k: sum(info[name, s][k] for s in sets) for k in info[name, 0] if k != "target_costs"}
            merged.update({k: v / len(sets) for k, v in merged.items() if k in MEANS})
            if "target_costs" in info[name, 0]:
                merged["target_costs"] = info[name, 0]["target_costs"]
            results[f"{path}/{name}"] = dict(path=path, case=name, wall_s=sum(best), set_wall_s=best,
                                             all_wall_s=[walls[name, s] for s in sets],
                                             set_tokens_per_s=[info[name, s]["tokens"] / b for s, b in zip(sets, best)],
                                             tokens_per_s=merged["tokens"] / sum(best), **merged)
            print(f"{path:8s} {name:14s} {merged['tokens'] / sum(best):8.1f} tok/s  "
                  + ", ".join(f"{k} {v:.3g}" for k, v in merged.items() if k not in ("tokens", "target_costs")),
                  flush=True)
    rows = []
    for key, r in results.items():
        base = results[f"{r['path']}/sample"]["tokens_per_s"]
        rows.append([r["path"], r["case"], f"{r['tokens_per_s']:.1f}", f"{r['tokens_per_s'] / base:.2f}",
                     f"{r.get('acceptance_rate', float('nan')):.2f}", f"{r.get('mean_draft_tokens', float('nan')):.2f}",
                     r.get("row_rounds_k0", ""), f"{r['draft_cost']:.2f}" if "draft_cost" in r else "",
                     " / ".join(f"{c:.2f}" for c in r["target_costs"][1::7]) if "target_costs" in r else "",
                     r.get("draft_calls", "")])
    md = (f"# sd: fixed K vs num_draft_tokens='auto' vs sample, {args.world} world, batch 1\n\n`{command_line()}`\n\n"
          + markdown_table(["path", "case", "tokens/s", "x sample", "acceptance", "mean K", "rounds at K=0",
                            "draft cost", "target cost at 2 / 9 tokens", "draft calls"], rows))
    md += auto_against_fixed(results, paths, args.ks)
    payload = dict(command=command_line(), device=device_info(dev), threads=1, prompts=len(prompts),
                   max_new_tokens=args.max_new_tokens, repeats=args.repeats, seed_sets=args.seed_sets,
                   results=results)
    stem = f"adaptive_cpu_{args.world}" + (f"_{args.tag}" if args.tag else "")
    for p in write_results(stem, payload, md):
        print("wrote", p)
    print(md)


def auto_against_fixed(results, paths, ks) -> str:
    """Markdown: ``sd auto``'s tokens/s over each fixed K's, per seed set and over all sets (several sets only)."""
    lines = []
    for path in paths:
        auto = results[f"{path}/sd auto"]
        if len(auto["set_tokens_per_s"]) < 2:
            continue
        lines.append(f"\n{path}: `sd auto` / `sd K` in tokens/s, per seed set and over all sets:\n")
        for k in ks:
            fixed = results[f"{path}/sd K={k}"]
            per_set = [a / f for a, f in zip(auto["set_tokens_per_s"], fixed["set_tokens_per_s"])]
            lines.append(f"- K={k}: " + ", ".join(f"{r:.2f}" for r in per_set)
                         + f"; all sets {auto['tokens_per_s'] / fixed['tokens_per_s']:.2f}")
    return "\n".join(lines) + ("\n" if lines else "")


if __name__ == "__main__":
    main()
