"""Chat prompts, end-of-turn stop tokens, text rewards (VADER), model loading options and named worlds, on the
toy world (the real models are in tests/real)."""

import copy
import json
import sys

import pytest
import torch

import fastalign
from fastalign import InputError
from fastalign.models.chat import end_of_turn_ids, render
from fastalign.cli import main
from fastalign.eval.gold import GoldReward
from fastalign.models.loading import is_gguf
from fastalign.models.remote import RemoteLM
from fastalign.models.text_rewards import TextReward, text_reward_function, vader
from fastalign.eval.toyworld import load_toy_world
from fastalign.eval.worlds import NAMES, SMOLLM2_PROMPTS, UNAVAILABLE, load_world, world_prompts
from fastalign.testing import serving

# a chat template in the toy language: each message's content, then <pad> as the end-of-turn token
TEMPLATE = ("{% for m in messages %}{{ m['content'] }} <pad> {% endfor %}"
            "{% if add_generation_prompt %}review :{% endif %}")


@pytest.fixture(scope="module")
def world():
    return load_toy_world()


@pytest.fixture
def chat_tokenizer(world):
    tokenizer = copy.deepcopy(world.tokenizer)
    tokenizer.chat_template = TEMPLATE
    return tokenizer


# ------------------------------------------------------------------ chat
def test_prompts_given_as_a_generator_or_an_array_read_as_the_list(world, chat_tokenizer):
    """chat=True was ignored for prompts that were not a list or tuple (the template silently skipped), and
    conversations in a generator were refused as "token ids must be integers"."""
    import numpy as np

    engine = fastalign.Engine(target=world.target, tokenizer=chat_tokenizer)
    rendered = engine.encode(["the pasta"], chat=True)
    assert rendered != engine.encode(["the pasta"])
    assert engine.encode((p for p in ["the pasta"]), chat=True) == rendered
    assert engine.encode(np.array(["the pasta"]), chat=True) == rendered
    conversation = [{"role": "user", "content": "the pasta"}]
    assert engine.encode(c for c in [conversation]) == engine.encode([conversation])
    ids = [[1, 2, 3], [4, 5, 6]]
    assert engine.encode(np.array(ids)) == engine.encode(torch.tensor(ids)) == engine.encode(r for r in ids) == ids


def test_conversations_and_chat_strings_render_with_the_template(world, chat_tokenizer):
    engine = fastalign.Engine(target=world.target, tokenizer=chat_tokenizer)
    word = chat_tokenizer.convert_tokens_to_ids
    expected = [word("the"), word("pasta"), word("<pad>"), word("review"), word(":")]
    assert engine.encode([[{"role": "user", "content": "the pasta"}]]) == [expected]
    assert engine.encode(["the pasta"], chat=True) == [expected]
    assert engine.encode(["the pasta"])[0] == [word("<s>"), word("the"), word("pasta")]  # plain: no template
    assert fastalign.Engine(target=world.target, tokenizer=chat_tokenizer, chat=True).encode(["the pasta"]) == [expected]
    assert render(chat_tokenizer, [[{"role": "system", "content": "the"}, {"role": "user", "content": "pasta"}]]) == \
        [[word("the"), word("<pad>"), word("pasta"), word("<pad>"), word("review"), word(":")]]


def test_chat_input_errors(world, chat_tokenizer):
    engine = fastalign.Engine(target=world.target, tokenizer=chat_tokenizer)
    with pytest.raises(InputError, match="prompt 0, message 1: expected a dict with string 'role' and 'content'"):
        engine.encode([[{"role": "user", "content": "the"}, {"role": "user"}]])
    plain = fastalign.Engine(target=world.target, tokenizer=world.tokenizer)
    with pytest.raises(InputError, match="needs? a tokenizer with a chat template"):
        plain.encode(["the pasta"], chat=True)
    with pytest.raises(InputError, match="chat template"):
        plain.decode([[{"role": "user", "content": "the pasta"}]], max_new_tokens=2)


