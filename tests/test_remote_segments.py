"""The segment methods against a served target (``fastalign.serve``, the protocol vLLM speaks): each round is one
completion request per live candidate that continues its prefix. ``speculative_rejection`` with ``alpha=0`` is
remote ``bon`` token for token; a candidate continued over several requests follows the target's law; the
request seeds are the prompts' own (a seeded run is reproducible and pins which request drew which tokens)."""

import math

import pytest
import torch

import fastalign
from fastalign.methods.base import Randomness
from fastalign.models.remote import RemoteLM
from fastalign.testing import (empirical_law, enumerate_law, next_token_probs, serving, tilted_law, tiny_causal_lm,
                               total_variation, tv_threshold)

import test_smc as smc_case  # its world (a module, not its fixtures: they would shadow this file's)

V, EOS = 6, 5
PROMPTS = [[1, 2], [3, 1, 4], [2], [4, 4]]


def weights_reward(prompts, responses):
    w = [0.3, 0.1, 0.5, 0.2, 0.4, 0.0]
    return torch.tensor([sum(w[t] for t in r) + 0.01 * len(r) for r in responses], dtype=torch.float32)


def constant_reward(prompts, responses):
    return torch.zeros(len(responses))


@pytest.fixture(scope="module")
def model():
    return tiny_causal_lm(vocab_size=V, hidden=16, init_range=0.25)


@pytest.fixture(scope="module")
def server(model):
    with serving(model) as url:
        yield url


def remote(server, method, prompts=PROMPTS, reward=weights_reward, seed=3, max_new_tokens=5, **options):
    return fastalign.decode(prompts, method=method, target=RemoteLM(server), reward=reward,
                            max_new_tokens=max_new_tokens, seed=seed, **options)


@pytest.mark.parametrize("n, round_tokens, batch", [(3, 2, 4), (4, 1, 2), (1, 3, 1)])
def test_specrej_alpha_zero_is_remote_bon_token_for_token(server, n, round_tokens, batch):
    for seed in (0, 2**40 + 7):
        bon = remote(server, "bon", PROMPTS[:batch], seed=seed, n=n)
        sr = remote(server, "speculative_rejection", PROMPTS[:batch], seed=seed, n=n, alpha=0.0,
                    round_tokens=round_tokens)
        assert sr.sequences == bon.sequences
        assert torch.equal(sr.extra["rewards"], bon.extra["rewards"])
        assert torch.equal(sr.extra["chosen_index"], bon.extra["chosen_index"])
        assert sr.stats["candidates_pruned"] == sr.stats["rejection_rounds"] == 0
        assert sr.stats["target_calls"] == bon.stats["target_calls"] == batch * n  # one request per sample


def test_specrej_rounds_are_seeded_requests_continuing_each_prefix(server):
    """Round k of prompt b asks for candidate j's next round_tokens tokens with seed s_bk + j (s_bk: draw k of the
    prompt's "request" stream), prompt plus response so far; pruned candidates stop, the output is finished."""
    lm = RemoteLM(server)
    prompts, n, rt, M = PROMPTS[:2], 4, 2, 6
    out = remote(server, "speculative_rejection", prompts, seed=9, max_new_tokens=M, n=n, alpha=0.5,
                 round_tokens=rt)
    again = remote(server, "speculative_rejection", prompts, seed=9, max_new_tokens=M, n=n, alpha=0.5,
                   round_tokens=rt)
    assert out.sequences == again.sequences and out.extra["candidates"] == again.extra["candidates"]
    assert out.stats["candidates_pruned"] > 0
    rng = Randomness(9, len(prompts))
    for b, prompt in enumerate(prompts):
        seeds = [rng.request_seeds([b], "request")[0] for _ in range(M)]  # s_b0, s_b1, ...
        for j, y in enumerate(out.extra["candidates"][b]):
            replay, k = [], 0
            while len(replay) < len(y):  # a round of rt tokens, or the rest once the prompt can stop nothing
                rest = lm.complete([prompt + replay], [M - len(replay)], seed=seeds[k] + j)[0]
                replay, k = (y, k) if replay + rest == y else (replay + rest[:rt], k + 1)
            assert replay == y
        chosen = out.extra["candidates"][b][int(out.extra["chosen_index"][b])]
        assert out.sequences[b] == chosen and (chosen[-1] == EOS or len(chosen) == M)
    # a prompt's output depends on its own seed only: alone, it is the same
    alone = remote(server, "speculative_rejection", prompts[1:], seed=rng.seeds[1:], max_new_tokens=M, n=n,
                   alpha=0.5, round_tokens=rt)
    assert alone.sequences == out.sequences[1:]


