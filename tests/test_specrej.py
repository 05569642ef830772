"""``speculative_rejection``: with ``alpha=0`` it is ``bon`` token for token; with ``alpha > 0`` it stops the lowest
partial rewards, generates fewer tokens and always returns a finished candidate; its options are checked."""

import math

import pytest
import torch

import fastalign
from fastalign.testing import tiny_causal_lm, tiny_reward_model

V, M, EOS = 8, 10, 7
W = [0.3, 0.1, 0.5, 0.2, 0.4, 0.0, 0.6, 0.0]


def weights_reward(prompts, responses):
    return torch.tensor([sum(W[t] for t in r) + 0.01 * len(r) for r in responses], dtype=torch.float32)


@pytest.fixture(scope="module")
def target():
    return tiny_causal_lm(vocab_size=V, hidden=16, layers=1, init_range=0.6, seed=0)


@pytest.fixture(scope="module")
def reward_model():
    return tiny_reward_model(vocab_size=V, hidden=16, layers=1, seed=3)


PROMPTS = [[1, 2, 3], [4], [2, 6, 1, 5, 3], [7, 7], [5, 5, 5]]


def decode(target, method, prompts=PROMPTS, reward=weights_reward, seed=0, **options):
    return fastalign.decode(prompts, method=method, target=target, reward=reward, max_new_tokens=M, seed=seed,
                            **options)


@pytest.mark.parametrize("layer", [{}, {"static_cache": True}], ids=["eager", "static"])
@pytest.mark.parametrize("batch", [1, 3, 5])
def test_alpha_zero_is_bon_token_for_token(target, batch, layer):
    for seed in (0, 1, 2**40 + 7):
        for n, round_tokens in ((3, 2), (4, 3), (1, 16)):
            bon = decode(target, "bon", PROMPTS[:batch], seed=seed, n=n, **layer)
            sr = decode(target, "speculative_rejection", PROMPTS[:batch], seed=seed, n=n, alpha=0.0,
                        round_tokens=round_tokens, **layer)
            assert sr.sequences == bon.sequences
            assert torch.equal(sr.extra["rewards"], bon.extra["rewards"])
            assert torch.equal(sr.extra["chosen_index"], bon.extra["chosen_index"])
            assert sr.stats["candidates_pruned"] == sr.stats["rejection_rounds"] == 0
            assert sr.stats["target_tokens"] == bon.stats["target_tokens"]


def test_alpha_zero_is_bon_with_a_reward_model_and_every_select(target, reward_model):
    for select, options in (("best", {}), ("sample", {"lam": 0.3}), ("majority", {"answer_fn": lambda t: t[0] % 2})):
        bon = decode(target, "bon", reward=reward_model, seed=4, n=4, select=select, **options)
        sr = decode(target, "speculative_rejection", reward=reward_model, seed=4, n=4, alpha=0.0, round_tokens=2,
                    select=select, **options)
        assert sr.sequences == bon.sequences
    assert decode(target, "speculative_rejection", seed=4, n=4, alpha=0.0, select="sample").sequences == \
        decode(target, "soft_bon", seed=4, n=4).sequences


def finished(tokens) -> bool:
    return tokens[-1] == EOS or len(tokens) == M