def test_the_end_of_turn_token_is_found_and_ends_responses(world, chat_tokenizer):
    assert end_of_turn_ids(chat_tokenizer) == {chat_tokenizer.pad_token_id}
    assert end_of_turn_ids(world.tokenizer) == set()  # no template
    engine = fastalign.Engine(target=copy.deepcopy(world.target), tokenizer=chat_tokenizer)
    assert engine.target.eos_token_ids == {chat_tokenizer.eos_token_id, chat_tokenizer.pad_token_id}
    held = fastalign.Engine(target=copy.deepcopy(world.target)).target  # a CausalLM the caller holds and passes
    assert fastalign.Engine(target=held, tokenizer=chat_tokenizer).target.eos_token_ids == engine.target.eos_token_ids
    assert held.eos_token_ids == {chat_tokenizer.eos_token_id}  # unchanged
    both = fastalign.Engine(target=held, draft=held, tokenizer=chat_tokenizer)
    assert both.target.model is both.draft.model and both.draft.store is not both.target.store  # a cache each
    assert both.draft.eos_token_ids == both.target.eos_token_ids
    # a stop token ends a response in every method as EOS does: take "," (frequent in the toy language)
    comma = chat_tokenizer.convert_tokens_to_ids(",")
    engine.target.add_stop_tokens([comma])
    engine = fastalign.Engine(target=engine.target, reward=world.reward, tokenizer=chat_tokenizer)
    prompts = ["the pasta", "the coffee", "our waiter", "my phone"] * 2
    for method, options in (("sample", {}), ("bon", {"n": 2}), ("cards", {"min_segment_tokens": 2}),
                            ("qalign", {"steps": 2})):
        out = engine.decode(prompts, method=method, max_new_tokens=24, temperature=1.0, seed=0, chat=True, **options)
        for seq in out.sequences:
            assert comma not in seq[:-1] and chat_tokenizer.eos_token_id not in seq[:-1], (method, seq)
        assert any(seq[-1] == comma for seq in out.sequences), method


def test_the_end_of_turn_token_ends_responses_of_a_remote_target(world):
    """A served target gets the template's end-of-turn ids as stop tokens too (the engine added them to local
    targets only: remote responses ran past ",", the end of a turn here, and rarely ended at it)."""
    tokenizer = copy.deepcopy(world.tokenizer)
    tokenizer.chat_template = TEMPLATE.replace("<pad>", ",")
    tokenizer.add_special_tokens({"additional_special_tokens": [","]})
    comma = tokenizer.convert_tokens_to_ids(",")
    assert end_of_turn_ids(tokenizer) == {comma}
    prompts = ["the pasta", "the coffee", "our waiter", "my phone"] * 2
    with serving(world.target) as url:
        remote = RemoteLM(url)
        engine = fastalign.Engine(target=remote, reward=world.reward, tokenizer=tokenizer)
        assert comma in engine.target.eos_token_ids
        # the caller's RemoteLM keeps its own stops: the engine's leaked into every later engine over it
        assert comma not in remote.eos_token_ids and comma not in fastalign.Engine(target=remote).target.eos_token_ids
        for method, options in (("sample", {}), ("bon", {"n": 2}), ("smc", {"particles": 2, "segment_tokens": 4})):
            out = engine.decode(prompts, method=method, max_new_tokens=24, temperature=1.0, seed=0, chat=True,
                                **options)
            assert all(comma not in seq[:-1] for seq in out.sequences), method
            assert any(seq[-1] == comma for seq in out.sequences), method


# ------------------------------------------------------------------ rewards
def test_vader_scores_the_completion_text():
    scores = vader(["ignored", "ignored"], ["I love it, the food was wonderful!", "Awful service, I hate it."])
    assert scores[0] > 0.5 and scores[1] < -0.5
    assert text_reward_function("vader") is vader
    assert text_reward_function("fastalign.models.text_rewards:vader") is vader
    assert text_reward_function("some/model-name") is None  # a reward model's name, not a function
    with pytest.raises(InputError, match="cannot load the reward function 'no_such_module:f'"):
        text_reward_function("no_such_module:f")
    with pytest.raises(InputError, match="needs the policy's tokenizer"):
        TextReward(vader, None, "vader")