def test_specrej_candidate_continued_over_requests_follows_the_target_law(server, model):
    """With a constant reward candidate 0 is never stopped (ties stop the later candidates) and is chosen; it is
    sampled one token per request (round_tokens=1), each request a fresh seed: its law is the target's."""
    prompt, copies, M = [2, 3], 500, 3
    out = remote(server, "speculative_rejection", [prompt] * copies, reward=constant_reward, seed=5,
                 max_new_tokens=M, n=2, alpha=0.5, round_tokens=1)
    assert all(int(i) == 0 for i in out.extra["chosen_index"]) and out.stats["candidates_pruned"] > 0
    law = enumerate_law(lambda t: next_token_probs(model, t), prompt, M, {EOS})
    assert total_variation(empirical_law(out.sequences), law) < tv_threshold(law, copies)


# ------------------------------------------------------------------------------------------------ smc
# test_smc's world: its model, prompt and reward (not additive over tokens, not 0 on the prompt alone)
SMC_EOS, SMC_M, BETA, SMC_PROMPT = smc_case.EOS, smc_case.MAX_NEW, smc_case.BETA, smc_case.PROMPT
smc_reward = smc_case.reward


@pytest.fixture(scope="module")
def smc_model():
    return tiny_causal_lm(vocab_size=smc_case.V, hidden=16, layers=1, init_range=0.6, seed=0)


@pytest.fixture(scope="module")
def smc_server(smc_model):
    with serving(smc_model) as url:
        yield url


def remote_smc(url, rows, seed=0, **options):
    options = {"particles": 2, "segment_tokens": 1, "beta": BETA, "ess_threshold": 1.0, **options}
    return fastalign.decode([SMC_PROMPT] * rows, method="smc", target=RemoteLM(url), reward=smc_reward,
                            max_new_tokens=SMC_M, seed=seed, **options)


def z_error(url, model, rows=400, min_resampled=200, **options) -> tuple[float, float, float]:
    """``(mean of exp(log_z) - Z, its standard error, Z)`` over ``rows`` independent runs of remote smc, of which
    more than ``min_resampled`` resample at least once (the resampling path is what is under test)."""
    p = enumerate_law(lambda t: next_token_probs(model, t), SMC_PROMPT, SMC_M, {SMC_EOS})
    _, Z = tilted_law(p, lambda y: smc_case.reward_of(SMC_PROMPT, y), BETA)
    out = remote_smc(url, rows, **options)
    assert sum(n > 0 for n in out.extra["resamplings"]) > min_resampled
    z = out.extra["log_z"].exp()
    return float(z.mean()) - Z, float(z.std()) / math.sqrt(rows), Z


# 2-token delimited segments: most runs end at their first boundary, and about 28% resample before it
@pytest.mark.parametrize("options", [{}, {"particles": 3, "segment_tokens": 2, "delimiters": [1],
                                          "min_resampled": 80}], ids=["tokens", "delimited"])
