"""``num_draft_tokens="auto"`` against fixed draft lengths, replayed on recorded acceptance: the policy without the
text's noise.

A real run (``bench_adaptive.py``) samples its own text in every case (K changes which draws a token uses), and
on the 100m world one set of 16 prompts of 96 tokens moves a case by about 3% from text alone, as much as the
cases differ. The replay holds the text fixed and repeats the draws:

1. record: the target samples each prompt's continuation (``sample``, temperature 1, EOS off); along it,
   ``beta_t``, the probability that a token drafted at position ``t`` is accepted
   (``kernels.acceptance_probability`` of the target's and the draft's logits there);
2. measure: ``RoundCosts`` of the pair at batch 1 (``measure_round_costs``, as ``"auto"`` does);
3. replay: a prompt's rounds on its trace, each at the K its policy chooses (``AdaptiveLength`` itself for
   ``auto``, fed what ``sd`` feeds it: the betas of the round's accepted positions and its first rejected one),
   its drafted positions accepted with probability ``beta`` in turn, the round costing
   ``RoundCosts.chain_round(K)`` target calls, ``--replays`` times per trace.

It reports each policy's tokens per unit of cost (a target call of one token), rounds per prompt and the spread
(relative sd) of one draw of a set of prompts, and how a single real comparison of auto against the best of the
fixed K would spread: each of ``--replays`` draws of one set, auto over the best fixed K of that draw.

What it leaves out: the replay takes the target's sample as the path of every round, while an accepted draft
token follows ``min(p, q) / beta`` rather than ``p``; a round's time beyond its model calls (verification,
bookkeeping: about 3 ms, 0.2 target calls, at every K on the 100m world, so it favours longer K a little); and
widths past ``MAX_AUTO + 1``, costed as the widest measured. Checked against real runs on the 100m world: the
replay's rounds per prompt at K = 6, 8 and 12 were within 3% of ``bench_adaptive.py``'s.

    python bench/bench_adaptive_replay.py --prompts 16 --max-new-tokens 96 --seed-sets 3   # ~5 minutes
    python bench/bench_adaptive_replay.py --ks 4 6 8 10 12 --caps 12   # also fixed K past 8, and auto up to 12

Writes ``bench/results/adaptive_replay_cpu_100m.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench_adaptive import engine, set_seed  # noqa: E402
from bench.bench_engine import random_world  # noqa: E402
from bench.common import command_line, device_info, markdown_table, write_results  # noqa: E402
from fastalign.kernels import acceptance_probability  # noqa: E402
from fastalign.methods.speculative import AdaptiveLength, RoundCosts, measure_round_costs  # noqa: E402


@torch.no_grad()
def record(eng, models, prompts, max_new: int, seed: int) -> list[list[float]]:
    """Per prompt, ``beta_t`` along the target's own sample of ``max_new`` tokens (seed ``seed + i``)."""
    traces = []
    for i, p in enumerate(prompts):
        out = eng.decode([p], method="sample", max_new_tokens=max_new, seed=[seed + i], temperature=1.0)
        ids = torch.tensor([p + list(out.sequences[0])])
        at = slice(len(p) - 1, ids.shape[1] - 1)  # the logits that predict each new token
        target, draft = (models[role](ids).logits[:, at] for role in ("target", "draft"))
        traces.append(acceptance_probability(target, draft)[0].tolist())
    return traces


class Fixed:
    """A fixed draft length, behind ``AdaptiveLength``'s interface (one row)."""

    def __init__(self, k: int):
        self.k = k

    def choose(self, rows):
        return [self.k]

    def update(self, rows, betas):
        pass


