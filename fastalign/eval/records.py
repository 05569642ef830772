"""Results files: the JSONL records of ``fastalign generate -o FILE`` and ``fastalign eval`` (``results.jsonl``)."""

from __future__ import annotations

import json
from pathlib import Path


def jsonable(value):
    """A method option's value as a record stores it: a tuple becomes a list (what JSON reads back), so that
    the options of a record read back compare equal to this run's."""
    return list(value) if isinstance(value, tuple) else value


def write_jsonl(path, records) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


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
