"""``cards``, ``rs`` and ``args``: exact laws on a tiny model, segmentation, caching, forced acceptance, errors."""

import functools
import math

import pytest
import torch

import fastalign
from fastalign.methods.cards import threshold_schedule
from fastalign.models.reward import RewardModel
from fastalign.testing import (
    empirical_law,
    enumerate_law,
    next_token_probs,
    tiny_causal_lm,
    tiny_reward_model,
    total_variation,
    tv_threshold,
)

V, EOS, T, TOP_K = 6, 5, 0.8, 3


@pytest.fixture(scope="module")
def model():
    return tiny_causal_lm(vocab_size=V, hidden=16, init_range=0.25)


WEIGHTS = [0.3, 0.1, 0.5, 0.2, 0.4, 0.0]  # reward per token, so that the threshold schedule matters


def weights_reward(prompts, responses):
    """Sum of per-token weights, plus an injective tie-break below 0.01 (the response as a base-7 fraction)."""
    return torch.tensor([sum(WEIGHTS[t] for t in r) + 0.01 * sum((t + 1) * 7.0 ** -(i + 1) for i, t in enumerate(r))
                         for r in responses], dtype=torch.float32)


def reward_of(response) -> float:
    return float(weights_reward(None, [list(response)])[0])


# ------------------------------------------------------------------ exact laws
def accepted_law(proposals: dict, rewards: dict, thresholds: dict, mode: str, beta: float, max_rejections: int):
    """Law of the candidate accepted by the sequential rule with forced acceptance, for i.i.d. proposals.

    Attempts 1..m (m = max_rejections) accept candidate s with probability a(s); if all m are rejected, attempt
    m+1 is forced: the best of the m rejected draws (law rho) and one fresh draw (law p). Rewards are injective.
    """
    a = {s: float(rewards[s] >= thresholds[s]) if mode == "hard"
         else min(1.0, math.exp((rewards[s] - thresholds[s]) / beta)) for s in proposals}
    q = sum(p * a[s] for s, p in proposals.items())
    m, streak = max_rejections, sum((1 - q) ** i for i in range(max_rejections))
    rho = {s: p * (1 - a[s]) / (1 - q) for s, p in proposals.items()} if q < 1 else None

    def cdf(law, r, strict):
        return sum(p for s, p in law.items() if (rewards[s] < r if strict else rewards[s] <= r))

    law = {}
    for s, p in proposals.items():
        law[s] = p * a[s] * streak
        if q < 1:
            r = rewards[s]
            best = cdf(rho, r, False) ** m * cdf(proposals, r, False) - cdf(rho, r, True) ** m * cdf(proposals, r, True)
            law[s] += (1 - q) ** m * best
    return law


@functools.lru_cache(maxsize=None)
def logits_after(model, tokens: tuple) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([list(tokens)])).logits[0, -1].float()


def cards_law(model, prompt, max_new, threshold, min_seg, max_seg, r_star, alpha, mode, beta, max_rejections):
    """Exact law of cards' responses: segment proposals enumerated, then ``accepted_law`` per segment."""
    r_prompt = reward_of([])

    def proposals(response):
        law = {}

        def walk(seg, prob):
            tokens = tuple(prompt) + response + seg
            if len(seg) >= min_seg:
                entropy, _ = fastalign.kernels.entropy(logits_after(model, tokens)[None])
                if float(entropy) >= threshold:
                    law[seg] = law.get(seg, 0.0) + prob
                    return
            probs = next_token_probs(model, list(tokens), T, TOP_K)
            for tok in torch.nonzero(probs > 0).flatten().tolist():
                s, p = seg + (tok,), prob * float(probs[tok])
                if tok == EOS or len(s) == max_seg or len(response) + len(s) == max_new:
                    law[s] = law.get(s, 0.0) + p
                else:
                    walk(s, p)

        walk((), 1.0)
        return law

    out = {}

    def grow(response, prob):
        props = proposals(response)
        rewards = {s: reward_of(response + s) for s in props}
        thresholds = {s: float(threshold_schedule(r_prompt, r_star, alpha, torch.tensor(len(response + s)), max_new))
                      for s in props}
        for s, p in accepted_law(props, rewards, thresholds, mode, beta, max_rejections).items():
            y = response + s
            if y[-1] == EOS or len(y) == max_new:
                out[y] = out.get(y, 0.0) + prob * p
            else:
                grow(y, prob * p)

    grow((), 1.0)
    return out


