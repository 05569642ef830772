"""``select`` for multi-candidate methods (``fastalign.methods.selection``): each rule on hand-made candidates, the
``"sample"`` draw's law, ``bon`` / ``soft_bon`` with every rule, and the options' validation."""

import pytest
import torch

import fastalign
from fastalign.methods.base import Context, Randomness
from fastalign.methods.selection import check_select, reward_weights, select, vote
from fastalign.testing import tiny_causal_lm, total_variation, tv_threshold

V, M = 8, 5


def ctx_for(n_prompts: int, seed=0, tokenizer=None) -> Context:
    return Context(target=None, draft=None, ref=None, reward=None, tokenizer=tokenizer, max_new_tokens=M,
                   temperature=1.0, top_k=None, top_p=None, rng=Randomness(seed, n_prompts))


# candidates of one prompt: their answer is the first token
CANDS = [[[1, 9], [2, 9], [2, 8], [1, 7], [3, 7]]]
REWARDS = torch.tensor([[0.0, 0.5, 0.2, 0.9, 3.0]])
first = lambda tokens: tokens[0]  # noqa: E731


def pick(rule, rewards=REWARDS, cands=CANDS, answer=first, lam=1.0, available=None):
    return int(select(ctx_for(len(cands)), rule, cands, rewards, lam, answer, available)[0])


def test_best_takes_the_first_of_equal_rewards():
    assert pick("best") == 4
    assert pick("best", torch.tensor([[1.0, 2.0, 2.0, 0.0, 2.0]])) == 1
    assert pick("best", available=torch.tensor([[True, True, True, True, False]])) == 3  # unavailable never wins


def test_majority_ties_go_to_the_answer_reached_first():
    # answers 1, 2, 2, 1, 3: a tie of 1 and 2 (two votes each), 1 came first; its best candidate is index 3
    assert pick("majority") == 3
    # with candidate 3 unavailable, answer 2 wins outright; its best candidate (0.5 > 0.2) is index 1
    assert pick("majority", available=torch.tensor([[True, True, True, False, True]])) == 1
    # among equal rewards of the winning answer, the first candidate
    assert pick("majority", torch.zeros(1, 5)) == 0
    # candidates without an answer do not vote, unless none has one
    assert pick("majority", answer=lambda t: None if t[0] == 1 else t[0]) == 1
    assert pick("majority", answer=lambda t: None) == 4  # everyone's answer is None: the best reward


