"""Evaluation (fastalign.eval): grid specs, prompt sources, gold rewards, metrics, outputs, and a run end to end."""

import json
import math
import time

import pytest
import torch

import fastalign
from fastalign.eval.gold import GoldReward
from fastalign.eval.grid import parse_grid
from fastalign.eval.harness import evaluate
from fastalign.eval.prompts import load_prompts, read_prompt_file
from fastalign.eval.records import read_complete_jsonl
from fastalign.eval.report import summarize, summary_table, win_rates, write_results
from fastalign.methods.base import prompt_seeds
from fastalign.errors import InputError
from fastalign.testing import tiny_causal_lm, tiny_reward_model, tiny_tokenizer

V = 16


def count_w1(prompts, completions):
    """A gold reward on texts (used by test_cli through ``--gold test_evaluate:count_w1``)."""
    return [c.split().count("w1") for c in completions]


def record(method, budget, i, reward, **costs):
    base = {"method": method, "budget": budget, "options": {}, "prompt_index": i, "gold_reward": reward,
            "generated_tokens": 4, "compute_tokens": 10.0, "wall_time_s": 0.1, "accepted_per_target_call": None}
    base.update({f"{role}_{kind}": 0 for role in ("target", "draft", "ref", "reward") for kind in ("calls", "tokens")})
    base.update(costs)
    return base


def test_win_rate_counts_ties_as_half_and_skips_prompts_without_baseline():
    records = [record("sample", "default", i, r) for i, r in enumerate([1.0, 2.0, 3.0])]
    records += [record("bon", "n=2", i, r) for i, r in enumerate([2.0, 2.0, 1.0, 9.0])]  # prompt 3: no baseline
    records += [record("bon", "n=4", i, r) for i, r in enumerate([5.0, 5.0, 5.0])]
    wins = win_rates(records)
    assert wins[("sample", "default")] == 0.5
    assert wins[("bon", "n=2")] == pytest.approx((1 + 0.5 + 0) / 3)
    assert wins[("bon", "n=4")] == 1.0
    assert win_rates(records, baseline="missing")[("bon", "n=2")] is None


def test_summary_means_stderr_and_table():
    records = [record("sample", "default", i, r, target_calls=c, target_tokens=10 * c)
               for i, (r, c) in enumerate([(1.0, 2), (3.0, 4)])]
    (row,) = summarize(records)
    assert row["gold_reward"] == 2.0 and row["prompts"] == 2
    assert row["gold_reward_stderr"] == pytest.approx(math.sqrt(2.0) / math.sqrt(2))
    assert row["target_calls"] == 3 and row["target_tokens"] == 30 and row["win_rate"] == 0.5
    table = summary_table([row])
    assert table.splitlines()[0].startswith("| method | budget | prompts | gold reward")
    assert "| sample | default | 2 | 2 |" in table and "target calls" in table and "draft calls" not in table
    assert "win rate vs sample" in table
    records += [record("bon", "n=2", i, r) for i, r in enumerate([2.0, 2.0])]
    assert "win rate vs bon |" in summary_table(summarize(records, baseline="bon"))


