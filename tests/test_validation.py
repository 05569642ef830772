"""Bad input never hangs or answers silently wrong: every case gets an ``InputError`` naming the problem.

One test per hang and per silent wrong answer that was found by probing the API as a new user would; hangs
run under ``within`` (a SIGALRM deadline), so a regression fails instead of stalling the suite.
"""

import os
import threading

import numpy as np
import pytest
import torch

import fastalign
from fastalign import validation
from fastalign.testing import tiny_causal_lm, tiny_reward_model, within

V, EOS = 8, 7
NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def models():
    return {"target": tiny_causal_lm(vocab_size=V, hidden=16, init_range=0.2),
            "draft": tiny_causal_lm(vocab_size=V, hidden=16, seed=1),
            "ref": tiny_causal_lm(vocab_size=V, hidden=16, seed=2)}


def constant_reward(values):
    """A reward callable giving ``values[i % len(values)]`` to the i-th response of every call."""
    return lambda prompts, responses: torch.tensor([values[i % len(values)] for i in range(len(responses))])


# -------------------------------------------------------------------------------------- prompts
@pytest.mark.parametrize("prompts, match", [
    (None, "prompts must be a list of strings or a list of token-id lists, got None"),
    ("w1 w2", "prompts must be a list .* got 'w1 w2'"),
    ([], "no prompts given"),
    ([1, 2, 3], r"flat list of token ids \[1, 2, 3\]: pass a list of prompts"),
    ([[1, 2], "w1"], r"prompts mix text \(prompt 1\) and token ids \(prompt 0\)"),
    ([[1, 2.0]], "prompt 0, position 1: token ids must be integers, got 2.0"),
    ([[1], ["2"]], "prompt 1, position 0: token ids must be integers, got '2'"),
    ([[1, True]], "prompt 0, position 1: token ids must be integers, got True"),
    ([[1, V]], rf"prompt 0, position 1: token id {V} is outside the vocabulary of the target \(ids \[0, {V}\)\)"),
    ([[-1]], "prompt 0, position 0: token id -1 is outside the vocabulary"),
    ([[1], []], "prompt 1 is empty"),
    ([[1], None], "prompt 1 must be a string or a list of token ids, got None"),
    (torch.tensor([[1.0, 2.0]]), "prompt 0: token ids must be integers, got an array of torch.float32"),
    (torch.tensor([1, 2]), r"2-D \[prompts, tokens\]"),
    ([np.array(3)], "prompt 0 must be a string or a list of token ids"),  # a raw TypeError before
    (np.array("w1 w2"), "prompts must be a list .* got "),  # a 0-d array: one value, not a list of prompts
    ({"w1 w2", "w3"}, "prompts must be a list .* got "),  # a set: answered in an arbitrary order before
])
def test_bad_prompts(models, prompts, match):
    with pytest.raises(fastalign.InputError, match=match):
        fastalign.decode(prompts, target=models["target"], max_new_tokens=2)


def test_one_causal_lm_in_two_roles_gets_a_cache_per_role(toy):
    """A CausalLM passed as target and draft shared one KV cache: sd's tokens differed from the same weights
    wrapped twice for 11 of 20 seeds (toy world, 12 tokens)."""
    engine, _ = toy
    model = engine.target.model
    held = fastalign.Engine(target=model).target  # a CausalLM the caller holds
    prompts = [[1, 131, 86], [1, 5]]
    for method, roles in [("sd", ("draft",)), ("sss", ("draft", "ref"))]:
        shared = fastalign.Engine(target=held, **{role: held for role in roles})
        apart = fastalign.Engine(target=model, **{role: model for role in roles})
        for seed in range(4):
            kw = dict(method=method, max_new_tokens=12, seed=seed, temperature=1.0)
            assert shared.decode(prompts, **kw).sequences == apart.decode(prompts, **kw).sequences, (method, seed)


def test_good_prompt_forms_are_equivalent(models):
    kw = dict(target=models["target"], max_new_tokens=3, seed=5)
    ref = fastalign.decode([[1, 2], [3]], **kw).sequences
    assert fastalign.decode([(1, 2), torch.tensor([3])], **kw).sequences == ref
    assert fastalign.decode(torch.tensor([[1, 2]]), **kw).sequences == ref[:1]


@pytest.mark.parametrize("method, options", [("sample", {}), ("bon", {"n": 3}), ("qalign", {"steps": 2}),
                                             ("sd", {"num_draft_tokens": 2}),
                                             ("sd", {"tree": "sampled", "branching": (2, 2)})])
