"""``smc``: the exactness particle filtering allows, on a tiny model whose laws are enumerated.

* The estimate of the normalising constant is unbiased at every particle count: the mean of ``exp(log_z)`` over
  many independent runs (one prompt copied into many rows, each with its own seed stream) equals the enumerated
  ``Z = sum_y p(y) exp(r(y) / beta)`` within 4 standard errors, with resampling happening; plausible wrong
  variants (weights not reset after resampling, the twist ``w_t`` used instead of the increment) fail the test.
* The law of the returned response approaches ``P ∝ p exp(r / beta)`` as the particles grow; one particle is
  ``sample``, token for token.
"""

import math

import pytest
import torch

import fastalign
from fastalign.methods import smc
from fastalign.models.reward import RewardModel
from fastalign.testing import (
    empirical_law,
    enumerate_law,
    next_token_probs,
    tiny_causal_lm,
    tilted_law,
    tiny_reward_model,
    total_variation,
    tv_threshold,
)

V, EOS, MAX_NEW, BETA = 4, 3, 3, 1.0
PROMPT = [1, 2]
ROWS = 2000  # independent runs per estimate
WEIGHTS = [0.3, 1.0, -0.5, 0.4]


def reward_of(prompt, response) -> float:
    """A reward over token ids, not 0 on the prompt alone, and not a sum over tokens (a repeat earns a bonus)."""
    return (0.7 + 0.1 * len(prompt) + sum(WEIGHTS[t] for t in response)
            + 0.5 * sum(a == b for a, b in zip(response, response[1:])))


def reward(prompts, responses):
    return torch.tensor([reward_of(p, y) for p, y in zip(prompts, responses)], dtype=torch.float32)


@pytest.fixture(scope="module")
def model():
    return tiny_causal_lm(vocab_size=V, hidden=16, layers=1, init_range=0.6, seed=0)


@pytest.fixture(scope="module")
def laws(model):
    """``(p, P, Z)``: the model's law of responses, the target law and its normalising constant."""
    p = enumerate_law(lambda t: next_token_probs(model, t), PROMPT, MAX_NEW, {EOS})
    P, Z = tilted_law(p, lambda y: reward_of(PROMPT, y), BETA)
    return p, P, Z


def run(model, rows=ROWS, seed=0, **options):
    options = {"particles": 4, "segment_tokens": 1, "beta": BETA, **options}
    return fastalign.decode([PROMPT] * rows, method="smc", target=model, reward=reward, max_new_tokens=MAX_NEW,
                            seed=seed, **options)


