"""Process reward models (PRMs): a token-classification model with 2 labels read as P(good) at a step's last token.

* ``RewardModel.score`` of a PRM is ``softmax(logits)[good]`` at the response's last token (one plain forward).
* In ``beam`` with steps that end at a separator token, every step score of a finished beam is the PRM's reading
  at that step's separator in one forward over the whole sequence: the cached, growing prefix gives the same
  numbers as whole-sequence scoring.
* A saved token-classification model loads by path as a PRM; a PRM without 2 labels is an ``InputError``.
* The ``step_reward`` role: one engine holds an outcome reward (for ``bon``) and a PRM (for ``smc`` and ``beam``);
  each method reads its own, token for token as an engine holding only that one; without a step reward the
  step-level methods read ``reward``, and without either the error names both.
* Delimiters given as one-token strings are their token ids.
"""

import pytest
import torch

import fastalign
from fastalign.models.builder import ModelBuilder
from fastalign.models.reward import RewardModel
from fastalign.testing import tiny_causal_lm, tiny_process_reward_model, tiny_reward_model, tiny_tokenizer

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


# ------------------------------------------------------------------ the step_reward role
STEP_OPTIONS = {"beam": dict(beams=2, width=2, max_step_tokens=STEP, delimiters=[SEP]),
                "smc": dict(particles=4, segment_tokens=STEP, delimiters=[SEP], ess_threshold=1.0)}


@pytest.fixture(scope="module")
def target():
    return tiny_causal_lm(vocab_size=V, hidden=16, layers=1, init_range=0.6, seed=0)


@pytest.mark.parametrize("method", ["beam", "smc"])
def test_one_engine_serves_outcome_and_step_level_methods_each_with_its_own_reward(target, prm, method):
    outcome = tiny_reward_model(vocab_size=V, seed=5)
    both = fastalign.Engine(target=target, reward=outcome, step_reward=prm)
    prm_only = fastalign.Engine(target=target, reward=prm)  # the PRM as the reward: read as the step reward
    rm_only = fastalign.Engine(target=target, reward=outcome)
    run = dict(max_new_tokens=M, seed=[3, 4, 5], **STEP_OPTIONS[method])
    scores = {"beam": "scores", "smc": "log_z"}[method]  # what the step reward decides
    stepped, alone = both.decode(PROMPTS, method=method, **run), prm_only.decode(PROMPTS, method=method, **run)
    assert stepped.sequences == alone.sequences and torch.equal(stepped.extra[scores], alone.extra[scores])
    assert stepped.stats["step_reward_calls"] > 0 and stepped.stats["reward_calls"] == 0
    # the test has power: the outcome reward read on partial responses scores otherwise
    assert not torch.allclose(stepped.extra[scores], rm_only.decode(PROMPTS, method=method, **run).extra[scores])
    best = both.decode(PROMPTS, method="bon", n=4, max_new_tokens=M, seed=[3, 4, 5])
    assert best.sequences == rm_only.decode(PROMPTS, method="bon", n=4, max_new_tokens=M, seed=[3, 4, 5]).sequences
    assert best.stats["reward_calls"] > 0 and best.stats["step_reward_calls"] == 0


def test_a_step_level_method_without_a_reward_names_both_roles(target):
    with pytest.raises(fastalign.InputError, match=r"needs a step_reward model \(pass step_reward=\.\.\. or reward="):
        fastalign.decode(PROMPTS, method="beam", target=target, max_new_tokens=M)
    with pytest.raises(fastalign.InputError, match="needs a reward model"):  # bon has no stand-in
        fastalign.decode(PROMPTS, method="bon", target=target, step_reward=prm_like(), max_new_tokens=M)


def prm_like():
    return tiny_process_reward_model(vocab_size=V, hidden=16, seed=4)


def test_a_method_gets_only_the_models_of_its_roles(target, prm):
    engine = fastalign.Engine(target=target, reward=prm_like(), step_reward=prm)
    ctx = engine.context(M, 1.0, None, None, 0, method="beam")
    assert ctx.step_reward is engine.step_reward and ctx.reward is None
    ctx = engine.context(M, 1.0, None, None, 0, method="bon")
    assert ctx.reward is engine.reward and ctx.step_reward is None


@pytest.mark.parametrize("method", ["beam", "smc"])
def test_delimiters_as_one_token_strings(target, prm, method):
    tokenizer = tiny_tokenizer(V)  # words w0 .. w7: "w0" is token SEP = 0
    run = dict(target=target, step_reward=prm, tokenizer=tokenizer, max_new_tokens=M, seed=2)
    options = dict(STEP_OPTIONS[method])
    by_id = fastalign.decode(PROMPTS, method=method, **run, **options)
    options["delimiters"] = "w0"
    assert fastalign.decode(PROMPTS, method=method, **run, **options).sequences == by_id.sequences
    options["delimiters"] = ["w0 w1"]
    with pytest.raises(fastalign.InputError, match="'w0 w1' is 2 tokens"):
        fastalign.decode(PROMPTS, method=method, **run, **options)
    options["delimiters"] = ["w0"]
    with pytest.raises(fastalign.InputError, match="needs a tokenizer"):
        fastalign.decode(PROMPTS, method=method, target=target, step_reward=prm, max_new_tokens=M, **options)