def test_parse_grid():
    assert parse_grid("bon:n=2,4,8") == [("bon", {"n": 2}), ("bon", {"n": 4}), ("bon", {"n": 8})]
    assert parse_grid("sample") == [("sample", {})]
    assert parse_grid("sss:tree=sampled;branching=(2,2),(4,2)") == [
        ("sss", {"tree": "sampled", "branching": (2, 2)}), ("sss", {"tree": "sampled", "branching": (4, 2)})]
    assert len(parse_grid("cards:reward_threshold=1,2;alpha=0.3,0.5,0.7")) == 6
    assert parse_grid("sd:num-draft-tokens=2,4") == [("sd", {"num_draft_tokens": 2}), ("sd", {"num_draft_tokens": 4})]
    assert parse_grid("bon:n=2;") == [("bon", {"n": 2})]
    with pytest.raises(InputError, match="no method name"):
        parse_grid(":n=2")
    for bad in ("bon:n", "bon:=3", "bon:n="):
        with pytest.raises(InputError, match="expected key=value"):
            parse_grid(bad)
    # each silently dropped or repeated budgets: n=2,4;n=8 gave n=8 twice, n=4,4 n=4 twice, n=2,,4 only 2 and 4
    with pytest.raises(InputError, match="gives 'n' twice"):
        parse_grid("bon:n=2,4;n=8")
    assert len(parse_grid("bon:n=" + "9" * 400 + ",4")) == 2  # (a huge int is its own value, no OverflowError)
    for repeated in ("bon:n=4,4", "bon:n=4,4.0"):
        with pytest.raises(InputError, match="repeats a value of 'n'"):
            parse_grid(repeated)
    with pytest.raises(InputError, match="expected key=value"):
        parse_grid("bon:n=2,,4")


def test_check_grid_refuses_a_repeated_budget_and_a_method_without_its_models():
    from fastalign.eval.grid import check_grid

    engine = fastalign.Engine(target=tiny_causal_lm("llama", vocab_size=64), reward=tiny_reward_model(vocab_size=64))
    check_grid([("sample", {}), ("bon", {"n": 2}), ("bon", {"n": 4})], lambda method: engine)
    with pytest.raises(InputError, match="the grid gives bon at n=4 twice"):
        check_grid([("bon", {"n": 4}), ("sample", {}), ("bon", {"n": 4})], lambda method: engine)
    with pytest.raises(InputError, match="twice"):  # the same budget, its options in another order
        check_grid([("bon", {"n": 4, "select": "best"}), ("bon", {"select": "best", "n": 4})], lambda method: engine)
    with pytest.raises(InputError, match="'sd' needs a draft model"):
        check_grid([("sample", {}), ("sd", {})], lambda method: engine)
    with pytest.raises(InputError, match="cannot run here: no draft in this world"):
        check_grid([("sd", {})], lambda method: engine, {"sd": "no draft in this world"})
    with pytest.raises(InputError, match="twice"):  # evaluate refuses it too, before any decode
        evaluate([{"prompt": "x"}], [("sample", {}), ("sample", {})], engine, gold=None)


def test_prompt_files(tmp_path):
    (tmp_path / "a.txt").write_text("first prompt\n\n second \n")
    assert read_prompt_file(tmp_path / "a.txt") == [{"prompt": "first prompt"}, {"prompt": " second "}]
    (tmp_path / "b.jsonl").write_text('{"question": "2+2?", "answer": "#### 4"}\n')
    assert load_prompts(str(tmp_path / "b.jsonl"), prompt_field="question") == [
        {"question": "2+2?", "answer": "#### 4", "prompt": "2+2?"}]
    (tmp_path / "c.jsonl").write_text('{"prompt": "x"}\nnot json\n')
    with pytest.raises(InputError, match="line 2: not valid JSON"):
        read_prompt_file(tmp_path / "c.jsonl")
    with pytest.raises(InputError, match="not found"):
        read_prompt_file(tmp_path / "missing.txt")
    # lines end at \n only: a JSON string may hold U+2028 (json.dumps with ensure_ascii=False writes it raw),
    # a text prompt a form feed; \r\n ends a line too
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "one\u2028two\x85three"}, ensure_ascii=False) + "\r\n",
                                      encoding="utf-8", newline="")
    assert read_prompt_file(tmp_path / "d.jsonl") == [{"prompt": "one\u2028two\x85three"}]
    (tmp_path / "e.txt").write_bytes(b"a\x0cb\r\nc\n")
    assert read_prompt_file(tmp_path / "e.txt") == [{"prompt": "a\x0cb"}, {"prompt": "c"}]
    # a .txt file is text even when a line starts with {; a .jsonl error names the line in the file
    (tmp_path / "f.txt").write_text("{curly} review: the pasta\n")
    assert read_prompt_file(tmp_path / "f.txt") == [{"prompt": "{curly} review: the pasta"}]
    for name in ("h.txt", "h.prompts"):  # a byte-order mark (Windows editors) is not part of the first prompt
        (tmp_path / name).write_bytes("\ufeff".encode() + b'{"prompt": "x"}\r\n')
    assert read_prompt_file(tmp_path / "h.txt") == [{"prompt": '{"prompt": "x"}'}]
    assert read_prompt_file(tmp_path / "h.prompts") == [{"prompt": "x"}]  # sniffed as JSONL
    (tmp_path / "g.jsonl").write_text('{"prompt": "x"}\n\n\n{"prompt": "y"}\n{"prompt": 5}\n')
    with pytest.raises(InputError, match="line 5: expected an object"):
        read_prompt_file(tmp_path / "g.jsonl")