CARDS = dict(entropy_threshold=1.4, min_segment_tokens=1, max_segment_tokens=2, reward_threshold=1.0, alpha=0.5,
             accept_beta=0.7, max_rejections=2)


def cards_exact(model, prompt, mode, **changes):
    o = {**CARDS, **changes}
    return cards_law(model, prompt, 3, o["entropy_threshold"], o["min_segment_tokens"], o["max_segment_tokens"],
                     o["reward_threshold"], o["alpha"], mode, o["accept_beta"], o["max_rejections"])


def plain_law(model, prompt, max_new=3):
    return enumerate_law(lambda t: next_token_probs(model, t, T, TOP_K), prompt, max_new, {EOS})


@pytest.mark.usefixtures("both_layers")
def test_cards_hard_follows_exact_law_in_a_mixed_batch(model):
    prompts, draws = [[1, 2], [3, 1, 4]], 3000
    out = fastalign.decode(prompts * draws, method="cards", target=model, reward=weights_reward, max_new_tokens=3,
                           temperature=T, top_k=TOP_K, seed=0, mode="hard", **CARDS)
    for i, prompt in enumerate(prompts):
        exact = cards_exact(model, prompt, "hard")
        assert abs(sum(exact.values()) - 1) < 1e-9
        assert total_variation(empirical_law(out.sequences[i::2]), exact) < tv_threshold(exact, draws)
        assert total_variation(exact, plain_law(model, prompt)) > 0.3  # the check can tell the laws apart
    # ... and the laws of slightly wrong algorithms: no entropy cuts, another schedule, forcing one step late
    exact = cards_exact(model, prompts[0], "hard")
    for wrong in (dict(entropy_threshold=100.0), dict(alpha=0.0), dict(max_rejections=3)):
        assert total_variation(exact, cards_exact(model, prompts[0], "hard", **wrong)) > 0.1
    assert out.stats["forced_acceptances"] > 0 and out.stats["rejections"] > 0


@pytest.mark.usefixtures("both_layers")
def test_cards_soft_with_parallel_candidates_follows_the_same_law(model):
    prompt, draws = [1, 2], 3000
    out = fastalign.decode([prompt] * draws, method="cards", target=model, reward=weights_reward, max_new_tokens=3,
                           temperature=T, top_k=TOP_K, seed=1, mode="soft", parallel_candidates=3, **CARDS)
    exact = cards_exact(model, prompt, "soft")
    assert total_variation(empirical_law(out.sequences), exact) < tv_threshold(exact, draws)
    assert total_variation(exact, cards_exact(model, prompt, "hard")) > 0.3
    st = out.stats
    assert st["segments_proposed"] % 3 == 0 and st["segments_proposed"] > st["segments_accepted"] + st["rejections"]


@pytest.mark.usefixtures("both_layers")
def test_rs_follows_exact_law_with_forced_acceptance(model):
    prompt, draws, r_star = [3, 1, 4], 3000, 1.0
    out = fastalign.decode([prompt] * draws, method="rs", target=model, reward=weights_reward, max_new_tokens=3,
                           temperature=T, top_k=TOP_K, seed=2, mode="hard", reward_threshold=r_star,
                           max_rejections=2)
    p = plain_law(model, prompt)
    rewards = {y: reward_of(y) for y in p}
    exact = accepted_law(p, rewards, {y: r_star for y in p}, "hard", 0.7, 2)
    assert total_variation(empirical_law(out.sequences), exact) < tv_threshold(exact, draws)
    assert total_variation(exact, p) > 0.2
    assert total_variation(exact, accepted_law(p, rewards, {y: r_star for y in p}, "hard", 0.7, 1)) > 0.1
    st = out.stats
    assert st["responses_proposed"] == draws + st["rejections"] and 0 < st["forced_acceptances"] < draws


