"""Prompt sources of an evaluation: prompt files, Hugging Face datasets and the worlds' prompts.

    records = load_prompts("gsm8k", limit=100)     # [{"prompt": str, "answer": str}, ...]
    records = load_prompts("prompts.jsonl")        # a JSONL file ({"prompt": ...} per line) or a text file
    records = load_prompts("toy")                  # a world's prompts (``fastalign.eval.worlds``)

Every source gives prompt records: dicts with a ``"prompt"`` string and the other fields of the source (e.g.
``answer``, which the answer-matching gold rewards read).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import InputError
from .worlds import NAMES as WORLD_NAMES
from .worlds import world_prompts

# dataset aliases: name -> (hub id, config, split, prompt field, answer field, prompt template)
DATASETS = {
    "hh-rlhf": ("Dahoas/full-hh-rlhf", None, "test", "prompt", None, "{}"),  # used by CARDS and SSS
    "gsm8k": ("openai/gsm8k", "main", "test", "question", "answer", "Question: {}\nAnswer:"),  # QAlign
}


def read_prompt_file(path: str | os.PathLike, prompt_field: str = "prompt") -> list[dict]:
    """Records ``{"prompt": str, ...}`` from a JSONL file (``.jsonl``, ``.json``: a ``prompt_field`` per line;
    other fields kept, e.g. ``answer``) or a text file (``.txt``: one prompt per non-empty line); a file with
    another suffix is JSONL when its first line is an object."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"prompt file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8-sig")  # as written: no newline translation, a BOM dropped
    except UnicodeDecodeError as e:
        raise InputError(f"prompt file {path} is not UTF-8 text: {e.reason} at byte {e.start}") from None
    jsonl = {".jsonl": True, ".json": True, ".txt": False}.get(path.suffix)
    return parse_prompt_text(text, prompt_field, jsonl=jsonl, where=str(path))


def parse_prompt_text(text: str, prompt_field: str = "prompt", jsonl: bool | None = None,
                      where: str = "input") -> list[dict]:
    """Prompt records from text or JSONL (``jsonl=None``: JSONL when the first non-empty line is an object).

    Lines end at ``\n`` (or ``\r\n``) only: JSON strings may hold other line separators (U+2028, U+0085, form
    feeds), which ``str.splitlines`` would split at. Errors give the line's number in the file."""
    lines = [(n, line.removesuffix("\r")) for n, line in enumerate(text.split("\n"), 1)]
    lines = [(n, line) for n, line in lines if line.strip()]
    if jsonl is None:
        jsonl = bool(lines) and lines[0][1].lstrip().startswith("{")
    if not jsonl:
        return [{"prompt": line} for _, line in lines]
    records = []
    for n, line in lines:
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
    elif Path(source).suffix in (".jsonl", ".json", ".txt"):
        raise InputError(f"prompt file not found: {source}")
    else:
        raise InputError(f"unknown prompt source {source!r}: expected a world ({', '.join(WORLD_NAMES)}), a .jsonl/.txt file, "
                         f"one of {sorted(DATASETS)} or 'hf:NAME[:CONFIG]'")
    if not records:
        raise InputError(f"no prompts in {source!r}")
    return records[:limit] if limit is not None else records
