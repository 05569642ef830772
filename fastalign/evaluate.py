"""Evaluation harness: methods x budgets on a prompt set, scored by a gold reward.

    records = evaluate(prompts, grid, engine, gold, max_new_tokens=64, seed=0)
    rows = summarize(records)            # one row per (method, budget)
    write_results(records, rows, "eval_out")   # results.jsonl, summary.md, summary.json, reward_vs_compute.png

A *grid* is a list of ``(method, options)`` pairs; ``parse_grid("bon:n=2,4,8")`` expands a compact spec.
Prompts are decoded in batches of ``batch_size`` (one ``decode`` call each), so per-prompt costs are the
batch's costs shared equally between its rows: exact at ``batch_size=1``, an average otherwise.

Metrics per (method, budget): mean gold reward (with its standard error), win rate against the baseline
method (``sample``; per prompt 1 for a higher gold reward, 1/2 for a tie), forward calls and tokens processed
per model, compute tokens (all models' tokens together: target + draft + ref + reward), wall time, and for
speculative methods the accepted tokens per target call they report (``accepted_per_target_call``).
Before timing, each engine decodes a few tokens once (untimed), so that one-off start-up costs do not land on
the first method of the grid.
"""

from __future__ import annotations

import ast
import itertools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from .answers import EXTRACTORS
from .api import MODEL_ROLES, Engine, _load_reward
from .models import InputError, RewardModel
from .rewards import call_text_reward, text_reward_function
from .validation import check_scores
from .worlds import NAMES as WORLD_NAMES
from .worlds import world_prompts
from .methods.base import prompt_seeds

# ------------------------------------------------------------------------------------------- prompts
# dataset aliases: name -> (hub id, config, split, prompt field, answer field, prompt template)
DATASETS = {
    "hh-rlhf": ("Dahoas/full-hh-rlhf", None, "test", "prompt", None, "{}"),  # used by CARDS and SSS
    "gsm8k": ("openai/gsm8k", "main", "test", "question", "answer", "Question: {}\nAnswer:"),  # QAlign
}


def parse_value(text: str):
    """A method option value from the command line: int, float, bool (true/false), None (none), a tuple
    (``2,2`` or ``(2,2)`` or ``[2,2]``) or, failing those, the string itself."""
    text = text.strip()
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("nan", "inf", "+inf", "-inf", "infinity", "-infinity"):
        return float(lowered)  # a number (that the option checks then refuse as not finite), not a string
    if lowered in ("none", "null"):
        return None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if "," in text:
            return tuple(parse_value(part) for part in text.split(","))
        return text
    if isinstance(value, list):
        return tuple(value)
    return value if isinstance(value, (int, float, tuple, str)) else text


