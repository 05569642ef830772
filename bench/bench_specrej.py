"""``speculative_rejection`` against ``bon`` on the toy world: mean gold reward, generated tokens and wall time.

Each run decodes the toy world's 16 prompts with the toy reward model as the reward, ``n`` candidates per prompt.
``bon`` generates every candidate to the end; ``speculative_rejection`` scores the unfinished candidates every
``round_tokens`` tokens and stops the lowest ``alpha`` share of each prompt's. Measured, as means over the seeds:
the gold reward of the returned responses (the toy world's rule-based ``world.gold_reward``, in [-1, 1]), the
reward model's score of them, the tokens generated over all candidates (``bon``: every candidate's length;
``speculative_rejection``: its ``candidate_tokens`` stat), the target's and reward model's forward tokens, and the
wall time of the decode call (CPU, one thread).

    python bench/bench_specrej.py            # n = 8, 16, 32, seeds 0 1 2; a few minutes on a CPU

Writes ``bench/results/specrej_<device>.json`` and ``.md`` (``--out-dir`` to choose).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import command_line, device_info, device_tag, markdown_table, write_results  # noqa: E402
import fastalign  # noqa: E402
from fastalign.eval.toyworld import load_toy_world  # noqa: E402


def runs(ns):
    for n in ns:
        yield f"bon n={n}", "bon", dict(n=n)
        for alpha, round_tokens in ((0.5, 16), (0.5, 8), (0.75, 8), (0.5, 4)):
            yield (f"speculative_rejection n={n} alpha={alpha} round_tokens={round_tokens}", "speculative_rejection",
                   dict(n=n, alpha=alpha, round_tokens=round_tokens))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    world = load_toy_world()
    ids = [world.tokenizer(p)["input_ids"] for p in world.prompts]
    engine = fastalign.Engine(target=world.target, reward=world.reward, tokenizer=world.tokenizer)
    engine.decode(ids[:2], method="bon", n=2, max_new_tokens=4, seed=0)  # warm-up
    rows = []
    for label, method, options in runs(args.n):
        acc = dict(gold=0.0, reward=0.0, generated=0.0, target_tokens=0.0, reward_tokens=0.0, wall=0.0, pruned=0.0)
        for seed in args.seeds:
            start = time.perf_counter()
            out = engine.decode(ids, method=method, max_new_tokens=args.max_new_tokens, seed=seed, **options)
            acc["wall"] += time.perf_counter() - start
            acc["gold"] += float(world.gold_reward(ids, out.sequences).mean())
            chosen = out.extra["rewards"].gather(1, out.extra["chosen_index"][:, None])
            acc["reward"] += float(chosen.mean())
            if method == "bon":  # every candidate to the end: what speculative_rejection with alpha=0 generates
                every = engine.decode(ids, method="speculative_rejection", alpha=0.0, seed=seed, n=options["n"],
                                      max_new_tokens=args.max_new_tokens)
                assert every.sequences == out.sequences
                acc["generated"] += every.stats["candidate_tokens"]
            else:
                acc["generated"] += out.stats["candidate_tokens"]
                acc["pruned"] += out.stats["candidates_pruned"]
            acc["target_tokens"] += out.stats["target_tokens"]
            acc["reward_tokens"] += out.stats["reward_tokens"]
        row = {"run": label, **{k: v / len(args.seeds) for k, v in acc.items()}}
        rows.append(row)
        print(f"{label:<52} gold {row['gold']:+.3f}  RM {row['reward']:+.3f}  generated {row['generated']:7.0f}  "
              f"target tok {row['target_tokens']:7.0f}  RM tok {row['reward_tokens']:7.0f}  "
              f"wall {row['wall']:.2f}s", flush=True)

    info = device_info(torch.device("cpu"))
    payload = dict(benchmark="speculative_rejection vs bon on the toy world", command=command_line(), device=info,
                   fastalign=fastalign.__version__, num_prompts=len(ids), max_new_tokens=args.max_new_tokens,
                   seeds=args.seeds, rows=rows)
    md = (f"# speculative_rejection vs bon on the toy world ({info['name']}, {info['device_type']})\n\n"
          f"Command: `{command_line()}`  \nToy world, {len(ids)} prompts, max_new_tokens {args.max_new_tokens}, the "
          f"toy reward model as the reward, means over seeds {args.seeds}, one CPU thread. gold: the toy world's "
          "rule-based reward of the returned responses, in [-1, 1]; RM: the reward model's score of them; "
          "generated: tokens generated over all candidates of all prompts; target / RM tokens: tokens the target "
          "and the reward model processed (prompts included); wall: the decode call.\n\n"
          + markdown_table(["run", "gold", "RM", "generated tokens", "pruned", "target tokens", "RM tokens",
                            "wall (s)"],
                           [[r["run"], f"{r['gold']:+.3f}", f"{r['reward']:+.3f}", f"{r['generated']:.0f}",
                             f"{r['pruned']:.1f}", f"{r['target_tokens']:.0f}", f"{r['reward_tokens']:.0f}",
                             f"{r['wall']:.2f}"] for r in rows]))
    paths = write_results(f"specrej_{device_tag(info)}", payload, md, args.out_dir)
    print(md)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