@pytest.mark.usefixtures("both_layers")
def test_args_sampled_follows_exact_law(model):
    prompt, draws, w, k = [1, 2], 3000, 2.0, 3

    def step_probs(tokens):  # softmax(log p_T(v) + w r) over the top-k of the logits
        logits = logits_after(model, tuple(tokens))
        top = torch.topk(logits, k).indices
        response = tokens[len(prompt):]
        score = torch.log_softmax(logits.double() / T, -1)[top] + w * torch.tensor(
            [reward_of(response + [int(v)]) for v in top], dtype=torch.float64)
        probs = torch.zeros(V, dtype=torch.float64)
        probs[top] = torch.softmax(score, -1)
        return probs

    exact = enumerate_law(step_probs, prompt, 3, {EOS})
    out = fastalign.decode([prompt] * draws, method="args", target=model, reward=weights_reward, max_new_tokens=3,
                           temperature=T, seed=3, mode="sampled", k=k, w=w)
    assert total_variation(empirical_law(out.sequences), exact) < tv_threshold(exact, draws)
    assert total_variation(exact, plain_law(model, prompt)) > 0.2
    assert out.stats["reward_calls"] == 1 + 3  # the prompts, then one call per token for every row at once


# ------------------------------------------------------------------ schedule, segmentation, forced acceptance
def test_threshold_schedule_by_hand():
    # r0 = 0.5 * 2 + 0.5 * 8 = 5; tau(L) = min(8, 5 + L * 3 / 12)
    taus = threshold_schedule(torch.tensor(2.0), torch.tensor(8.0), 0.5, torch.tensor([0, 4, 6, 12, 20]), 12)
    torch.testing.assert_close(taus, torch.tensor([5.0, 6.0, 6.5, 8.0, 8.0]))
    # alpha = 1 starts at r_star; alpha = 0 at R(x); per-prompt tensors broadcast
    torch.testing.assert_close(threshold_schedule(torch.tensor([1.0, -3.0]), torch.tensor([4.0, 1.0]), 0.0,
                                                  torch.tensor([[0], [5]]), 10),
                               torch.tensor([[1.0, -3.0], [2.5, -1.0]]))
    assert float(threshold_schedule(-1.0, 3.0, 1.0, torch.tensor(0), 10)) == 3.0
    # rewards near the fp32 limit: L (r_star - r0) would overflow fp32 to inf, which the min turns into r_star
    huge = threshold_schedule(torch.tensor(-2e38), torch.tensor(2e38), 0.5, torch.tensor([2, 4, 8]), 8)
    torch.testing.assert_close(huge, torch.tensor([0.5e38, 1e38, 2e38]), rtol=1e-6, atol=0)


def full_entropy(model, tokens) -> float:
    return float(fastalign.kernels.entropy(logits_after(model, tuple(tokens))[None])[0])


@pytest.mark.parametrize("threshold,min_seg,max_seg", [(1.45, 2, 4), (0.0, 3, 5), (1e9, 2, 3)])
def test_segment_boundaries_and_boundary_logits_reused(model, threshold, min_seg, max_seg):
    prompts, max_new = [[1, 2], [3, 1, 4], [2]], 10
    out = fastalign.decode(prompts, method="cards", target=model, reward=weights_reward, max_new_tokens=max_new,
                           seed=4, mode="hard", reward_threshold=-100.0, entropy_threshold=threshold,
                           min_segment_tokens=min_seg, max_segment_tokens=max_seg)
    for prompt, response, lengths in zip(prompts, out.sequences, out.extra["segment_lengths"]):
        assert sum(lengths) == len(response) and 1 <= len(response) <= max_new
        assert EOS not in response[:-1] and (response[-1] == EOS or len(response) == max_new)
        start = 0
        for j, n in enumerate(lengths):
            last = j == len(lengths) - 1
            assert n <= max_seg and (n >= min_seg or last)
            for i in range(start + min_seg, start + n):  # no cut was due inside the segment
                assert full_entropy(model, prompt + response[:i]) < threshold
            if not last and n < max_seg:  # ended by an entropy cut
                assert full_entropy(model, prompt + response[:start + n]) >= threshold
            start += n
    if threshold == 0.0:
        assert all(n == min_seg for ls in out.extra["segment_lengths"] for n in ls[:-1])
    if threshold == 1e9:
        assert all(n == max_seg for ls in out.extra["segment_lengths"] for n in ls[:-1])
    st = out.stats
    assert st["segments_accepted"] == st["segments_proposed"] == sum(map(len, out.extra["segment_lengths"]))
    # every token is fed to the target once, when the next step needs its logits; a boundary's logits are reused
    assert st["target_tokens"] == sum(map(len, prompts)) + sum(len(r) - 1 for r in out.sequences)