def read_prompt_file(path: str | os.PathLike, prompt_field: str = "prompt") -> list[dict]:
    """Records ``{"prompt": str, ...}`` from a JSONL file (a ``prompt_field`` per line; other fields kept,
    e.g. ``answer``) or from a text file (one prompt per non-empty line)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"prompt file not found: {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    return parse_prompt_lines(lines, prompt_field, jsonl=path.suffix in (".jsonl", ".json") or None, where=str(path))


def parse_prompt_lines(lines: list[str], prompt_field: str = "prompt", jsonl: bool | None = None,
                       where: str = "input") -> list[dict]:
    """Prompt records from lines of text or JSONL (``jsonl=None``: JSONL when the first line is an object)."""
    lines = [line for line in lines if line.strip()]
    if jsonl is None:
        jsonl = bool(lines) and lines[0].lstrip().startswith("{")
    if not jsonl:
        return [{"prompt": line} for line in lines]
    records = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}, line {n}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(prompt_field), str):
            raise InputError(f"{where}, line {n}: expected an object with a string {prompt_field!r} field")
        records.append({**record, "prompt": record[prompt_field]})
    return records


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def load_hf_prompts(name: str, config: str | None = None, split: str = "test", prompt_field: str = "prompt",
                    answer_field: str | None = None, template: str = "{}", limit: int | None = None) -> list[dict]:
    """Prompt records from a Hugging Face dataset (needs the optional package ``datasets``).

    Fails with a clear ``InputError`` when ``datasets`` is missing, the Hub cannot be reached (checked first
    with a 10 s timeout, so an offline machine never hangs) or, offline (``HF_HUB_OFFLINE=1``), when the
    dataset is not in the local cache.
    """
    hint = "pass a JSONL file of prompts instead (one {\"prompt\": ...} object per line)"
    try:
        import datasets
    except ImportError:
        raise InputError(f"loading the dataset {name!r} needs the optional package `datasets` "
                         f"(pip install datasets), or {hint}") from None
    if not _offline():
        from huggingface_hub import HfApi

        try:
            HfApi().dataset_info(name, timeout=10)
        except Exception as e:  # connection refused, DNS failure, timeout, gated or unknown dataset
            raise InputError(f"cannot reach the dataset {name!r} on the Hugging Face Hub ({type(e).__name__}: {e}); "
                             f"offline? set HF_HUB_OFFLINE=1 to use a cached copy, or {hint}") from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:
        raise InputError(f"could not load the dataset {name!r} (split {split!r}): {type(e).__name__}: {e}; "
                         f"{hint}") from None
    if prompt_field not in ds.column_names:
        raise InputError(f"dataset {name!r} has no field {prompt_field!r}; fields: {ds.column_names}")
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    records = []
    for row in ds:
        record = {"prompt": template.format(row[prompt_field])}
        if answer_field is not None:
            record["answer"] = row[answer_field]
        records.append(record)
    return records


def load_prompts(source: str, limit: int | None = None, split: str | None = None,
                 prompt_field: str | None = None, world=None) -> list[dict]:
    """Prompt records from ``source``: a world's name (``"toy"``, ``"smollm2"``: its prompts), a ``.jsonl``/``.txt`` file, a
    dataset alias (``"hh-rlhf"``, ``"gsm8k"``) or ``"hf:NAME[:CONFIG]"`` (any Hub dataset)."""
    if source in WORLD_NAMES:
        same = world is not None and getattr(world, "name", "toy") == source
        records = [{"prompt": p} for p in (world.prompts if same else world_prompts(source))]
    elif Path(source).is_file():
        records = read_prompt_file(source, prompt_field or "prompt")
    elif source in DATASETS:
        name, config, default_split, field, answer, template = DATASETS[source]
        return load_hf_prompts(name, config, split or default_split, prompt_field or field, answer, template, limit)
    elif source.startswith("hf:"):
        name, _, config = source[3:].partition(":")
        return load_hf_prompts(name, config or None, split or "test", prompt_field or "prompt", limit=limit)
    else:
        raise InputError(f"unknown prompt source {source!r}: expected a world ({', '.join(WORLD_NAMES)}), a .jsonl/.txt file, "
                         f"one of {sorted(DATASETS)} or 'hf:NAME[:CONFIG]'")
    if not records:
        raise InputError(f"no prompts in {source!r}")
    return records[:limit] if limit is not None else records


def load_toy_world(device=None):
    """The built-in toy world (``fastalign.toyworld``), with a clear error where it is not available."""
    from .toyworld import load_toy_world as load

    try:
        return load(device)
    except FileNotFoundError as e:
        raise InputError(str(e)) from None


# ---------------------------------------------------------------------------------------- gold reward
@dataclass
class GoldReward:
    """The reward that judges the outputs (not the one a method optimises).

    ``fn(prompt_ids, response_ids, prompt_texts, completion_texts, records) -> sequence of N floats``; build
    one with ``GoldReward.from_spec`` or from a reward accepted by ``fastalign.decode`` (``from_reward``).
    """

    fn: object
    name: str

    def __call__(self, prompt_ids, response_ids, prompt_texts, completion_texts, records) -> list[float]:
        scores = self.fn(prompt_ids, response_ids, prompt_texts, completion_texts, records)
        scores = check_scores(f"gold reward {self.name!r}", scores, len(response_ids))
        bad = next((i for i, x in enumerate(scores) if not math.isfinite(x)), None)
        if bad is not None:  # a NaN would silently poison the means and win rates
            raise InputError(f"gold reward {self.name!r} is {scores[bad]} for the prompt {prompt_texts[bad]!r}; "
                             "gold rewards must be finite numbers")
        return scores

    @classmethod
    def from_reward(cls, reward, name: str = "reward", tokenizer=None, policy_tokenizer=None) -> GoldReward:
        """From an HF sequence-classification model or a token-id callable ``reward(prompts, responses)``."""
        rm = reward if isinstance(reward, RewardModel) else RewardModel(reward, tokenizer, policy_tokenizer)
        return cls(lambda p, r, pt, ct, rec: rm.score(p, r), name)

    @classmethod
    def from_text_fn(cls, fn, name: str) -> GoldReward:
        """From ``fn(prompts: list[str], completions: list[str]) -> N floats``: the caller's code, so an
        exception it raises is an ``InputError`` naming the gold reward (``rewards.call_text_reward``)."""
        return cls(lambda p, r, pt, ct, rec: call_text_reward(fn, f"gold reward {name!r}", pt, ct), name)

    @classmethod
    def from_spec(cls, spec: str, policy_tokenizer=None, world=None, trust_remote_code: bool = False,
                  device=None, dtype=None) -> GoldReward:
        """``"toy"``: the toy world's gold reward; ``"last_number"``, ``"boxed"``, ``"option"``: 1 if the answer
        extracted from the completion (``fastalign.answers``) equals the one extracted from the record's
        ``answer`` field (GSM8K: ``"... #### 72"``), else 0; ``"vader"``: the VADER sentiment of the completion
        (``fastalign.rewards``); ``"module:function"``: a Python function called on texts ``(prompts, completions)``;
        anything else: an HF reward model name or path."""
        if spec == "toy":
            world = world if world is not None else load_toy_world()
            return cls.from_reward(world.gold_reward, "toy", policy_tokenizer=policy_tokenizer)
        if spec in EXTRACTORS:
            extract = EXTRACTORS[spec]

            def match(p, r, pt, ct, records):
                if any("answer" not in rec for rec in records):
                    raise InputError(f"the {spec!r} gold reward needs an 'answer' field in every prompt record")
                return [float(extract(c) is not None and extract(c) == extract(str(rec["answer"])))
                        for c, rec in zip(ct, records)]
            return cls(match, spec)
        fn = text_reward_function(spec, role="gold reward")
        if fn is not None:
            return cls.from_text_fn(fn, spec)
        return cls.from_reward(_load_reward(spec, None, policy_tokenizer, trust_remote_code, device, dtype), spec)


# --------------------------------------------------------------------------------------------- grid
def _split_top_level(text: str, sep: str) -> list[str]:
    """Split at ``sep`` outside parentheses and brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def parse_grid(spec: str) -> list[tuple[str, dict]]:
    """``"METHOD[:key=v1,v2;key2=w1,w2]"`` -> one ``(method, options)`` per combination of values.

    Values are parsed like ``--opt`` values (int, float, bool, tuple, str); a tuple value is written in
    parentheses: ``"sss:tree=sampled;branching=(2,2),(4,2)"``.
    """
    method, _, rest = spec.partition(":")
    method = method.strip()
    if not method:
        raise InputError(f"grid entry {spec!r} has no method name")
    axes = []
    for item in _split_top_level(rest, ";"):
        key, eq, values = item.partition("=")
        values = _split_top_level(values, ",")
        if not eq or not key.strip() or not values:
            raise InputError(f"grid entry {spec!r}: expected key=value[,value...], got {item!r}")
        axes.append([(key.strip(), parse_value(v)) for v in values])
    return [(method, dict(combo)) for combo in itertools.product(*axes)]