def test_weighted_majority_weights_by_softmax_of_reward_over_lam():
    # lam = 1: answer 3 has weight e^3 against e^0 + e^0.9 (answer 1) and e^0.5 + e^0.2 (answer 2)
    assert pick("weighted_majority") == 4
    # lam = 100: the weights are nearly equal, so the vote is the majority vote (answer 1 first among ties)
    assert pick("weighted_majority", lam=100.0) == 3
    w = reward_weights(REWARDS, 1.0)
    assert torch.allclose(w, torch.softmax(REWARDS.double(), 1))
    masked = reward_weights(REWARDS, 1.0, torch.tensor([[True, False, True, True, False]]))
    assert masked[0, 1] == masked[0, 4] == 0 and torch.isclose(masked.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_vote():
    assert vote(["a", "b", "b", "a"], [1, 1, 1, 1]) == ("a", [0, 1, 2, 3])
    assert vote(["a", "b", None], [0.1, 0.2, 5.0]) == ("b", [0, 1])
    assert vote([None, None], [1, 1]) == (None, [0, 1])


def test_sample_draws_by_softmax_over_the_available_candidates():
    """``"sample"`` over 4000 prompts (each its own stream) against softmax(r / lam) restricted to the available
    candidates; a wrong rule (uniform, or the softmax over all candidates) is far outside the noise."""
    B, lam = 4000, 0.5
    rewards = torch.tensor([[0.0, 0.5, 0.2, 0.9]]).repeat(B, 1)
    available = torch.tensor([[True, True, False, True]]).repeat(B, 1)
    picks = select(ctx_for(B, seed=3), "sample", [[[0]] * 4] * B, rewards, lam, None, available)
    law = torch.softmax(torch.tensor([0.0, 0.5, -torch.inf, 0.9]) / lam, 0)
    empirical = torch.bincount(picks, minlength=4).double() / B
    as_dict = lambda p: {i: float(p[i]) for i in range(4)}  # noqa: E731
    threshold = tv_threshold(law, B)
    assert total_variation(as_dict(empirical), as_dict(law)) < threshold
    for wrong in (torch.tensor([1 / 3, 1 / 3, 0, 1 / 3]), torch.softmax(rewards[0] / lam, 0)):
        assert total_variation(as_dict(empirical), as_dict(wrong)) > 3 * threshold


# ------------------------------------------------------------------------------ bon and soft_bon
def weights_reward(prompts, responses):
    w = [0.3, 0.1, 0.5, 0.2, 0.4, 0.0, 0.6, 0.0]
    return torch.tensor([sum(w[t] for t in r) + 0.01 * len(r) for r in responses], dtype=torch.float32)


@pytest.fixture(scope="module")
def target():
    return tiny_causal_lm(vocab_size=V, hidden=16, layers=1, init_range=0.6, seed=0)


PROMPTS = [[1, 2, 3], [4], [2, 6, 1, 5, 3]]


def decode(target, method, **options):
    return fastalign.decode(PROMPTS, method=method, target=target, reward=weights_reward, max_new_tokens=M, seed=5,
                            **options)


def test_bon_majority_votes_over_its_candidates(target):
    """bon with ``select="majority"``: the answer (the response's first token mod 3) most candidates share, returned
    as its highest-reward candidate. The candidates are the ones the answer_fn sees, in order."""
    seen = []

    def answer(tokens):
        seen.append(list(tokens))
        return tokens[0] % 3

    n = 6
    out = decode(target, "bon", n=n, select="majority", answer_fn=answer)
    best = decode(target, "bon", n=n)
    assert torch.equal(out.extra["rewards"], best.extra["rewards"])  # the same candidates
    for b in range(len(PROMPTS)):
        cands = seen[b * n:(b + 1) * n]
        answers = [c[0] % 3 for c in cands]
        counts = {a: answers.count(a) for a in answers}
        top = max(counts.values())
        winner = next(a for a in answers if counts[a] == top)
        r = out.extra["rewards"][b]
        expect = max((i for i in range(n) if answers[i] == winner), key=lambda i: (float(r[i]), -i))
        assert int(out.extra["chosen_index"][b]) == expect and out.sequences[b] == cands[expect]
        assert best.sequences[b] == cands[int(r.argmax())]


def test_bon_and_soft_bon_differ_only_in_their_default_rule(target):
    assert decode(target, "bon", n=4, select="sample", lam=0.5).sequences == \
        decode(target, "soft_bon", n=4, lam=0.5).sequences
    assert decode(target, "soft_bon", n=4, select="best").sequences == decode(target, "bon", n=4).sequences


@pytest.mark.parametrize("method", ["bon", "soft_bon", "speculative_rejection"])
@pytest.mark.parametrize("options, message", [
    (dict(select="vote"), r"select must be one of \('best', 'sample', 'majority', 'weighted_majority'\)"),
    (dict(select="majority"), "select='majority' votes over answers: pass answer_fn"),
    (dict(select="weighted_majority", answer_fn="last_number"), "answer_fn='last_number' reads text"),
    (dict(answer_fn="roman"), "answer_fn must be a callable or one of"),
    (dict(lam=0.0), "lam must be a number > 0"),
])
def test_bad_select_options(target, method, options, message):
    with pytest.raises(fastalign.InputError, match=message):
        decode(target, method, n=2, **options)


def test_check_select_with_a_tokenizer():
    class Tok:
        def decode(self, tokens, skip_special_tokens=True):
            return " ".join(f"x{t}" for t in tokens)

    answer = check_select(ctx_for(1, tokenizer=Tok()), "majority", "last_number")
    assert answer([3, 4, 12]) == "12"