def test_forced_acceptance_with_a_reward_that_never_passes(model):
    out = fastalign.decode([[1, 2], [3, 1, 4]], method="cards", target=model, reward=weights_reward, max_new_tokens=8,
                           seed=5, mode="hard", reward_threshold=1e6, max_rejections=3, min_segment_tokens=2,
                           entropy_threshold=1.45, parallel_candidates=2)
    st = out.stats
    accepted = st["segments_accepted"]
    assert st["forced_acceptances"] == accepted == sum(map(len, out.extra["segment_lengths"]))
    assert st["rejections"] == 3 * accepted
    assert st["segments_proposed"] == 2 * accepted * 2  # two rounds of two candidates per segment
    for r in out.sequences:
        assert 1 <= len(r) <= 8 and (r[-1] == EOS or len(r) == 8)


# ------------------------------------------------------------------ caching
def test_cards_with_cached_reward_equals_full_rescoring(model):
    """The cached reward model (segments scored on top of its cache) decides exactly as full rescoring does."""
    rm = tiny_reward_model(vocab_size=V)
    full = RewardModel(rm)

    def rescore(prompts, responses):
        return full.score(prompts, responses)

    options = dict(method="cards", target=model, max_new_tokens=8, seed=11, entropy_threshold=1.45,
                   min_segment_tokens=2, max_segment_tokens=4, max_rejections=2, parallel_candidates=2)
    cached = fastalign.decode([[1, 2], [3, 1, 4]], reward=rm, **options)
    plain = fastalign.decode([[1, 2], [3, 1, 4]], reward=rescore, **options)
    assert cached.sequences == plain.sequences
    assert cached.stats["rejections"] == plain.stats["rejections"] > 0
    torch.testing.assert_close(cached.extra["reward_threshold"], plain.extra["reward_threshold"])
    # the cached reward model processes each proposed segment once (plus the prompts and auto-calibration)
    assert cached.stats["reward_tokens"] < plain.stats["reward_tokens"]


def test_args_greedy_matches_a_full_recompute_reference(model):
    rm = tiny_reward_model(vocab_size=V)
    full = RewardModel(rm)
    prompts, k, w, max_new = [[1, 2], [3, 1, 4, 4]], 4, 1.5, 6
    out = fastalign.decode(prompts, method="args", target=model, reward=rm, max_new_tokens=max_new, k=k, w=w)
    for prompt, response in zip(prompts, out.sequences):
        ref = []
        while len(ref) < max_new and (not ref or ref[-1] != EOS):
            logits = logits_after(model, tuple(prompt + ref))
            logp, top = torch.topk(torch.log_softmax(logits, -1), k)
            rewards = full.score([prompt] * k, [ref + [int(v)] for v in top])
            ref.append(int(top[torch.argmax(logp + w * rewards)]))
        assert response == ref
    assert out.stats["reward_calls"] == 1 + max(map(len, out.sequences))


# ------------------------------------------------------------------ reward, auto threshold, errors
def test_cards_raises_the_mean_reward_over_sampling():
    model = tiny_causal_lm(vocab_size=8, hidden=16, init_range=0.1, seed=3)

    def count_twos(prompts, responses):
        return torch.tensor([float(sum(t == 2 for t in r)) for r in responses])

    prompts = [[1, 3]] * 32
    options = dict(target=model, reward=count_twos, max_new_tokens=8, seed=7)
    plain = fastalign.decode(prompts, method="sample", temperature=0.7, top_k=40, **options)
    aligned = fastalign.decode(prompts, method="cards", reward_threshold=3.0, entropy_threshold=2.0,
                               max_rejections=4, **options)
    mean = lambda seqs: count_twos(None, seqs).mean().item()  # noqa: E731
    assert mean(aligned.sequences) > mean(plain.sequences) + 0.5


def test_auto_threshold_is_mean_plus_std_of_plain_samples(model):
    prompts = [[1, 2], [3, 1, 4]]
    out = fastalign.decode(prompts, method="rs", target=model, reward=weights_reward, max_new_tokens=4, top_k=1,
                           temperature=1.0, seed=8)
    greedy = fastalign.decode(prompts, method="sample", target=model, max_new_tokens=4, top_k=1, temperature=1.0)
    # top-1 samples are all equal: std 0, r_star = their reward
    torch.testing.assert_close(out.extra["reward_threshold"], weights_reward(prompts, greedy.sequences))
    assert out.sequences == greedy.sequences


