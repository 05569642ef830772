"""The arith world: shipped files, the language's generator and checker, the rewards, and decoding on it."""

import hashlib
import io
import json
import os
import random
from pathlib import Path

import pytest
import torch

import fastalign
from fastalign.eval import arithworld as aw
from fastalign.eval.arithworld import DATA_DIR, load_arith_world
from fastalign.errors import InputError
from fastalign.methods.answers import EXTRACTORS

MANIFEST = json.loads((DATA_DIR / "manifest.json").read_text())
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "build_arith_world.py"


@pytest.fixture(scope="module")
def world():
    return load_arith_world()


def ids(world, texts):
    return [world.tokenizer(t)["input_ids"] for t in texts]


def response_ids(world, text, finished=True):
    return world.tokenizer(text, add_special_tokens=False)["input_ids"] + ([world.tokenizer.eos_token_id]
                                                                             if finished else [])


# ------------------------------------------------------------------ shipped files
def test_shipped_files_match_the_manifest():
    shipped = sorted(str(p.relative_to(DATA_DIR)) for p in DATA_DIR.rglob("*") if p.is_file())
    assert shipped == sorted([*MANIFEST["files"], "manifest.json"])
    for name, digest in MANIFEST["files"].items():
        assert hashlib.sha256((DATA_DIR / name).read_bytes()).hexdigest() == digest, name
    assert sum((DATA_DIR / n).stat().st_size for n in MANIFEST["files"]) < 4e6  # a few MB at most
    assert MANIFEST["settings"]["error_rate"] == aw.ERROR_RATE
    assert 0.35 <= MANIFEST["metrics"]["sample_accuracy"] <= 0.65  # plain sampling: right about half the time


def test_loads_offline_and_the_tokenizer_rebuilds(world):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert aw.build_tokenizer().get_vocab() == world.tokenizer.get_vocab()
    assert world.target.config.model_type == "llama" and world.target.config.vocab_size == len(world.tokenizer)
    assert world.reward.config.num_labels == 1 and not world.target.training and not world.reward.training
    assert world.prompts == aw.PROMPTS and len(set(world.prompts)) == aw.NUM_PROMPTS
    words = set(aw.vocabulary())
    for text in world.prompts:
        assert world.tokenizer.unk_token_id not in world.tokenizer(text)["input_ids"]
        assert set(text.split()) <= words


@pytest.fixture(scope="module")
def build():
    """scripts/build_arith_world.py as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_arith_world", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_corpus_rebuilds_identically_without_the_prompts(build):
    """The build script's training corpus hashes to the manifest's and holds none of the held-out problems."""
    settings = MANIFEST["settings"]
    held = {aw.question(s) for s in aw.held_out_problems(settings["eval_problems"])}
    rows = build.build_corpus(settings["corpus_size"], settings["corpus_seed"], settings["error_rate"], held)
    texts = build.corpus_texts(rows)
    assert hashlib.sha256("\n".join(texts).encode()).hexdigest() == MANIFEST["corpus_sha256"]
    assert set(aw.PROMPTS) <= held and not held & {aw.question(state) for state, _, _ in rows}


def test_reward_model_labels_follow_the_checker(build):
    """The reward model's per-token labels: 1 up to the first wrong step's result, 0 from there on; at </s>
    the answer's verdict (1 where errors cancel out)."""
    q = [3, "+", 4, "*", 2]
    assert build.token_labels(q, "4 * 2 = 8 ; 3 + 8 = 11 ; answer 11") == [1.0] * 15
    assert build.token_labels(q, "4 * 2 = 9 ; 3 + 9 = 12 ; answer 12") == [1.0] * 4 + [0.0] * 11
    assert build.token_labels(q, "4 * 2 = 8 ; 3 + 8 = 11 ; answer 12") == [1.0] * 13 + [0.0] * 2
    rng = random.Random(3)
    for _ in range(300):
        state = aw.generate_problem(rng)
        text, injected = aw.solution(state, rng, error_rate=0.3)
        labels = build.token_labels(state, text)
        assert len(labels) == len(text.split()) + 1 and labels[:-1] == sorted(labels[:-1], reverse=True)
        assert labels[-2] == float(not any(injected))
        assert labels[-1] == float(aw.answer_of(text) == str(aw.true_answer(state)))


def test_missing_files_give_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="build_arith_world"):
        load_arith_world(path=tmp_path)


