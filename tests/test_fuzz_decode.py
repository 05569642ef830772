"""Property-based fuzzing of ``decode``'s arguments on the toy world (Hypothesis).

Every call either returns valid output (one token list per prompt, ids in the vocabulary, at most
``max_new_tokens`` tokens, nothing after an EOS) or raises ``InputError`` / ``ValueError``, within a time
bound. Any other exception (``TypeError``, ``IndexError``, a torch ``RuntimeError``), a hang or a malformed
output fails. The examples are derandomised, so the suite is reproducible; the option names come from each
method's signature, so new options are fuzzed too.
"""


import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fastalign  # noqa: E402
from fastalign.testing import within  # noqa: E402
from fastalign.eval.toyworld import load_toy_world  # noqa: E402
from fastalign.methods import METHODS, get_method  # noqa: E402

SECONDS_PER_CALL = 60  # a generous bound on the 2-core CI machine; calls take well under a second


@pytest.fixture(scope="module")
def engine():
    world = load_toy_world()
    return fastalign.Engine(target=world.target, draft=world.aligned_draft, ref=world.draft, reward=world.reward,
                            tokenizer=world.tokenizer)



def options_of(method: str) -> list[str]:
    return list(get_method(method).option_defaults())


small_ints = st.integers(-2, 5)
odd_numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([2.5, 0.0, -1.0, 1e-30, 1e30]),
                        st.just(2**70), st.booleans())
words = st.sampled_from(["auto", "soft", "hard", "greedy", "sampled", "topk", "exact", "paper", "last", "majority",
                         "best_reward", "mbr", "rouge1", "last_number", "nonsense", "", "nan", "1"])
values = st.one_of(st.none(), small_ints, st.floats(-3, 10), odd_numbers, words,
                   st.tuples(small_ints, small_ints), st.lists(small_ints, max_size=3))

token = st.integers(0, 40)  # the toy vocabulary has more than 40 words
bad_token = st.one_of(st.integers(-3, -1), st.integers(10**6, 10**7), st.floats(0, 5), st.text(max_size=2),
                      st.booleans(), st.none())
id_prompt = st.lists(token, min_size=1, max_size=6)
prompts = st.one_of(
    st.lists(st.sampled_from(["review :", "review : the pasta was", "the", "", "zzz unknown words"]),
             min_size=1, max_size=3),
    st.lists(id_prompt, min_size=1, max_size=3),
    st.lists(st.lists(st.one_of(token, bad_token), min_size=0, max_size=4), min_size=0, max_size=3),
    st.lists(st.one_of(id_prompt, st.text(max_size=8), st.none(), token), min_size=1, max_size=3),
    st.one_of(st.none(), st.text(max_size=8), id_prompt, st.integers(), st.just({"prompt": [1]})),
)