def z_error(model, Z, min_resampled=ROWS // 2, **options) -> tuple[float, float]:
    """``(mean of exp(log_z) - Z, its standard error)`` over ``ROWS`` independent runs, of which more than
    ``min_resampled`` resample at least once (the resampling path is what is under test)."""
    out = run(model, **options)
    assert sum(n > 0 for n in out.extra["resamplings"]) > min_resampled
    z = out.extra["log_z"].exp()
    return float(z.mean()) - Z, float(z.std()) / math.sqrt(len(z))


# ------------------------------------------------------------------ the normalising constant
@pytest.mark.parametrize("particles", [2, 4])
def test_log_z_is_unbiased(model, laws, particles):
    _, _, Z = laws
    error, se = z_error(model, Z, particles=particles, ess_threshold=1.0)
    assert abs(error) < 4 * se, (error, se, Z)
    assert se < 0.05 * Z  # the test has power: the noise is small against Z


def test_log_z_is_unbiased_with_delimited_segments(model, laws):
    _, _, Z = laws
    # 2-token segments over 3 tokens: most runs end at their first boundary, and about 37% resample before it
    error, se = z_error(model, Z, ROWS // 4, particles=4, segment_tokens=2, delimiters=[1], ess_threshold=1.0)
    assert abs(error) < 4 * se, (error, se, Z)


@pytest.mark.parametrize("variant", ["weights kept after resampling", "twist w_t as the increment",
                                     "psi_0 = 1 with increments from r_0"])
def test_wrong_variants_are_biased(model, laws, monkeypatch, variant):
    _, _, Z = laws
    if variant == "weights kept after resampling":
        monkeypatch.setattr(smc, "reset_weights", lambda log_w, ancestors: log_w[ancestors])
    elif variant == "twist w_t as the increment":
        monkeypatch.setattr(smc, "log_increment", lambda r_new, r_old, beta: r_new.double() / beta)
    else:  # the prompt's reward (0.9 here) left out of the final twist: Z_hat * exp(-0.9)
        monkeypatch.setattr(smc, "initial_log_weight", lambda r_0, beta: torch.zeros_like(r_0, dtype=torch.float64))
    error, se = z_error(model, Z, particles=4, ess_threshold=1.0)
    assert abs(error) > 4 * se, (error, se, Z)


def test_without_resampling_the_weights_are_the_tilt():
    """No resampling (``ess_threshold=0``), a cached reward model: every particle's weight is ``exp(r(y) / beta)``
    (normalised) with ``r(y)`` the reward of its whole response, and ``log_z = log mean_i exp(r(y_i) / beta)``;
    with resampling the rewards in ``extra`` are still those of the particles' responses (gathered caches)."""
    lm = tiny_causal_lm(vocab_size=8, hidden=16, layers=1, init_range=0.6, seed=0)
    rm = RewardModel(tiny_reward_model(vocab_size=8, hidden=16, layers=1, seed=3))
    prompts = [[1, 2, 3], [4], [5, 6]]
    for threshold in (0.0, 1.0):
        out = fastalign.decode(prompts, method="smc", target=lm, reward=rm, max_new_tokens=6, seed=1, particles=3,
                               segment_tokens=2, beta=0.05, ess_threshold=threshold)
        for b, prompt in enumerate(prompts):
            particles = out.extra["particles"][b]
            r = rm.score([prompt] * 3, particles).double()
            assert torch.allclose(out.extra["rewards"][b].double(), r, atol=1e-4)
            if threshold == 0.0:
                assert torch.allclose(out.extra["weights"][b], torch.softmax(r / 0.05, 0), atol=1e-3)
                expected = torch.logsumexp(r / 0.05, 0) - math.log(3)
                assert abs(float(out.extra["log_z"][b]) - float(expected)) < 2e-3
        if threshold == 0.0:
            assert out.stats["smc_resamplings"] == 0
        else:
            assert out.stats["smc_resamplings"] > 0


def test_equal_weights_have_an_effective_sample_size_of_n_and_are_not_resampled():
    """``ess_threshold=1`` resamples whenever the weights differ, and only then. ESS computed as
    ``exp(2 logsumexp(w) - logsumexp(2w))`` missed N for equal weights (for 98 of these 101 values at N=4; below
    N for 50 at N=2, 32 at N=3) and counted a resampling of particles that were all alike."""
    for n in (2, 3, 4, 16):
        for value in torch.linspace(-30, 30, 101, dtype=torch.float64).tolist():
            assert float(smc.effective_sample_size(torch.full((n,), value, dtype=torch.float64))) == n
    log_w = torch.tensor([[0.0, 1e-9, 0.0], [5.0, -700.0, -700.0]], dtype=torch.float64)
    ess = smc.effective_sample_size(log_w)
    assert ess[0] < 3 and abs(float(ess[0]) - 3) < 1e-15 and abs(float(ess[1]) - 1) < 1e-12

    # greedy decoding: every particle is the same response, and a reward of its length gives each the same
    # increment at every step
    lm = tiny_causal_lm(vocab_size=8, hidden=16, layers=1, init_range=0.6, seed=0)

    def length(prompts, responses):
        return torch.tensor([len(y) / 10 for y in responses])

    out = fastalign.decode([[1]], method="smc", target=lm, reward=length, max_new_tokens=6, particles=4,
                           segment_tokens=2, ess_threshold=1.0, top_k=1, seed=0)
    assert out.extra["particles"][0] == [out.extra["particles"][0][0]] * 4
    assert out.extra["ess"][0] == [4.0] * len(out.extra["ess"][0]) and out.stats["smc_resamplings"] == 0


# ------------------------------------------------------------------ the output law
def test_output_law_approaches_the_target(model, laws):
    p, P, _ = laws
    tv = {}
    for n in (1, 4, 16, 32):
        tv[n] = total_variation(empirical_law(run(model, seed=1, particles=n).sequences), P)
    noise = tv_threshold(P, ROWS)
    assert total_variation(p, P) > 4 * noise  # the tilt is far from p
    assert tv[1] > total_variation(p, P) - noise  # one particle samples p
    assert tv[1] > tv[4] > tv[16] > tv[32], tv
    assert tv[32] < tv[1] / 3, tv  # measured: 0.256, 0.169, 0.080, 0.051 (noise 0.044)


def test_one_particle_is_sample(model, laws):
    p, _, _ = laws
    prompts = [PROMPT, [0], [2, 2, 1]]
    sample = fastalign.decode(prompts * 20, target=model, max_new_tokens=MAX_NEW, seed=5).sequences
    for segment in (1, 2):
        out = fastalign.decode(prompts * 20, method="smc", target=model, reward=reward, max_new_tokens=MAX_NEW,
                               seed=5, particles=1, segment_tokens=segment)
        assert out.sequences == sample
        assert out.stats["smc_resamplings"] == 0
    law = empirical_law(run(model, particles=1).sequences)
    assert total_variation(law, p) < tv_threshold(p, ROWS)


def test_select_best_returns_the_highest_reward_particle(model):
    out = run(model, rows=20, particles=6, select="best")
    for b, seq in enumerate(out.sequences):
        rewards = [reward_of(PROMPT, y) for y in out.extra["particles"][b]]
        assert reward_of(PROMPT, seq) == pytest.approx(max(rewards), abs=1e-5)
    assert out.extra["weights"].shape == (20, 6)
    assert torch.allclose(out.extra["weights"].sum(1), torch.ones(20, dtype=torch.float64))
    assert {"smc_steps", "smc_resamplings", "smc_mean_ess"} <= set(out.stats)


def test_votes_over_the_particles_answers(model):
    """``select="majority"`` (the shared selection rules): the returned particle carries the most frequent answer
    among the prompt's particles (the answer reached first among equal counts), ``weighted_majority`` the answer
    with the largest total final weight."""
    def first_token(tokens):
        return tokens[0] if tokens else None

    for rule in ("majority", "weighted_majority"):
        out = run(model, rows=30, particles=6, select=rule, answer_fn=first_token)
        for b, seq in enumerate(out.sequences):
            answers = [first_token(y) for y in out.extra["particles"][b]]
            weights = [1.0] * 6 if rule == "majority" else out.extra["weights"][b].tolist()
            totals = {}
            for a, w in zip(answers, weights):
                totals[a] = totals.get(a, 0.0) + w
            assert first_token(seq) == max(totals, key=totals.get)


def test_a_prompt_does_not_depend_on_its_batch_once_its_particles_have_ended():
    """A prompt whose particles had all ended stayed in the loop while another prompt decoded on: it recorded its
    ESS again after every step and was resampled again when that fell below the threshold, which it would not be
    alone (the loop ends). Seed 78 returned [6, 0, 3] alone and [6, 3] beside a longer prompt."""
    model = tiny_causal_lm(vocab_size=8, hidden=16, layers=1, init_range=0.6, seed=0, eos_token_id=3)
    weights = [0.3, 1.0, -0.5, 0.4, 0.2, -0.1, 0.7, 0.0]

    def reward(prompts, responses):
        return torch.tensor([3 * sum(weights[t] for t in y) for y in responses])

    options = dict(method="smc", target=model, reward=reward, max_new_tokens=10, particles=4, segment_tokens=1,
                   ess_threshold=1.0)
    for seed in (78, 5, 11, 23, 40):
        alone = fastalign.decode([[1, 2]], seed=[seed], **options)
        beside = fastalign.decode([[1, 2], [3, 1, 4, 5, 6]], seed=[seed, 1000 + seed], **options)
        assert beside.sequences[0] == alone.sequences[0]
        assert torch.equal(beside.extra["weights"][0], alone.extra["weights"][0])
        assert beside.extra["ess"][0] == alone.extra["ess"][0]
        assert beside.extra["resamplings"][0] == alone.extra["resamplings"][0]
        assert beside.extra["particles"][0] == alone.extra["particles"][0]


def test_a_beta_that_overflows_the_log_weights_is_an_input_error(model):
    """(r_t - r_(t-1)) / beta with beta = 1e-310 is inf: the weights and log_z came out NaN, with no error."""
    with pytest.raises(fastalign.InputError, match=r"reward / beta overflows float64 \(beta=1e-310\)"):
        run(model, rows=2, beta=1e-310)


@pytest.mark.parametrize("options, message", [
    (dict(particles=0), "particles"),
    (dict(particles=2.5), "particles"),
    (dict(beta=0.0), "beta"),
    (dict(segment_tokens=0), "segment_tokens"),
    (dict(ess_threshold=1.5), "ess_threshold"),
    (dict(select="majority"), "select"),
    (dict(delimiters=[-1]), "delimiters"),
    (dict(delimiters="\n"), "delimiters"),
    (dict(delimiters=[1.5]), "delimiters"),
    (dict(delimiters=[2, V]), "delimiters: token id 4 is outside the target's vocabulary"),  # never emitted
    (dict(particle=2), "particle"),
])
def test_bad_options_are_input_errors(model, options, message):
    with pytest.raises(fastalign.InputError, match=message):
        run(model, rows=1, **options)


def test_a_delimiter_string_the_tokenizer_does_not_know_is_an_input_error():
    """A word outside the vocabulary encodes as the one unknown token, which would become the delimiter."""
    from fastalign.eval.toyworld import load_toy_world

    world = load_toy_world()
    options = dict(target=world.target, tokenizer=world.tokenizer, reward=world.reward, max_new_tokens=4, seed=0)
    for method in ("smc", "beam"):
        with pytest.raises(fastalign.InputError, match="'semicolon-typo' is not in the tokenizer's vocabulary"):
            fastalign.decode(world.prompts[:1], method=method, delimiters="semicolon-typo", **options)
        fastalign.decode(world.prompts[:1], method=method, delimiters=".", **options)  # a known word
