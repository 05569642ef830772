"""Results files: the JSONL records of ``fastalign generate -o FILE`` and ``fastalign eval`` (``results.jsonl``).

This module is the one writer and reader of those files, and holds the one resume protocol of both commands:

    append_jsonl(stream, batch_records)      # as a batch finishes: one write, then flush
    records = read_complete_jsonl(path)      # the whole records; a line cut by an interrupt is dropped
    rewrite_jsonl(path, records)             # atomically: a temporary file in the same folder, then os.replace
    replace_file(path, text)                 # the same for any other file of a run (run.json, summaries)

Resuming (``--resume``), the same for ``generate`` and ``eval``:

1. The earlier records are those ``read_complete_jsonl`` returns.
2. They must be this run's: ``changed_settings(recorded, settings)`` names the settings (prompt, method,
   options, sampling, seed, ...) whose recorded value differs from this run's; any difference refuses the resume
   with an ``InputError`` naming them, before the file is touched. ``generate`` records its settings in every
   line; ``eval`` records them once, in ``run.json`` beside ``results.jsonl``.
3. A batch is the unit of work: a batch is finished when the file holds a record for every one of its keys
   (``finished_batches``; a record's key is its prompt's index for ``generate``, ``(method, budget, prompt
   index)`` for ``eval``). Finished batches are not decoded again; every other batch is decoded again whole, so
   that each decode sees the prompts, seeds and batch that one uninterrupted run gives it.
4. The file is rewritten atomically with the records kept (``rewrite_jsonl``), and the new batches are
   appended to it (``append_jsonl``).
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Hashable, Iterable, Mapping, Sequence, TextIO


def jsonable(value):
    """A method option's value as a record stores it: a tuple becomes a list (what JSON reads back), so that
    the options of a record read back compare equal to this run's."""
    return list(value) if isinstance(value, tuple) else value


def _lines(records: Iterable[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def append_jsonl(stream: TextIO, records: Iterable[dict]) -> None:
    """Append ``records`` to an open text file (or stdout) as JSON lines, in one write, then flush: an interrupt
    leaves whole records, at worst followed by a cut last line (which ``read_complete_jsonl`` drops)."""
    stream.write(_lines(records))
    stream.flush()


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


def replace_file(path, text: str | Iterable[str]) -> None:
    """Write ``text`` (a string, or chunks of one) as the file ``path``, all or nothing: it goes to a temporary
    file in the same folder, flushed to disk, which then takes the name ``path`` (``os.replace``, atomic), so an
    interrupt or an error leaves either the old file or the new one, never a part of either (``open(path, "w")``
    empties the old file first: a kill there lost finished records)."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")  # same folder: same file system
    f = open(temporary, "x", encoding="utf-8")
    try:
        with f:
            for chunk in [text] if isinstance(text, str) else text:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the rename makes it the file
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def rewrite_jsonl(path, records: Iterable[dict]) -> None:
    """Replace the file at ``path`` by ``records``, one JSON line each, atomically (``replace_file``)."""
    replace_file(path, (json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def changed_settings(recorded: Mapping | None, settings: Mapping) -> list[str]:
    """The names of the settings whose recorded value differs from this run's, sorted (every setting when none
    were recorded); ``[]`` when an earlier run with ``recorded`` may be continued with ``settings``."""
    if recorded is None:
        return sorted(settings)
    return sorted(k for k in {**recorded, **settings} if k not in recorded or k not in settings
                  or recorded[k] != settings[k])


def finished_batches(done: Mapping[Hashable, dict], batches: Sequence[Iterable[Hashable]]) -> list[bool]:
    """For each batch (the keys of its records): whether ``done`` (key -> earlier record) holds every one of
    them, so that the batch is not decoded again."""
    return [all(key in done for key in keys) for keys in batches]