@pytest.mark.parametrize("reward", ["callable", "model"])
def test_pruning_stops_the_lowest_partial_rewards(target, reward_model, reward):
    """Every scored partial reward is the reward of the candidate's first ``tokens`` tokens (the reward model's
    cached prefixes agree with whole-text scoring); each round stops floor(alpha * U) of a prompt's U scored
    candidates, the lowest ones; stopped candidates are unfinished, never chosen."""
    rm = weights_reward if reward == "callable" else reward_model
    score = weights_reward if reward == "callable" else fastalign.models.reward.RewardModel(reward_model).score
    alpha, n = 0.5, 6
    for seed in (0, 1):
        out = decode(target, "speculative_rejection", reward=rm, seed=seed, n=n, alpha=alpha, round_tokens=2)
        cands, pruned = out.extra["candidates"], out.extra["pruned_round"]
        assert out.stats["candidates_pruned"] == int((pruned >= 0).sum()) > 0
        assert out.stats["rejection_rounds"] == len(out.extra["rounds"]) > 0
        assert out.stats["candidate_tokens"] == sum(len(c) for cs in cands for c in cs)
        for k, rnd in enumerate(out.extra["rounds"]):
            table, t = rnd["partial_rewards"], rnd["tokens"]
            for b, prompt in enumerate(PROMPTS):
                scored = [j for j in range(n) if not math.isnan(table[b, j])]
                if scored:
                    expect = score([prompt] * len(scored), [cands[b][j][:t] for j in scored])
                    assert torch.allclose(table[b, scored], expect, atol=1e-5)
                lowest = sorted(scored, key=lambda j: (float(table[b, j]), -j))[: math.floor(alpha * len(scored))]
                assert rnd["pruned"][b] == sorted(lowest)
                for j in rnd["pruned"][b]:
                    assert pruned[b, j] == k and len(cands[b][j]) == t and not finished(cands[b][j])
        for b in range(len(PROMPTS)):
            i = int(out.extra["chosen_index"][b])
            assert pruned[b, i] == -1 and finished(out.sequences[b]) and out.sequences[b] == cands[b][i]
            done = [j for j in range(n) if pruned[b, j] == -1]
            assert all(finished(cands[b][j]) for j in done)
            r = out.extra["rewards"][b]
            assert all(math.isnan(r[j]) for j in range(n) if j not in done)
            assert i == max(done, key=lambda j: (float(r[j]), -j))


def test_pruning_generates_fewer_tokens_than_bon(target):
    for seed in (0, 1, 2):
        bon = decode(target, "bon", seed=seed, n=8)
        sr = decode(target, "speculative_rejection", seed=seed, n=8, alpha=0.5, round_tokens=2)
        assert sr.stats["target_tokens"] < bon.stats["target_tokens"]
        every = decode(target, "speculative_rejection", seed=seed, n=8, alpha=0.0)  # bon's candidates
        assert sr.stats["candidate_tokens"] < every.stats["candidate_tokens"]
        assert all(finished(s) for s in sr.sequences)


def test_a_hand_made_reward_decides_which_candidates_survive(target):
    """A reward that only likes token 2: at every round the candidates with the fewest 2s go."""
    def twos(prompts, responses):
        return torch.tensor([float(r.count(2)) for r in responses])

    out = decode(target, "speculative_rejection", reward=twos, seed=3, n=8, alpha=0.75, round_tokens=3)
    assert out.stats["candidates_pruned"] > 0
    for rnd in out.extra["rounds"]:
        table = rnd["partial_rewards"]
        for b in range(len(PROMPTS)):
            stopped = rnd["pruned"][b]
            kept = [j for j in range(8) if not math.isnan(table[b, j]) and j not in stopped]
            if stopped:
                assert max(table[b, stopped]) <= min(table[b, kept])


def test_a_memory_budget_triggers_a_round_when_a_prompts_candidates_fill_it(target):
    """``max_live_tokens``: a prompt's round comes when one more token per unfinished candidate would pass the
    budget (or every ``round_tokens``). With n=4, alpha=0.5 and a budget of 8, rounds come at 2 tokens (4 x 2),
    then at 4 (2 x 4); one candidate is left, which runs to the end. (The budget is a trigger, not a bound: a
    round stops floor(alpha * U), which can leave more than fit.)"""
    no_eos = tiny_causal_lm(vocab_size=V, hidden=16, layers=1, init_range=0.6, seed=0)
    no_eos.generation_config.eos_token_id = None
    no_eos.config.eos_token_id = None
    out = decode(no_eos, "speculative_rejection", PROMPTS[:2], seed=1, n=4, alpha=0.5, round_tokens=100,
                 max_live_tokens=8)
    assert [rnd["tokens"] for rnd in out.extra["rounds"]] == [2, 4]
    assert [list(map(len, rnd["pruned"])) for rnd in out.extra["rounds"]] == [[2, 2], [1, 1]]
    assert all(len(s) == M for s in out.sequences)
    # with the budget never reached it is the round_tokens schedule, token for token
    plain = decode(target, "speculative_rejection", seed=2, n=6, alpha=0.5, round_tokens=3)
    roomy = decode(target, "speculative_rejection", seed=2, n=6, alpha=0.5, round_tokens=3, max_live_tokens=6 * M)
    assert roomy.sequences == plain.sequences and roomy.stats == {**plain.stats, "wall_time_s": roomy.stats["wall_time_s"]}
    # every scored prompt's candidates hold at most the budget at their round, and a round comes only when full
    for budget in (5, 9, 13):
        out = decode(target, "speculative_rejection", seed=3, n=4, alpha=0.5, round_tokens=100, max_live_tokens=budget)
        assert out.stats["rejection_rounds"] > 0 and all(
            finished(s) for s in out.sequences)
        for rnd in out.extra["rounds"]:
            scored = (~torch.isnan(rnd["partial_rewards"])).sum(1)  # unfinished candidates per prompt at the round
            assert bool((scored * rnd["tokens"] <= budget).all())
            assert bool(((scored == 0) | (scored * (rnd["tokens"] + 1) > budget)).all())  # a round only when full