def test_hub_datasets_fail_clearly_offline():
    start = time.perf_counter()
    for source in ("hh-rlhf", "gsm8k", "hf:some/dataset"):
        with pytest.raises(InputError, match="datasets|offline|cache|reach"):
            load_prompts(source, limit=4)
    assert time.perf_counter() - start < 60


def test_answer_match_gold_rewards():
    gold = GoldReward.from_spec("boxed")
    assert gold(None, [[1], [1]], None, ["so \\boxed{x^2}", "none"], [{"answer": "\\boxed{x^2}"}] * 2) == [1.0, 0.0]
    gold = GoldReward.from_spec("last_number")
    records = [{"prompt": "q", "answer": "... #### 7"}, {"prompt": "q", "answer": "#### 8"}, {"prompt": "q", "answer": "9"}]
    assert gold(None, [[1], [1], [1]], None, ["it is 7", "it is 7", "none"], records) == [1.0, 0.0, 0.0]
    with pytest.raises(InputError, match="answer"):
        gold(None, [[1]], None, ["7"], [{"prompt": "q"}])


def test_gold_reward_from_function_spec_and_reward_model():
    gold = GoldReward.from_spec("test_evaluate:count_w1")
    assert gold(None, [[1], [1]], None, ["w1 w1 w2", "w3"], [{}, {}]) == [2.0, 0.0]
    with pytest.raises(InputError, match="cannot load"):
        GoldReward.from_spec("test_evaluate:nothing_here")
    rm = tiny_reward_model(vocab_size=V)
    gold = GoldReward.from_reward(rm)
    expected = fastalign.RewardModel(rm).score([[1, 2]], [[3]])
    assert gold([[1, 2]], [[3]], None, [""], [{}]) == pytest.approx(expected.tolist())



def test_gold_reward_from_a_reward_model_path(tmp_path):
    rm, tok = tiny_reward_model(vocab_size=V), tiny_tokenizer(V)
    rm.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    gold = GoldReward.from_spec(str(tmp_path), policy_tokenizer=tok)
    expected = fastalign.RewardModel(rm, tokenizer=tok, policy_tokenizer=tok).score([[1, 2]], [[3, 4]])
    assert gold.name == str(tmp_path)
    assert gold([[1, 2]], [[3, 4]], None, [""], [{}]) == pytest.approx(expected.tolist())


@pytest.fixture(scope="module")
def engine():
    return fastalign.Engine(target=tiny_causal_lm(vocab_size=V, init_range=0.2), reward=tiny_reward_model(vocab_size=V),
                            tokenizer=tiny_tokenizer(V))