# ------------------------------------------------------------------ the language
def test_generator_and_checker_agree():
    """Every generated right solution checks right on every step; every injected error is the step the process
    reward finds wrong (and no other)."""
    rng = random.Random(5)
    injected_total, hidden, with_errors = 0, 0, 0
    for _ in range(2000):
        state = aw.generate_problem(rng)
        assert all(0 <= step[3] <= aw.MAX_VALUE for step in aw.solve(state))
        text, injected = aw.solution(state)
        assert not any(injected)
        assert all(aw.check_steps(state, text, finished=True))
        assert aw.answer_of(text) == str(aw.true_answer(state))
        text, injected = aw.solution(state, rng, error_rate=0.5)
        checks = aw.check_steps(state, text, finished=True)
        assert [not ok for ok in checks[:-1]] == injected and checks[-1]  # the answer follows the written steps
        injected_total += sum(injected)
        if any(injected):  # errors can cancel (x * 0, or +2 then -2): rarely
            with_errors += 1
            hidden += aw.answer_of(text) == str(aw.true_answer(state))
    assert injected_total > 500 and hidden < 0.1 * with_errors


def test_checker_on_hand_made_solutions():
    q = [3, "+", 4, "*", 2]
    assert aw.check_steps(q, "4 * 2 = 8 ; 3 + 8 = 11 ; answer 11", True) == [True, True, True]
    assert aw.check_steps(q, "4 * 2 = 9 ; 3 + 9 = 12 ; answer 12", True) == [False, True, True]
    assert aw.check_steps(q, "3 + 4 = 7 ; 7 * 2 = 14 ; answer 14", True) == [False, False, False]  # wrong order
    assert aw.check_steps(q, "4 * 2 = 8 ; answer 8", True) == [True, False]  # a step skipped
    assert aw.check_steps(q, "4 * 2 = 8 ; 3 + 8 = 11 ; answer 12", True) == [True, True, False]
    assert aw.check_steps(q, "4 * 2 = 8 ; 3 + 8 = 11 ;", True) == [True, True, False]  # no answer
    assert aw.check_steps(q, "4 * 2 = 8 ; 3 +", False) == [True]  # the step being written is not checked
    assert aw.check_steps(q, "4 * = 8 ; 3 + 8 = 11 ; answer 11", True) == [False, False, False]
    for final in ("+ 11", "11 11", "= 11", "q 11"):  # a final segment is right only as "answer N"
        assert aw.check_steps(q, f"4 * 2 = 8 ; 3 + 8 = 11 ; {final}", True) == [True, True, False]
    assert aw.parse_question("q : 3 + 4 * 2 =") == q and aw.parse_question("review : the pasta") is None


@pytest.mark.parametrize("text,answer", [
    ("4 * 2 = 8 ; 3 + 8 = 11 ; answer 11", "11"), ("answer 7", "7"), ("4 * 2 = 8 ; 3 + 8 = 11 ;", None),
    ("", None), ("answer 3 ; answer 42", "42"), ("answer", None), ("4 * 2 = 8", None)])
def test_answer_extractors(text, answer):
    assert aw.answer_of(text) == answer
    assert EXTRACTORS["answer"](text) == answer


def test_answer_extractor_reads_prose():
    assert EXTRACTORS["answer"]("So the answer is 72.") == "72"
    assert EXTRACTORS["answer"]("Answer: -3") == "-3"
    assert EXTRACTORS["answer"]("no number here") is None


# ------------------------------------------------------------------ rewards over token ids
def test_rewards_over_token_ids(world):
    prompt = "q : 3 + 4 * 2 ="
    texts = ["4 * 2 = 8 ; 3 + 8 = 11 ; answer 11", "4 * 2 = 9 ; 3 + 9 = 12 ; answer 12",
             "4 * 2 = 9 ; 3 + 9 = 13 ; answer 13", "4 * 2 = 8 ; 3 + 8", "3 + 4 = 7 ;"]
    finished = [True, True, True, False, False]
    prompts = ids(world, [prompt] * len(texts))
    responses = [response_ids(world, t, f) for t, f in zip(texts, finished)]
    assert world.step_checks(prompts, responses) == [[True] * 3, [False, True, True], [False, False, True],
                                                     [True], [False]]
    assert world.step_reward(prompts, responses).tolist() == [0, -1, -2, 0, -1]
    assert world.gold_reward(prompts, responses).tolist() == [1, 0, 0, 0, 0]
    scores = fastalign.RewardModel(world.reward).score(prompts[:2], responses[:2])
    assert scores[0] > scores[1]  # the outcome reward model prefers the right solution