def test_numpy_integers_count_as_integers(models, method, options):
    """max_new_tokens=np.int64(3) failed inside sample ("not iterable"); n=np.int64(3) was refused as "not an
    integer >= 1, got np.int64(3)"; num_draft_tokens=np.int64(2) raised a raw AttributeError."""
    kw = dict(target=models["target"], draft=models["draft"], reward=constant_reward([1.0, 2.0]), method=method,
              seed=5)
    numpy_options = {k: tuple(map(np.int64, v)) if isinstance(v, tuple) else v if isinstance(v, str) else np.int64(v)
                     for k, v in options.items()}
    ref = fastalign.decode([[1, 2], [3]], max_new_tokens=3, **options, **kw).sequences
    assert fastalign.decode([[1, 2], [3]], max_new_tokens=np.int64(3), **numpy_options, **kw).sequences == ref


# -------------------------------------------------------------------------------------- numbers
@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=NAN), "temperature must be a finite number, got nan"),
    (dict(temperature=INF), "temperature must be a finite number, got inf"),
    (dict(temperature=0.0), r"temperature must be in \(0.0, inf\], got 0.0 \(use top_k=1 for greedy\)"),
    (dict(temperature="1"), "temperature must be a finite number, got '1'"),
    (dict(top_k=2.5), "top_k must be an integer or None, got 2.5"),
    (dict(top_k=0), "top_k must be an integer >= 1, got 0"),
    (dict(top_k=True), "top_k must be an integer or None, got True"),
    (dict(top_p=NAN), "top_p must be a finite number or None, got nan"),
    (dict(top_p=1.5), r"top_p must be in \(0.0, 1.0\], got 1.5"),
    (dict(max_new_tokens=True), "max_new_tokens must be an integer, got True"),
    (dict(max_new_tokens=2.0), "max_new_tokens must be an integer, got 2.0"),
    (dict(seed=2**70), r"seed must be an integer >= 0 and <= 18446744073709551615, got 1180591620717411303424"),
    (dict(seed=-1), "seed must be an integer >= 0"),
    (dict(seed=1.5), "seed must be None, an integer"),
    (dict(seed="7"), "seed must be None, an integer"),
    (dict(seed=[1, 2, 3]), "seed has 3 values for 1 prompts"),
])
def test_bad_sampling_numbers(models, kwargs, match):
    with pytest.raises(fastalign.InputError, match=match):
        fastalign.decode([[1, 2]], **{"target": models["target"], "max_new_tokens": 2, **kwargs})


def test_largest_seed_is_accepted(models):
    fastalign.decode([[1, 2]], target=models["target"], max_new_tokens=2, seed=2**64 - 1)


@pytest.mark.parametrize("method, options, match", [
    ("sss", dict(lam=NAN), "sss option lam must be finite, got nan"),
    ("sss", dict(max_log_ratio=NAN), "sss option max_log_ratio must be finite, got nan"),
    ("sss", dict(num_draft_tokens=2.5),
     r"sss option num_draft_tokens must be an integer or a string or a tuple of integers such as \(2, 2\), got 2.5"),
    ("sss", dict(branching=(2, INF)), "sss option branching must be finite"),
    ("sss", dict(bonus_on_full_accept="no"), "sss option bonus_on_full_accept must be True or False, got 'no'"),
    ("args", dict(w=NAN), "args option w must be finite, got nan"),
    ("args", dict(w="1.5"), "args option w must be a number, got '1.5'"),
    ("bon", dict(n=2.5), "bon option n must be an integer, got 2.5"),
    ("bon", dict(n=True), "bon option n must be an integer, got True"),
    ("soft_bon", dict(lam=NAN), "soft_bon option lam must be finite"),
    ("qalign", dict(beta=NAN), "qalign option beta must be finite"),
    ("qalign", dict(beta="nan"), "qalign option beta must be a number, got 'nan'"),
    ("cards", dict(accept_beta=NAN), "cards option accept_beta must be finite"),
    ("rs", dict(max_rejections=1.5), "rs option max_rejections must be an integer"),
    ("bon", dict(bogus=1), "method 'bon' has no option 'bogus'; its options: n"),
    ("sss", dict(lamda=1.0), "method 'sss' has no option 'lamda'; its options: num_draft_tokens, tree, branching, "
                             "variant, lam, max_log_ratio, bonus_on_full_accept, allow_no_ref"),
])
def test_bad_method_options(models, method, options, match):
    kw = dict(target=models["target"], draft=models["draft"], ref=models["ref"], reward=constant_reward([1.0]))
    with pytest.raises(fastalign.InputError, match=match):
        fastalign.decode([[1, 2]], method=method, max_new_tokens=2, **kw, **options)