@pytest.mark.parametrize("method", ["cards", "rs"])
def test_auto_settings_do_not_depend_on_the_reward_scale(model, method):
    """With reward_threshold="auto" and accept_beta="auto" an affine change of the reward (here onto about
    [0, 1]) changes r_star and accept_beta with it and nothing else: the same responses are accepted."""
    prompts = [[1, 2], [3, 1, 4], [2]] * 4
    options = dict(target=model, max_new_tokens=4, seed=5, temperature=T, top_k=TOP_K)
    if method == "cards":
        options.update(entropy_threshold=1.4, min_segment_tokens=1, max_segment_tokens=2)
    base = fastalign.decode(prompts, method=method, reward=weights_reward, **options)
    scaled = fastalign.decode(prompts, method=method, reward=lambda p, r: 0.25 * weights_reward(p, r) + 0.5,
                              **options)
    assert scaled.sequences == base.sequences
    torch.testing.assert_close(scaled.extra["reward_threshold"], 0.25 * base.extra["reward_threshold"] + 0.5)
    torch.testing.assert_close(scaled.extra["accept_beta"], 0.25 * base.extra["accept_beta"])
    fixed = fastalign.decode(prompts, method=method, reward=weights_reward, reward_threshold=1.0, **options)
    assert fixed.extra["accept_beta"].tolist() == pytest.approx([0.7] * len(prompts))  # the CARDS code's value


@pytest.mark.parametrize("method", ["cards", "rs"])
def test_auto_accept_beta_is_a_third_of_the_calibration_std(model, method, monkeypatch):
    """accept_beta="auto" is std / 3 of the calibration rewards that give r_star = mean + std; a number is
    used as given; a zero std gives the hard test."""
    import fastalign.methods.rs as rs

    calibrate = rs.calibrate_reward_threshold
    seen = {}

    def spy(*args, **kwargs):
        seen["out"] = calibrate(*args, **kwargs)
        return seen["out"]

    monkeypatch.setattr(rs, "calibrate_reward_threshold", spy)
    prompts = [[1, 2], [3, 1, 4]]
    options = dict(target=model, reward=weights_reward, max_new_tokens=3, temperature=T, top_k=TOP_K, seed=11)
    out = fastalign.decode(prompts, method=method, **options)
    r_star, std = seen["out"]
    assert (std > 0).all()
    torch.testing.assert_close(out.extra["reward_threshold"], r_star)
    torch.testing.assert_close(out.extra["accept_beta"], std / 3)
    explicit = fastalign.decode(prompts, method=method, accept_beta=0.3, **options)
    assert explicit.extra["accept_beta"].tolist() == pytest.approx([0.3, 0.3])
    # top-1 sampling: the calibration samples are identical, std 0, and soft acceptance is r >= r_star
    greedy = fastalign.decode(prompts, method=method, **{**options, "top_k": 1})
    assert (greedy.extra["accept_beta"] < 1e-30).all()


def test_cards_defaults_raise_a_reward_in_the_unit_interval():
    """Out of the box (reward_threshold and accept_beta "auto") cards and rs raise a reward in [0, 1]; with a
    fixed accept_beta=0.7 on that scale the soft test accepts almost everything."""
    model = tiny_causal_lm(vocab_size=8, hidden=16, init_range=0.1, seed=3)

    def share_of_twos(prompts, responses):
        return torch.tensor([sum(t == 2 for t in r) / max(len(r), 1) for r in responses], dtype=torch.float32)

    prompts = [[1, 3]] * 32
    options = dict(target=model, reward=share_of_twos, max_new_tokens=8, seed=7)
    mean = lambda out: share_of_twos(None, out.sequences).mean().item()  # noqa: E731
    plain = mean(fastalign.decode(prompts, method="sample", temperature=0.7, top_k=40, **options))
    for method in ("cards", "rs"):
        extra = dict(entropy_threshold=2.0) if method == "cards" else {}
        assert mean(fastalign.decode(prompts, method=method, **extra, **options)) > plain + 0.1, method


