"""The report of an evaluation: per (method, budget) summaries, win rates, a Markdown table and a plot.

    rows = summarize(records)            # one row per (method, budget)
    write_results(records, rows, "eval_out")   # results.jsonl, summary.md, summary.json, reward_vs_compute.png
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ..errors import InputError
from ..methods import MODEL_ROLES
from .harness import COUNTERS
from .records import replace_file, rewrite_jsonl


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
        for key in COUNTERS:  # records written before a role existed have no counter for it: 0
            row[key] = sum(r.get(key, 0) for r in rs) / n
        for key in ("compute_tokens", "wall_time_s", "generated_tokens"):
            row[key] = sum(r[key] for r in rs) / n
        row["accepted_per_target_call"] = sum(per_call) / len(per_call) if per_call else None
        rows.append(row)
    return rows


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):  # significant digits where fixed ones would round to 0 or drop the size
        plain = 1e-2 <= abs(value) < 1e4
        return f"{value:.{digits}f}".rstrip("0").rstrip(".") if plain else f"{value + 0.0:.{digits}g}"  # (-0 is 0)
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


def _curves(rows: list[dict]) -> list[list[dict]]:
    """The plot's curves, in the order first seen: the rows of one method with the same non-numeric options
    (``select``, ``answer_fn``, ``delimiters``, ...), so that a curve runs through budgets of one variant (bon's
    majority vote and bon's best-of-n are two curves); numbers, and the tree shapes ``branching`` (tuples of
    numbers) are budgets. (``delimiters`` are tuples of numbers too, but a variant.)"""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    def budget(key, v):
        return number(v) or (key == "branching" and isinstance(v, (list, tuple)) and all(map(number, v)))

    curves: dict[tuple, list[dict]] = {}
    for r in rows:
        variant = tuple(sorted((k, json.dumps(v)) for k, v in r["options"].items() if not budget(k, v)))
        curves.setdefault((r["method"], variant), []).append(r)
    return list(curves.values())


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
    curves = _curves(rows)
    used = [role.replace("_", " ") for role in MODEL_ROLES if any(r.get(f"{role}_tokens", 0) for r in rows)]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^vP*Xph<>"
    prompts = sorted({r["prompts"] for r in rows})
    for ax, (key, label) in zip(axes, [("compute_tokens", f"tokens processed per prompt ({' + '.join(used)})"),
                                       ("wall_time_s", "wall time per prompt (s)")]):
        points = []
        for m, pts in enumerate(curves):  # each in budget order
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
    # as many columns as the longest entry leaves room for (about 170 characters of 8 pt text across 11 inches)
    ncol = max(1, min(len(names), 7, 170 // (max(map(len, names)) + 6)))
    fig.legend(handles, names, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.suptitle(f"{title}\n{n} prompts per point; error bars: ± one standard error of the mean over prompts",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.06 + 0.045 * ((len(names) - 1) // ncol), 1, 1))
    fig.savefig(path, dpi=150)
    plt.close(fig)


def write_results(records: list[dict], rows: list[dict], out_dir: str | os.PathLike, plot: bool = True,
                  header: str = "") -> dict[str, Path]:
    """Write ``results.jsonl`` (one line per record), ``summary.json``, ``summary.md`` (each replaced atomically:
    ``fastalign.eval.records``) and, when ``plot`` and matplotlib is installed, ``reward_vs_compute.png`` into
    ``out_dir``. Returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results": out / "results.jsonl", "summary_json": out / "summary.json", "summary": out / "summary.md"}
    rewrite_jsonl(paths["results"], records)
    replace_file(paths["summary_json"], json.dumps(rows, indent=1) + "\n")
    replace_file(paths["summary"], header + summary_table(rows))
    if plot:
        paths["plot"] = out / "reward_vs_compute.png"
        plot_reward_vs_compute(rows, paths["plot"])
    return paths
