"""Process reward models (PRMs): a token-classification model with 2 labels read as P(good) at a step's last token.

* ``RewardModel.score`` of a PRM is ``softmax(logits)[good]`` at the response's last token (one plain forward).
* In ``beam`` with steps that end at a separator token, every step score of a finished beam is the PRM's reading
  at that step's separator in one forward over the whole sequence: the cached, growing prefix gives the same
  numbers as whole-sequence scoring.
* A saved token-classification model loads by path as a PRM; a PRM without 2 labels is an ``InputError``.
"""

import pytest
import torch

import fastalign
from fastalign.models.builder import ModelBuilder
from fastalign.models.reward import RewardModel
from fastalign.testing import tiny_causal_lm, tiny_process_reward_model, tiny_tokenizer

V, SEP, M, STEP = 8, 0, 8, 3
PROMPTS = [[2, 3, 4], [5], [6, 6]]


@pytest.fixture(scope="module")
def prm():
    return tiny_process_reward_model(vocab_size=V, hidden=16, seed=3)


def good_probability(prm, tokens: list[int]) -> torch.Tensor:
    """P(good) at every position of ``tokens`` (one forward, no cache).  [T]"""
    with torch.no_grad():
        logits = prm(torch.tensor([tokens])).logits[0]
    return torch.softmax(logits.float(), -1)[:, 1]


def step_ends(tokens: list[int]) -> list[int]:
    """The index of each step's last token: a step ends at ``SEP``, after ``STEP`` tokens, or at the end."""
    ends, length = [], 0
    for i, t in enumerate(tokens):
        length += 1
        if t == SEP or length == STEP or i == len(tokens) - 1:
            ends.append(i)
            length = 0
    return ends


def test_prm_score_is_the_good_label_probability_at_the_last_token(prm):
    responses = [[1, 4, 1], [3], [7, 2, 2, 1]]
    got = RewardModel(prm).score(PROMPTS, responses)
    want = torch.stack([good_probability(prm, p + r)[-1] for p, r in zip(PROMPTS, responses)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("aggregate", ["min", "prod"])
def test_beam_step_scores_are_the_prm_at_each_separator(prm, aggregate):
    target = tiny_causal_lm(vocab_size=V, hidden=16, layers=1, init_range=0.6, seed=0)
    out = fastalign.decode(PROMPTS, method="beam", target=target, reward=prm, max_new_tokens=M, seed=1, beams=2,
                           width=2, max_step_tokens=STEP, delimiters=[SEP], aggregate=aggregate)
    steps_seen = 0
    for prompt, finished in zip(PROMPTS, out.extra["finished"]):
        for f in finished:
            tokens = f["tokens"]
            ends = step_ends(tokens)
            probs = good_probability(prm, prompt + tokens)[[len(prompt) + i for i in ends]]
            torch.testing.assert_close(torch.tensor(f["step_scores"], dtype=torch.float32), probs,
                                       atol=1e-5, rtol=1e-5)
            steps_seen += len(ends)
            if ends[0] > 0:  # a plausible wrong reading, one token before each step's end, gives other numbers
                off = good_probability(prm, prompt + tokens)[[len(prompt) + i - 1 for i in ends]]
                assert not torch.allclose(off, probs, atol=1e-5)
    assert any(SEP in f["tokens"][:-1] for fs in out.extra["finished"] for f in fs)  # a step ended at SEP
    assert steps_seen > 2 * sum(len(f) for f in out.extra["finished"])  # several steps per beam: prefixes grow


def test_a_saved_prm_loads_by_path(prm, tmp_path):
    prm.save_pretrained(tmp_path)
    tiny_tokenizer(V).save_pretrained(tmp_path)
    loaded = ModelBuilder().reward(str(tmp_path))
    assert loaded.process
    torch.testing.assert_close(loaded.score(PROMPTS, [[1], [2], [3]]), RewardModel(prm).score(PROMPTS, [[1], [2], [3]]))


def test_a_prm_needs_two_labels():
    from transformers import LlamaConfig, LlamaForTokenClassification

    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=V, num_labels=3, pad_token_id=0)
    with pytest.raises(fastalign.InputError, match="2 labels"):
        RewardModel(LlamaForTokenClassification(cfg))
