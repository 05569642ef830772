"""The grid of an evaluation: which methods run, at which budgets (option values).

A *grid* is a list of ``(method, options)`` pairs; ``parse_grid("bon:n=2,4,8")`` expands a compact spec
(``fastalign eval --grid``), ``parse_value`` reads one option value (``--opt``, ``--grid``), ``budget_label``
names a budget in the records and the summary, and ``default_grid`` picks the methods the models allow.
This module imports no torch (``fastalign --help`` reads option values with it).
"""

from __future__ import annotations

import ast
import itertools
import json

from ..errors import InputError
from ..methods import get_method


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


def option_key(text: str) -> str:
    """An option's name as written on the command line (``num-draft-tokens``) -> as the method takes it
    (``num_draft_tokens``)."""
    return text.strip().replace("-", "_")


def _split_top_level(text: str, sep: str) -> list[str]:
    """Split at ``sep`` outside parentheses and brackets; the parts stripped, empty ones kept."""
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
    return [p.strip() for p in parts]


def parse_grid(spec: str) -> list[tuple[str, dict]]:
    """``"METHOD[:key=v1,v2;key2=w1,w2]"`` -> one ``(method, options)`` per combination of values.

    Values are parsed like ``--opt`` values (int, float, bool, tuple, str); a tuple value is written in
    parentheses: ``"sss:tree=sampled;branching=(2,2),(4,2)"``. A key given twice, a value given twice under
    one key and an empty value are input errors: each would drop or repeat budgets silently.
    """
    method, _, rest = spec.partition(":")
    method = method.strip()
    if not method:
        raise InputError(f"grid entry {spec!r} has no method name")
    axes = {}
    for item in filter(None, _split_top_level(rest, ";")):
        key, eq, text = item.partition("=")
        key, texts = option_key(key), _split_top_level(text, ",")
        if not eq or not key or not all(texts):
            raise InputError(f"grid entry {spec!r}: expected key=value[,value...], got {item!r}")
        if key in axes:
            raise InputError(f"grid entry {spec!r} gives {key!r} twice; list its values once: {key}=v1,v2")
        values = [parse_value(v) for v in texts]
        if len({budget_key({key: v}) for v in values}) < len(values):
            raise InputError(f"grid entry {spec!r} repeats a value of {key!r}")
        axes[key] = values
    return [(method, dict(zip(axes, combo))) for combo in itertools.product(*axes.values())]


def check_grid(grid: list[tuple[str, dict]], engine_for, why_missing: dict | None = None) -> None:
    """Refuse a grid before anything runs: an entry given twice (the same method and budget: its records would
    count twice in the summary), and a method whose models ``engine_for(method)`` lacks (an ``InputError``
    naming the model, or ``why_missing[method]`` where given: why the models are not there)."""
    seen = set()
    for method, options in grid:
        if (method, budget_key(options)) in seen:
            raise InputError(f"the grid gives {method} at {budget_label(options)} twice")
        seen.add((method, budget_key(options)))
        spec, models = get_method(method), engine_for(method).models()
        if why_missing and method in why_missing and not spec.runs_with(models):
            raise InputError(f"method {method!r} cannot run here: {why_missing[method]}")
        spec.models_for(models)  # names a missing model


def budget_key(options: dict) -> str:
    """What tells budgets apart: their options whatever their order, numbers whatever their spelling (4, 4.0)."""
    def canonical(value):
        if isinstance(value, float) and value.is_integer():  # (4.0 is 4; an int stays as it is, however large)
            return int(value)
        return [canonical(v) for v in value] if isinstance(value, (list, tuple)) else value
    return json.dumps(sorted((key, canonical(value)) for key, value in options.items()), default=repr)


def budget_label(options: dict) -> str:
    """A budget's name in the records and the summary: its options (``"n=4"``), or ``"default"``."""
    return ",".join(f"{k}={v}" for k, v in options.items()) or "default"


def default_grid(engine_for) -> list[tuple[str, dict]]:
    """A small grid over the methods whose models (every role a method uses, or its stand-in) ``engine_for(method)`` has:
    sample; bon n in {2, 4, 8}; soft_bon n=4; args; rs; cards; sd; sss; qalign steps in {2, 4, 8}."""
    grid = [("sample", {}), *[("bon", {"n": n}) for n in (2, 4, 8)], ("soft_bon", {"n": 4}), ("args", {}),
            ("rs", {}), ("cards", {}), ("sd", {}), ("sss", {}), *[("qalign", {"steps": s}) for s in (2, 4, 8)]]
    chosen = []
    for method, options in grid:
        models, spec = engine_for(method).models(), get_method(method)
        if spec.runs_with(models) and all(models[role] is not None for role in spec.optional):
            chosen.append((method, options))
    return chosen
