"""No work is lost: ``fastalign eval`` writes each record as it finishes and resumes; ``generate -o`` resumes;
the command line reports bad input in one line (no traceback)."""

import json

import pytest

from fastalign import cli
from fastalign.eval.records import read_complete_jsonl
from fastalign.testing import save_tiny_models

V = 16
PROMPTS = ["w1 w2", "w3", "w4 w5 w6", "w7", "w8 w9"]
GOLD_CALLS = {"n": 0, "interrupt_at": None}


def gold_length(prompts, completions):
    """A gold reward over texts that can simulate Ctrl-C at its n-th call (``GOLD_CALLS``)."""
    GOLD_CALLS["n"] += 1
    if GOLD_CALLS["n"] == GOLD_CALLS["interrupt_at"]:
        raise KeyboardInterrupt
    return [float(len(c)) for c in completions]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("models"), V)


def one_line_error(capsys, *parts):
    err = capsys.readouterr().err
    # (transformers draws a "Loading weights" progress bar while loading a model)
    # (and torch.compile's imports warn of deprecations, printed under pytest's warning filters)
    lines = [line for line in err.splitlines() if line.strip() and "Loading weights" not in line
             and not (": warning: " in line and "is deprecated" in line)]
    assert len(lines) == 1 and lines[0].startswith("fastalign ") and "Traceback" not in err, err
    for part in parts:
        assert part in err, err
    return err


# ---------------------------------------------------------------------------------------- CLI errors
def test_cli_errors_are_one_line(model_dirs, tmp_path, capsys):
    lm, rm = model_dirs
    assert cli.main(["generate", "--target", str(tmp_path / "missing"), "w1"]) == 2
    one_line_error(capsys, "cannot load the target", "missing")
    assert cli.main(["generate", "--target", str(lm), "-o", str(tmp_path), "w1"]) == 2
    one_line_error(capsys, "is a directory")
    assert cli.main(["generate", "--target", str(lm), "-o", str(tmp_path / "no" / "such" / "x.jsonl"), "w1"]) == 2
    one_line_error(capsys, "does not exist")
    assert cli.main(["generate", "--target", str(lm), "--reward", str(rm), "--method", "qalign",
                     "--opt", "beta=nan", "w1"]) == 2
    one_line_error(capsys, "qalign option beta must be finite, got nan")
    assert cli.main(["generate", "--target", str(lm), "--opt", "top_k=3", "w1"]) == 2
    one_line_error(capsys, "method 'sample' has no option 'top_k'; its options: none")
    assert cli.main(["generate", "--target", str(lm), "--top-k", "0", "w1"]) == 2
    one_line_error(capsys, "top_k must be an integer >= 1, got 0")
    for command in (["generate", "--toy"], ["demo"]):
        assert cli.main([*command, "--device", "nonsense"]) == 2
        one_line_error(capsys, "device must be a torch device such as 'cpu'")
    assert cli.main(["generate", "--target", str(lm), "--resume", "w1"]) == 2
    one_line_error(capsys, "--resume continues an --output FILE")


def test_eval_grid_with_an_empty_value_is_an_error(model_dirs, tmp_path, capsys):
    lm, rm = model_dirs
    # (a text gold: the toy world's gold reads the toy world's tokens, which this target's tokenizer is not)
    assert cli.main(["eval", "--target", str(lm), "--reward", str(rm), "--prompts", "toy",
                     "--gold", "test_resume:gold_length", "--grid", "bon:n=", "--out-dir", str(tmp_path)]) == 2
    one_line_error(capsys, "grid entry 'bon:n=': expected key=value[,value...]")


# ------------------------------------------------------------------------------------------- eval
def eval_args(model_dirs, tmp_path, out_dir, *extra):
    lm, rm = model_dirs
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return ["eval", "--target", str(lm), "--reward", str(rm), "--prompts", str(prompts),
            "--gold", "test_resume:gold_length", "--grid", "sample", "--grid", "bon:n=2,3", "--max-new-tokens", "3",
            "--batch-size", "2", "--seed", "5", "--out-dir", str(out_dir), "--no-progress", "--no-plot", *extra]


def strip_times(records):
    drop = {"wall_time_s", "batch_stats"}
    return [{k: v for k, v in r.items() if k not in drop} for r in records]


