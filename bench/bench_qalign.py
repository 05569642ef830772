"""Cost of one QAlign MCMC step: fastalign (prompt cached once, suffix-only proposals, reward prompt cached)
against a loop that regenerates every proposal from the prompt without reusing any cache.

Both run the same chain (same proposal law, batched over prompts x chains, same models and kernels); the
baseline, written here, prefills ``prompt + y[:i]`` afresh for every proposal and scores the whole
``prompt + response`` with the reward model, as a research loop over ``generate`` calls does. Per step we
report the tokens each model processes and the wall time, measured as ``(run(steps) - run(0)) / steps``
so that the initial samples are left out, and the ratios baseline / fastalign.

    python bench/bench_qalign.py                        # tiny random models on CPU (< 3 min)
    python bench/bench_qalign.py --device cuda --target Qwen/Qwen2.5-0.5B --reward <reward model> \
        --prompt-lens 512 2048 --max-new-tokens 256 --chains 8 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fastalign  # noqa: E402
from bench.common import command_line, device_info, device_tag, markdown_table, timed, write_results  # noqa: E402
from fastalign.methods.base import Context, Randomness, sample_continuations  # noqa: E402
from fastalign.models.causal_lm import CausalLM
from fastalign.models.reward import RewardModel  # noqa: E402
from fastalign.testing import tiny_causal_lm, tiny_reward_model  # noqa: E402


def no_cache_qalign(lm: CausalLM, rm: RewardModel, prompts, chains, steps, max_new_tokens, beta, seed):
    """QAlign without cache reuse: every proposal prefills ``prompt + y[:i]``; rewards score the whole pair."""
    rows = [list(p) for p in prompts for _ in range(chains)]
    ctx = Context(lm, None, None, rm, None, max_new_tokens, 1.0, None, None, Randomness(seed, len(rows)))
    row_ids = range(len(rows))  # every chain its own stream

    def generate(kept, budgets):
        logits = lm.prefill([p + k for p, k in zip(rows, kept)])  # the budgets keep each row in context
        return sample_continuations(ctx, lm, logits, budgets, row_ids)

    states = generate([[] for _ in rows], [max_new_tokens] * len(rows))
    rewards = rm.score(rows, states)
    for _ in range(steps):
        lengths = torch.tensor([len(y) for y in states], dtype=torch.float64)
        u_index = ctx.rng.uniform(row_ids, 1, "index")[:, 0].double()
        index = torch.minimum((u_index * lengths).long(), lengths.long() - 1).tolist()
        suffixes = generate([y[:i] for y, i in zip(states, index)], [max_new_tokens - i for i in index])
        proposals = [y[:i] + s for y, i, s in zip(states, index, suffixes)]
        new = rm.score(rows, proposals)
        new_lengths = torch.tensor([len(y) for y in proposals], dtype=torch.float64)
        log_ratio = ((new - rewards).double() / beta + lengths.log() - new_lengths.log()).clamp(-20, 20)
        accept = ctx.rng.uniform(row_ids, 1, "mh")[:, 0].double() < log_ratio.exp()
        states = [p if a else y for y, p, a in zip(states, proposals, accept.tolist())]
        rewards = torch.where(accept, new, rewards)
    return states


def measure(run, lm, rm, device, repeats):
    """Wall time (s) and tokens processed by each model of ``run()``; the best of ``repeats`` wall times."""
    walls = []
    for _ in range(repeats):
        before = (lm.counters.tokens, rm.counters.tokens)
        walls.append(timed(run, device)[1])
        tokens = (lm.counters.tokens - before[0], rm.counters.tokens - before[1])
    return min(walls), tokens


def per_step(run_with_steps, lm, rm, steps, device, repeats):
    """(wall s, target tokens, reward tokens) per MCMC step (all chains), the initial samples left out."""
    wall_s, tok_s = measure(lambda: run_with_steps(steps), lm, rm, device, repeats)
    wall_0, tok_0 = measure(lambda: run_with_steps(0), lm, rm, device, repeats)
    return (wall_s - wall_0) / steps, (tok_s[0] - tok_0[0]) / steps, (tok_s[1] - tok_0[1]) / steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--target", help="HF causal LM name/path (default: a tiny random Llama)")
    parser.add_argument("--reward", help="HF sequence-classification reward (default: a tiny random Llama)")
    parser.add_argument("--hidden", type=int, default=128, help="tiny models: hidden size")
    parser.add_argument("--layers", type=int, default=4, help="tiny models: layers")
    parser.add_argument("--vocab", type=int, default=1024, help="tiny models: vocabulary")
    parser.add_argument("--prompt-lens", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: stable timings on a shared CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.target:
        from transformers import AutoModelForCausalLM

        target = AutoModelForCausalLM.from_pretrained(args.target, dtype=dtype)
    else:
        context = max(args.prompt_lens) + args.max_new_tokens + 8
        target = tiny_causal_lm(vocab_size=args.vocab, hidden=args.hidden, layers=args.layers, context=context,
                                dtype=dtype)
    if args.reward:
        from transformers import AutoModelForSequenceClassification

        reward = AutoModelForSequenceClassification.from_pretrained(args.reward, dtype=dtype)
    else:
        reward = tiny_reward_model(vocab_size=args.vocab, hidden=args.hidden, layers=args.layers,
                                   context=max(args.prompt_lens) + args.max_new_tokens + 8).to(dtype)
    lm, rm = CausalLM(target.to(device)), RewardModel(reward.to(device))
    vocab = min(lm.vocab_size, args.vocab if not args.target else lm.vocab_size)
    eos = min(lm.eos_token_ids) if lm.eos_token_ids else -1

    results = []
    for prompt_len in args.prompt_lens:
        g = torch.Generator().manual_seed(args.seed + prompt_len)
        prompts = []
        for _ in range(args.prompts):
            p = torch.randint(1, vocab, (prompt_len,), generator=g).tolist()
            prompts.append([t if t != eos else 1 for t in p])
        common = dict(max_new_tokens=args.max_new_tokens, seed=args.seed)

        def fast(steps):
            out = fastalign.decode(prompts, method="qalign", target=lm, reward=rm, steps=steps, chains=args.chains,
                                   beta=args.beta, **common)
            if steps:
                fast.out = out

        def slow(steps):
            no_cache_qalign(lm, rm, prompts, args.chains, steps, args.max_new_tokens, args.beta, args.seed)

        fast(1)  # warm-up
        f_wall, f_tgt, f_rew = per_step(fast, lm, rm, args.steps, device, args.repeats)
        lengths = [len(y) for p in fast.out.extra["final_states"] for y in p]
        s_wall, s_tgt, s_rew = per_step(slow, lm, rm, args.steps, device, args.repeats)
        results.append({
            "prompt_len": prompt_len, "rows": args.prompts * args.chains,
            "mean_response_len": statistics.mean(lengths),
            "acceptance_rate": fast.out.extra["acceptance_rate"],
            "fastalign": {"wall_ms_per_step": f_wall * 1e3, "target_tokens_per_step": f_tgt,
                          "reward_tokens_per_step": f_rew},
            "no_cache": {"wall_ms_per_step": s_wall * 1e3, "target_tokens_per_step": s_tgt,
                         "reward_tokens_per_step": s_rew},
            "ratio": {"wall": s_wall / f_wall, "target_tokens": s_tgt / f_tgt, "reward_tokens": s_rew / f_rew},
        })
        print(results[-1], flush=True)

    info = device_info(device)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None  # wall times on a shared CPU depend on it
    config = {k: v for k, v in vars(args).items() if k != "out_dir"}
    payload = {"benchmark": "qalign", "command": command_line(), "device": info, "config": config,
               "fastalign_version": fastalign.__version__, "load_average": load, "results": results}
    rows = [[r["prompt_len"], r["rows"], f"{r['mean_response_len']:.1f}", f"{r['acceptance_rate']:.2f}",
             f"{r['fastalign']['target_tokens_per_step']:.0f}", f"{r['no_cache']['target_tokens_per_step']:.0f}",
             f"{r['ratio']['target_tokens']:.1f}x",
             f"{r['fastalign']['reward_tokens_per_step']:.0f}", f"{r['no_cache']['reward_tokens_per_step']:.0f}",
             f"{r['ratio']['reward_tokens']:.1f}x",
             f"{r['fastalign']['wall_ms_per_step']:.1f}", f"{r['no_cache']['wall_ms_per_step']:.1f}",
             f"{r['ratio']['wall']:.2f}x"] for r in results]
    models = f"target {args.target or f'tiny Llama (hidden {args.hidden}, {args.layers} layers, vocab {args.vocab})'}, " \
             f"reward {args.reward or 'tiny Llama classifier of the same size'}"
    md = (f"# QAlign: cost per MCMC step, fastalign vs. no cache reuse\n\n"
          f"Device: {info['name']} ({info['device_type']}), torch {info['torch']}, {args.dtype}; {models}.\n"
          f"{args.prompts} prompts x {args.chains} chains, max_new_tokens {args.max_new_tokens}, "
          f"{args.steps} steps, beta {args.beta}, threads {args.threads if device.type == 'cpu' else '-'}; "
          f"load average at the end {'-' if load is None else ', '.join(f'{x:.1f}' for x in load)}.\n\n"
          f"Command: `{command_line()}`\n\n"
          "Per MCMC step of all chains (initial samples excluded). Tokens = tokens each model processed; "
          "no-cache = every proposal prefills prompt + kept prefix again and the reward scores prompt + "
          "response. Ratio = no-cache / fastalign.\n\n"
          + markdown_table(["prompt len", "rows", "mean response len", "accept", "target tok (fa)", "target tok (no cache)",
                            "ratio", "reward tok (fa)", "reward tok (no cache)", "ratio", "ms/step (fa)",
                            "ms/step (no cache)", "speed-up"], rows))
    paths = write_results(f"qalign_{device_tag(info)}", payload, md, args.out_dir)
    print(md)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