def budget_label(options: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in options.items()) or "default"


# ------------------------------------------------------------------------------------------- running
COUNTERS = [f"{role}_{kind}" for role in MODEL_ROLES for kind in ("calls", "tokens")]


def record_key(record: dict) -> tuple[str, str, int]:
    """What identifies a record of an evaluation: (method, budget, prompt index)."""
    return record["method"], record["budget"], record["prompt_index"]


def evaluate(prompts: list[dict], grid: list[tuple[str, dict]], engine, gold: GoldReward,
             max_new_tokens: int = 64, seed: int = 0, temperature: float | None = None, top_k: int | None = None,
             top_p: float | None = None, batch_size: int = 16, progress: bool | None = None,
             done: list[dict] | None = None, on_record=None) -> list[dict]:
    """Decode every prompt record with every ``(method, options)`` of ``grid`` and score it with ``gold``.

    ``engine`` is a ``fastalign.Engine`` or a function ``method -> Engine`` (when methods need different
    models). Prompt ``i`` gets the same seed, derived from ``seed`` and ``i``, in every method (common random
    numbers), whatever the batch size (``methods.base.prompt_seeds``). Returns one record
    per (method, budget, prompt); see the module docstring for the fields. ``progress``: None shows a bar on a
    terminal and periodic lines otherwise (``ProgressLines``), True a bar, False nothing.

    Resuming: ``done`` holds records of an earlier, interrupted run of the same evaluation; a batch whose
    records are all there is not decoded again (batches, not prompts, are the unit, so that every decode sees
    the seed and batch it would have seen in one uninterrupted run). ``on_record(record)`` is called for each
    new record as soon as its batch is scored (e.g. to append it to a file).
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    if not prompts or not grid:
        raise InputError("evaluate needs at least one prompt record and one (method, options) grid entry")
    engine_for = (lambda method: engine) if isinstance(engine, Engine) else engine
    batches = [prompts[i: i + batch_size] for i in range(0, len(prompts), batch_size)]
    seeds = prompt_seeds(seed, len(prompts))
    previous = {record_key(r): r for r in done or []}
    for key, r in previous.items():
        index = key[2]
        if not (isinstance(index, int) and 0 <= index < len(prompts)) or r.get("prompt") != prompts[index]["prompt"]:
            raise InputError(f"the earlier record of {key} is not for prompt {index} of these prompts: "
                             "it belongs to another run")
    warm = set()
    records = []
    with progress_bar(len(grid) * len(prompts), progress) as bar:
        for method, options in grid:
            label = budget_label(options)
            keys = [[(method, label, k * batch_size + i) for i in range(len(b))] for k, b in enumerate(batches)]
            eng = engine_for(method)
            if id(eng) not in warm and not all(key in previous for ks in keys for key in ks):
                eng.decode([prompts[0]["prompt"]], method="sample", max_new_tokens=2, seed=0)  # untimed warm-up
                warm.add(id(eng))
            bar.set_postfix_str(f"{method} {label}")
            for k, batch in enumerate(batches):
                if all(key in previous for key in keys[k]):
                    records += [previous[key] for key in keys[k]]
                    bar.update(len(batch))
                    continue
                prompt_ids = eng.encode([r["prompt"] for r in batch])
                out = eng.decode(prompt_ids, method=method, max_new_tokens=max_new_tokens, temperature=temperature,
                                 top_k=top_k, top_p=top_p, seed=seeds[k * batch_size: k * batch_size + len(batch)],
                                 **options)
                texts = out.texts or [None] * len(batch)
                scores = gold(prompt_ids, out.sequences, [r["prompt"] for r in batch],
                              [t if t is not None else "" for t in texts], batch)
                stats = {key: v for key, v in out.stats.items() if isinstance(v, (int, float))}
                rows = len(batch)
                compute = sum(stats.get(f"{role}_tokens", 0) for role in MODEL_ROLES)
                for i, (record, seq, text, score) in enumerate(zip(batch, out.sequences, texts, scores)):
                    records.append({
                        "method": method, "budget": label, "options": {k2: _jsonable(v) for k2, v in options.items()},
                        "prompt_index": k * batch_size + i, "prompt": record["prompt"], "completion": text,
                        "tokens": list(seq), "gold_reward": score, "generated_tokens": len(seq),
                        **{c: stats.get(c, 0) / rows for c in COUNTERS},
                        "compute_tokens": compute / rows, "wall_time_s": stats["wall_time_s"] / rows,
                        "accepted_per_target_call": stats.get("accepted_per_target_call"),
                        "batch_rows": rows, "batch_stats": stats,
                    })
                    if on_record is not None:
                        on_record(records[-1])
                bar.update(rows)
    return records


class ProgressLines:
    """Progress as plain lines on stderr, for a log file or CI where a progress bar would not show: one line
    when a (method, budget) starts and one at least every ``every`` seconds in between."""

    def __init__(self, total: int, every: float = 30.0, file=None):
        import sys
        import time

        self.total, self.done, self.every, self.file = total, 0, every, file or sys.stderr
        self.clock = time.perf_counter
        self.start = self.last = self.clock()
        self.what = ""

    def _line(self) -> None:
        print(f"eval: {self.done}/{self.total} decodes ({100 * self.done / max(self.total, 1):.0f}%), {self.what}, "
              f"{self.clock() - self.start:.0f} s", file=self.file, flush=True)
        self.last = self.clock()

    def set_postfix_str(self, what: str) -> None:
        self.what = what
        self._line()

    def update(self, n: int) -> None:
        self.done += n
        if self.clock() - self.last >= self.every:
            self._line()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.what = "finished"
            self._line()


def progress_bar(total: int, progress: bool | None):
    """``progress=None``: a tqdm bar on a terminal, else ``ProgressLines``; True: a bar; False: nothing."""
    import sys

    from tqdm.auto import tqdm

    if progress is None and not sys.stderr.isatty():
        return ProgressLines(total)
    return tqdm(total=total, desc="eval", unit="prompt", disable=progress is False)


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


# ------------------------------------------------------------------------------------------- metrics
def win_rates(records: list[dict], baseline: str = "sample") -> dict[tuple[str, str], float | None]:
    """Per (method, budget): the mean over prompts of 1 (gold reward above the baseline's on the same prompt),
    1/2 (tie) or 0. The baseline is the first budget of method ``baseline``; None where it was not run."""
    base: dict[int, float] = {}
    first_budget = next((r["budget"] for r in records if r["method"] == baseline), None)
    for r in records:
        if r["method"] == baseline and r["budget"] == first_budget:
            base[r["prompt_index"]] = r["gold_reward"]
    outcomes: dict[tuple[str, str], list[float]] = {}
    for r in records:
        b = base.get(r["prompt_index"])
        if b is None:
            continue
        outcome = 1.0 if r["gold_reward"] > b else 0.5 if r["gold_reward"] == b else 0.0
        outcomes.setdefault((r["method"], r["budget"]), []).append(outcome)
    keys = dict.fromkeys((r["method"], r["budget"]) for r in records)
    return {key: (sum(outcomes[key]) / len(outcomes[key]) if key in outcomes else None) for key in keys}


def summarize(records: list[dict], baseline: str = "sample") -> list[dict]:
    """One row per (method, budget), in the order first seen: means per prompt of the record fields, and the
    win rate against ``baseline`` (named in the row)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["method"], r["budget"]), []).append(r)
    wins = win_rates(records, baseline)
    rows = []
    for (method, budget), rs in groups.items():
        n = len(rs)
        rewards = [r["gold_reward"] for r in rs]
        mean = sum(rewards) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in rewards) / (n - 1)) if n > 1 else 0.0
        per_call = [r["accepted_per_target_call"] for r in rs if r["accepted_per_target_call"] is not None]
        row = {"method": method, "budget": budget, "options": rs[0]["options"], "prompts": n,
               "gold_reward": mean, "gold_reward_stderr": std / math.sqrt(n), "win_rate": wins[(method, budget)],
               "baseline": baseline}
        for key in COUNTERS + ["compute_tokens", "wall_time_s", "generated_tokens"]:
            row[key] = sum(r[key] for r in rs) / n
        row["accepted_per_target_call"] = sum(per_call) / len(per_call) if per_call else None
        rows.append(row)
    return rows


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) >= 1e4 or value == 0 else f"{value:.{digits}f}".rstrip("0").rstrip(".")
    return str(value)