def test_evaluate_records_costs_and_reproducibility(engine, tmp_path):
    prompts = [{"prompt": p} for p in ["w1 w2", "w3", "w4 w5 w6"]]
    gold = GoldReward.from_text_fn(count_w1, "count_w1")
    grid = [("sample", {}), ("bon", {"n": 2}), ("bon", {"n": 4})]
    records = evaluate(prompts, grid, engine, gold, max_new_tokens=4, seed=3, batch_size=2, progress=False)
    assert len(records) == 9 and [r["prompt_index"] for r in records[:3]] == [0, 1, 2]
    # prompt i's seed is derived from the seed and i alone: prompt 2 decoded alone with it, and any batch size
    again = engine.decode(["w4 w5 w6"], method="bon", max_new_tokens=4, seed=[prompt_seeds(3, 3)[2]], n=4)
    assert records[8]["tokens"] == again.sequences[0] and records[8]["completion"] == again.texts[0]
    one_batch = evaluate(prompts, grid, engine, gold, max_new_tokens=4, seed=3, batch_size=3, progress=False)
    assert [r["tokens"] for r in one_batch] == [r["tokens"] for r in records]
    for r in records:
        assert r["gold_reward"] == r["completion"].split().count("w1")
        stats = r["batch_stats"]
        assert r["target_calls"] == stats["target_calls"] / r["batch_rows"]
        assert r["compute_tokens"] == (stats["target_tokens"] + stats["reward_tokens"]) / r["batch_rows"]
        assert r["accepted_per_target_call"] is None  # reported by speculative methods only
    rows = summarize(records)
    assert [(r["method"], r["budget"]) for r in rows] == [("sample", "default"), ("bon", "n=2"), ("bon", "n=4")]
    assert rows[2]["reward_tokens"] > rows[1]["reward_tokens"] > 0 == rows[0]["reward_tokens"]
    paths = write_results(records, rows, tmp_path / "out", plot=False)
    assert read_complete_jsonl(paths["results"]) == json.loads(json.dumps(records))  # JSONL round trip
    assert json.loads(paths["summary_json"].read_text())[1]["budget"] == "n=2"


def test_summary_numbers_keep_their_size():
    from fastalign.eval.report import _fmt

    # 0.0004 s a prompt printed as 0, and -0.0004 as -0
    assert [_fmt(v) for v in (0.0004, -0.0004, 0.00049, 0.0, -0.0, 0.0123, 2.5, 1234.5678, 123456.0)] == [
        "0.0004", "-0.0004", "0.00049", "0", "0", "0.012", "2.5", "1234.568", "1.23e+05"]


def test_plot_curves_run_through_numeric_budgets_tuples_included():
    from fastalign.eval.report import _curves

    def row(options):
        return {"method": "sss", "options": options}
    rows = [row({"tree": "sampled", "branching": [2, 2]}), row({"tree": "sampled", "branching": [4, 2]}),
            row({"tree": "chain", "num_draft_tokens": 4}), row({"tree": "chain", "num_draft_tokens": 8})]
    # a branching sweep was one single-point curve per value
    assert [[r["options"] for r in curve] for curve in _curves(rows)] == [[o["options"] for o in rows[:2]],
                                                                         [o["options"] for o in rows[2:]]]
    # delimiters (token ids) are a variant: one curve per set of delimiters, through its particle counts
    rows = [{"method": "smc", "options": {"particles": n, "delimiters": d}} for d in ([13], [198]) for n in (4, 8)]
    assert [[r["options"] for r in curve] for curve in _curves(rows)] == [[o["options"] for o in rows[:2]],
                                                                         [o["options"] for o in rows[2:]]]


