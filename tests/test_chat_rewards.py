"""Chat prompts, end-of-turn stop tokens, text rewards (VADER), model loading options and named worlds, on the
toy world (the real models are in tests/real)."""

import copy
import json

import pytest
import torch

import fastalign
from fastalign import InputError
from fastalign.models.chat import end_of_turn_ids, render
from fastalign.cli import main
from fastalign.eval.gold import GoldReward
from fastalign.models.loading import is_gguf
from fastalign.models.text_rewards import TextReward, text_reward_function, vader
from fastalign.eval.toyworld import load_toy_world
from fastalign.eval.worlds import NAMES, SMOLLM2_PROMPTS, UNAVAILABLE, load_world, world_prompts

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


def test_worlds_name_toy_and_smollm2():
    assert NAMES == ("toy", "smollm2")
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
