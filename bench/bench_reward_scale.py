"""Do ``cards`` and ``rs`` raise the reward with their default options, whatever the reward's scale?

On the toy world, each method decodes the same prompts with the toy reward model (scores roughly in [-4, 4])
and with the same reward mapped onto [0, 1] (``(r + 4) / 8``, clamped). Rows: ``sample`` at the sampling
settings of ``cards``/``rs`` (T = 0.7, top-k 40; no reward), ``cards`` and ``rs`` with every option at its
default (``reward_threshold="auto"``, ``accept_beta="auto"``), the same with ``accept_beta=0.7`` (the CARDS
code's value, the default before ``"auto"``), and ``cards`` with ``mode="hard"`` (which does not depend on the
scale). Measured: mean gold reward (rule-based, in [-1, 1]), mean reward on the [0, 1] scale, and the target and
reward-model forward passes. (The clamp makes the map not quite affine for the few scores beyond [-4, 4], so the
two scales' default rows differ a little.)

    python bench/bench_reward_scale.py                 # 64 prompts, 24 new tokens, seeds 0 and 1; ~1 min on a CPU

Writes ``bench/results/reward_scale_<device>.json`` and ``.md`` (``--out-dir`` to choose).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import command_line, device_info, device_tag, markdown_table, write_results  # noqa: E402
import fastalign  # noqa: E402
from fastalign.models.reward import RewardModel  # noqa: E402
from fastalign.eval.toyworld import REWARD_SCALE, gold_reward_text, load_toy_world  # noqa: E402

RUNS = [  # label, method, options
    ("sample (T=0.7, top-k 40)", "sample", dict(temperature=0.7, top_k=40)),
    ("rs, defaults", "rs", {}),
    ("rs, accept_beta=0.7", "rs", dict(accept_beta=0.7)),
    ("cards, defaults", "cards", {}),
    ("cards, accept_beta=0.7", "cards", dict(accept_beta=0.7)),
    ("cards, mode=hard", "cards", dict(mode="hard")),
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # tiny models
    world = load_toy_world()
    prompts = [world.prompts[i % len(world.prompts)] for i in range(args.num_prompts)]
    ids = [world.tokenizer(p)["input_ids"] for p in prompts]
    scorer = RewardModel(world.reward)

    def unit_reward(p, r):  # the toy reward model mapped onto [0, 1]
        return ((scorer.score(p, r) + REWARD_SCALE) / (2 * REWARD_SCALE)).clamp(0, 1)

    rows = []
    for scale, reward in (("toy RM (about [-4, 4])", world.reward), ("[0, 1]", unit_reward)):
        for label, method, options in RUNS:
            if method == "sample" and rows:
                continue  # the baseline does not use the reward
            gold, unit, target_calls, reward_calls = 0.0, 0.0, 0, 0
            for seed in args.seeds:
                out = fastalign.decode(ids, method=method, target=world.target, reward=reward,
                                       tokenizer=world.tokenizer, max_new_tokens=args.max_new_tokens, seed=seed,
                                       **options)
                gold += sum(gold_reward_text(f"{p} {c}") for p, c in zip(prompts, out.texts)) / len(prompts)
                unit += float(unit_reward(ids, out.sequences).mean())
                target_calls += out.stats["target_calls"]
                reward_calls += out.stats["reward_calls"]
            n = len(args.seeds)
            rows.append(dict(reward=scale if method != "sample" else "-", run=label, gold=gold / n,
                             unit_reward=unit / n, target_calls=target_calls / n, reward_calls=reward_calls / n))
            print(f"{rows[-1]['reward']:>22} | {label:<26} gold {gold / n:+.3f}  [0,1] reward {unit / n:.3f}  "
                  f"target calls {target_calls / n:.0f}  reward calls {reward_calls / n:.0f}", flush=True)

    info = device_info(torch.device("cpu"))
    payload = dict(benchmark="cards/rs defaults on two reward scales", command=command_line(), device=info,
                   fastalign=fastalign.__version__, num_prompts=len(prompts), max_new_tokens=args.max_new_tokens,
                   seeds=args.seeds, rows=rows)
    md = (f"# cards and rs defaults on two reward scales ({info['name']}, {info['device_type']})\n\n"
          f"Command: `{command_line()}`  \nToy world, {len(prompts)} prompts, max_new_tokens {args.max_new_tokens}, "
          f"means over seeds {args.seeds}. gold: rule-based reward in [-1, 1]; [0, 1] reward: the toy reward model "
          "mapped onto [0, 1] ((r + 4) / 8, clamped); calls: forward passes per decode of all prompts.\n\n"
          + markdown_table(["reward the method sees", "run", "gold", "[0, 1] reward", "target calls", "reward calls"],
                           [[r["reward"], r["run"], f"{r['gold']:+.3f}", f"{r['unit_reward']:.3f}",
                             f"{r['target_calls']:.0f}", f"{r['reward_calls']:.0f}"] for r in rows]))
    paths = write_results(f"reward_scale_{device_tag(info)}", payload, md, args.out_dir)
    print(md)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