def test_eval_interrupted_then_resumed_equals_one_run(model_dirs, tmp_path, capsys):
    GOLD_CALLS.update(n=0, interrupt_at=None)
    assert cli.main(eval_args(model_dirs, tmp_path, tmp_path / "whole")) == 0
    whole = read_complete_jsonl(tmp_path / "whole" / "results.jsonl")
    batches = GOLD_CALLS["n"]
    assert len(whole) == 3 * len(PROMPTS) and batches == 9  # 3 budgets x 3 batches

    out = tmp_path / "part"
    out.mkdir()
    (out / "summary.md").write_text("a summary of an earlier run")
    (out / "results.jsonl").write_text('{"method": "stale"}\n')
    GOLD_CALLS.update(n=0, interrupt_at=5)  # Ctrl-C while scoring the 5th batch
    capsys.readouterr()
    assert cli.main(eval_args(model_dirs, tmp_path, out)) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "--resume" in err and "Traceback" not in err
    kept = read_complete_jsonl(out / "results.jsonl")
    assert strip_times(kept) == strip_times(whole[:7])  # 4 whole batches (2 + 2 + 1 + 2 prompts), valid JSONL
    assert (out / "results.jsonl").read_text().count("\n") == 7
    assert not (out / "summary.md").exists()  # the earlier run's summary is never presented as this run's

    with open(out / "results.jsonl", "a") as f:
        f.write('{"method": "bon", "budg')  # a record cut by a hard kill
    GOLD_CALLS.update(n=0, interrupt_at=None)
    assert cli.main(eval_args(model_dirs, tmp_path, out, "--resume")) == 0
    assert GOLD_CALLS["n"] == batches - 4  # the 4 finished batches are not decoded again
    resumed = read_complete_jsonl(out / "results.jsonl")
    assert strip_times(resumed) == strip_times(whole)
    assert "| bon | n=3 | 5 |" in (out / "summary.md").read_text()

    capsys.readouterr()
    assert cli.main(eval_args(model_dirs, tmp_path, out, "--resume", "--max-new-tokens", "4")) == 2
    one_line_error(capsys, "holds a run with other settings (differs in: max_new_tokens)")


# --------------------------------------------------------------------------------------- generate
def generate_args(model_dirs, output, *extra):
    lm, _ = model_dirs
    return ["generate", "--target", str(lm), "--max-new-tokens", "4", "--seed", "3", "--batch-size", "2",
            "-o", str(output), *extra, *PROMPTS]


def test_generate_resume(model_dirs, tmp_path, capsys):
    assert cli.main(generate_args(model_dirs, tmp_path / "whole.jsonl")) == 0
    whole = read_complete_jsonl(tmp_path / "whole.jsonl")
    assert len(whole) == len(PROMPTS)

    part = tmp_path / "part.jsonl"
    lines = (tmp_path / "whole.jsonl").read_text().splitlines(keepends=True)
    part.write_text("".join(lines[:3]) + lines[3][:10])  # 1.5 batches and a cut line
    assert cli.main(generate_args(model_dirs, part, "--resume")) == 0
    resumed = read_complete_jsonl(part)
    assert [(r["prompt"], r["tokens"]) for r in resumed] == [(r["prompt"], r["tokens"]) for r in whole]
    assert part.read_text().count("\n") == len(PROMPTS)

    assert cli.main(generate_args(model_dirs, part, "--resume")) == 0  # all done: nothing to add
    assert [r["tokens"] for r in read_complete_jsonl(part)] == [r["tokens"] for r in whole]

    capsys.readouterr()
    assert cli.main(generate_args(model_dirs, part, "--resume", "--method", "bon", "--reward",
                                  str(model_dirs[1]))) == 2
    one_line_error(capsys, "line 1 of", "is not this run's")


def test_generate_resume_refuses_other_sampling_settings(model_dirs, tmp_path, capsys):
    """A resume with another seed or temperature would mix two runs in one file: refused, the file untouched."""
    out = tmp_path / "out.jsonl"
    assert cli.main(generate_args(model_dirs, out)) == 0
    before = out.read_text()
    for extra in (["--seed", "4"], ["--temperature", "0.5"], ["--max-new-tokens", "3"]):
        capsys.readouterr()
        assert cli.main(generate_args(model_dirs, out, "--resume", *extra)) == 2
        one_line_error(capsys, "line 1 of", "is not this run's")
        assert out.read_text() == before