# plausible values of the options the methods have today (an option added later is fuzzed with ``values``)
GOOD_OPTIONS = {
    "n": st.integers(1, 4), "lam": st.floats(-2, 3), "k": st.integers(1, 5), "w": st.floats(-3, 3),
    "mode": st.sampled_from(["soft", "hard", "greedy", "sampled"]),
    "reward_threshold": st.one_of(st.just("auto"), st.floats(-5, 5)), "accept_beta": st.floats(0.1, 2),
    "max_rejections": st.integers(0, 3), "entropy_threshold": st.floats(0, 5), "alpha": st.floats(0, 1),
    "min_segment_tokens": st.integers(1, 4), "max_segment_tokens": st.integers(1, 8),
    "parallel_candidates": st.integers(1, 3), "num_draft_tokens": st.integers(1, 4),
    "tree": st.sampled_from([None, "sampled", "topk"]),
    "branching": st.lists(st.integers(1, 2), min_size=1, max_size=3).map(tuple),
    "variant": st.sampled_from(["exact", "paper"]), "max_log_ratio": st.one_of(st.none(), st.floats(0.1, 5)),
    "bonus_on_full_accept": st.booleans(), "allow_no_ref": st.booleans(), "beta": st.floats(0.1, 3),
    "steps": st.integers(0, 3), "chains": st.integers(1, 3),
    "select": st.sampled_from(["last", "majority", "weighted_majority", "best_reward", "mbr"]),
    "answer_fn": st.sampled_from([None, "last_number"]), "burn_in": st.integers(0, 2),
    "similarity": st.sampled_from(["rouge1", "answer"]),
}
GOOD_SAMPLING = dict(
    max_new_tokens=st.integers(1, 5),
    temperature=st.one_of(st.none(), st.floats(0.05, 3)),
    top_k=st.one_of(st.none(), st.integers(1, 50)),
    top_p=st.one_of(st.none(), st.floats(0.05, 1.0)),
    seed=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
)
ODD_SAMPLING = dict(
    max_new_tokens=st.one_of(st.integers(-1, 0), odd_numbers),
    temperature=st.one_of(odd_numbers, small_ints, words),
    top_k=st.one_of(small_ints, odd_numbers),
    top_p=odd_numbers,
    seed=st.one_of(st.integers(-5, -1), odd_numbers),
)
good_prompts = st.one_of(
    st.lists(st.sampled_from(["review :", "review : the pasta was", "the", "zzz unknown words"]), min_size=1,
             max_size=3),
    st.lists(id_prompt, min_size=1, max_size=3),
)


@st.composite
def calls(draw):
    """A plausible call with, half of the time, one argument (a prompt, a sampling setting or an option) odd."""
    method = draw(st.sampled_from(sorted(METHODS)))
    names = options_of(method)
    chosen = draw(st.lists(st.sampled_from(names), unique=True, max_size=3)) if names else []
    options = {name: draw(GOOD_OPTIONS.get(name, values)) for name in chosen}
    kwargs = {name: draw(strategy) for name, strategy in GOOD_SAMPLING.items()}
    call_prompts = draw(good_prompts)
    odd = draw(st.sampled_from(["none", "none", "none", "prompts", "sampling", "option", "unknown option",
                                "loading"]))
    if odd == "prompts":
        call_prompts = draw(prompts)
    elif odd == "sampling":
        name = draw(st.sampled_from(sorted(ODD_SAMPLING)))
        kwargs[name] = draw(ODD_SAMPLING[name])
    elif odd == "option" and names:
        options[draw(st.sampled_from(names))] = draw(values)
    elif odd == "unknown option":
        options["not_an_option"] = 1
    elif odd == "loading":  # Engine arguments, through fastalign.decode
        options["device"] = draw(st.sampled_from([None, "cpu", "nonsense", "cuda:7", 3, ""]))
        options["dtype"] = draw(st.sampled_from([None, "auto", "fp32", "float32", "fp17", 5, "int8"]))
    return method, call_prompts, kwargs, options


def is_valid(out, num_prompts: int, max_new_tokens: int, vocab_size: int, eos: set) -> bool:
    if len(out.sequences) != num_prompts:
        return False
    for seq in out.sequences:
        if not (1 <= len(seq) <= max_new_tokens) or not all(isinstance(t, int) and 0 <= t < vocab_size for t in seq):
            return False
        if any(t in eos for t in seq[:-1]):
            return False
    return out.texts is not None and len(out.texts) == num_prompts


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(call=calls())
def test_decode_returns_valid_output_or_a_value_error(engine, call):
    method, prompts, kwargs, options = call
    try:
        with within(SECONDS_PER_CALL):
            if "device" in options:
                models = dict(target=engine.target.model, draft=engine.draft.model, ref=engine.ref.model,
                              reward=engine.reward.lm.model, tokenizer=engine.tokenizer)
                out = fastalign.decode(prompts, method=method, **models, **kwargs, **options)
            else:
                out = engine.decode(prompts, method=method, **kwargs, **options)
    except ValueError:  # InputError included: bad input, named
        return
    assert is_valid(out, len(prompts), kwargs["max_new_tokens"], engine.target.vocab_size,
                    engine.target.eos_token_ids), (method, prompts, kwargs, options, out.sequences)