@pytest.mark.parametrize("method,options,message", [
    ("cards", dict(alpha=1.5), "alpha"),
    ("cards", dict(alpha=-0.1), "alpha"),
    ("cards", dict(mode="medium"), "mode"),
    ("cards", dict(min_segment_tokens=0), "min_segment_tokens"),
    ("cards", dict(min_segment_tokens=4, max_segment_tokens=3), "max_segment_tokens"),
    ("cards", dict(parallel_candidates=0), "parallel_candidates"),
    ("cards", dict(reward_threshold="high"), "reward_threshold"),
    ("cards", dict(accept_beta=0.0), "accept_beta"),
    ("cards", dict(max_rejections=-1), "max_rejections"),
    ("cards", dict(entropy_threshold=float("nan")), "entropy_threshold"),
    ("rs", dict(mode="greedy"), "mode"),
    ("rs", dict(reward_threshold=float("inf")), "reward_threshold"),
    ("args", dict(k=0), "k must"),
    ("args", dict(mode="soft"), "mode"),
    ("args", dict(top_k=5), "pass k="),
    ("args", dict(w=1e39), "w \\* reward overflows float32"),  # finite, but w * reward is not
])
def test_bad_options(model, method, options, message):
    with pytest.raises(fastalign.InputError, match=message):
        fastalign.decode([[1, 2]], method=method, target=model, reward=weights_reward, max_new_tokens=2, **options)


def test_greedy_rs_accepts_its_first_response(model):
    """Top-1 sampling: the 8 calibration samples are the greedy response, so r_star is exactly its reward
    (zero spread) and that response passes at once: no rejection, one proposal per prompt. An fp32 mean of
    equal rewards could round above them (prompt [2] here: 20 rejections and a forced acceptance before)."""
    for prompts in ([[2]], [[1, 2], [3, 1, 4], [2], [4, 4]]):
        out = fastalign.decode(prompts, method="rs", target=model, reward=weights_reward, max_new_tokens=4,
                               top_k=1, temperature=1.0, seed=8)
        assert out.stats["rejections"] == 0 and out.stats["forced_acceptances"] == 0
        assert out.stats["responses_proposed"] == len(prompts)
        assert torch.equal(out.extra["reward_threshold"], weights_reward(prompts, out.sequences))


def test_greedy_rs_with_a_reward_model_accepts_its_first_response():
    """The toy world's reward model scores the greedy response's 8 calibration copies once (a reward is a function
    of the text): scored in 8 cache slots they came out a few ulps apart, r_star fell above the copy scored again
    as a proposal, and prompts 4 and 5 took 20 rejections and a forced acceptance each."""
    from fastalign.eval.toyworld import load_toy_world

    world = load_toy_world()
    out = fastalign.decode(world.prompts[:8], method="rs", target=world.target, reward=world.reward,
                           tokenizer=world.tokenizer, max_new_tokens=12, top_k=1, temperature=1.0, seed=0)
    assert out.stats["rejections"] == 0 and out.stats["forced_acceptances"] == 0
    assert out.stats["responses_proposed"] == 8
    assert out.stats["reward_calls"] == 2  # the prompts, the calibration; each proposal is a calibration copy


@pytest.mark.parametrize("method", ["rs", "cards"])
def test_auto_threshold_uses_the_unbiased_std_of_known_rewards(model, method):
    """The calibration rewards of one prompt are 1..8: mean 4.5, unbiased std sqrt(6) = 2.449 (the biased one
    is 2.291), so r_star = 6.949 and accept_beta = 0.816."""

    def known_rewards(prompts, responses):
        if len(responses) == 8:  # the calibration call: the prompt's 8 samples at once
            return torch.arange(1.0, 9.0)
        return torch.zeros(len(responses))

    # seed 11: the 8 calibration samples are distinct responses (copies would share one reward: rs.score_once)
    out = fastalign.decode([[1, 2]], method=method, target=model, reward=known_rewards, max_new_tokens=2,
                           max_rejections=0, seed=11)
    assert out.extra["reward_threshold"].item() == pytest.approx(4.5 + math.sqrt(6), rel=1e-6)
    assert out.extra["accept_beta"].item() == pytest.approx(math.sqrt(6) / 3, rel=1e-6)
