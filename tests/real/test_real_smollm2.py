"""SmolLM2-135M-Instruct from PyPI (GGUF): loading, greedy equality with ``generate``, every method on chat
prompts, and that best-of-n raises the VADER reward."""

import pytest
import torch

import fastalign
from fastalign.models.chat import end_of_turn_ids
from fastalign.models.text_rewards import vader
from fastalign.testing import hf_greedy
from fastalign.eval.worlds import SMOLLM2_SETTINGS, smollm2_gguf_path

pytestmark = pytest.mark.real

# chat prompts of different lengths (the batch is left-padded by up to ~20 tokens)
GREEDY_PROMPTS = [
    "Hi!",
    "Write a one-sentence review of a coffee shop.",
    "Tell me about your weekend.",
    "Complain about the weather in a long paragraph with many details, please, in the voice of an old pirate "
    "who has sailed every sea.",
]
# requests with short answers, so that responses end their turn within the budget
SHORT_PROMPTS = [
    "In one short sentence, how was your day?",
    "Say hello to my friend Anna in a few words.",
    "In one sentence, what do you think of rainy days?",
    "Give a one-line review of your favourite cafe.",
]
GREEDY_TOKENS = 64


@pytest.fixture(scope="module")
def engine(smollm2):
    return smollm2.engine()


def test_the_gguf_file_loads_and_equals_the_saved_model(smollm2):
    gguf = fastalign.Engine(target=str(smollm2_gguf_path()), chat=True)  # model and tokenizer from the one file
    assert gguf.tokenizer.get_vocab() == smollm2.tokenizer.get_vocab()
    assert gguf.tokenizer.chat_template == smollm2.tokenizer.chat_template
    assert getattr(gguf.target.model, "hf_quantizer", None) is None  # plain tensors: save_pretrained works
    prompts = gguf.encode(GREEDY_PROMPTS)
    saved = fastalign.Engine(target=smollm2.target, tokenizer=smollm2.tokenizer, chat=True)
    assert saved.encode(GREEDY_PROMPTS) == prompts
    assert torch.equal(gguf.target.prefill(prompts), saved.target.prefill(prompts))
    assert gguf.target.eos_token_ids == saved.target.eos_token_ids == set(end_of_turn_ids(gguf.tokenizer))


def test_chat_rendering_and_end_of_turn(engine):
    ids = engine.encode(["Hello"])[0]
    text = engine.tokenizer.decode(ids)
    assert text.endswith("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")
    assert engine.encode([[{"role": "user", "content": "Hello"}]])[0] == ids
    assert end_of_turn_ids(engine.tokenizer) == {engine.tokenizer.convert_tokens_to_ids("<|im_end|>")}


def _greedy(engine, prompts):
    return engine.decode(prompts, method="sample", max_new_tokens=GREEDY_TOKENS, temperature=1.0, top_k=1,
                         seed=0).sequences


def test_greedy_equals_generate_alone(engine):
    model, stop = engine.target.model, engine.target.eos_token_ids
    for prompt in engine.encode(GREEDY_PROMPTS):
        expected = hf_greedy(model, [prompt], GREEDY_TOKENS, engine.tokenizer.pad_token_id, stop)
        assert _greedy(engine, [prompt]) == expected


def test_greedy_equals_generate_in_a_left_padded_batch(engine):
    prompts = engine.encode(GREEDY_PROMPTS)
    assert len({len(p) for p in prompts}) == len(prompts)  # different lengths: the batch is padded
    expected = hf_greedy(engine.target.model, prompts, GREEDY_TOKENS, engine.tokenizer.pad_token_id,
                         engine.target.eos_token_ids)
    got = _greedy(engine, prompts)
    mismatched = [i for i in range(len(prompts)) if got[i] != expected[i]]
    assert not mismatched, f"prompts {mismatched} differ from generate's greedy tokens"
    assert any(len(s) == GREEDY_TOKENS for s in got) and any(len(s) < GREEDY_TOKENS for s in got)


# reduced budgets of the world's settings, so that each method takes seconds
METHODS = {"sample": {}, "bon": {"n": 4}, "soft_bon": {"n": 4, "lam": 0.1}, "args": SMOLLM2_SETTINGS["args"][1],
           "rs": {**SMOLLM2_SETTINGS["rs"][1], "max_rejections": 2},
           "cards": {**SMOLLM2_SETTINGS["cards"][1], "max_rejections": 2}, "qalign": {"beta": 0.2, "steps": 4}}


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_runs_on_chat_prompts_and_stops_at_end_of_turn(engine, method):
    budget = 40
    out = engine.decode(SHORT_PROMPTS, method=method, max_new_tokens=budget, temperature=0.7, seed=1,
                        **METHODS[method])
    end = engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert len(out.sequences) == len(SHORT_PROMPTS)
    for seq, text in zip(out.sequences, out.texts):
        assert 0 < len(seq) <= budget
        assert end not in seq[:-1]  # nothing is generated past the end of the turn
        assert seq[-1] == end or len(seq) == budget
        assert "<|im_start|>" not in text and text.strip()
    assert sum(seq[-1] == end for seq in out.sequences) >= 2, out.texts
    if method != "sample":
        assert out.stats["reward_calls"] > 0


def test_best_of_n_raises_the_vader_reward_over_sample(engine, smollm2):
    # measured gains at this size: +0.25 (seed 2) and +0.87 (seed 3); the best of 8 VADER scores in [-1, 1]
    prompts = smollm2.prompts[:6]
    mean = {}
    for method, options in (("sample", {}), ("bon", {"n": 8})):
        out = engine.decode(prompts, method=method, max_new_tokens=24, temperature=0.7, seed=2, **options)
        mean[method] = sum(vader(prompts, out.texts)) / len(prompts)
    assert mean["bon"] > mean["sample"] + 0.15, mean


def test_demo_and_eval_run_on_the_smollm2_world(tmp_path, capsys):
    from fastalign.cli import main

    assert main(["demo", "--world", "smollm2", "--methods", "sample", "bon", "sd", "--num-prompts", "2",
                 "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out
    assert "| sample |" in printed and "| bon |" in printed and "not run: sd:" in printed
    assert main(["eval", "--world", "smollm2", "--limit", "2", "--max-new-tokens", "6", "--grid", "sample",
                 "--grid", "bon:n=2", "--out-dir", str(tmp_path), "--no-progress"]) == 0
    assert (tmp_path / "reward_vs_compute.png").stat().st_size > 0
    assert "vader" in (tmp_path / "summary.md").read_text()
