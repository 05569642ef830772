"""``beam``: step-level beam search with a step reward, on tiny models and hand-made step rewards.

* With a step reward whose best path is known, beam search finds it for every seed where sampling rarely does.
* ``beams=width=1`` is ``sample`` token for token; ``beams=1, max_step_tokens=1`` with a wide expansion is greedy
  by step reward (the best-scoring token at every step).
* DVTS subtrees never share a beam after the root; plain beam search does share (the test has power).
* Only finished beams are returned; a finished beam's step scores are the step reward of its prefixes at the step
  boundaries, and its score their aggregate.
* A reward model over cached prefixes gives the same search as the same model scoring whole prefixes.
"""

import pytest
import torch

import fastalign
from fastalign.methods.beam import aggregate_step
from fastalign.models.reward import RewardModel
from fastalign.testing import tiny_causal_lm, tiny_reward_model

V, EOS, M = 4, 3, 3
PROMPTS = [[1, 2], [0], [2, 2, 1]]
WEIGHTS = [0.3, 1.0, -0.5, 0.4]


def twos(prompts, responses):
    """Step reward: the share of 2s in the partial response (the best path is all 2s)."""
    return torch.tensor([sum(t == 2 for t in y) / max(1, len(y)) for y in responses], dtype=torch.float32)


def last_token(prompts, responses):
    """Step reward: the weight of the last token (token 1 is the best, then the EOS)."""
    return torch.tensor([WEIGHTS[y[-1]] if y else 0.0 for y in responses], dtype=torch.float32)


@pytest.fixture(scope="module")
def flat():
    """Near-uniform next-token laws: every token is sampled often."""
    return tiny_causal_lm(vocab_size=V, hidden=16, layers=1, init_range=0.02, seed=0)


@pytest.fixture(scope="module")
def peaky():
    return tiny_causal_lm(vocab_size=8, hidden=16, layers=1, init_range=0.6, seed=0)


def decode(model, method="beam", reward=twos, prompts=PROMPTS, seed=0, max_new_tokens=M, **options):
    return fastalign.decode(prompts, method=method, target=model, reward=reward, max_new_tokens=max_new_tokens,
                            seed=seed, **options)


def is_finished(tokens, eos, max_new_tokens):
    return len(tokens) == max_new_tokens or (tokens and tokens[-1] in eos and len(tokens) <= max_new_tokens)


def test_beam_finds_the_known_best_path_where_sampling_does_not(flat):
    best = [2] * M
    found = sampled = 0
    for seed in range(4):
        out = decode(flat, seed=seed, beams=2, width=16, max_step_tokens=1, aggregate="min")
        found += sum(s == best for s in out.sequences)
        sampled += sum(s == best for s in decode(flat, "sample", seed=seed).sequences)
    assert found == 4 * len(PROMPTS)
    assert sampled <= 2  # p([2, 2, 2]) is about 1 / 64 under the model


def test_one_beam_of_width_one_is_sample(peaky):
    for options in (dict(max_step_tokens=1), dict(max_step_tokens=2, delimiters=[1, 4])):
        out = decode(peaky, beams=1, width=1, seed=5, max_new_tokens=6, **options)
        assert out.sequences == decode(peaky, "sample", seed=5, max_new_tokens=6).sequences
        assert out.stats["beam_candidates"] == sum(len(f[0]["step_scores"]) for f in out.extra["finished"])


def test_one_beam_one_token_steps_is_greedy_by_step_reward(flat):
    """``beams=1, width=W, max_step_tokens=1``, ``last``: each step keeps the best of W sampled next tokens;
    with W = 32 on near-uniform laws every token is among them, so the output is the best token every step."""
    out = decode(flat, reward=last_token, beams=1, width=32, max_step_tokens=1, aggregate="last")
    assert out.sequences == [[1] * M] * len(PROMPTS)
    plain = decode(flat, "sample").sequences
    assert plain != out.sequences


def test_dvts_subtrees_never_share_a_beam(peaky):
    out = decode(peaky, beams=6, width=2, dvts=True, max_step_tokens=1, max_new_tokens=5, seed=1)
    for finished in out.extra["finished"]:
        assert sorted(f["subtree"] for f in finished) == [0, 1, 2]  # one finished beam per subtree
        paths = [set(f["path"]) for f in finished]
        assert all(not (paths[i] & paths[j]) for i in range(3) for j in range(i))
    # plain beam search over the same budget keeps its best beams wherever they come from: they share ancestors
    plain = decode(peaky, beams=6, width=2, max_step_tokens=1, max_new_tokens=5, seed=1)
    assert all(any(set(f["path"]) & set(g["path"]) for f in fs for g in fs if f is not g)
               for fs in plain.extra["finished"])
    assert all(len(fs) == 6 for fs in plain.extra["finished"])