def test_nan_options_that_used_to_answer_all_token_zero(models):
    """temperature / lam / max_log_ratio = nan returned token 0 everywhere with no error; w = nan was greedy."""
    kw = dict(target=models["target"], draft=models["draft"], ref=models["ref"], max_new_tokens=3)
    for bad in (dict(temperature=NAN), dict(lam=NAN), dict(max_log_ratio=NAN)):
        with pytest.raises(fastalign.InputError, match="nan"):
            fastalign.decode([[1, 2]], method="sss", **kw, **bad)
    with pytest.raises(fastalign.InputError, match="w must be finite"):
        fastalign.decode([[1, 2]], method="args", target=models["target"], reward=constant_reward([0.0]),
                         max_new_tokens=3, w=NAN)


# -------------------------------------------------------------------------------- dtype, device
def test_dtype_names_and_aliases():
    assert validation.check_dtype("fp16") is torch.float16 and validation.check_dtype("bf16") is torch.bfloat16
    assert validation.check_dtype("torch.float32") is torch.float32 and validation.check_dtype("auto") == "auto"
    for bad in ("fp17", torch.int64, 16):
        with pytest.raises(fastalign.InputError, match="dtype must be 'auto', a floating torch dtype or one of"):
            validation.check_dtype(bad)


def test_bad_dtype_and_device_are_named(models):
    with pytest.raises(fastalign.InputError, match="dtype must be .* got 'fp17'"):
        fastalign.Engine(target=models["target"], dtype="fp17")
    with pytest.raises(fastalign.InputError, match="device must be a torch device such as 'cpu'.* got 'nonsense'"):
        fastalign.decode([[1]], target=models["target"], device="nonsense")
    if not torch.cuda.is_available():
        with pytest.raises(fastalign.InputError, match="device 'cuda:0' is not available on this machine"):
            fastalign.Engine(target=models["target"], device="cuda:0")
    fastalign.Engine(target=models["target"], dtype="fp32", device="cpu")  # an alias is accepted


def test_missing_model_path_names_the_role(tmp_path):
    with pytest.raises(fastalign.InputError, match=r"cannot load the target '.*nowhere': no such file or folder"):
        fastalign.Engine(target=str(tmp_path / "nowhere"))
    with pytest.raises(fastalign.InputError, match=r"cannot load the draft '.*nowhere'"):
        fastalign.Engine(target=tiny_causal_lm(vocab_size=V, hidden=16), draft=str(tmp_path / "nowhere"))


# ----------------------------------------------------------------------------------- context lengths
def test_context_length_names_the_model_role(models):
    short = tiny_causal_lm(vocab_size=V, hidden=16, context=8)
    with pytest.raises(fastalign.InputError, match=r"context length of the draft model \(8\)"):
        fastalign.decode([[1, 2, 3]], method="sd", target=models["target"], draft=short, max_new_tokens=6)
    with pytest.raises(fastalign.InputError, match=r"context length of the ref model \(8\)"):
        fastalign.decode([[1, 2, 3]], method="sss", target=models["target"], draft=models["draft"], ref=short,
                         max_new_tokens=6)
    reward = tiny_reward_model(vocab_size=V, hidden=16, context=8)
    with pytest.raises(fastalign.InputError, match=r"prompt 1 has 4 tokens; with max_new_tokens=6 it needs 10 "
                                                   r"positions, more than the context length of the reward model"):
        fastalign.decode([[1], [1, 2, 3, 4]], method="bon", target=models["target"], reward=reward,
                         max_new_tokens=6, n=2)
    with pytest.raises(fastalign.InputError, match="context length of the target model"):
        fastalign.decode([[1] * 120], target=models["target"], max_new_tokens=10)


def test_the_model_layer_and_the_remote_client_check_through_validation(models):
    """A direct caller of ``CausalLM.prefill``, ``RemoteLM.complete`` or ``prompt_seeds`` gets the API's checks."""
    from fastalign.methods.base import prompt_seeds
    from fastalign.models.causal_lm import CausalLM
    from fastalign.models.remote import request_seeds_of

    lm = CausalLM(tiny_causal_lm(vocab_size=V, hidden=16, context=8))
    with pytest.raises(fastalign.InputError, match=rf"prompt 0, position 1: token id {V} is outside the vocabulary"):
        lm.prefill([[1, V]])
    with pytest.raises(fastalign.InputError, match=r"prompt 1 has 4 tokens; with max_new_tokens=6 it needs 10 "
                                                   r"positions, more than the context length of the model \(8\)"):
        lm.prefill([[1], [1, 2, 3, 4]], max_new_tokens=6)
    lm.prefill([[1] * 8])
    with pytest.raises(fastalign.InputError, match=r"a sequence needs 9 positions, more than the context length"):
        lm.extend(torch.ones(1, 1, dtype=torch.long))
    with pytest.raises(fastalign.InputError, match=r"prompt 0 has 1 tokens; with max_new_tokens=8 .* of 'm' on"):
        validation.check_context_length([[1], [1, 2, 3]], [8, 1], 8, "'m' on the server")  # RemoteLM's budgets
    with pytest.raises(fastalign.InputError, match="seed must be an integer >= 0"):
        prompt_seeds(-1, 2)
    with pytest.raises(fastalign.InputError, match=r"seed must be an integer in \[0, 2\*\*64\) or one"):
        request_seeds_of(None, 1)
    with pytest.raises(fastalign.InputError, match="seed has 1 values for 2 prompts"):
        request_seeds_of([3], 2)