# ------------------------------------------------------------------ a step tag inserted after every step
TAG = 1  # the PRM's step tag (a token the policy may write too: the PRM's view is what counts)


def tagged_view(prompt: list[int], tokens: list[int]) -> tuple[list[int], list[int]]:
    """The PRM's view of a response scored step by step (steps as ``step_ends``), with ``TAG`` after every step,
    and the positions of the tags in it."""
    view, reads, start = list(prompt), [], 0
    for end in step_ends(tokens):
        view += tokens[start:end + 1] + [TAG]
        reads.append(len(view) - 1)
        start = end + 1
    return view, reads


@pytest.mark.parametrize("method", ["beam", "smc"])
def test_a_step_tag_is_read_after_every_step_as_the_prm_is_trained(prm, target, method):
    tagged = RewardModel(prm, step_tag=TAG)
    options = STEP_OPTIONS[method] | ({"select": "best"} if method == "smc" else {})
    out = fastalign.decode(PROMPTS, method=method, target=target, step_reward=tagged, max_new_tokens=M, seed=1,
                           **options)
    if method == "beam":
        for prompt, finished in zip(PROMPTS, out.extra["finished"]):
            for f in finished:
                view, reads = tagged_view(prompt, f["tokens"])
                want = good_probability(prm, view)[reads]
                torch.testing.assert_close(torch.tensor(f["step_scores"], dtype=torch.float32), want,
                                           atol=1e-5, rtol=1e-5)
                # the plausible wrong reading, at the step's own last token without tags, gives other numbers
                plain = good_probability(prm, prompt + f["tokens"])[[len(prompt) + i for i in step_ends(f["tokens"])]]
                assert not torch.allclose(plain, want, atol=1e-4)
    else:  # smc's final rewards: the PRM after the last step's tag, over the tagged steps
        for b, prompt in enumerate(PROMPTS):
            for j, particle in enumerate(out.extra["particles"][b]):
                view, reads = tagged_view(prompt, particle)
                torch.testing.assert_close(out.extra["rewards"][b, j], good_probability(prm, view)[reads[-1]],
                                           atol=1e-5, rtol=1e-5)
    # a whole response scored at once is one step: followed by one tag
    responses = [[4, 4, 2], [5], [6, 0, 3]]
    torch.testing.assert_close(tagged.score(PROMPTS, responses),
                               torch.stack([good_probability(prm, p + r + [TAG])[-1]
                                            for p, r in zip(PROMPTS, responses)]), atol=1e-5, rtol=1e-5)


def test_a_step_tag_needs_a_process_reward_model_and_a_token_id(prm):
    with pytest.raises(fastalign.InputError, match="step_tag is for a process reward model"):
        RewardModel(tiny_reward_model(vocab_size=V, seed=5), step_tag=TAG)
    with pytest.raises(fastalign.InputError, match="step_tag is for a process reward model"):
        RewardModel(lambda prompts, responses: torch.zeros(len(responses)), step_tag=TAG)
    with pytest.raises(fastalign.InputError, match=r"step_tag must be a token id .*0 \.\. 7"):
        RewardModel(prm, step_tag=V)


def test_a_context_too_short_names_the_role_the_model_was_given_as(target):
    """A reward standing in as the step reward is named as the reward the caller passed; a tagged PRM's tags are
    checked where they are written (one per step on top of the tokens)."""
    short = tiny_process_reward_model(vocab_size=V, hidden=16, seed=4, context=8)
    with pytest.raises(fastalign.InputError, match="context length of the reward model"):
        fastalign.decode([[2, 3, 4]], method="beam", target=target, reward=short, max_new_tokens=6, seed=0)
    with pytest.raises(fastalign.InputError, match="context length of the step_reward model"):
        fastalign.decode([[2, 3, 4]], method="beam", target=target, step_reward=short, max_new_tokens=6, seed=0)
    # 3 + 5 tokens fit; with a tag after every one-token step the PRM would need 3 + 10 positions
    with pytest.raises(fastalign.InputError, match="more than the context length"):
        fastalign.decode([[2, 3, 4]], method="beam", target=target, step_reward=RewardModel(short, step_tag=TAG),
                         max_new_tokens=5, max_step_tokens=1, beams=1, width=1, seed=0)
    fastalign.decode([[2, 3, 4]], method="beam", target=target, step_reward=RewardModel(short, step_tag=TAG),
                     max_new_tokens=2, max_step_tokens=1, beams=1, width=1, seed=0)  # 3 + 2 + 2 tags: fits