def test_smc_remote_z_hat_is_unbiased(smc_server, smc_model, options):
    """Each step a request per particle that continues its prefix (stopping at a delimiter or after
    segment_tokens), resampled in the client: the mean of exp(log_z) over independent runs is the enumerated Z."""
    error, se, Z = z_error(smc_server, smc_model, **options)
    assert abs(error) < 4 * se and se < 0.1 * Z, (error, se, Z)


def test_smc_remote_one_segment_is_remote_bon_and_sample(smc_server):
    """A segment as long as the response: one step, the first request of each prompt is bon's (n particles) and
    sample's (one particle), token for token; the particles' rewards are the responses'."""
    prompts = [[1, 2], [2], [0, 1, 2]]
    kwargs = dict(target=RemoteLM(smc_server), reward=smc_reward, max_new_tokens=SMC_M, seed=4)
    smc = fastalign.decode(prompts, method="smc", particles=3, segment_tokens=SMC_M, **kwargs)
    bon = fastalign.decode(prompts, method="bon", n=3, **kwargs)
    assert torch.equal(smc.extra["rewards"], bon.extra["rewards"]) and smc.stats["smc_steps"] == 1
    one = fastalign.decode(prompts, method="smc", particles=1, segment_tokens=SMC_M, **kwargs)
    assert one.sequences == fastalign.decode(prompts, method="sample", **kwargs).sequences
    kwargs["seed"] = Randomness(4, 3).seeds  # the prompts' own seeds: a prompt alone gives the same output
    steps = fastalign.decode(prompts, method="smc", particles=3, segment_tokens=1, **kwargs)
    assert steps.stats["smc_steps"] > 1
    assert steps.sequences == fastalign.decode(prompts, method="smc", particles=3, segment_tokens=1, **kwargs).sequences
    alone = fastalign.decode(prompts[2:], method="smc", particles=3, segment_tokens=1,
                             **{**kwargs, "seed": kwargs["seed"][2:]})
    assert alone.sequences == steps.sequences[2:]


# ------------------------------------------------------------------------------------------------ beam
def split_steps(response, max_step_tokens, delimiters):
    """The steps of a response as the search cut it: a step ends at a delimiter or EOS (kept) or after
    max_step_tokens tokens."""
    steps, step = [], []
    for t in response:
        step.append(t)
        if t in delimiters or t == EOS or len(step) == max_step_tokens:
            steps.append(step)
            step = []
    return steps + ([step] if step else [])


@pytest.mark.parametrize("seed", [0, 2**40 + 7])
def test_beam_remote_one_step_is_remote_sample_and_bon(server, seed):
    """A step as long as the response: beams=width=1 is remote sample token for token, and beams=K, width=1 is
    remote bon with n=K (the K requests of the first step are bon's: seeds s_b0 + i); one step, K finished."""
    M = 5
    beam = remote(server, "beam", seed=seed, max_new_tokens=M, beams=1, width=1, max_step_tokens=M)
    assert beam.sequences == remote(server, "sample", seed=seed, max_new_tokens=M).sequences
    assert beam.stats["beam_steps"] == 1
    beam = remote(server, "beam", seed=seed, max_new_tokens=M, beams=3, width=1, max_step_tokens=M)
    bon = remote(server, "bon", seed=seed, max_new_tokens=M, n=3)
    assert beam.sequences == bon.sequences
    assert torch.equal(beam.extra["scores"].sort(1).values, bon.extra["rewards"].double().sort(1).values)
    assert beam.stats["beam_steps"] == 1 and beam.stats["beam_finished"] == 3 * len(PROMPTS)


def test_beam_remote_response_built_over_requests_follows_the_target_law(server, model):
    """One token per step, so every response is built over several seeded requests; with a constant step reward
    every step keeps its first candidate (ties: the first), a fresh sample from the target given the prefix: the
    law of the answers is the target's (one beam of width 2, whose second candidate loses the tie)."""
    prompt, copies, M = [2, 3], 400, 3
    law = enumerate_law(lambda t: next_token_probs(model, t), prompt, M, {EOS})
    out = remote(server, "beam", [prompt] * copies, reward=constant_reward, seed=6, max_new_tokens=M, beams=1,
                 width=2, max_step_tokens=1)
    assert out.stats["beam_steps"] > 1
    assert total_variation(empirical_law(out.sequences), law) < tv_threshold(law, copies)


