"""Accuracy against compute on the arith world: sample, majority vote, bon, speculative_rejection, qalign, smc and
beam at N.

Each run decodes the arith world's 32 held-out problems (``fastalign.eval.arithworld``) at temperature 1 with the
world's outcome reward model as the reward. Measured, as means over the seeds: the accuracy (the answer checker,
``world.gold_reward``: 1 if the final answer is right), the share of responses with every step right (the
process reward), the tokens sampled over all candidates (the target's tokens less the prompts and qalign's
re-fed prefixes), the target's forward tokens (prompts included), the reward's tokens (the outcome reward
model's, or for smc and beam the process reward's) and the wall time of the decode call (CPU, one thread). One
engine holds both rewards: the outcome reward model as ``reward``, the process reward as ``step_reward``.

Methods at budget N: ``majority``: ``bon`` with ``n=N``, ``select="majority"``, ``answer_fn="answer"`` (self-
consistency); ``bon``: the highest outcome reward of N; ``weighted_majority``: votes weighted by
``softmax(r)``; ``speculative_rejection``: N candidates, the lowest half of the partial rewards stopped every 8
tokens; ``qalign``: N MCMC steps (``beta=1``), the majority answer over the chain. With the rule-based process
reward (``world.step_reward``: minus the wrong steps so far) as the step reward, steps ending at ``;``: ``smc``: N
particles, ``beta=0.5``, one particle drawn by weight; ``beam``: ``N/4`` beams (at least 1) expanded 4 ways per
step, the best finished beam.

    python bench/bench_arith.py              # N = 4 16 64, seeds 0 1 2; a few minutes on a CPU

Writes ``bench/results/arith_<device>.json`` and ``.md`` (``--out-dir`` to choose).
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
from fastalign.eval.arithworld import load_arith_world  # noqa: E402

VOTE = dict(select="majority", answer_fn="answer")


def runs(ns):
    """``(label, method, options)``: the outcome methods (the reward model), then smc and beam (the step reward)."""
    yield "sample", "sample", {}
    for n in ns:
        yield f"majority N={n}", "bon", dict(n=n, **VOTE)
        yield f"bon N={n}", "bon", dict(n=n)
        yield f"weighted_majority N={n}", "bon", dict(n=n, select="weighted_majority", answer_fn="answer")
        yield f"speculative_rejection N={n}", "speculative_rejection", dict(n=n, alpha=0.5, round_tokens=8)
        yield f"qalign N={n}", "qalign", dict(steps=n, beta=1.0, **VOTE)
    for n in ns:
        yield f"smc N={n}", "smc", dict(particles=n, beta=0.5, delimiters=";", segment_tokens=8)
        yield f"beam N={n}", "beam", dict(beams=max(1, n // 4), width=4, delimiters=";", max_step_tokens=8)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    world = load_arith_world()
    ids = [world.tokenizer(p)["input_ids"] for p in world.prompts]
    engine = fastalign.Engine(target=world.target, reward=world.reward, step_reward=world.step_reward,
                              tokenizer=world.tokenizer)
    engine.decode(ids[:2], method="bon", n=2, max_new_tokens=4, seed=0)  # warm-up
    prompt_tokens = sum(map(len, ids))
    rows = []
    for label, method, options in runs(args.n):
        acc = dict(accuracy=0.0, process=0.0, generated=0.0, target_tokens=0.0, reward_tokens=0.0, target_calls=0.0,
                   wall=0.0)
        for seed in args.seeds:
            start = time.perf_counter()
            out = engine.decode(ids, method=method, max_new_tokens=args.max_new_tokens, temperature=1.0, seed=seed,
                                **options)
            acc["wall"] += time.perf_counter() - start
            acc["accuracy"] += float(world.gold_reward(ids, out.sequences).mean())
            acc["process"] += float((world.step_reward(ids, out.sequences) == 0).float().mean())
            acc["target_tokens"] += out.stats["target_tokens"]
            # every candidate's sampled tokens: the target's tokens less the prompts (prefilled once per prompt)
            # and less qalign's re-fed prefix tokens
            acc["generated"] += (out.stats["target_tokens"] - prompt_tokens
                                 - out.stats.get("qalign_refed_tokens", 0))
            acc["reward_tokens"] += out.stats["reward_tokens"] + out.stats["step_reward_tokens"]
            acc["target_calls"] += out.stats["target_calls"]
        row = {"run": label, **{k: v / len(args.seeds) for k, v in acc.items()}}
        rows.append(row)
        print(f"{label:<28} accuracy {row['accuracy']:.3f}  sound {row['process']:.3f}  "
              f"generated {row['generated']:7.0f}  target tok {row['target_tokens']:7.0f}  "
              f"reward tok {row['reward_tokens']:7.0f}  "
              f"wall {row['wall']:.2f}s", flush=True)

    info = device_info(torch.device("cpu"))
    payload = dict(benchmark="accuracy against compute on the arith world", command=command_line(), device=info,
                   fastalign=fastalign.__version__, num_prompts=len(ids), max_new_tokens=args.max_new_tokens,
                   seeds=args.seeds, rows=rows)
    md = (f"# Accuracy against compute on the arith world ({info['name']}, {info['device_type']})\n\n"
          f"Command: `{command_line()}`  \narith world, {len(ids)} held-out problems, max_new_tokens "
          f"{args.max_new_tokens}, temperature 1, the outcome reward model as the reward and the rule-based process "
          "reward as the step reward (smc and beam; steps ending at `;`), means over seeds "
          f"{args.seeds}, one CPU thread. accuracy: the final answer is right (the world's answer checker); "
          "sound: every step right (the rule-based process reward is 0); generated: tokens sampled over all "
          "candidates of all prompts (the target's tokens less the prompts, each prefilled once, and less "
          "qalign's re-fed prefixes); target tokens: every token the target processed; reward tokens: tokens the "
          "reward the method reads processed (the outcome reward model's; smc and beam: the process reward's); wall: the decode call. N: candidates (bon, votes, speculative_rejection), "
          "MCMC steps (qalign), particles (smc) or candidates per step (beam: N/4 beams x 4).\n\n"
          + markdown_table(["run", "accuracy", "sound", "generated", "target calls", "target tokens", "reward tokens",
                            "wall (s)"],
                           [[r["run"], f"{r['accuracy']:.3f}", f"{r['process']:.3f}", f"{r['generated']:.0f}",
                             f"{r['target_calls']:.0f}",
                             f"{r['target_tokens']:.0f}", f"{r['reward_tokens']:.0f}", f"{r['wall']:.2f}"]
                            for r in rows]))
    paths = write_results(f"arith_{device_tag(info)}", payload, md, args.out_dir)
    print(md)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