@pytest.mark.parametrize("spec", ["vader", "fastalign.models.text_rewards:vader"])
def test_reward_vader_drives_best_of_n(world, spec):
    prompts = world.prompts[:4]
    out = fastalign.decode(prompts, method="bon", target=world.target, reward=spec, tokenizer=world.tokenizer,
                           n=4, max_new_tokens=12, temperature=1.0, seed=0)
    rewards = out.extra["rewards"]  # [prompts, n]: VADER of each candidate's response text
    assert torch.allclose(rewards.max(1).values, torch.tensor(vader(prompts, out.texts)), atol=1e-6)
    gold = GoldReward.from_spec("vader", world.tokenizer)
    assert gold(None, out.sequences, prompts, out.texts, [{}] * 4) == pytest.approx(vader(prompts, out.texts))


# ------------------------------------------------------------------ loading
def test_gguf_paths_are_recognised_and_missing_files_named():
    assert is_gguf("model.gguf") and is_gguf("/a/B.GGUF") and not is_gguf("gpt2") and not is_gguf(None)
    with pytest.raises(InputError, match="GGUF file not found: .*nowhere.gguf"):
        fastalign.Engine(target="/tmp/nowhere.gguf")


def test_dtype_and_device_apply_to_model_objects(world):
    target, reward = copy.deepcopy(world.target), copy.deepcopy(world.reward)
    engine = fastalign.Engine(target=target, reward=reward, tokenizer=world.tokenizer, dtype=torch.float64,
                              device="cpu")
    assert engine.target.dtype == torch.float64 and engine.reward.lm.dtype == torch.float64
    again = fastalign.Engine(target=engine.target, reward=engine.reward, tokenizer=world.tokenizer,
                             dtype=torch.float32)  # wrapped objects
    assert again.target.dtype == torch.float32 and again.reward.lm.dtype == torch.float32
    out = again.decode(world.prompts[:2], method="bon", n=2, max_new_tokens=4, temperature=1.0, seed=0)
    assert len(out.sequences) == 2
    assert fastalign.Engine(target=again.target, dtype="auto").target is again.target  # nothing to change


def test_worlds_name_toy_smollm2_and_arith():
    assert NAMES == ("toy", "smollm2", "arith")
    assert world_prompts("smollm2") == SMOLLM2_PROMPTS and len(SMOLLM2_PROMPTS) >= 16
    assert set(UNAVAILABLE["smollm2"]) == {"sd", "sss"}
    toy = load_world("toy", dtype=torch.float64)
    assert toy.target.dtype == toy.reward.dtype == toy.aligned_draft.dtype == torch.float64
    assert toy.engine("sss").draft.model is toy.aligned_draft and toy.engine().draft.model is toy.draft
    with pytest.raises(InputError, match="unknown world 'moon'"):
        load_world("moon")


# ------------------------------------------------------------------ command line
def test_cli_reward_and_gold_vader(tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--toy", "--method", "bon", "--opt", "n=2", "--reward", "vader", "--max-new-tokens", "4",
                 "--seed", "0", "-o", str(out), "review : the pasta"]) == 0
    line = json.loads(out.read_text())
    assert line["batch"]["stats"]["reward_calls"] > 0
    assert main(["eval", "--toy", "--gold", "vader", "--grid", "sample", "--limit", "2", "--max-new-tokens", "4",
                 "--out-dir", str(tmp_path / "eval"), "--no-plot", "--no-progress"]) == 0
    assert "gold reward: vader" in (tmp_path / "eval" / "summary.md").read_text()
    assert main(["generate", "--toy", "--chat", "--max-new-tokens", "2", "review : the pasta"]) == 2
    assert "chat template" in capsys.readouterr().err