@pytest.mark.parametrize("dvts", [False, True])
def test_beam_remote_finishes_beams_step_by_step_and_is_reproducible_per_prompt(server, dvts):
    """Steps stop at a delimiter (kept) or after max_step_tokens; every step score is the reward of the prefix
    up to that step; only finished beams (EOS or max_new_tokens) are returned, K of them (one per subtree for
    DVTS); a seed reproduces the run and a prompt alone (with its own seed) gives the same output."""
    K, W, S, M, delims = 4, 2, 2, 6, [1]
    seeds = Randomness(11, len(PROMPTS)).seeds
    kwargs = dict(max_new_tokens=M, beams=K, width=W, max_step_tokens=S, delimiters=delims, dvts=dvts,
                  aggregate="min")
    out = remote(server, "beam", seed=seeds, **kwargs)
    assert out.stats["beam_steps"] > 1
    for b, (prompt, finished) in enumerate(zip(PROMPTS, out.extra["finished"])):
        assert len(finished) == (K // W if dvts else K)
        if dvts:
            assert sorted(f["subtree"] for f in finished) == list(range(K // W))
        for f in finished:
            y = f["tokens"]
            assert y[-1] == EOS or len(y) == M
            steps = split_steps(y, S, delims)
            assert len(f["step_scores"]) == len(steps) == len(f["path"])
            prefixes = [sum(steps[:t + 1], []) for t in range(len(steps))]
            want = weights_reward([prompt] * len(prefixes), prefixes).double().tolist()
            assert f["step_scores"] == pytest.approx(want) and f["score"] == pytest.approx(min(want))
        chosen = finished[int(out.extra["chosen_index"][b])]
        assert out.sequences[b] == chosen["tokens"]
        assert chosen["score"] == max(f["score"] for f in finished)
    again = remote(server, "beam", seed=seeds, **kwargs)
    assert again.sequences == out.sequences and again.extra["finished"] == out.extra["finished"]
    alone = remote(server, "beam", PROMPTS[2:], seed=seeds[2:], **kwargs)
    assert alone.sequences == out.sequences[2:] and alone.extra["finished"] == out.extra["finished"][2:]
    other = remote(server, "beam", seed=12, **kwargs)
    assert other.extra["finished"] != out.extra["finished"]


def test_beam_remote_finds_the_best_path_of_a_step_reward(server):
    """A hand-made step reward: +1 per token 0, -10 per other token (EOS too). One token per step, the best two
    beams kept, a flattened target (temperature 3: token 0 has probability >= 0.17 after every prefix): the
    search follows 0, 0, 0, 0 (sampled among the best beam's 16 expansions), while remote sample rarely draws
    it (fewer than 10 of 100 samples)."""
    M = 4

    def step_reward(prompts, responses):
        return torch.tensor([sum(1.0 if t == 0 else -10.0 for t in y) for y in responses])

    out = remote(server, "beam", reward=step_reward, seed=1, max_new_tokens=M, beams=2, width=16,
                 max_step_tokens=1, temperature=3.0)
    assert out.sequences == [[0] * M] * len(PROMPTS)
    for b, finished in enumerate(out.extra["finished"]):
        best = finished[int(out.extra["chosen_index"][b])]
        assert best["step_scores"] == [1.0, 2.0, 3.0, 4.0] and best["score"] == 4.0
    sampled = remote(server, "sample", PROMPTS * 25, reward=step_reward, seed=1, max_new_tokens=M,
                     temperature=3.0)
    assert sum(y == [0] * M for y in sampled.sequences) < 10