@pytest.mark.parametrize("reward", ["callable", "tagged_prm"])
def test_a_prompts_rounds_and_extras_do_not_depend_on_its_batch(target, reward):
    """With a memory budget the prompts' rounds come at different times (their candidates finish at different
    times); each prompt's tokens, partial rewards at its own rounds, pruned_round and final rewards are those it
    gets alone. With a PRM that marks every scored piece with a tag, its cached pieces are the prompt's own
    rounds, so even its partial rewards are batch-free."""
    from fastalign.models.reward import RewardModel
    from fastalign.testing import tiny_process_reward_model

    scorer = weights_reward if reward == "callable" else RewardModel(
        tiny_process_reward_model(vocab_size=V, hidden=16, seed=3), step_tag=1)
    seeds = [11, 12, 13, 14, 15]
    options = dict(n=4, alpha=0.5, round_tokens=100, max_live_tokens=11)
    batch = decode(target, "speculative_rejection", reward=scorer, seed=seeds, **options)

    def own_rounds(out, b):  # (tokens, partial rewards) of prompt b's scored rounds
        return [(rnd["tokens"], rnd["partial_rewards"][b].tolist()) for rnd in out.extra["rounds"]
                if not torch.isnan(rnd["partial_rewards"][b]).all()]

    schedules = set()
    for b, prompt in enumerate(PROMPTS):
        alone = decode(target, "speculative_rejection", [prompt], reward=scorer, seed=[seeds[b]], **options)
        assert alone.sequences[0] == batch.sequences[b]
        assert torch.equal(alone.extra["pruned_round"][0], batch.extra["pruned_round"][b])
        torch.testing.assert_close(alone.extra["rewards"][0], batch.extra["rewards"][b], equal_nan=True)
        mine, theirs = own_rounds(alone, 0), own_rounds(batch, b)
        assert [t for t, _ in mine] == [t for t, _ in theirs]
        torch.testing.assert_close(torch.tensor([r for _, r in mine]), torch.tensor([r for _, r in theirs]),
                                   equal_nan=True, atol=1e-6, rtol=1e-6)
        schedules.add(tuple(t for t, _ in mine))
    assert len(schedules) > 1  # the prompts' rounds differ: a batch-wide schedule would fail


@pytest.mark.parametrize("options, message", [
    (dict(n=0), "n must be an integer >= 1"),
    (dict(alpha=1.0), r"alpha must be a number in \[0, 1\)"),
    (dict(alpha=-0.1), r"alpha must be a number in \[0, 1\)"),
    (dict(round_tokens=0), "round_tokens must be an integer >= 1"),
    (dict(select="last"), "select must be one of"),
    (dict(rounds=3), "rounds"),
    (dict(n=4, max_live_tokens=3), "max_live_tokens must be None or an integer >= n"),
    (dict(max_live_tokens=2.5), "max_live_tokens"),
])
def test_bad_options(target, options, message):
    with pytest.raises(fastalign.InputError, match=message):
        decode(target, "speculative_rejection", **options)


def test_requires_a_reward(target):
    with pytest.raises(fastalign.InputError, match="reward"):
        fastalign.decode(PROMPTS, method="speculative_rejection", target=target, max_new_tokens=M)