# ------------------------------------------------------------------ user code and files that fail
REWARD_MODULE = '''
def boom(prompts, completions):
    raise RuntimeError("the reward server is down")

def words(prompts, completions):
    return ["good" for _ in completions]

def nothing(prompts, completions):
    return None

def one_argument(completions):
    return [1.0 for _ in completions]

not_a_function = 3
'''


@pytest.fixture
def user_rewards(tmp_path, monkeypatch):
    """A module of text rewards that fail in every way (``user_rewards:NAME``), and one that fails to import."""
    (tmp_path / "user_rewards.py").write_text(REWARD_MODULE)
    (tmp_path / "user_rewards_broken.py").write_text("x = 1 / 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "user_rewards"


def test_a_text_reward_that_fails_is_an_input_error_with_its_own_cause(world, user_rewards):
    kw = dict(method="bon", target=world.target, tokenizer=world.tokenizer, n=2, max_new_tokens=3, seed=0)
    with pytest.raises(InputError, match="the reward 'user_rewards:boom' raised RuntimeError: the reward server "
                                         "is down") as caught:
        fastalign.decode(["the pasta"], reward="user_rewards:boom", **kw)
    assert isinstance(caught.value.__cause__, RuntimeError)  # chained, not swallowed
    with pytest.raises(InputError, match=r"the reward 'user_rewards:words' returned \['good', 'good'\]; "
                                         "expected 2 numbers"):
        fastalign.decode(["the pasta"], reward="user_rewards:words", **kw)
    with pytest.raises(InputError, match="the reward 'user_rewards:nothing' returned None; expected 2 numbers"):
        fastalign.decode(["the pasta"], reward="user_rewards:nothing", **kw)


def test_a_text_reward_that_cannot_be_loaded_is_named(world, user_rewards):
    with pytest.raises(InputError, match=r"cannot load the reward function 'user_rewards_broken:f': importing "
                                         r"'user_rewards_broken' raised ZeroDivisionError") as caught:
        fastalign.Engine(target=world.target, tokenizer=world.tokenizer, reward="user_rewards_broken:f")
    assert isinstance(caught.value.__cause__, ZeroDivisionError)
    with pytest.raises(InputError, match=r"'user_rewards:one_argument': it must take two arguments \(prompts, "
                                         r"completions\); its signature is \(completions\)"):
        fastalign.Engine(target=world.target, tokenizer=world.tokenizer, reward="user_rewards:one_argument")
    with pytest.raises(InputError, match="'user_rewards:not_a_function': it is a int, not a function"):
        fastalign.Engine(target=world.target, tokenizer=world.tokenizer, reward="user_rewards:not_a_function")
    with pytest.raises(InputError, match="cannot load the reward function 'user_rewards:missing'"):
        fastalign.Engine(target=world.target, tokenizer=world.tokenizer, reward="user_rewards:missing")


def test_a_gold_text_reward_that_fails_is_an_input_error(user_rewards):
    records = dict(prompt_ids=[[1], [2]], response_ids=[[3], [4]], prompt_texts=["a", "b"],
                   completion_texts=["x", "y"], records=[{}, {}])
    with pytest.raises(InputError, match="gold reward 'user_rewards:boom' raised RuntimeError") as caught:
        GoldReward.from_spec("user_rewards:boom")(**records)
    assert isinstance(caught.value.__cause__, RuntimeError)
    with pytest.raises(InputError, match=r"gold reward 'user_rewards:words' returned \['good', 'good'\]"):
        GoldReward.from_spec("user_rewards:words")(**records)
    with pytest.raises(InputError, match="gold reward 'user_rewards:nothing' returned None"):
        GoldReward.from_spec("user_rewards:nothing")(**records)
    with pytest.raises(InputError, match="cannot load the gold reward function 'user_rewards_broken:f'"):
        GoldReward.from_spec("user_rewards_broken:f")


def test_cli_reward_errors_are_one_line(user_rewards, capsys):
    for spec, message in (("user_rewards:boom", "raised RuntimeError: the reward server is down"),
                          ("user_rewards_broken:f", "raised ZeroDivisionError")):
        assert main(["generate", "--toy", "--method", "bon", "--opt", "n=2", "--reward", spec, "--max-new-tokens",
                     "2", "review : the pasta"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "Traceback" not in err, err


def test_a_chat_template_that_raises_is_an_input_error(world, chat_tokenizer):
    chat_tokenizer.chat_template = "{{ raise_exception('system messages are not supported') }}"
    engine = fastalign.Engine(target=world.target, tokenizer=chat_tokenizer)
    with pytest.raises(InputError, match="prompt 0: the tokenizer's chat template failed on it "
                                         r"\(TemplateError: system messages are not supported\)") as caught:
        engine.encode(["the pasta"], chat=True)
    assert type(caught.value.__cause__).__name__ == "TemplateError"


def test_a_lone_surrogate_in_a_prompt_is_named(world, chat_tokenizer):
    """Undecodable bytes on a command line reach Python as lone surrogates; the tokenizer raised a raw
    TypeError."""
    engine = fastalign.Engine(target=world.target, tokenizer=chat_tokenizer)
    with pytest.raises(InputError, match=r"prompt 1 is not valid Unicode text: it holds a lone surrogate "
                                         r"'\\udcff' at position 4"):
        engine.decode(["the pasta", "the \udcff"], max_new_tokens=2)
    with pytest.raises(InputError, match="prompt 0, message 0 is not valid Unicode text"):
        engine.encode([[{"role": "user", "content": "\ud800"}]])


def test_a_tokenizer_given_as_a_model_is_named(world):
    with pytest.raises(InputError, match=r"target is a tokenizer \(.*\); pass it as tokenizer=\.\.\. and the "
                                         r"model as target=\.\.\."):
        fastalign.Engine(target=world.tokenizer)
    with pytest.raises(InputError, match="reward is a tokenizer"):  # callable, it passed for a reward function
        fastalign.Engine(target=world.target, tokenizer=world.tokenizer, reward=world.tokenizer)


def write_tiny_gguf(path):
    """A small but well-formed GGUF file (a vocabulary and one tensor), written with the ``gguf`` package."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_token_list([f"tok{i}" for i in range(200)])
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_truncated_gguf_file_is_named(tmp_path):
    """A GGUF file cut short (an interrupted download) used to raise a raw struct.error from the reader."""
    whole = tmp_path / "whole.gguf"
    write_tiny_gguf(whole)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])  # inside the vocabulary
    with pytest.raises(InputError, match=r"the target '.*cut.gguf' is not a complete GGUF file \(truncated or "
                                         r"corrupt\): reading it failed with struct.error"):
        fastalign.Engine(target=str(cut))
    # a whole file that transformers cannot use (no tokenizer in it) is another error, not called truncated
    with pytest.raises(InputError) as caught:
        fastalign.Engine(target=str(whole))
    assert "not a complete GGUF file" not in str(caught.value)


def test_a_module_in_the_current_folder_is_found_without_it_on_the_path(tmp_path, monkeypatch):
    """``python -m fastalign`` puts the current folder on the path; the ``fastalign`` console script does not,
    and ``--reward myrewards:good`` then failed there with 'No module named'."""
    (tmp_path / "rewards_here_only.py").write_text("def good(prompts, completions):\n"
                                                   "    import neighbour_here_only\n"  # a neighbour, at call time
                                                   "    return [neighbour_here_only.score(c) for c in completions]\n")
    (tmp_path / "neighbour_here_only.py").write_text("def score(c):\n    return float(len(c))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    fn = text_reward_function("rewards_here_only:good")
    assert fn(["p"], ["abc"]) == [3.0] and sys.path[-1] == str(tmp_path)  # left on the path, as python -m does
    with pytest.raises(InputError, match="No module named 'not_here_either'"):
        text_reward_function("not_here_either:good")