# ------------------------------------------------------------------------------------------- rewards
def test_nan_reward_never_wins_bon(models):
    """rewards [nan, 1, 2, 3] used to pick index 0."""
    with pytest.raises(fastalign.InputError, match=r"prompt 1: the reward is nan for prompt \[3, 4\]"):
        fastalign.decode([[1, 2], [3, 4]], method="bon", target=models["target"], max_new_tokens=2, n=4,
                         reward=lambda p, r: torch.tensor([1.0, 2.0, 3.0, 4.0, NAN, 1.0, 2.0, 3.0]))


@pytest.mark.parametrize("method", ["rs", "cards"])
@pytest.mark.parametrize("value", [NAN, -INF, INF])
def test_non_finite_rewards_never_hang_rs_or_cards(models, method, value):
    """Every candidate NaN or -inf used to loop forever (the forced acceptance accepted nothing)."""
    with within(60), pytest.raises(fastalign.InputError, match=f"prompt 0: the reward is {value}"):
        fastalign.decode([[1, 2]], method=method, target=models["target"], reward=constant_reward([value]),
                         max_new_tokens=4, reward_threshold=1.0, max_rejections=2, seed=0)


def test_a_reward_past_float32_is_named_as_returned(models):
    """A float64 reward of 1e300 was reported as "the reward is inf" (its float32 cast)."""
    huge = lambda prompts, responses: torch.full((len(responses),), 1e300, dtype=torch.float64)  # noqa: E731
    with pytest.raises(fastalign.InputError,
                       match=r"the reward is 1e\+300 .* finite float32 numbers \(\|r\| <= 3.4e\+38"):
        fastalign.decode([[1, 2]], method="bon", target=models["target"], reward=huge, max_new_tokens=2, n=2, seed=0)


def test_a_reward_model_whose_head_outputs_nan_is_an_error_not_a_hang(models):
    reward = tiny_reward_model(vocab_size=V, hidden=16)
    with torch.no_grad():
        reward.score.weight.fill_(NAN)
    for method in ("cards", "rs", "bon", "args"):
        with within(60), pytest.raises(fastalign.InputError, match="the reward model's score is nan"):
            fastalign.decode([[1, 2]], method=method, target=models["target"], reward=reward, max_new_tokens=4,
                             seed=0, **({"reward_threshold": 1.0} if method in ("rs", "cards") else {}))


@pytest.mark.parametrize("method", ["rs", "cards"])
def test_max_rejections_bounds_rs_and_cards(models, method):
    """An unreachable threshold: after max_rejections rejections the best candidate is forced in."""
    with within(60):
        out = fastalign.decode([[1, 2], [3]], method=method, target=models["target"], max_new_tokens=4, seed=0,
                               reward=constant_reward([-5.0, -4.0, -3.0]), reward_threshold=1e9, mode="hard",
                               max_rejections=2, **({"min_segment_tokens": 4} if method == "cards" else {}))
    assert out.stats["forced_acceptances"] >= 2 and out.stats["rejections"] == 2 * out.stats["forced_acceptances"]
    assert all(len(s) >= 1 for s in out.sequences)


@pytest.mark.parametrize("bad, match", [
    (lambda p, r: torch.zeros(len(r), 4), r"returned a torch.float32 tensor of shape \[2, 4\] for 2 \(prompt, "
                                          r"response\) pairs; expected shape \[2\]"),
    (lambda p, r: [1.0], r"shape \[1\] for 2"),
    (lambda p, r: ["good", "bad"], "the reward returned .*expected 2 numbers"),
    (lambda p, r: None, "the reward returned None; expected 2 numbers"),
])
def test_reward_callable_shape_is_checked_every_call(models, bad, match):
    with pytest.raises(fastalign.InputError, match=match):
        fastalign.decode([[1, 2]], method="bon", target=models["target"], reward=bad, max_new_tokens=2, n=2)


def test_sss_without_ref_is_an_error_unless_asked(models):
    kw = dict(target=models["target"], draft=models["draft"], max_new_tokens=3, seed=1)
    with pytest.raises(fastalign.InputError, match="sss needs ref=.*allow_no_ref=True"):
        fastalign.decode([[1, 2]], method="sss", **kw)
    sd = fastalign.decode([[1, 2]], method="sd", **kw)
    assert fastalign.decode([[1, 2]], method="sss", allow_no_ref=True, **kw).sequences == sd.sequences


