"""End to end: ``cards`` against a no-cache implementation in the style of the original research code.

The baseline (``NoCacheCards``, below) is the same algorithm written the way the CARDS code runs it: one prompt
at a time, and at every step the full prefix goes through the policy again (no KV cache) and every candidate
segment is scored by running the reward model over prompt + accepted prefix + segment. Both sides use the same
models, prompts, settings and random streams (``Randomness(seed + i)`` for prompt ``i``, drawn in the same order),
so ``fastalign`` run one prompt at a time (``fastalign_b1``) must produce the same responses, up to the rare
flip of a near-tie by float rounding (counted as ``identical_responses``). ``fastalign_batch`` decodes all
prompts in one call (one random stream, the same law).

Measured per side: wall time, forward calls and tokens processed by the target and the reward model, and the
mean reward (reward model) of the responses; ratios are baseline / fastalign.

``r_star`` (``reward_threshold``) is one number for all prompts, calibrated as ``cards``' ``"auto"`` does per
prompt: mean + std of the rewards of 8 plain samples of every prompt (or ``--reward-threshold``).

    python bench/bench_cards.py                          # the shipped toy world on CPU, < 3 min
    python bench/bench_cards.py --models random --max-new-tokens 48 --tag random   # larger random models
    python bench/bench_cards.py --device cuda --dtype bf16 --target <hf causal lm> --reward <hf reward model> \\
        --prompts-file prompts.txt --num-prompts 32 --max-new-tokens 128

Writes ``bench/results/cards_<device>[_<tag>].json`` and ``.md``. On tiny CPU models the per-call overhead of the
explicit attention mask dominates, so wall-time ratios there understate what the token ratios mean for real
models on a GPU.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (  # noqa: E402
    DTYPES, command_line, device_info, device_tag, env_backend, markdown_table, timed, write_results,
)
import fastalign  # noqa: E402
from fastalign import kernels  # noqa: E402
from fastalign.methods.base import Randomness  # noqa: E402
from fastalign.models.causal_lm import CausalLM, ModelCounters
from fastalign.models.reward import RewardModel  # noqa: E402
from fastalign.testing import tiny_causal_lm, tiny_reward_model  # noqa: E402

COUNTS = ("target_calls", "target_tokens", "reward_calls", "reward_tokens")
CARDS_DEFAULTS = dict(entropy_threshold=3.0, alpha=0.5, accept_beta=0.7, mode="soft", min_segment_tokens=4,
                      max_segment_tokens=64, max_rejections=20)


class NoCacheCards:
    """CARDS as the research code runs it: batch size 1, no KV cache, full prefixes through both models."""

    def __init__(self, target, reward: RewardModel, eos_ids, max_new_tokens, temperature, top_k, opts):
        self.target, self.reward, self.eos = target, reward, set(eos_ids)
        self.max_new, self.temperature, self.top_k, self.o = max_new_tokens, temperature, top_k, opts
        self.counters = ModelCounters()

    @torch.no_grad()
    def next_logits(self, ids: list[int]) -> torch.Tensor:
        device = next(self.target.parameters()).device
        self.counters.calls += 1
        self.counters.tokens += len(ids)
        return self.target(input_ids=torch.tensor([ids], device=device)).logits[0, -1:].float()  # [1, V]

    def generate(self, prompt: list[int], r_star: float, rng: Randomness) -> list[int]:
        o = self.o
        r0 = (1 - o["alpha"]) * float(self.reward.score([prompt], [[]])[0]) + o["alpha"] * r_star
        response: list[int] = []
        best, best_reward, rejections = None, -math.inf, 0
        while len(response) < self.max_new and not (response and response[-1] in self.eos):
            segment: list[int] = []
            while True:
                logits = self.next_logits(prompt + response + segment)
                if len(segment) >= o["min_segment_tokens"] and \
                        float(kernels.entropy(logits)[0][0]) >= o["entropy_threshold"]:
                    break
                token = int(kernels.sample(logits, self.temperature, self.top_k, None,
                                           seed=rng.streams([0], "token"))[0])
                segment.append(token)
                if token in self.eos or len(segment) == o["max_segment_tokens"] or \
                        len(response) + len(segment) == self.max_new:
                    break
            reward = float(self.reward.score([prompt], [response + segment])[0])
            tau = min(r_star, r0 + (len(response) + len(segment)) * (r_star - r0) / self.max_new)
            if o["mode"] == "soft":
                u = float(rng.uniform([0], 1, "accept")[0, 0])
                passed = u < min(1.0, math.exp((reward - tau) / o["accept_beta"]))
            else:
                passed = reward >= tau
            if reward > best_reward:
                best, best_reward = segment, reward
            if rejections >= o["max_rejections"]:
                response += best
            elif passed:
                response += segment
            else:
                rejections += 1
                continue
            best, best_reward, rejections = None, -math.inf, 0
        return response


def load_models(args, device, dtype):
    if args.target:
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

        target = AutoModelForCausalLM.from_pretrained(args.target, dtype=dtype).to(device).eval()
        reward = AutoModelForSequenceClassification.from_pretrained(args.reward, dtype=dtype).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.target)
        reward_tokenizer = AutoTokenizer.from_pretrained(args.reward)
        prompts = Path(args.prompts_file).read_text().splitlines() if args.prompts_file else [
            "Explain why the sky is blue.", "Write a short poem about autumn.", "How do I bake bread?",
            "Give me advice for a job interview."]
        prompts = [p for p in prompts if p.strip()][: args.num_prompts]
        ids = [tokenizer(p)["input_ids"] for p in prompts]
        return target, reward, tokenizer, reward_tokenizer, ids, args.target
    if args.models == "toy":
        from fastalign.eval.toyworld import load_toy_world

        world = load_toy_world(device=device)
        ids = [world.tokenizer(p)["input_ids"] for p in world.prompts][: args.num_prompts]
        return world.target.to(dtype), world.reward.to(dtype), world.tokenizer, None, ids, "toy world"
    target = tiny_causal_lm(vocab_size=512, hidden=128, layers=4, heads=4, context=512).to(device, dtype)
    reward = tiny_reward_model(vocab_size=512, hidden=64, layers=2, context=512).to(device, dtype)
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(1, 511, (int(torch.randint(6, 16, (1,), generator=g)),), generator=g).tolist()
           for _ in range(args.num_prompts)]
    return target, reward, None, None, ids, "random tiny (llama 4x128, vocab 512; reward 2x64)"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    ap.add_argument("--models", choices=["toy", "random"], default="toy")
    ap.add_argument("--target", help="HF causal LM name/path (with --reward): realistic sizes")
    ap.add_argument("--reward", help="HF sequence-classification reward model name/path")
    ap.add_argument("--prompts-file", help="one prompt per line (with --target)")
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-k", type=int, default=40)
    ap.add_argument("--reward-threshold", type=float, help="r_star (default: calibrated, see the docstring)")
    ap.add_argument("--entropy-threshold", type=float, default=CARDS_DEFAULTS["entropy_threshold"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2, help="timed repetitions (the minimum wall time is kept)")
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--tag", help="suffix of the result files: cards_<device>_<tag>")
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    target_hf, reward_hf, tokenizer, reward_tokenizer, prompts, model_desc = load_models(args, device, dtype)
    engine = fastalign.Engine(target=target_hf, reward=reward_hf, tokenizer=tokenizer,
                              reward_tokenizer=reward_tokenizer)
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k)

    # r_star: mean + std of the rewards of 8 plain samples of every prompt
    if args.reward_threshold is None:
        plain = engine.decode([p for p in prompts for _ in range(8)], method="sample", seed=args.seed, **sampling)
        rewards = engine.reward.score([p for p in prompts for _ in range(8)], plain.sequences)
        r_star = float(rewards.mean() + rewards.std())
    else:
        r_star = args.reward_threshold
    opts = dict(CARDS_DEFAULTS, entropy_threshold=args.entropy_threshold, reward_threshold=r_star)

    def mean_reward(responses):
        return float(engine.reward.score(prompts, responses).mean())

    def fastalign_batch():  # all prompts in one call
        out, wall = timed(lambda: engine.decode(prompts, method="cards", seed=args.seed, **sampling, **opts), device)
        return dict(wall_s=wall, **{k: out.stats[k] for k in COUNTS}, responses=out.sequences)

    def fastalign_b1():  # one prompt at a time, with the baseline's random streams
        run = dict(wall_s=0.0, **{k: 0 for k in COUNTS}, responses=[])
        for i, p in enumerate(prompts):
            out, wall = timed(lambda: engine.decode([p], method="cards", seed=args.seed + i, **sampling, **opts),
                              device)
            run["wall_s"] += wall
            for k in COUNTS:
                run[k] += out.stats[k]
            run["responses"].append(out.sequences[0])
        return run

    def no_cache_baseline():
        scorer = RewardModel(reward_hf, tokenizer=reward_tokenizer, policy_tokenizer=tokenizer)
        baseline = NoCacheCards(target_hf, scorer, CausalLM(target_hf).eos_token_ids, args.max_new_tokens,
                                args.temperature, args.top_k, opts)
        run = dict(wall_s=0.0, responses=[])
        for i, p in enumerate(prompts):
            response, wall = timed(lambda: baseline.generate(p, r_star, Randomness(args.seed + i)), device)
            run["wall_s"] += wall
            run["responses"].append(response)
        return dict(run, target_calls=baseline.counters.calls, target_tokens=baseline.counters.tokens,
                    reward_calls=scorer.counters.calls, reward_tokens=scorer.counters.tokens)

    engine.decode(prompts[:1], method="cards", seed=args.seed, **sampling, **opts)  # warm-up
    runs = {}
    for _ in range(args.repeats):  # interleaved; counts are deterministic, wall time is the minimum
        for name, fn in (("fastalign_batch", fastalign_batch), ("fastalign_b1", fastalign_b1),
                         ("no_cache_baseline", no_cache_baseline)):
            run = fn()
            runs[name] = run if name not in runs else dict(runs[name], wall_s=min(runs[name]["wall_s"], run["wall_s"]))
    responses = runs["no_cache_baseline"]["responses"]
    for run in runs.values():
        run["mean_reward"] = mean_reward(run["responses"])
        run["generated_tokens"] = sum(map(len, run["responses"]))
    identical = sum(a == b for a, b in zip(runs["fastalign_b1"]["responses"], responses))

    base = runs["no_cache_baseline"]
    ratios = {name: {k: base[k] / max(run[k], 1e-12) for k in ("wall_s", "target_tokens", "reward_tokens",
                                                                 "target_calls", "reward_calls")}
              for name, run in runs.items() if name != "no_cache_baseline"}
    info = device_info(device)
    payload = dict(benchmark="cards vs no-cache baseline", command=command_line(), device=info,
                   kernels_backend=env_backend(), fastalign=fastalign.__version__, models=model_desc,
                   dtype=args.dtype, num_prompts=len(prompts), repeats=args.repeats, settings=dict(sampling, **opts),
                   identical_responses=f"{identical}/{len(prompts)}", runs=runs,
                   ratios_baseline_over_fastalign=ratios)
    header = ["run", "wall s", "target tokens", "target calls", "reward tokens", "reward calls", "generated",
              "mean reward"]
    rows = [[name, f"{r['wall_s']:.2f}", r["target_tokens"], r["target_calls"], r["reward_tokens"],
             r["reward_calls"], r["generated_tokens"], f"{r['mean_reward']:.3f}"] for name, r in runs.items()]
    ratio_rows = [[name, f"{r['wall_s']:.1f}x", f"{r['target_tokens']:.1f}x", f"{r['target_calls']:.1f}x",
                   f"{r['reward_tokens']:.1f}x", f"{r['reward_calls']:.1f}x"] for name, r in ratios.items()]
    md = (f"# cards vs a no-cache baseline ({info['name']}, {info['device_type']})\n\n"
          f"Command: `{command_line()}`  \nModels: {model_desc}, {args.dtype}; {len(prompts)} prompts, "
          f"max_new_tokens {args.max_new_tokens}, T {args.temperature}, top-k {args.top_k}, r_star {r_star:.3f}, "
          f"other cards options at their defaults.  \ntorch {info['torch']}, triton {info['triton']}, kernels "
          f"backend {env_backend()}. fastalign_b1 and the baseline share random streams: identical responses "
          f"{identical}/{len(prompts)}. Wall time: minimum of {args.repeats} interleaved repetitions (on a shared "
          f"machine, indicative only).\n\n"
          + markdown_table(header, rows)
          + "\nBaseline / fastalign:\n\n"
          + markdown_table(["run", "wall time", "target tokens", "target calls", "reward tokens", "reward calls"],
                           ratio_rows))
    stem = f"cards_{device_tag(info)}" + (f"_{args.tag}" if args.tag else "")
    paths = write_results(stem, payload, md, args.out_dir)
    print(md)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