def replay(policy, trace: list[float], costs: RoundCosts, rng: random.Random) -> tuple[float, int]:
    """One prompt's rounds on ``trace``: ``(cost in target calls, rounds)``."""
    t = cost = rounds = 0
    while t < len(trace):
        k = min(policy.choose([0])[0], len(trace) - t - 1)  # the length cap: a round emits at most what is left
        n = 0
        while n < k and rng.random() < trace[t + n]:
            n += 1
        policy.update([0], [trace[t: t + n + (n < k)]])  # accepted positions and the first rejected one
        cost, rounds, t = cost + costs.chain_round(k), rounds + 1, t + n + 1
    return cost, rounds


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=16, help="prompts per set (the real bench's set)")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0, help="the world's seed")
    ap.add_argument("--seed-sets", type=int, default=3, help="sets of prompts' seeds recorded")
    ap.add_argument("--acceptance", type=float, default=0.8, help="the draft's calibrated SD acceptance")
    ap.add_argument("--ks", type=int, nargs="+", default=[4, 6, 8], help="the fixed draft lengths")
    ap.add_argument("--replays", type=int, default=200, help="replays of every trace per policy")
    ap.add_argument("--caps", type=int, nargs="*", default=[],
                    help="also auto with these largest K (beside MAX_AUTO's; widths past the measured costed as it)")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    world_args = argparse.Namespace(device=torch.device("cpu"), dtype=torch.float32, seed=args.seed,
                                    acceptance=args.acceptance)
    models, prompts, _ = random_world(world_args, "100m")
    prompts = prompts[: args.prompts]
    eng = engine(argparse.Namespace(target=models["target"], draft=models["draft"]), False)
    eng.target.prefill(prompts[:1], args.max_new_tokens)
    eng.draft.prefill(prompts[:1], args.max_new_tokens)
    costs = measure_round_costs(eng.target, eng.draft, 1, args.max_new_tokens)
    sets = [record(eng, models, prompts, args.max_new_tokens, set_seed(args.seed, s)) for s in range(args.seed_sets)]
    traces = [t for s in sets for t in s]
    print(f"costs: draft {costs.draft:.3f}, target " + " ".join(f"{c:.2f}" for c in costs.target), flush=True)

    policies = {f"K={k}": (lambda k=k: Fixed(k)) for k in args.ks}
    policies["auto"] = lambda: AdaptiveLength(1, costs, floor=0)
    for cap in args.caps:
        policies[f"auto, K <= {cap}"] = lambda cap=cap: AdaptiveLength(1, costs, floor=0, max_k=cap)
    rng = random.Random(args.seed)
    # per policy and replay: (cost, rounds, tokens) of one draw of a whole set (every trace of one set of seeds)
    draws = {name: [] for name in policies}
    for r in range(args.replays):
        trace_set = sets[r % len(sets)]
        for name, make in policies.items():
            cost = rounds = 0
            for trace in trace_set:
                c, n = replay(make(), trace, costs, rng)
                cost, rounds = cost + c, rounds + n
            draws[name].append((cost, rounds, sum(map(len, trace_set))))
    results = {}
    for name, d in draws.items():
        cost, rounds, tokens = (sum(x[i] for x in d) for i in range(3))
        rates = [x[2] / x[0] for x in d]
        mean = sum(rates) / len(rates)
        results[name] = dict(tokens_per_cost=tokens / cost, rounds_per_prompt=rounds / (len(d) * args.prompts),
                             set_sd=(sum((r - mean) ** 2 for r in rates) / (len(rates) - 1)) ** 0.5 / mean)
    best = max(results[f"K={k}"]["tokens_per_cost"] for k in args.ks)
    single = sorted((d[2] / d[0]) / max(draws[f"K={k}"][i][2] / draws[f"K={k}"][i][0] for k in args.ks)
                    for i, d in enumerate(draws["auto"]))
    spread = dict(mean=sum(single) / len(single), p10=single[len(single) // 10], p50=single[len(single) // 2])
    rows = [[name, f"{r['tokens_per_cost']:.3f}", f"{r['tokens_per_cost'] / best:.3f}", f"{r['rounds_per_prompt']:.1f}",
             f"{r['set_sd']:.1%}"] for name, r in results.items()]
    mean_beta = sum(map(sum, traces)) / sum(map(len, traces))
    md = (f"# sd on the 100m world: auto against fixed K, replayed on recorded acceptance\n\n`{command_line()}`\n\n"
          f"{len(traces)} traces ({args.seed_sets} sets of {args.prompts} prompts, {args.max_new_tokens} tokens), "
          f"mean beta along them {mean_beta:.3f}; costs measured: draft {costs.draft:.3f}, "
          f"target at 1..{len(costs.target)} tokens "
          + " ".join(f"{c:.2f}" for c in costs.target) + f"; {args.replays} replays of a set per policy.\n\n"
          + markdown_table(["policy", "tokens per target call", "x best fixed K", "rounds per prompt",
                            "sd of one set's draw"], rows)
          + f"\nOne set's draw (what one real comparison sees), auto over the best fixed K of the same draw: mean "
            f"{spread['mean']:.3f}, median {spread['p50']:.3f}, 10th percentile {spread['p10']:.3f}.\n")
    payload = dict(command=command_line(), device=device_info(torch.device("cpu")), threads=1, costs=costs._asdict(),
                   results=results, single_set=spread, mean_beta=mean_beta, traces=traces)
    for p in write_results("adaptive_replay_cpu_100m" + (f"_{args.tag}" if args.tag else ""), payload, md):
        print("wrote", p)
    print(md)


if __name__ == "__main__":
    main()
