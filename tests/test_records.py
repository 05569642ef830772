"""Results files (fastalign.eval.records): append, read back after an interrupt, rewrite atomically, resume."""

import io

import pytest

from fastalign.eval.records import (
    append_jsonl,
    changed_settings,
    finished_batches,
    jsonable,
    read_complete_jsonl,
    rewrite_jsonl,
)


def test_appended_batches_read_back_without_a_cut_last_line(tmp_path):
    path = tmp_path / "out.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        append_jsonl(f, [{"i": 0, "text": "é"}, {"i": 1}])
        append_jsonl(f, [{"i": 2}])
    assert read_complete_jsonl(path) == [{"i": 0, "text": "é"}, {"i": 1}, {"i": 2}]
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"i": 3, "te')  # an interrupt in the middle of a line
    assert read_complete_jsonl(path) == [{"i": 0, "text": "é"}, {"i": 1}, {"i": 2}]
    assert read_complete_jsonl(tmp_path / "missing.jsonl") == []
    stream = io.StringIO()
    append_jsonl(stream, [{"options": {"branching": jsonable((2, 2))}}])
    assert stream.getvalue() == '{"options": {"branching": [2, 2]}}\n'


def test_rewrite_replaces_the_file_whole_or_not_at_all(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"old": 1}\n')
    rewrite_jsonl(path, [{"new": 1}, {"new": 2}])
    assert read_complete_jsonl(path) == [{"new": 1}, {"new": 2}]
    with pytest.raises(TypeError):
        rewrite_jsonl(path, [{"new": 3}, {"bad": object()}])  # fails while writing: the file stays as it was
    assert read_complete_jsonl(path) == [{"new": 1}, {"new": 2}]
    assert [p.name for p in tmp_path.iterdir()] == ["results.jsonl"]  # no temporary file left


def test_changed_settings_and_finished_batches():
    settings = {"seed": 1, "method": "bon"}
    assert changed_settings(dict(settings), settings) == []
    assert changed_settings({"seed": 2, "method": "bon"}, settings) == ["seed"]
    assert changed_settings({"seed": 1}, settings) == ["method"]
    assert changed_settings({**settings, "extra": 0}, settings) == ["extra"]
    assert changed_settings(None, settings) == ["method", "seed"]
    done = {0: {}, 1: {}, 2: {}}
    assert finished_batches(done, [range(0, 2), range(2, 4), range(4, 5)]) == [True, False, False]