# ------------------------------------------------------------------------------ atomic rewrites
def fail_after(monkeypatch, calls):
    """Make ``json.dumps`` in ``fastalign.eval.records`` (the JSONL writer's) raise at its ``calls + 1``-th call
    from now: a kill in the middle of a rewrite."""
    import json
    import types

    from fastalign.eval import records

    count = {"n": 0}

    def dumps(*args, **kwargs):
        count["n"] += 1
        if count["n"] > calls:
            raise RuntimeError("killed while writing")
        return json.dumps(*args, **kwargs)

    monkeypatch.setattr(records, "json", types.SimpleNamespace(dumps=dumps, loads=json.loads,
                                                                JSONDecodeError=json.JSONDecodeError))


def test_write_jsonl_replaces_the_file_whole_or_not_at_all(tmp_path, monkeypatch):
    from fastalign.eval.records import rewrite_jsonl as write_jsonl

    path = tmp_path / "results.jsonl"
    write_jsonl(path, [{"i": i} for i in range(5)])
    before = path.read_text()
    fail_after(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="killed while writing"):
        write_jsonl(path, [{"i": i} for i in range(8)])
    assert path.read_text() == before  # open(path, "w") had emptied it and written 2 of 8 lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl"]  # no temporary file left


def test_eval_resume_and_generate_resume_never_lose_finished_records(model_dirs, tmp_path, monkeypatch):
    """The rewrites of ``eval --resume`` (at its start and in ``write_results`` at its end) and of
    ``generate --resume`` fail midway: the file keeps every record it had."""
    GOLD_CALLS.update(n=0, interrupt_at=None)
    out = tmp_path / "eval"
    assert cli.main(eval_args(model_dirs, tmp_path, out)) == 0
    before = (out / "results.jsonl").read_text()
    records = 3 * len(PROMPTS)
    # one json.dumps per record: the rewrite at the start (records), then the one of write_results
    for calls, where in ((1, "_start_eval_run"), (records + 1, "write_results")):
        with monkeypatch.context() as patch:
            fail_after(patch, calls)
            with pytest.raises(RuntimeError, match="killed while writing") as caught:
                cli.main(eval_args(model_dirs, tmp_path, out, "--resume"))
        assert where in [entry.name for entry in caught.traceback]
        assert (out / "results.jsonl").read_text() == before

    path = tmp_path / "generated.jsonl"
    assert cli.main(generate_args(model_dirs, path)) == 0
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:4]) + lines[4][:10])  # 2 whole batches and a cut line
    partial = path.read_text()
    fail_after(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="killed while writing") as caught:
        cli.main(generate_args(model_dirs, path, "--resume"))
    assert "rewrite_jsonl" in [entry.name for entry in caught.traceback]
    assert path.read_text() == partial


def test_eval_resume_with_another_grid_is_refused(model_dirs, tmp_path, capsys):
    """A resume with another --grid used to be accepted and to delete the earlier methods' records."""
    GOLD_CALLS.update(n=0, interrupt_at=None)
    out = tmp_path / "eval"
    assert cli.main(eval_args(model_dirs, tmp_path, out)) == 0
    before = (out / "results.jsonl").read_text()
    other = [a if a != "bon:n=2,3" else "bon:n=2" for a in eval_args(model_dirs, tmp_path, out, "--resume")]
    capsys.readouterr()
    assert cli.main(other) == 2
    one_line_error(capsys, "holds a run with other settings (differs in: grid)")
    assert (out / "results.jsonl").read_text() == before
    assert cli.main(eval_args(model_dirs, tmp_path, out, "--resume")) == 0  # the same grid resumes
    assert (out / "results.jsonl").read_text().count("\n") == before.count("\n")
    # the tokenizer, the device and the compiled path are settings too: each changes tokens or times
    for extra, name in [(["--tokenizer", str(model_dirs[0])], "tokenizers"), (["--device", "cpu"], "device"),
                        (["--compile"], "compile")]:
        capsys.readouterr()
        assert cli.main(eval_args(model_dirs, tmp_path, out, "--resume", *extra)) == 2
        one_line_error(capsys, f"holds a run with other settings (differs in: {name})")
        assert (out / "results.jsonl").read_text() == before
    # a run recorded before these were settings (no keys), or with them at their defaults, resumes
    recorded = json.loads((out / "run.json").read_text())
    for written in ({k: v for k, v in recorded.items() if k not in ("tokenizers", "device", "compile")},
                    {**recorded, "tokenizers": [None, None], "device": None, "compile": False}):
        (out / "run.json").write_text(json.dumps(written))
        assert cli.main(eval_args(model_dirs, tmp_path, out, "--resume")) == 0
