"""SSS under top-k on the toy world: the truncation rule of docs/design.md section 1 (``trunc(pi)``, pi from the
untruncated target, draft and ref) against untruncated SSS, the published rule and plain sampling.

The toy world's 16 review openings, each decoded ``--repeats`` times (one seed per prompt and repeat), at the
original SSS settings (temperature 0.8, top-k 40, K = 4) through ``fastalign.compat.RewardSampling.sss_generate``,
and with the same temperature without truncation through ``fastalign.decode``. Reported: the mean gold reward
(the toy world's rule-based reward, in [-1, 1]) with its standard error, the acceptance rate and two
completions per row::

    python bench/bench_sss_truncation.py            # writes bench/results/sss_truncation_cpu.{json,md}
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import command_line, device_info, markdown_table, write_results  # noqa: E402
from fastalign import Engine  # noqa: E402
from fastalign.compat import RewardSampling  # noqa: E402
from fastalign.eval.toyworld import gold_reward_text, load_toy_world  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    world = load_toy_world()
    prompts = list(world.prompts) * args.repeats
    seeds = list(range(args.seed, args.seed + len(prompts)))
    engine = Engine(target=world.target, draft=world.aligned_draft, ref=world.ref, tokenizer=world.tokenizer)
    compat = RewardSampling(world.target, draft_dir=world.ref, draft_r_dir=world.aligned_draft,
                            tokenizer=world.tokenizer)
    M, T = args.max_new_tokens, 0.8
    runs = {
        "sample, T 0.8, top-k 40": lambda: engine.decode(prompts, method="sample", max_new_tokens=M, temperature=T,
                                                         top_k=40, seed=seeds),
        "sss exact, T 0.8, no truncation": lambda: engine.decode(prompts, method="sss", max_new_tokens=M,
                                                                 temperature=T, seed=seeds),
        "sss exact, T 0.8, top-k 40 (compat.sss_generate)": lambda: _compat(compat, prompts, M, seeds, "exact"),
        "sss paper rule, T 0.8, top-k 40 (compat.sss_generate)": lambda: _compat(compat, prompts, M, seeds,
                                                                               "paper"),
    }
    rows, payload = [], {"command": command_line(), "device": device_info(torch.device("cpu")),
                         "prompts": len(prompts), "max_new_tokens": M, "runs": {}}
    for name, run in runs.items():
        result = run()
        texts, stats = result if isinstance(result, tuple) else (_texts(result, prompts), result.stats)
        gold = [gold_reward_text(t) for t in texts]
        mean = statistics.fmean(gold)
        sem = statistics.stdev(gold) / len(gold) ** 0.5
        acc = stats.get("acceptance_rate")
        payload["runs"][name] = {"gold_mean": mean, "gold_sem": sem, "acceptance_rate": acc,
                                 "examples": texts[:2]}
        rows.append([name, f"{mean:+.3f} ± {sem:.3f}", "" if acc is None else f"{acc:.2f}", texts[0]])
        print(f"{name:55s} gold {mean:+.3f} ± {sem:.3f}  acceptance {acc}  | {texts[0]}", flush=True)
    md = (f"# SSS under top-k on the toy world\n\n`{command_line()}`\n\n{len(prompts)} decodes (16 prompts x "
          f"{args.repeats}), {M} new tokens at most, CPU.\n\n"
          + markdown_table(["run", "gold reward (mean ± s.e.)", "acceptance", "first completion"], rows))
    write_results("sss_truncation_cpu", payload, md)
    return 0


def _compat(compat: RewardSampling, prompts, M, seeds, variant):
    texts, _ = compat.sss_generate(prompts, beta=0.8, topk=40, max_draft_token=4, max_new_token=M,
                                   variant=variant, seed=seeds)
    return texts, compat.last_output.stats


def _texts(out, prompts):
    return [f"{p} {c}".strip() for p, c in zip(prompts, out.texts)]


if __name__ == "__main__":
    sys.exit(main())
