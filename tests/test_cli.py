"""The command line: option parsing, generate (arguments, files, stdin, JSONL out), eval, bench, demo."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fastalign
from fastalign.methods.base import prompt_seeds
from fastalign import cli
from fastalign.testing import save_tiny_models

V = 16
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A tiny target and reward model saved as HF folders (loaded by path, offline)."""
    return save_tiny_models(tmp_path_factory.mktemp("models"), V)


def read_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("text, value", [
    ("8", 8), ("-3", -3), ("0.5", 0.5), ("1e-3", 1e-3), ("true", True), ("False", False), ("none", None),
    ("2,2", (2, 2)), ("(4, 2)", (4, 2)), ("[1,2,3]", (1, 2, 3)), ("sampled", "sampled"), ("soft", "soft"),
    ("'quoted'", "quoted"), ("a,b", ("a", "b")), ("weighted_majority", "weighted_majority"),
])
def test_parse_value(text, value):
    assert cli.parse_value(text) == value and type(cli.parse_value(text)) is type(value)


def test_parse_options_and_errors():
    assert cli.parse_options(["n=8", "tree=sampled", "branching=2,2", "max-rejections=3"]) == {
        "n": 8, "tree": "sampled", "branching": (2, 2), "max_rejections": 3}
    with pytest.raises(ValueError, match="key=value"):
        cli.parse_options(["n8"])


def test_help_of_every_command(capsys):
    for argv in ([], ["generate"], ["eval"], ["demo"], ["bench"]):
        with pytest.raises(SystemExit) as exit_:
            cli.main([*argv, "--help"])
        assert exit_.value.code == 0
    assert "--prompts-file" in capsys.readouterr().out


def test_generate_jsonl_matches_decode(model_dirs, tmp_path):
    lm, rm = model_dirs
    out = tmp_path / "out.jsonl"
    rc = cli.main(["generate", "--target", str(lm), "--reward", str(rm), "--method", "bon", "--opt", "n=3",
                   "--max-new-tokens", "4", "--seed", "5", "-o", str(out), "w1 w2", "w3"])
    assert rc == 0
    lines = read_lines(out.read_text())
    expected = fastalign.decode(["w1 w2", "w3"], method="bon", target=str(lm), reward=str(rm), max_new_tokens=4,
                                seed=5, n=3)
    assert [ln["prompt"] for ln in lines] == ["w1 w2", "w3"]
    assert [ln["tokens"] for ln in lines] == expected.sequences
    assert [ln["completion"] for ln in lines] == expected.texts
    assert all(ln["method"] == "bon" and ln["options"] == {"n": 3, "select": "best", "answer_fn": None, "lam": 1.0}
               for ln in lines)
    # per-prompt values where they exist; the decode call's stats under "batch"
    assert [ln["generated_tokens"] for ln in lines] == [len(s) for s in expected.sequences]
    assert [ln["rewards"] for ln in lines] == expected.extra["rewards"].tolist()
    assert [ln["chosen_index"] for ln in lines] == expected.extra["chosen_index"].tolist()
    assert lines[0]["sampling"] == {"max_new_tokens": 4, "temperature": 1.0, "top_k": None, "top_p": None, "seed": 5}
    assert lines[0]["batch"]["stats"]["reward_calls"] == 1 and lines[0]["batch"]["prompts"] == 2
    assert lines[0]["batch"]["stats"]["generated_tokens"] == sum(len(s) for s in expected.sequences)