def summary_table(rows: list[dict]) -> str:
    """The summary as a Markdown table (per-prompt means)."""
    used = [role for role in MODEL_ROLES if any(r[f"{role}_calls"] for r in rows)]
    baseline = rows[0]["baseline"] if rows else "baseline"
    head = (["method", "budget", "prompts", "gold reward", "± s.e.", f"win rate vs {baseline}"]
            + [f"{role} calls" for role in used] + [f"{role} tokens" for role in used]
            + ["compute tokens", "wall time (s)", "accepted tokens / target call"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = ([r["method"], r["budget"], r["prompts"], r["gold_reward"], r["gold_reward_stderr"], r["win_rate"]]
                 + [r[f"{role}_calls"] for role in used] + [r[f"{role}_tokens"] for role in used]
                 + [r["compute_tokens"], r["wall_time_s"], r["accepted_per_target_call"]])
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _budget_labels(rows: list[dict]) -> tuple[str, list[str]]:
    """A method's legend entry and one point label per budget: the options that vary across its budgets
    are named in the legend and their values label the points; options common to all go in the legend."""
    options = [r["options"] for r in rows]
    keys = list(dict.fromkeys(k for o in options for k in o))
    varying = [k for k in keys if len({json.dumps(o.get(k)) for o in options}) > 1]
    fixed = [f"{k}={options[0][k]}" for k in keys if k not in varying and k in options[0]]
    legend = rows[0]["method"] + (f" ({', '.join(varying + fixed)})" if varying or fixed else "")
    labels = [",".join(str(o.get(k, "-")) for k in varying) for o in options]
    return legend, labels


def _log_ticks(ax) -> None:
    """Readable log-axis ticks: 1-2-5 steps labelled with plain numbers (1 and 10 only over wide ranges)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    lo, hi = ax.get_xlim()
    subs = (1.0, 2.0, 5.0) if math.log10(hi / lo) <= 3 else (1.0,)
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_locator(LogLocator(base=10, subs=tuple(range(1, 10))))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _place_labels(fig, ax, points: list[tuple[float, float, str, str]]) -> None:
    """Label points without overlaps: each label takes the first of a few offsets around its point whose box
    does not overlap a label placed before it (points are labelled in order of x)."""
    offsets = [(5, 4, "left", "bottom"), (5, -4, "left", "top"), (-5, 4, "right", "bottom"),
               (-5, -4, "right", "top"), (0, 9, "center", "bottom"), (0, -9, "center", "top")]
    renderer = fig.canvas.get_renderer()
    placed = []
    for x, y, text, color in sorted(points, key=lambda p: p[0]):
        for dx, dy, ha, va in offsets:
            label = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), ha=ha, va=va,
                                fontsize=7, color=color)
            box = label.get_window_extent(renderer).expanded(1.05, 1.1)
            if not any(box.overlaps(other) for other in placed):
                placed.append(box)
                break
            label.remove()
        else:  # every spot is taken: the first one, over another label, rather than none
            dx, dy, ha, va = offsets[0]
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), ha=ha, va=va, fontsize=7,
                        color=color)


def plot_reward_vs_compute(rows: list[dict], path: str | os.PathLike, title: str = "gold reward vs compute") -> None:
    """PNG: mean gold reward (y, with error bars of one standard error of the mean over prompts) against
    compute tokens per prompt (left) and wall time per prompt (right), both on log axes; one curve per method
    through its budgets in grid order, each point labelled with the value of the option that varies (named
    in the legend). Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("the reward-versus-compute plot needs matplotlib (pip install matplotlib)") from None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^vP*Xph<>"
    prompts = sorted({r["prompts"] for r in rows})
    for ax, (key, label) in zip(axes, [("compute_tokens", "tokens processed per prompt (target + draft + ref + reward)"),
                                       ("wall_time_s", "wall time per prompt (s)")]):
        points = []
        for m, method in enumerate(methods):
            pts = [r for r in rows if r["method"] == method]  # in budget order
            legend, labels = _budget_labels(pts)
            color, marker = colors[m % len(colors)], markers[m % len(markers)]
            xs, ys = [r[key] for r in pts], [r["gold_reward"] for r in pts]
            ax.errorbar(xs, ys, yerr=[r["gold_reward_stderr"] for r in pts], marker=marker, markersize=5, capsize=3,
                        linewidth=1.2, color=color, label=legend)
            points += [(x, y, text, color) for x, y, text in zip(xs, ys, labels) if text]
        ax.set_xscale("log")
        ax.margins(x=0.08)
        _log_ticks(ax)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3, which="major")
        ax.grid(alpha=0.1, which="minor")
        fig.canvas.draw()  # label boxes are measured in the laid-out figure
        _place_labels(fig, ax, points)
    n = prompts[0] if len(prompts) == 1 else f"{prompts[0]}-{prompts[-1]}"
    axes[0].set_ylabel("mean gold reward (± 1 s.e.)")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 7), fontsize=8, frameon=False)
    fig.suptitle(f"{title}\n{n} prompts per point; error bars: ± one standard error of the mean over prompts",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.06 + 0.045 * ((len(names) - 1) // 7), 1, 1))
    fig.savefig(path, dpi=150)
    plt.close(fig)


def write_results(records: list[dict], rows: list[dict], out_dir: str | os.PathLike, plot: bool = True,
                  header: str = "") -> dict[str, Path]:
    """Write ``results.jsonl`` (one line per record), ``summary.json``, ``summary.md`` and, when ``plot`` and
    matplotlib is installed, ``reward_vs_compute.png`` into ``out_dir``. Returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results": out / "results.jsonl", "summary_json": out / "summary.json", "summary": out / "summary.md"}
    write_jsonl(paths["results"], records)
    replace_file(paths["summary_json"], [json.dumps(rows, indent=1) + "\n"])
    replace_file(paths["summary"], [header + summary_table(rows)])
    if plot:
        paths["plot"] = out / "reward_vs_compute.png"
        plot_reward_vs_compute(rows, paths["plot"])
    return paths


def replace_file(path, chunks) -> None:
    """Write the text ``chunks`` (any iterable of strings) as the file ``path``, all or nothing: they go to a
    temporary file in the same folder, which is flushed to disk and then renamed over ``path`` (``os.replace``,
    atomic). A kill or an error at any moment leaves either the old file or the new one, never a cut one
    (``open(path, "w")`` empties the old file first: a kill there lost finished records)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the rename makes it the file
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_jsonl(path, records) -> None:
    """``records`` as a JSONL file at ``path``, one line each, replacing the file atomically (``replace_file``)."""
    replace_file(path, (json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_complete_jsonl(path) -> list[dict]:
    """The records of a JSONL file up to its first incomplete or invalid line (what an interrupted writer
    left); ``[]`` when the file does not exist."""
    if not Path(path).is_file():
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break
            if not isinstance(record, dict):
                break
            records.append(record)
    return records


def default_grid(engine_for) -> list[tuple[str, dict]]:
    """A small grid over the methods whose modules exist and whose models ``engine_for(method)`` has (``sss``
    also needs ``ref``):
    sample; bon n in {2, 4, 8}; soft_bon n=4; args; rs; cards; sd; sss; qalign steps in {2, 4, 8}."""
    from .methods import get_method

    grid = [("sample", {}), *[("bon", {"n": n}) for n in (2, 4, 8)], ("soft_bon", {"n": 4}), ("args", {}),
            ("rs", {}), ("cards", {}), ("sd", {}), ("sss", {}), *[("qalign", {"steps": s}) for s in (2, 4, 8)]]
    chosen = []
    for method, options in grid:
        try:
            module, _ = get_method(method)
        except (ImportError, AttributeError):
            continue  # not implemented in this installation
        needs = module.REQUIRES + (("ref",) if method == "sss" else ())  # sss without ref is an error
        if all(getattr(engine_for(method), role) is not None for role in needs):
            chosen.append((method, options))
    return chosen