# ------------------------------------------------------------------------------------------- threads
def test_engine_shared_by_threads_gives_each_call_its_own_tokens(models):
    """One Engine from several threads used to mix KV caches and return different tokens with no error."""
    engine = fastalign.Engine(target=models["target"], draft=models["draft"], reward=constant_reward([0.5, 1.0]))
    jobs = [dict(method="sample", seed=s) for s in range(3)] + [dict(method="sd", seed=s) for s in range(3)] + \
        [dict(method="bon", n=3, seed=s) for s in range(2)]
    prompts = [[1, 2, 3], [4], [5, 6]]
    alone = [engine.decode(prompts, max_new_tokens=6, **job).sequences for job in jobs]
    results = [None] * (2 * len(jobs))
    errors = []

    def work(i):
        try:
            results[i] = engine.decode(prompts, max_new_tokens=6, **jobs[i % len(jobs)]).sequences
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and results == alone + alone


def test_a_nan_gold_reward_is_an_error_not_a_poisoned_mean():
    from fastalign.eval.gold import GoldReward

    gold = GoldReward.from_text_fn(lambda prompts, completions: [1.0, NAN], "flaky")
    with pytest.raises(fastalign.InputError, match="gold reward 'flaky' is nan for the prompt 'b'"):
        gold([[1], [2]], [[3], [4]], ["a", "b"], ["x", "y"], [{}, {}])


def test_the_default_eval_grid_has_sss_only_with_a_ref(models):
    from fastalign.eval.grid import default_grid

    without_ref = fastalign.Engine(target=models["target"], draft=models["draft"])
    methods = [m for m, _ in default_grid(lambda method: without_ref)]
    assert "sd" in methods and "sss" not in methods
    with_ref = fastalign.Engine(target=models["target"], draft=models["draft"], ref=models["ref"])
    assert "sss" in [m for m, _ in default_grid(lambda method: with_ref)]


def test_a_reward_model_with_a_smaller_vocabulary_is_named(models):
    with pytest.raises(fastalign.InputError, match="the reward model embeds 6 token ids, the target emits up to 8"):
        fastalign.Engine(target=models["target"], reward=tiny_reward_model(vocab_size=6, hidden=16))


# ------------------------------------------------------------------------- float32 extremes (toy world)
@pytest.fixture(scope="module")
def toy():
    from fastalign.eval.toyworld import load_toy_world

    world = load_toy_world()
    engine = fastalign.Engine(target=world.target, draft=world.aligned_draft, ref=world.draft, reward=world.reward,
                              tokenizer=world.tokenizer)
    return engine, world.prompts[:2]


@pytest.mark.parametrize("method, options", [
    ("sample", {}), ("sample", dict(top_k=5, top_p=0.9)), ("sss", dict(num_draft_tokens=3)), ("qalign", dict(steps=2)),
])
def test_a_temperature_below_the_float32_floor_decodes_greedily(toy, method, options):
    """``temperature=1e-39`` (not even a normal float32) emitted <pad> and <s>: a temperature below 1e-20 is
    taken as 1e-20 (kernels/truncation.py), which is greedy on these models."""
    engine, prompts = toy
    greedy = engine.decode(prompts, method=method, max_new_tokens=8, seed=0, top_k=1, temperature=1.0,
                           **{k: v for k, v in options.items() if k not in ("top_k", "top_p")})
    for temperature in (1e-39, 1e-300, 1e-20):
        out = engine.decode(prompts, method=method, max_new_tokens=8, seed=0, temperature=temperature, **options)
        assert out.sequences == greedy.sequences, temperature
    assert all(t > 3 for s in greedy.sequences for t in s[:-1])  # words: no <pad>, <s>, </s> or <unk> inside


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_kernels_refuse_a_temperature_below_the_floor(backend, monkeypatch):
    """Every kernel that divides by the temperature, on both backends (Triton's verifiers drew token -1 and its
    entropy gave NaN at T = 1e-39, where the references raised or gave inf)."""
    from fastalign.kernels import entropy, sample, spec_verify, tree_verify, truncate_logits

    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton backend on CPU tensors needs TRITON_INTERPRET=1")
    monkeypatch.setenv("FASTALIGN_KERNELS", backend)
    logits, chain, tree = torch.randn(2, 10), torch.randn(1, 3, 10), torch.randn(1, 4, 10)
    u = torch.full((1, 3), 0.5)
    calls = [lambda: sample(logits, 1e-39), lambda: truncate_logits(logits, 1e-21), lambda: entropy(logits, 1e-39),
             lambda: spec_verify(chain, chain[:, :2], None, torch.tensor([[1, 2]]), temperature=1e-39,
                                 uniforms=u[:, :2]),
             lambda: tree_verify(tree, tree, None, torch.tensor([[1, 2, 3]]), torch.tensor([[-1, 0, 0]]),
                                 temperature=1e-39, uniforms=u)]
    for call in calls:
        with pytest.raises(ValueError, match=r"temperature must be >= 1e-20 \(a smaller one overflows float32\)"):
            call()


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), 0.0, -1.0])
def test_the_kernels_refuse_a_temperature_that_is_not_a_finite_positive_number(temperature):
    """NaN passes a ``<= 0`` check: every kernel that divides by the temperature names it instead."""
    from fastalign.kernels import entropy, sample, spec_verify, tree_verify, truncate_logits

    logits, chain, tree = torch.randn(2, 10), torch.randn(1, 3, 10), torch.randn(1, 4, 10)
    calls = [lambda: sample(logits, temperature), lambda: truncate_logits(logits, temperature),
             lambda: entropy(logits, temperature),
             lambda: spec_verify(chain, chain[:, :2], None, torch.tensor([[1, 2]]), temperature=temperature),
             lambda: tree_verify(tree, tree, None, torch.tensor([[1, 2, 3]]), torch.tensor([[-1, 0, 0]]),
                                 temperature=temperature)]
    for call in calls:
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            call()


