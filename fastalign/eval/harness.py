"""Evaluation harness: methods x budgets on a prompt set, scored by a gold reward.

    records = evaluate(prompts, grid, engine, gold, max_new_tokens=64, seed=0)

The parts around it: prompt records from ``fastalign.eval.prompts``, the grid of ``(method, options)`` pairs from
``fastalign.eval.grid``, the gold reward from ``fastalign.eval.gold``; the records go to a results file
(``fastalign.eval.records``) and into a summary, a table and a plot (``fastalign.eval.report``).

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

from ..api import Engine
from ..errors import InputError
from ..methods import MODEL_ROLES
from ..methods.base import prompt_seeds
from .gold import GoldReward
from .grid import budget_label, check_grid
from .records import finished_batches, jsonable

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

    Resuming (the protocol of ``fastalign.eval.records``): ``done`` holds records of an earlier, interrupted
    run of the same evaluation; a batch whose records are all there is not decoded again (batches, not
    prompts, are the unit, so that every decode sees the seed and batch it would have seen in one
    uninterrupted run). ``on_record(record)`` is called for each new record as soon as its batch is scored
    (e.g. to append it to a file).
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    if not prompts or not grid:
        raise InputError("evaluate needs at least one prompt record and one (method, options) grid entry")
    engine_for = (lambda method: engine) if isinstance(engine, Engine) else engine
    check_grid(grid, engine_for)
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
            finished = finished_batches(previous, keys)
            eng = engine_for(method)
            if id(eng) not in warm and not all(finished):
                eng.decode([prompts[0]["prompt"]], method="sample", max_new_tokens=2, seed=0)  # untimed warm-up
                warm.add(id(eng))
            bar.set_postfix_str(f"{method} {label}")
            for k, batch in enumerate(batches):
                if finished[k]:
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
                        "method": method, "budget": label, "options": {k2: jsonable(v) for k2, v in options.items()},
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