@pytest.mark.parametrize("aggregate", ["last", "min", "prod"])
def test_only_finished_beams_are_returned_and_scores_are_the_aggregated_step_rewards(peaky, aggregate):
    eos = {7}
    out = decode(peaky, reward=lambda p, y: torch.sigmoid(last_token(p, [[t % 4 for t in r] for r in y])),
                 beams=3, width=2, max_step_tokens=2, delimiters=[1], aggregate=aggregate, max_new_tokens=6, seed=2)
    for b, (seq, finished) in enumerate(zip(out.sequences, out.extra["finished"])):
        assert all(is_finished(f["tokens"], eos, 6) for f in finished)
        assert seq == finished[int(out.extra["chosen_index"][b])]["tokens"]
        for f in finished:
            agg = None
            for s in f["step_scores"]:
                agg = aggregate_step(aggregate, agg, s)
            assert f["score"] == pytest.approx(agg)
            assert f["step_scores"][-1] == pytest.approx(float(torch.sigmoid(last_token([], [[f["tokens"][-1] % 4]])[0])))
        scores = [f["score"] for f in finished]
        assert int(out.extra["chosen_index"][b]) == scores.index(max(scores))  # best: the first of the highest
    assert out.stats["beam_finished"] == 3 * len(PROMPTS)


def test_reward_model_on_cached_prefixes_matches_whole_prefix_scoring(peaky):
    rm = tiny_reward_model(vocab_size=8, hidden=16, layers=1, seed=3)
    whole = RewardModel(rm)
    options = dict(beams=2, width=3, max_step_tokens=2, aggregate="min", max_new_tokens=6, seed=4)
    cached = decode(peaky, reward=rm, **options)
    scored = decode(peaky, reward=lambda p, y: whole.score(p, y), **options)
    assert cached.sequences == scored.sequences
    torch.testing.assert_close(cached.extra["scores"], scored.extra["scores"], atol=1e-5, rtol=1e-5)


def test_majority_vote_over_finished_beams(peaky):
    out = decode(peaky, beams=4, width=2, max_step_tokens=2, max_new_tokens=6, select="majority",
                 answer_fn=lambda tokens: tokens[0], seed=3)
    for seq, finished in zip(out.sequences, out.extra["finished"]):
        firsts = [f["tokens"][0] for f in finished]
        assert seq[0] == max(firsts, key=firsts.count)


def test_aggregations():
    assert aggregate_step("last", None, 0.3) == 0.3
    assert aggregate_step("last", 0.9, 0.3) == 0.3
    assert aggregate_step("min", 0.2, 0.3) == 0.2
    assert aggregate_step("prod", 0.5, 0.4) == pytest.approx(0.2)
    assert aggregate_step("min", -1.0, -2.0) == -2.0 and aggregate_step("last", -1.0, -2.0) == -2.0


def test_a_product_of_negative_step_scores_is_an_input_error(peaky):
    """Under "prod", -1 * -2 = 2 ranked two wrong steps above a sound beam's 0 (the arith world's step reward
    is <= 0)."""
    for previous in (None, 0.5):
        with pytest.raises(fastalign.InputError, match="aggregate='prod' needs step scores >= 0, got -0.5"):
            aggregate_step("prod", previous, -0.5)
    negative = lambda prompts, responses: torch.full((len(responses),), -1.0)  # noqa: E731
    with pytest.raises(fastalign.InputError, match="needs step scores >= 0, got -1"):
        decode(peaky, reward=negative, prompts=[[1, 2]], beams=2, width=2, max_step_tokens=1, aggregate="prod",
               max_new_tokens=4)


def test_a_product_that_overflows_is_an_input_error(peaky):
    """Step rewards of 1e30 multiplied over 12 steps overflowed to inf: the inf beams tied, and ``select="sample"``
    (inf - inf = NaN in its weights) returned a beam scored 1e150 instead."""
    huge = lambda prompts, responses: torch.full((len(responses),), 1e30)  # noqa: E731
    with pytest.raises(fastalign.InputError, match=r"aggregate='prod' overflows float64 \(1e\+300 \* 1e\+30\)"):
        decode(peaky, reward=huge, prompts=[[1, 2]], beams=2, width=2, max_step_tokens=1, aggregate="prod",
               max_new_tokens=12, select="sample")
    out = decode(peaky, reward=huge, prompts=[[1, 2]], beams=2, width=2, max_step_tokens=1, aggregate="prod",
                 max_new_tokens=10, select="sample")  # 1e300 fits
    assert max(out.extra["scores"][0].tolist()) == pytest.approx(1e300)


@pytest.mark.parametrize("options, match", [
    (dict(beams=0), "beams"),
    (dict(width=1.5), "width"),
    (dict(max_step_tokens=0), "max_step_tokens"),
    (dict(aggregate="mean"), "aggregate"),
    (dict(dvts="yes"), "dvts"),
    (dict(dvts=True, beams=3, width=2), "multiple of width"),
    (dict(delimiters="\n"), "delimiters"),
    (dict(select="majority"), "answer_fn"),
    (dict(select="last"), "select"),
    (dict(lam=0), "lam"),
])
def test_bad_options(peaky, options, match):
    with pytest.raises(fastalign.InputError, match=match):
        decode(peaky, **options)