def test_the_kernels_refuse_a_top_k_that_is_not_an_integer():
    from fastalign.kernels import sample, truncate_logits

    logits = torch.randn(2, 10)
    for top_k in (2.5, True, "3"):
        for call in (lambda: sample(logits, 1.0, top_k), lambda: truncate_logits(logits, 1.0, top_k)):
            with pytest.raises(ValueError, match="top_k must be an integer or None, got"):
                call()
    assert torch.equal(truncate_logits(logits, 1.0, torch.tensor(3).numpy()[()]), truncate_logits(logits, 1.0, 3))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_kernels_refuse_a_seed_that_is_not_a_64_bit_integer(backend, monkeypatch):
    """A float or bool seed was truncated by ``int()``, and -1 or 2**64 + 5 shared the key of 2**64 - 1 or 5."""
    from fastalign.kernels import sample, spec_verify

    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton backend on CPU tensors needs TRITON_INTERPRET=1")
    monkeypatch.setenv("FASTALIGN_KERNELS", backend)
    logits, chain = torch.randn(2, 10), torch.randn(1, 3, 10)
    for seed in (1.5, True, -1, 2**64, 2**64 + 5, "3"):
        for call in (lambda: sample(logits, seed=seed),
                     lambda: spec_verify(chain, chain[:, :2], None, torch.tensor([[1, 2]]),
                                         uniforms=torch.full((1, 2), 0.5), seed=seed)):
            with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*64\), got"):
                call()
    assert torch.equal(sample(logits, seed=np.int64(5)), sample(logits, seed=5))
    sample(logits, seed=2**64 - 1)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_kernels_refuse_logits_that_overflow_once_scaled(backend, monkeypatch):
    """Finite logits above 3.4e38 * T scaled to +inf: (5e29, 1e30) at T = 1e-9 drew token 0, by index, where
    token 1 is the maximum. The public kernels name the overflow; a logit that scales to -inf (probability 0
    anyway) is fine, and so is the largest maximum that still fits."""
    from fastalign.kernels import entropy, sample, spec_verify, tree_verify

    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton backend on CPU tensors needs TRITON_INTERPRET=1")
    monkeypatch.setenv("FASTALIGN_KERNELS", backend)
    T = 1e-9
    logits = torch.tensor([[5e29, 1e30, 0.0], [1.0, 2.0, 3.0]])
    chain, tree = logits[:1].expand(1, 3, 3), logits[:1].expand(1, 4, 3)
    u = torch.full((1, 3), 0.5)
    calls = [lambda: sample(logits, T), lambda: entropy(logits, T),
             lambda: spec_verify(chain, chain[:, :2], None, torch.tensor([[1, 2]]), temperature=T,
                                 uniforms=u[:, :2]),
             lambda: tree_verify(tree, tree, None, torch.tensor([[1, 2, 0]]), torch.tensor([[-1, 0, 0]]),
                                 temperature=T, uniforms=u)]
    for call in calls:
        with pytest.raises(ValueError, match=r"logits / temperature overflows float32: a row's maximum 1e\+30"):
            call()
    assert sample(torch.tensor([[-1e30, 2.0, 3.0]]), T, seed=1).tolist() == [2]
    assert sample(torch.tensor([[3.3e29, 3.2e29]]), T, seed=1).tolist() == [0]