def test_generate_records_the_options_in_effect_and_says_where_it_wrote(model_dirs, tmp_path, capsys):
    lm, rm = model_dirs
    out = tmp_path / "out.jsonl"
    assert cli.main(["generate", "--target", str(lm), "--reward", str(rm), "--method", "cards", "--opt",
                     "alpha=0.3", "--max-new-tokens", "4", "-o", str(out), "w1 w2"]) == 0
    line = read_lines(out.read_text())[0]
    assert line["options"] == {"entropy_threshold": 3.0, "reward_threshold": "auto", "alpha": 0.3,
                               "accept_beta": "auto", "mode": "soft", "min_segment_tokens": 4,
                               "max_segment_tokens": 64, "max_rejections": 20, "parallel_candidates": 1}
    # cards' own sampling defaults (its paper's), the documented default seed, the calibrated values per prompt
    assert line["sampling"] == {"max_new_tokens": 4, "temperature": 0.7, "top_k": 40, "top_p": None,
                                "seed": cli.DEFAULT_SEED}
    assert isinstance(line["reward_threshold"], float) and line["accept_beta"] > 0
    assert f"wrote 1 completion (cards) to {out}" in capsys.readouterr().err


def test_help_imports_no_torch_and_shows_defaults():
    """`fastalign --help` answers at once: the library (torch, transformers) is imported inside the commands."""
    code = ("import sys, contextlib, io\nfrom fastalign import cli\nout = io.StringIO()\n"
            "with contextlib.redirect_stdout(out):\n    try:\n        cli.main(['generate', '--help'])\n"
            "    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\nprint(out.getvalue())")
    text = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert text.startswith("[]")
    for default in ("(default: sample)", "(default: 128)", "(default: 0)", "(default: 16)"):
        assert default in " ".join(text.split()), default


def test_generate_prompts_from_files_and_stdin(model_dirs, tmp_path, capsys, monkeypatch):
    lm, _ = model_dirs
    txt = tmp_path / "p.txt"
    txt.write_text("w1 w2\n\nw3\n")
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"prompt": "w1 w2", "id": 1}) + "\n" + json.dumps({"prompt": "w3"}) + "\n")
    common = ["generate", "--target", str(lm), "--max-new-tokens", "3", "--seed", "0"]
    outputs = []
    for source in (["--prompts-file", str(txt)], ["--prompts-file", str(jsonl)], ["w1 w2", "w3"]):
        assert cli.main(common + source) == 0
        outputs.append(read_lines(capsys.readouterr().out))
    monkeypatch.setattr(sys, "stdin", io.StringIO("w1 w2\nw3\n"))
    assert cli.main(common) == 0
    outputs.append(read_lines(capsys.readouterr().out))
    decoded = [[(ln["prompt"], ln["completion"], ln["tokens"]) for ln in o] for o in outputs]
    assert all(d == decoded[0] for d in decoded) and len(decoded[0]) == 2
    # the batch size does not change any output: prompt i's seed comes from --seed and i alone
    args = ["w3", "w1 w2", "w3", "w2"]
    by_size = []
    for size in ("1", "3", "16"):
        assert cli.main(common + ["--batch-size", size] + args) == 0
        by_size.append([ln["tokens"] for ln in read_lines(capsys.readouterr().out)])
    assert by_size[0] == by_size[1] == by_size[2]
    alone = fastalign.decode(["w3"], target=str(lm), max_new_tokens=3, seed=[prompt_seeds(0, 4)[2]])
    assert by_size[0][2] == alone.sequences[0]


def test_generate_errors_name_the_problem(model_dirs, tmp_path, capsys, monkeypatch):
    lm, _ = model_dirs
    assert cli.main(["generate", "--target", str(lm), "--opt", "n=3", "w1"]) == 2
    assert "method 'sample' has no option 'n'" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "w1"}\n{"text": "w2"}\n')
    assert cli.main(["generate", "--target", str(lm), "--prompts-file", str(bad)]) == 2
    assert "line 2" in capsys.readouterr().err
    assert cli.main(["generate", "--target", str(lm), "--method", "bon", "w1"]) == 2
    assert "needs a reward model" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert cli.main(["generate", "--target", str(lm)]) == 2
    assert "no prompts" in capsys.readouterr().err