def test_reward_vs_compute_plot(tmp_path):
    pytest.importorskip("matplotlib")
    records = [record("sample", "default", i, float(i)) for i in range(3)]
    records += [record(m, f"n={n}", i, float(i + n), compute_tokens=10.0 * n, wall_time_s=0.1 * n)
                for m in ("bon", "soft_bon") for n in (2, 4, 8) for i in range(3)]
    paths = write_results(records, summarize(records), tmp_path, plot=True)
    png = paths["plot"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_eval_on_the_toy_world(tmp_path):
    pytest.importorskip("fastalign.eval.toyworld")
    from fastalign.cli import main

    rc = main(["eval", "--toy", "--limit", "2", "--grid", "sample", "--grid", "bon:n=2", "--max-new-tokens", "4",
               "--seed", "0", "--out-dir", str(tmp_path), "--no-progress"])
    assert rc == 0
    records = read_complete_jsonl(tmp_path / "results.jsonl")
    assert len(records) == 4 and all(isinstance(r["gold_reward"], float) for r in records)
    assert "| bon | n=2 | 2 |" in (tmp_path / "summary.md").read_text()
    assert all(r["accepted_per_target_call"] is None for r in json.loads((tmp_path / "summary.json").read_text()))


def test_eval_reports_the_acceptance_of_speculative_methods(tmp_path):
    pytest.importorskip("fastalign.eval.toyworld")
    pytest.importorskip("fastalign.methods.speculative")
    from fastalign.cli import main

    rc = main(["eval", "--toy", "--limit", "2", "--grid", "sd", "--grid", "sss", "--max-new-tokens", "4",
               "--seed", "0", "--out-dir", str(tmp_path), "--no-progress", "--no-plot"])
    assert rc == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "summary.json").read_text())}
    assert set(rows) == {"sample", "sd", "sss"} and rows["sample"]["accepted_per_target_call"] is None
    assert rows["sd"]["accepted_per_target_call"] > 0 and rows["sd"]["draft_calls"] > 0
    assert rows["sss"]["ref_calls"] > 0 and rows["sd"]["ref_calls"] == 0  # sss: aligned draft + ref


def test_evaluate_rejects_bad_batch_size_and_empty_inputs(engine):
    gold = GoldReward.from_text_fn(count_w1, "c")
    with pytest.raises(InputError, match="batch_size"):
        evaluate([{"prompt": "w1"}], [("sample", {})], engine, gold, batch_size=0)
    with pytest.raises(InputError, match="at least one prompt"):
        evaluate([], [("sample", {})], engine, gold)
    with pytest.raises(InputError, match="grid entry"):
        evaluate([{"prompt": "w1"}], [], engine, gold)


def test_gold_reward_length_is_checked():
    gold = GoldReward(lambda *a: torch.zeros(1), "short")
    with pytest.raises(InputError, match="1 scores for 2"):
        gold(None, [[1], [2]], None, ["", ""], [{}, {}])


def test_default_grid_keeps_the_methods_the_models_allow(engine):
    from fastalign.eval.grid import default_grid

    grid = default_grid(lambda method: engine)  # a target and a reward model, no draft
    methods = [m for m, _ in grid]
    assert methods[0] == "sample" and ("bon", {"n": 8}) in grid
    assert "sd" not in methods and "sss" not in methods


def test_progress_lines_when_not_on_a_terminal():
    import io

    from fastalign.eval.harness import ProgressLines

    out = io.StringIO()
    with ProgressLines(4, every=0.0, file=out) as progress:
        progress.set_postfix_str("bon n=2")
        progress.update(2)
        progress.update(2)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("eval: 0/4 decodes (0%), bon n=2, ")
    assert lines[1].startswith("eval: 2/4 decodes (50%), bon n=2, ")
    assert lines[-1].startswith("eval: 4/4 decodes (100%), finished, ")


def test_a_missing_prompt_file_is_named_but_a_hub_dataset_is_not_a_file(monkeypatch, tmp_path):
    from fastalign.eval import prompts as prompt_sources

    with pytest.raises(InputError, match="prompt file not found"):
        prompt_sources.load_prompts(str(tmp_path / "nowhere.jsonl"))
    asked = []
    monkeypatch.setattr(prompt_sources, "load_hf_prompts",
                        lambda name, config, *a, **k: asked.append((name, config)) or [{"prompt": "p"}])
    assert prompt_sources.load_prompts("hf:org/prompts.jsonl") == [{"prompt": "p"}]
    assert prompt_sources.load_prompts("hf:org/name:config.txt") == [{"prompt": "p"}]
    assert asked == [("org/prompts.jsonl", None), ("org/name", "config.txt")]