def test_the_verifiers_refuse_uniforms_outside_the_unit_interval():
    """``u * q_r <= p`` with u = 2 or NaN accepts with a wrong probability, silently."""
    from fastalign.kernels import spec_verify, tree_verify

    chain, tree = torch.randn(1, 3, 10), torch.randn(1, 4, 10)
    for bad in (2.0, -0.5, float("nan")):
        u = torch.tensor([[0.5, bad, 0.5]])
        for call in (lambda: spec_verify(chain, chain[:, :2], None, torch.tensor([[1, 2]]), uniforms=u[:, :2]),
                     lambda: tree_verify(tree, tree, None, torch.tensor([[1, 2, 3]]),
                                         torch.tensor([[-1, 0, 0]]), uniforms=u)):
            with pytest.raises(ValueError, match=r"uniforms must lie in \[0, 1\]"):
                call()
    spec_verify(chain, chain[:, :2], None, torch.tensor([[1, 2]]), uniforms=torch.tensor([[0.0, 1.0]]))


@pytest.mark.parametrize("options, match", [
    (dict(lam=float("nan")), "lam must be a finite number, got nan"),
    (dict(lam=float("-inf")), "lam must be a finite number, got -inf"),
    (dict(max_log_ratio=float("nan")), "max_log_ratio must be None or a finite number > 0, got nan"),
    (dict(max_log_ratio=-1.0), "max_log_ratio must be None or a finite number > 0, got -1.0"),
])
def test_the_verifiers_refuse_a_tilt_that_is_not_a_number(options, match):
    """The method layer bounds lam and max_log_ratio; the verifiers called directly name them too (a NaN tilt
    gave token 0, a negative clip a reversed interval)."""
    from fastalign.kernels import spec_verify, tree_verify

    chain, tree = torch.randn(1, 3, 10), torch.randn(1, 4, 10)
    with pytest.raises(ValueError, match=match):
        spec_verify(chain, chain, chain + 0.1, torch.tensor([[1, 2]]), "sss_exact", uniforms=torch.rand(1, 2),
                    **options)
    with pytest.raises(ValueError, match=match):
        tree_verify(tree, tree, tree + 0.1, torch.tensor([[1, 2, 3]]), torch.tensor([[-1, 0, 0]]), "sss_exact",
                    uniforms=torch.rand(1, 3), **options)


def test_the_verifiers_name_missing_uniforms():
    """``uniforms`` (the acceptance tests' randomness) defaults to None in the signature but is required."""
    from fastalign.kernels import spec_verify, tree_verify

    chain, tree = torch.randn(1, 3, 10), torch.randn(1, 4, 10)
    with pytest.raises(ValueError, match=r"uniforms must be \[B, K\] = \(1, 2\), got None"):
        spec_verify(chain, chain[:, :2], None, torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match=r"uniforms must be \[B, N\] = \(1, 3\), got None"):
        tree_verify(tree, tree, None, torch.tensor([[1, 2, 3]]), torch.tensor([[-1, 0, 0]]))


@pytest.mark.parametrize("method, options, match", [
    ("sss", dict(lam=1e39), r"sss option lam must be in \[-1e6, 1e6\] \(a larger tilt overflows float32\), got 1e\+39"),
    ("sss", dict(lam=-2e6), r"lam must be in \[-1e6, 1e6\]"),
    ("sss", dict(max_log_ratio=1e39), r"sss option max_log_ratio must be in \(0, 1e6\]"),
    ("rs", dict(reward_threshold=1.7e308), r"rs option reward_threshold must be in \[-3.4e38, 3.4e38\] or 'auto' "
                                           r"\(rewards are float32\), got 1.7e\+308"),
    ("rs", dict(reward_threshold=-1e39), r"reward_threshold must be in \[-3.4e38, 3.4e38\]"),
    ("rs", dict(accept_beta=1e39), r"rs option accept_beta must be in \(0, 3.4e38\] or 'auto'"),
    ("cards", dict(reward_threshold=1e300), r"cards option reward_threshold must be in \[-3.4e38, 3.4e38\]"),
    ("cards", dict(accept_beta=1e300), r"cards option accept_beta must be in \(0, 3.4e38\]"),
])
def test_options_that_overflow_float32_are_input_errors(toy, method, options, match):
    """``sss`` with ``lam=1e39`` emitted only special tokens, ``rs`` with ``reward_threshold=1.7e308`` raised a raw
    overflow: both are finite, so they passed validation; each now names its range."""
    engine, prompts = toy
    with pytest.raises(fastalign.InputError, match=match):
        engine.decode(prompts, method=method, max_new_tokens=4, seed=0, **options)


def test_options_at_the_float32_limits_still_decode(toy):
    """The largest allowed values run: a tilt of 1e6 gives words, a threshold of 3.4e38 is never reached (every
    prompt ends with the forced acceptance), an accept_beta of 3.4e38 accepts the first response."""
    engine, prompts = toy
    tilted = engine.decode(prompts, method="sss", lam=1e6, max_new_tokens=6, seed=0)
    assert all(t > 3 for s in tilted.sequences for t in s[:-1])
    never = engine.decode(prompts, method="rs", reward_threshold=3.4e38, max_rejections=1, max_new_tokens=4, seed=0)
    assert never.stats["forced_acceptances"] == 2 and never.stats["rejections"] == 2
    always = engine.decode(prompts, method="rs", reward_threshold=-3.4e38, accept_beta=3.4e38, max_new_tokens=4, seed=0)
    assert always.stats["rejections"] == 0 and always.stats["responses_proposed"] == 2