def test_load_errors_name_the_flag_and_file(model_dirs, tmp_path, capsys):
    """Each failure names what the user gave: before, a missing --gold or --reward-tokenizer printed the Hub's
    own text (the latter blamed on the reward), a missing .jsonl was an 'unknown prompt source' and a file
    that is not UTF-8 a codec message without its name."""
    lm, rm = model_dirs
    missing = str(tmp_path / "nowhere")
    assert cli.main(["generate", "--target", str(lm), "--method", "bon", "--reward", str(rm),
                     "--reward-tokenizer", missing, "w1"]) == 2
    assert f"cannot load the reward tokenizer '{missing}': no such file or folder" in capsys.readouterr().err
    common = ["eval", "--target", str(lm), "--reward", str(rm), "--grid", "sample", "--max-new-tokens", "2",
              "--out-dir", str(tmp_path / "eval"), "--no-progress"]
    assert cli.main(common + ["--prompts", missing + ".jsonl", "--gold", "test_evaluate:count_w1"]) == 2
    assert f"prompt file not found: {missing}.jsonl" in capsys.readouterr().err
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w1\n")
    assert cli.main(common + ["--prompts", str(prompts), "--gold", missing]) == 2
    assert f"cannot load the gold reward '{missing}': no such file or folder" in capsys.readouterr().err
    prompts.write_bytes(b"\xff\xfe w1\n")
    assert cli.main(["generate", "--target", str(lm), "--prompts-file", str(prompts)]) == 2
    assert f"prompt file {prompts} is not UTF-8 text" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--batch-size", "0"), ("--max-new-tokens", "-1"), ("--batch-size", "two")])