def test_every_injected_error_is_found_by_the_process_reward(world):
    rng = random.Random(9)
    problems = [aw.generate_problem(rng) for _ in range(64)]
    solved = [aw.solution(s, rng, error_rate=0.4) for s in problems]
    prompts = ids(world, [aw.question(s) for s in problems])
    responses = [response_ids(world, text) for text, _ in solved]
    rewards = world.step_reward(prompts, responses)
    assert rewards.tolist() == [-float(sum(injected)) for _, injected in solved]
    gold = world.gold_reward(prompts, responses)
    assert all(g == 1 for g, (_, injected) in zip(gold.tolist(), solved) if not any(injected))


# ------------------------------------------------------------------ decoding on the world
def test_sampling_accuracy_and_methods_decode(world):
    from fastalign.eval.worlds import load_world

    loaded = load_world("arith")
    assert loaded.gold == "arith" and set(loaded.unavailable) == {"sd", "sss"}
    engine = loaded.engine()
    prompts = world.prompts[:8]
    out = engine.decode(prompts, method="sample", max_new_tokens=32, temperature=1.0, seed=0)
    prompt_ids = engine.encode(prompts)
    assert all(s[-1] == world.tokenizer.eos_token_id for s in out.sequences)  # every solution finishes
    gold = world.gold_reward(prompt_ids, out.sequences)
    assert set(gold.tolist()) <= {0.0, 1.0}
    assert all(t.split()[-2] == "answer" for t in out.texts)
    vote = engine.decode(prompts, method="bon", n=8, select="majority", answer_fn="answer", max_new_tokens=32,
                         temperature=1.0, seed=0)
    assert all(aw.answer_of(t) is not None for t in vote.texts)


def test_demo_and_eval_run_on_the_world(tmp_path):
    from fastalign import cli
    from fastalign.eval.demo import run_demo

    printed = io.StringIO()
    rows = run_demo(methods=["sample", "majority", "smc", "beam"], num_prompts=2, max_new_tokens=24, world="arith",
                    show=1, file=printed)
    assert [r["method"] for r in rows] == ["sample", "majority", "smc", "beam"]
    assert all(0 <= r["gold"] <= 1 for r in rows)
    # the step-level methods read the world's process reward, the others its outcome reward model
    assert [(r["reward_calls"] > 0, r["step_reward_calls"] > 0) for r in rows] == \
        [(False, False), (True, False), (False, True), (False, True)]
    assert "arith world" in printed.getvalue() and "| step reward |" in printed.getvalue()
    assert cli.main(["eval", "--world", "arith", "--limit", "2", "--grid", "bon:n=2;select=majority;answer_fn=answer",
                     "--grid", "smc:particles=2", "--grid", "beam:beams=1;width=2", "--max-new-tokens", "24",
                     "--out-dir", str(tmp_path), "--no-plot", "--no-progress"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["method"] for r in summary] == ["sample", "bon", "smc", "beam"]
    assert all(r["step_reward_calls"] > 0 for r in summary[2:])
    assert torch.isfinite(torch.tensor([r["gold_reward"] for r in summary])).all()


def test_gold_specs_pick_their_own_world(world):
    """``--gold arith`` is the answer checker whatever world runs; ``--gold toy`` with the arith world loaded is
    still the toy world's reward."""
    from fastalign.eval.gold import GoldReward

    prompt, right = "q : 3 + 4 * 2 =", "4 * 2 = 8 ; 3 + 8 = 11 ; answer 11"
    p, r = ids(world, [prompt] * 2), [response_ids(world, right), response_ids(world, "answer 12")]
    gold = GoldReward.from_spec("arith", world.tokenizer)
    assert gold.name == "arith" and gold(p, r, [prompt] * 2, [right, "answer 12"], [{}, {}]) == [1.0, 0.0]
    toy = GoldReward.from_spec("toy", world=world)  # the toy world's reward (on these ids: nonsense words)
    from fastalign.eval.toyworld import load_toy_world

    assert toy(p, r, [prompt] * 2, [right, "answer 12"], [{}, {}]) == load_toy_world().gold_reward(p, r).tolist()
    # a policy with another tokenizer: its ids were read as the world's words, and every answer judged wrong
    for spec, other in [("arith", load_toy_world().tokenizer), ("toy", world.tokenizer)]:
        with pytest.raises(InputError, match=f"the '{spec}' gold reward reads the {spec} world's tokens"):
            GoldReward.from_spec(spec, other)
