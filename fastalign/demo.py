"""``fastalign demo``: every method on the built-in toy world (``fastalign.toyworld``), offline, on the CPU.

    python -m fastalign.demo [--methods sample bon cards] [--num-prompts 32] [--max-new-tokens 24] [--seed 0]

Each method decodes the same prompts (review openings) once, batched; the demo prints a few completions per
method and a table of the mean gold reward (the rule-based positivity in ``[-1, 1]``), the mean reward-model
score (about 4x the gold reward), model calls, generated tokens and wall time, with the gold gain and the
time relative to ``sample``. Every method samples the target at temperature 1 without truncation, so the
differences come from the alignment alone. ``sd`` uses the unaligned draft (lossless: its rewards match
``sample`` up to noise); ``sss`` uses the aligned draft with the unaligned one as ``ref``.
"""

from __future__ import annotations

import sys
import time

# label -> (method, options): small settings, so that the whole demo runs in well under a minute on a CPU.
# The reward model's scale is about [-4, 4] (soft_bon's lam and qalign's beta are in those units). The toy
# vocabulary is small (entropy at most ln 144 = 5 nats; about 3 at a choice of noun, 1 to 2 at an adjective),
# so cards cuts segments at 2 nats after 2 tokens: clause-sized segments (the paper's 3 nats / 4 tokens cut
# mostly at nouns and reach a lower reward at more target calls here).
SETTINGS = {
    "sample": ("sample", {}),
    "bon": ("bon", {"n": 8}),
    "soft_bon": ("soft_bon", {"n": 8, "lam": 0.5}),
    "args": ("args", {"k": 10, "w": 1.5, "mode": "sampled"}),
    "rs": ("rs", {"reward_threshold": "auto", "max_rejections": 8}),
    "cards": ("cards", {"reward_threshold": "auto", "entropy_threshold": 2.0, "min_segment_tokens": 2}),
    "sd": ("sd", {"num_draft_tokens": 4}),
    "sss": ("sss", {"num_draft_tokens": 4, "lam": 1.0}),
    "sss_tree": ("sss", {"tree": "sampled", "branching": (2, 2, 1), "lam": 1.0}),
    "qalign": ("qalign", {"beta": 1.0, "steps": 8}),
}
METHODS = tuple(SETTINGS)
COLUMNS = ("method", "gold", "gold_vs_sample", "reward", "target_calls", "draft_calls", "ref_calls",
           "reward_calls", "generated_tokens", "time_s", "time_vs_sample")


def run_demo(methods=None, num_prompts: int = 32, max_new_tokens: int = 24, seed: int = 0, device=None,
             show: int = 2, file=None) -> list[dict]:
    """Run ``methods`` (labels of ``SETTINGS``; all by default) on the toy world and print what they do.

    The prompts are the toy world's review openings, cycled to ``num_prompts``. Returns one row per method:
    the ``COLUMNS`` plus ``texts`` (prompt and completion per prompt).
    """
    file = file or sys.stdout
    methods = list(METHODS if methods is None else methods)
    unknown = [m for m in methods if m not in SETTINGS]
    if unknown:
        raise ValueError(f"unknown demo method(s) {unknown}; expected some of {list(METHODS)}")
    if num_prompts < 1 or max_new_tokens < 1:
        raise ValueError("num_prompts and max_new_tokens must be positive")
    import torch  # here, not at the top: `fastalign --help` reads METHODS without importing torch

    from .api import Engine
    from .models import RewardModel
    from .toyworld import load_toy_world

    world = load_toy_world(device=device)
    prompts = [world.prompts[i % len(world.prompts)] for i in range(num_prompts)]
    prompt_ids = [world.tokenizer(p)["input_ids"] for p in prompts]
    common = dict(target=world.target, reward=world.reward, tokenizer=world.tokenizer)
    engines = {"default": Engine(draft=world.draft, **common),  # sd: lossless, with the unaligned draft
               "sss": Engine(draft=world.aligned_draft, ref=world.ref, **common)}
    evaluator = RewardModel(world.reward)  # scores the outputs outside the methods' own counters

    threads = torch.get_num_threads()
    if world.target.device.type == "cpu":
        torch.set_num_threads(1)  # tiny models: intra-op threads only add synchronisation (10x slower when busy)
    try:
        for engine in engines.values():  # warm-up, so that the first method's time is not the library's start
            engine.decode(prompt_ids[:1], method="sample", max_new_tokens=2, seed=seed)
        rows = [_run_method(label, engines, prompts, prompt_ids, max_new_tokens, seed, evaluator, show, file)
                for label in methods]
    finally:
        torch.set_num_threads(threads)

    base = next((r for r in rows if r["method"] == "sample"), None)
    for row in rows:
        row["gold_vs_sample"] = row["gold"] - base["gold"] if base else None
        row["time_vs_sample"] = row["time_s"] / base["time_s"] if base else None
    print(file=file)
    print(format_table(rows), file=file)
    print(f"\n{num_prompts} prompts, {max_new_tokens} new tokens at most, seed {seed}. gold: rule-based reward in "
          "[-1, 1]; RM reward: the toy reward model (about 4x gold); target/draft/ref/reward: forward passes "
          "per model; time ×: relative to sample.", file=file)
    return rows


def _run_method(label, engines, prompts, prompt_ids, max_new_tokens, seed, evaluator, show, file) -> dict:
    from .toyworld import gold_reward_text

    method, options = SETTINGS[label]
    engine = engines["sss" if method == "sss" else "default"]
    start = time.perf_counter()
    out = engine.decode(prompt_ids, method=method, max_new_tokens=max_new_tokens, temperature=1.0, seed=seed,
                        **options)
    elapsed = time.perf_counter() - start
    texts = [f"{p} {c}".strip() for p, c in zip(prompts, out.texts)]
    row = {
        "method": label,
        "gold": sum(map(gold_reward_text, texts)) / len(texts),
        "reward": float(evaluator.score(prompt_ids, out.sequences).mean()),
        **{key: out.stats[key] for key in ("target_calls", "draft_calls", "ref_calls", "reward_calls",
                                            "generated_tokens")},
        "time_s": elapsed,
        "texts": texts,
    }
    print(f"{label:>9}  gold {row['gold']:+.3f}  {elapsed:6.2f} s  | " + "  | ".join(texts[:show]),
          file=file, flush=True)
    return row


def format_table(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    headers = ["method", "gold", "Δgold", "RM reward", "target", "draft", "ref", "reward", "tokens",
               "time (s)", "time ×"]

    def cell(row, key):
        value = row.get(key)
        if value is None:
            return "-"
        if key in ("gold", "gold_vs_sample", "reward"):
            return f"{value:+.3f}"
        if key == "time_s":
            return f"{value:.2f}"
        if key == "time_vs_sample":
            return f"{value:.1f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(row, key) for key in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    """``python -m fastalign.demo ARGS`` is ``fastalign demo ARGS`` (one parser, in ``fastalign.cli``)."""
    from .cli import main as cli_main

    return cli_main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