def test_counts_must_be_positive_integers(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["generate", "--toy", flag, value, "w1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: expected a positive integer, got" in err and value in err


@pytest.mark.parametrize("argv", [["generate", "--method", "nope", "w1"], ["generate", "--dtype", "float64", "w1"],
                                  ["eval", "--threads", "0"], []])
def test_argument_errors_are_one_line(argv, capsys):
    """docs/cli.md: errors are one line on stderr; argparse printed its usage block before them."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and ": error: " in err


@pytest.mark.parametrize("command", ["generate", "eval", "demo"])
@pytest.mark.parametrize("value, message", [("-1", "seed must be an integer >= 0"),
                                            (str(2**64), "seed must be an integer >= 0"),
                                            ("abc", "expected an integer seed, got 'abc'")])
def test_a_bad_seed_is_refused_before_any_model_loads(command, value, message, capsys, monkeypatch):
    import fastalign.eval.worlds

    monkeypatch.setattr(fastalign.eval.worlds, "load_world", lambda *a, **k: pytest.fail("a world was loaded"))
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--seed", value] + (["w1"] if command == "generate" else []))
    assert exit_.value.code == 2 and f"argument --seed: {message}" in capsys.readouterr().err


def test_a_method_missing_from_the_installation_is_named(monkeypatch, capsys):
    from fastalign.methods import METHODS, Method

    monkeypatch.setitem(METHODS, "future", Method("future", "future_method:run", ("target",)))
    assert cli.main(["generate", "--method", "future", "w1"]) == 2
    assert "method 'future' is not available in this installation" in capsys.readouterr().err


def test_python_m_fastalign_generate_subprocess(model_dirs):
    lm, _ = model_dirs
    env = dict(os.environ, PYTHONPATH=str(REPO))
    run = subprocess.run([sys.executable, "-m", "fastalign", "generate", "--target", str(lm),
                          "--max-new-tokens", "3", "--seed", "0", "w1 w2"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    (line,) = read_lines(run.stdout)
    assert line["prompt"] == "w1 w2" and 1 <= len(line["tokens"]) <= 3


def test_eval_command_writes_results_summary_and_plot(model_dirs, tmp_path, capsys):
    lm, rm = model_dirs
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["w1 w2", "w3", "w4 w5 w6"]))
    out_dir = tmp_path / "eval"
    rc = cli.main(["eval", "--target", str(lm), "--reward", str(rm), "--prompts", str(prompts),
                   "--gold", "test_evaluate:count_w1", "--grid", "bon:n=2,4", "--max-new-tokens", "3",
                   "--batch-size", "2", "--seed", "0", "--out-dir", str(out_dir), "--no-progress"])
    assert rc == 0
    records = [json.loads(x) for x in (out_dir / "results.jsonl").read_text().splitlines()]
    assert [(r["method"], r["budget"]) for r in records[::3]] == [("sample", "default"), ("bon", "n=2"),
                                                                   ("bon", "n=4")]  # the baseline is added
    assert len(records) == 9
    summary = (out_dir / "summary.md").read_text()
    assert "| bon | n=4 | 3 |" in summary and "win rate vs sample" in summary
    assert summary.split("\n")[-2] in capsys.readouterr().out
    pytest.importorskip("matplotlib")
    assert (out_dir / "reward_vs_compute.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a grid that cannot run is refused before the folder is touched: the earlier run's files stay as they are
    files = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    for extra, message in [(["--baseline", "smaple"], "unknown method 'smaple'"),
                           (["--grid", "sd"], "method 'sd' needs a draft model"),
                           (["--grid", "bon:n=2", "--grid", "bon:n=2"], "the grid gives bon at n=2 twice")]:
        assert cli.main(["eval", "--target", str(lm), "--reward", str(rm), "--prompts", str(prompts),
                         "--gold", "test_evaluate:count_w1", "--grid", "bon:n=4", *extra, "--max-new-tokens", "3",
                         "--out-dir", str(out_dir), "--no-progress"]) == 2
        assert message in capsys.readouterr().err
        assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == files


def test_eval_needs_a_gold_reward_and_prompts(model_dirs, tmp_path, capsys):
    lm, rm = model_dirs
    assert cli.main(["eval", "--target", str(lm), "--reward", str(rm), "--gold", "x:y"]) == 2
    assert "eval needs --prompts" in capsys.readouterr().err
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w1\n")
    assert cli.main(["eval", "--target", str(lm), "--reward", str(rm), "--prompts", str(prompts)]) == 2
    assert "eval needs --gold" in capsys.readouterr().err
    assert cli.main(["eval", "--target", str(lm), "--reward", str(rm), "--prompts", "nowhere.jsonl",
                     "--gold", "x:y"]) == 2
    assert "prompt file not found: nowhere.jsonl" in capsys.readouterr().err
    assert cli.main(["eval", "--target", str(lm), "--reward", str(rm), "--prompts", "nowhere",
                     "--gold", "x:y"]) == 2
    assert "unknown prompt source 'nowhere'" in capsys.readouterr().err


def test_bench_lists_and_runs_scripts_or_says_where_they_are(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "bench_dir", lambda: None)
    assert cli.main(["bench"]) == 1
    assert "bench/ folder of the fastalign repository" in capsys.readouterr().err
    folder = tmp_path / "bench"
    folder.mkdir()
    (folder / "common.py").write_text("")
    (folder / "echo_args.py").write_text("import sys, pathlib\n"
                                         "pathlib.Path('ran.txt').write_text(' '.join(sys.argv[1:]))\n")
    monkeypatch.setattr(cli, "bench_dir", lambda: folder)
    assert cli.main(["bench", "--list"]) == 0
    listed = capsys.readouterr().out
    assert "echo_args" in listed and "common" not in listed
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    # by default a fresh folder under ./bench_out/, never the committed bench/results/
    assert cli.main(["bench", "echo_args", "--", "--quick", "x"]) == 0
    args = (tmp_path / "ran.txt").read_text().split()
    assert args[:3] == ["--quick", "x", "--out-dir"] and Path(args[3]).parent == work / "bench_out"
    assert "bench [1/1] echo_args: done" in capsys.readouterr().err
    assert cli.main(["bench", "echo_args", "--out-dir", "mine"]) == 0
    assert (tmp_path / "ran.txt").read_text() == f"--out-dir {work / 'mine'}"
    assert cli.main(["bench", "echo_args", "--", "--out-dir", "bench/results"]) == 0  # asked for: passed as is
    assert (tmp_path / "ran.txt").read_text() == "--out-dir bench/results"
    assert cli.main(["bench", "nope"]) == 2
    assert "unknown benchmark 'nope'" in capsys.readouterr().err


def test_demo_on_the_toy_world(capsys):
    pytest.importorskip("fastalign.eval.toyworld")
    assert cli.main(["demo", "--methods", "sample", "bon", "--num-prompts", "2", "--max-new-tokens", "4"]) == 0
    shown = capsys.readouterr().out
    assert "| sample |" in shown and "| bon |" in shown
    # --threads is the run's (the demo set one thread on the toy world whatever it said)
    import torch

    from fastalign.eval import demo

    seen, run_method = [], demo._run_method
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(demo, "_run_method", lambda *a, **k: seen.append(torch.get_num_threads()) or run_method(*a, **k))
        threads = torch.get_num_threads()
        assert cli.main(["demo", "--methods", "sample", "--num-prompts", "1", "--max-new-tokens", "2",
                         "--threads", "2"]) == 0
    assert seen == [2]
    torch.set_num_threads(threads)
    with pytest.raises(SystemExit):
        cli.main(["demo", "--show", "-1"])
    assert "expected an integer >= 0, got -1" in capsys.readouterr().err


def test_generate_sss_on_the_toy_world(capsys):
    pytest.importorskip("fastalign.eval.toyworld")
    pytest.importorskip("fastalign.methods.speculative")
    assert cli.main(["generate", "--toy", "--method", "sss", "--max-new-tokens", "4", "--seed", "0",
                     "review : the pasta"]) == 0
    (line,) = read_lines(capsys.readouterr().out)
    assert line["prompt"] == "review : the pasta" and 1 <= len(line["tokens"]) <= 4
    assert line["batch"]["stats"]["ref_calls"] > 0


def test_a_prompt_the_toy_tokenizer_does_not_know_is_warned_about(capsys):
    pytest.importorskip("fastalign.eval.toyworld")
    assert cli.main(["generate", "--toy", "--max-new-tokens", "2", "How do I boil an egg?"]) == 0
    err = capsys.readouterr().err
    assert "1 of 1 prompts are mostly unknown tokens" in err and "6 unknown token(s) out of 6" in err
    assert cli.main(["generate", "--toy", "--max-new-tokens", "2", "review : the pasta"]) == 0
    assert "unknown" not in capsys.readouterr().err


def test_generate_on_the_toy_world_uses_the_methods_sampling_defaults(capsys):
    """Without --temperature a method samples with its paper's settings (rs: T 0.7, top-k 40), on the toy world
    as anywhere; the demo alone fixes T = 1 for every method."""
    assert cli.main(["generate", "--toy", "--method", "rs", "--max-new-tokens", "2", "--opt", "max_rejections=1",
                     "review : the pasta"]) == 0
    line = read_lines(capsys.readouterr().out)[0]
    assert (line["sampling"]["temperature"], line["sampling"]["top_k"]) == (0.7, 40)


def test_bad_option_types_and_undecodable_prompts_are_one_line_errors(capsys):
    """--opt branching=3 (an int, not a tuple) raised a raw TypeError; a prompt with undecodable bytes (a lone
    surrogate in sys.argv) one from the tokenizer."""
    pytest.importorskip("fastalign.methods.speculative")
    assert cli.main(["generate", "--toy", "--method", "sss", "--opt", "tree=sampled", "--opt", "branching=3",
                     "review : the pasta"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sss option branching must be a tuple of integers such as (2, 2)" in err, err
    assert cli.main(["generate", "--toy", "--max-new-tokens", "2", "review : the \udcff"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "prompt 0 is not valid Unicode text" in err, err