# --------------------------------------------------------------------------------------- flags
@pytest.mark.parametrize("kwargs, match", [
    (dict(compile="no"), "compile must be True or False, got 'no'"),
    (dict(static_cache="false"), "static_cache must be True or False or None, got 'false'"),
    (dict(chat="yes"), "chat must be True or False, got 'yes'"),
    (dict(trust_remote_code="no"), "trust_remote_code must be True or False, got 'no'"),
    (dict(compile=1), "compile must be True or False, got 1"),
])
def test_engine_flags_must_be_booleans(models, kwargs, match):
    """A flag given as "no" or "false" is truthy to Python: it used to switch compile / the static cache /
    chat templates / remote code on."""
    with pytest.raises(fastalign.InputError, match=match):
        fastalign.Engine(target=models["target"], **kwargs)


def test_decode_chat_flag_must_be_a_boolean(models):
    engine = fastalign.Engine(target=models["target"])
    with pytest.raises(fastalign.InputError, match="chat must be True or False or None, got 'no'"):
        engine.decode([[1, 2]], max_new_tokens=2, chat="no")
    with pytest.raises(fastalign.InputError, match="chat must be True or False or None, got 0"):
        fastalign.decode([[1, 2]], target=models["target"], max_new_tokens=2, chat=0)


@pytest.mark.parametrize("method, options, match", [
    ("sss", dict(bonus_on_full_accept=1), "sss option bonus_on_full_accept must be True or False, got 1"),
    ("sss", dict(allow_no_ref="false"), "sss option allow_no_ref must be True or False, got 'false'"),
    ("sss", dict(branching=3, tree="sampled"),
     r"sss option branching must be a tuple of integers such as \(2, 2\) or None, got 3"),
    ("sd", dict(branching=(2.5, 2), tree="sampled"), "sd option branching must be a tuple of integers"),
    ("sd", dict(branching=(True, 2), tree="sampled"), "sd option branching must be a tuple of integers"),
    ("sd", dict(branching="2,2", tree="sampled"), "sd option branching must be a tuple of integers"),
])
def test_bool_and_tuple_options_are_checked_by_type(models, method, options, match):
    """branching=3 used to raise a raw TypeError (``tuple(3)``) from inside the method."""
    kw = dict(target=models["target"], draft=models["draft"], ref=models["ref"])
    with pytest.raises(fastalign.InputError, match=match):
        fastalign.decode([[1, 2]], method=method, max_new_tokens=2, **kw, **options)


def test_branching_as_a_list_or_tuple_is_accepted(models):
    kw = dict(target=models["target"], draft=models["draft"], max_new_tokens=3, seed=2, tree="sampled")
    as_tuple = fastalign.decode([[1, 2]], method="sd", branching=(2, 2), **kw).sequences
    assert fastalign.decode([[1, 2]], method="sd", branching=[2, 2], **kw).sequences == as_tuple


def test_qalign_with_zero_steps_reports_no_acceptance_rate(models):
    """steps=0 (the initial samples only) is a valid baseline; its acceptance rate is 0/0: reported as None,
    not NaN (a NaN poisons any mean taken over runs)."""
    out = fastalign.decode([[1, 2], [3]], method="qalign", target=models["target"], reward=constant_reward([1.0]),
                           max_new_tokens=3, seed=0, steps=0)
    assert out.extra["acceptance_rate"] is None and out.extra["completed_steps"] == 0
    assert out.stats["qalign_proposals"] == 0
    assert [path[0][0]["proposal"] for path in out.extra["state_path"]] == out.sequences
    stepped = fastalign.decode([[1, 2]], method="qalign", target=models["target"], reward=constant_reward([1.0]),
                               max_new_tokens=3, seed=0, steps=2)
    assert 0.0 <= stepped.extra["acceptance_rate"] <= 1.0


# ---------------------------------------------------------------------------------- devices, models
def test_the_meta_device_is_refused(models):
    """device="meta" used to fail inside the first decode with "Tensor.item() cannot be called on meta
    tensors"."""
    with pytest.raises(fastalign.InputError, match="device 'meta' holds no data"):
        fastalign.Engine(target=models["target"], device="meta")


def test_a_model_that_is_not_a_model_is_named(models):
    with pytest.raises(fastalign.InputError, match="draft must be a model: .* got a int"):
        fastalign.Engine(target=models["target"], draft=5)
