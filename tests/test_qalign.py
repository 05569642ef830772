"""qalign: the chains' law against the exact MCMC law, state paths, caching, selection rules, remote backends."""

import math

import pytest
import torch

import fastalign
import fastalign.serve
from fastalign.methods.answers import after_answer, boxed, last_number, option_letter
from fastalign.methods.qalign import rouge1, select_state
from fastalign.models.reward import RewardModel
from fastalign.models.remote import RemoteError, RemoteLM, RemoteReward
from fastalign.testing import (
    serving,
    empirical_law,
    next_token_probs,
    qalign_exact_laws,
    tiny_causal_lm,
    tiny_reward_model,
    tiny_tokenizer,
    total_variation,
    tv_threshold,
)

V, EOS = 6, 5


@pytest.fixture(scope="module")
def model():
    return tiny_causal_lm(vocab_size=V, hidden=16, init_range=0.25)


def last_token_reward(y) -> float:
    """Rewards ending in token 1, penalises ending in 3 (the empty response, a prompt's own score, is 0)."""
    return 1.5 * (tuple(y[-1:]) == (1,)) - 1.0 * (tuple(y[-1:]) == (3,))


def reward_fn(prompts, responses):
    return torch.tensor([last_token_reward(y) for y in responses])


def exact_laws(model, prompt, max_new_tokens, beta, steps):
    """(p, target, law after ``steps`` steps) of the QAlign chain, from its exact transition matrix."""
    return qalign_exact_laws(lambda prefix: next_token_probs(model, list(prompt) + list(prefix)), prompt,
                             max_new_tokens, {EOS}, last_token_reward, beta, steps)


def check_response(y, max_new_tokens):
    assert 1 <= len(y) <= max_new_tokens and EOS not in y[:-1]
    assert y[-1] == EOS or len(y) == max_new_tokens


def replay(path, max_new_tokens, beta):
    """Check one chain's state path step by step; returns its final state."""
    first = path[0]
    assert first["step"] == 0 and first["index"] is None and first["accepted"]
    current, reward = first["proposal"], first["reward"]
    check_response(current, max_new_tokens)
    for t, entry in enumerate(path[1:], 1):
        i, y = entry["index"], entry["proposal"]
        assert entry["step"] == t and 0 <= i < len(current) and y[:i] == current[:i] and len(y) > i
        check_response(y, max_new_tokens)
        log_ratio = (entry["reward"] - reward) / beta + math.log(len(current) / len(y))
        assert entry["accept_prob"] == pytest.approx(min(1.0, math.exp(max(-20, min(20, log_ratio)))), rel=1e-6)
        assert entry["accepted"] or entry["accept_prob"] < 1
        if entry["accepted"]:
            current, reward = y, entry["reward"]
    return current


# ------------------------------------------------------------------------------------------ laws
@pytest.mark.usefixtures("both_layers")
def test_chains_follow_the_reward_tilted_law_in_a_mixed_batch(model):
    prompts, copies, chains, steps = [[1, 2], [3, 1, 4]], 750, 4, 12
    out = fastalign.decode(prompts * copies, method="qalign", target=model, reward=reward_fn, max_new_tokens=2,
                           steps=steps, chains=chains, seed=0)
    finals = out.extra["final_states"]
    for k, prompt in enumerate(prompts):
        p, target, after = exact_laws(model, prompt, 2, 1.0, steps)
        seen = empirical_law([y for b in range(k, len(finals), len(prompts)) for y in finals[b]])
        assert total_variation(seen, after) < tv_threshold(after, copies * chains)  # 3000 chains per prompt
        assert total_variation(after, target) < 0.01  # 12 steps mix this chain (exactly computed)
        assert total_variation(seen, p) > 0.15 and total_variation(target, p) > 0.2  # p fails clearly
    assert 0.3 < out.extra["acceptance_rate"] < 1


def test_single_token_responses_always_regenerate_from_the_prompt(model):
    prompt, copies, steps = [2, 3], 1500, 12
    out = fastalign.decode([prompt] * copies, method="qalign", target=model, reward=reward_fn, max_new_tokens=1,
                           steps=steps, seed=1)
    for path in out.extra["state_path"]:
        assert all(len(e["proposal"]) == 1 for e in path[0]) and all(e["index"] == 0 for e in path[0][1:])
    p, target, after = exact_laws(model, prompt, 1, 1.0, steps)
    seen = empirical_law(out.sequences)
    assert total_variation(seen, after) < tv_threshold(after, copies) and total_variation(after, target) < 0.02
    assert total_variation(seen, p) > 0.15
    assert out.stats["qalign_refed_tokens"] == 0  # an i = 0 proposal starts from the kept prompt logits


# ------------------------------------------------------------------------- state path and caching
@pytest.mark.usefixtures("both_layers")
def test_state_path_replays_and_the_caches_process_each_prompt_once(model):
    rm = tiny_reward_model(vocab_size=V, hidden=16)
    prompts, chains, steps, beta = [[1, 2, 3, 4], [2], [4, 4, 1]], 3, 10, 0.5
    out = fastalign.decode(prompts, method="qalign", target=model, reward=rm, max_new_tokens=3, steps=steps,
                           chains=chains, beta=beta, seed=4)
    path = out.extra["state_path"]
    assert len(path) == 3 and all(len(p) == chains and all(len(c) == steps + 1 for c in p) for p in path)
    full = RewardModel(rm)
    entries = [(b, e) for b, p in enumerate(path) for c in p for e in c]
    scored = full.score([prompts[b] for b, _ in entries], [e["proposal"] for _, e in entries])
    assert torch.allclose(scored, torch.tensor([e["reward"] for _, e in entries]), atol=1e-5)  # prefix cache
    for b, p in enumerate(path):
        for c, chain in enumerate(p):
            final = replay(chain, 3, beta)
            assert out.extra["final_states"][b][c] == final
            assert out.extra["final_rewards"][b, c] == pytest.approx(
                next(e["reward"] for e in reversed(chain) if e["accepted"]))
        assert out.sequences[b] == out.extra["final_states"][b][0]  # select="last"
    # target: each prompt once, then only sampled tokens (the last one of a response is never fed) and
    # the tokens re-fed to restore y[:i] after a proposal
    sampled = sum(len(e["proposal"]) - (e["index"] or 0) - 1 for _, e in entries)
    stats = out.stats
    assert stats["target_tokens"] == sum(map(len, prompts)) + sampled + stats["qalign_refed_tokens"]
    proposals_from_later = sum(e["index"] > 0 for _, e in entries if e["index"] is not None)
    assert proposals_from_later <= stats["qalign_refed_tokens"] < sum((e["index"] or 0) for _, e in entries)
    # reward: each prompt once, then the whole responses
    assert stats["reward_tokens"] == sum(map(len, prompts)) + sum(len(e["proposal"]) for _, e in entries)
    assert stats["qalign_proposals"] == 9 * steps
    assert stats["qalign_accepted"] == sum(e["accepted"] for _, e in entries if e["index"] is not None)


def test_chains_one_and_seeds(model):
    kwargs = dict(method="qalign", target=model, reward=reward_fn, max_new_tokens=3, steps=5)
    a = fastalign.decode([[1, 2], [3]], seed=9, **kwargs)
    b = fastalign.decode([[1, 2], [3]], seed=9, **kwargs)
    assert a.sequences == b.sequences and a.extra["state_path"] == b.extra["state_path"]
    assert a.sequences == [a.extra["final_states"][0][0], a.extra["final_states"][1][0]]
    zero = fastalign.decode([[1, 2]], seed=9, **{**kwargs, "steps": 0})
    assert len(zero.extra["state_path"][0][0]) == 1 and zero.sequences[0] == zero.extra["state_path"][0][0][0]["proposal"]
    # no step: no proposal, and the counters are there (at 0) as after any step
    counters = ("qalign_proposals", "qalign_accepted", "qalign_refed_tokens")
    assert [zero.stats.get(k) for k in counters] == [0, 0, 0]


# ------------------------------------------------------------------------------------ selection
def entry(step, index, proposal, reward, accepted):
    return {"step": step, "index": index, "proposal": proposal, "reward": reward, "accepted": accepted,
            "accept_prob": 1.0}


CHAINS = [
    [entry(0, None, [1, 5], 0.0, True), entry(1, 0, [2, 5], 1.0, True), entry(2, 0, [3, 5], 9.0, False)],
    [entry(0, None, [2, 5], 1.0, True), entry(1, 0, [4, 5], 3.0, True), entry(2, 0, [2, 0], 1.0, True)],
]


def first_token(tokens):
    return tokens[0]


def test_selection_rules():
    # visited: chain 0: [1,5] [2,5] [2,5] (the rejected [3,5] is never visited); chain 1: [2,5] [4,5] [2,0]
    assert select_state(CHAINS, "last") == [2, 5]
    assert select_state(CHAINS, "best_reward") == [4, 5]
    assert select_state(CHAINS, "majority", first_token) == [2, 0]  # answer 2 (4 votes), latest such state
    assert select_state(CHAINS, "weighted_majority", first_token, beta=1.0) == [4, 5]  # e^3 > 4 e^1
    assert select_state(CHAINS, "weighted_majority", first_token, beta=10.0) == [2, 0]
    assert select_state(CHAINS, "majority", first_token, burn_in=2) == [2, 0]
    assert select_state(CHAINS, "majority", lambda t: None if t[0] == 2 else t[0]) == [1, 5]  # ties: first reached
    assert select_state(CHAINS, "majority", lambda t: None) == [2, 0]  # no answer anywhere: all vote
    assert select_state(CHAINS, "mbr") == [2, 5]  # rouge1: shares tokens with most of the pool
    assert select_state(CHAINS, "mbr", first_token, similarity="answer") == [2, 5]
    assert select_state(CHAINS, "mbr", similarity=lambda a, b: float(a == [1, 5])) == [1, 5]
    assert rouge1([1, 2, 2], [2, 2, 3]) == pytest.approx(2 * 2 / 6) and rouge1([1], [2]) == 0.0


def test_answer_extractors():
    assert last_number("3 apples and 1,250.5 pears, so 1,234") == "1234"
    assert last_number("it is -7.") == "-7" and last_number("none") is None
    # every separator of a long number goes, not every other one; a comma before 2 or 4 digits separates
    assert last_number("1,234,567") == "1234567" and last_number("so 12,000,000.") == "12000000"
    assert last_number("1,2345") == "2345" and last_number("pick 3,45") == "45"
    assert after_answer("The answer is 1,234,567.") == "1234567" and after_answer("answer: 12") == "12"
    assert boxed(r"so \boxed{\frac{1}{2}} and \boxed{x + 1}") == "x+1"
    assert boxed(r"\boxed{\frac{a}{b}}") == r"\frac{a}{b}" and boxed(r"\boxed{unclosed") is None
    assert option_letter("Between (B) and C, the answer is (D).") == "D" and option_letter("I think so") is None


def test_voting_through_decode_with_a_text_extractor(model):
    tok = tiny_tokenizer(V)
    out = fastalign.decode(["w1 w2", "w3"], method="qalign", target=model, reward=reward_fn, tokenizer=tok,
                           max_new_tokens=3, steps=6, chains=3, select="majority", answer_fn="last_number", seed=5)
    for b, chains in enumerate(out.extra["state_path"]):
        visited = []
        for chain in chains:
            current = None
            for e in chain:
                current = e["proposal"] if e["accepted"] else current
                visited.append(current)
        answers = [last_number(tok.decode(y, skip_special_tokens=True)) for y in visited]
        counts = {a: answers.count(a) for a in answers if a is not None}
        assert counts[last_number(out.texts[b])] == max(counts.values())
        assert out.sequences[b] in visited


def test_bad_options(model):
    call = dict(method="qalign", target=model, reward=reward_fn, max_new_tokens=2)
    for options, message in [({"beta": 0}, "beta"), ({"steps": -1}, "steps"), ({"chains": 0}, "chains"),
                             ({"select": "best"}, "select"), ({"select": "majority"}, "answer_fn"),
                             ({"select": "majority", "answer_fn": "last_number"}, "tokenizer"),
                             ({"select": "majority", "answer_fn": "roman"}, "answer_fn"),
                             ({"steps": 2, "burn_in": 3}, "burn_in"), ({"similarity": "bleu"}, "similarity")]:
        with pytest.raises(fastalign.InputError, match=message):
            fastalign.decode([[1]], **call, **options)


# -------------------------------------------------------------------------------------- remote
@pytest.fixture(scope="module")
def server(model):
    with serving(model, reward_fn) as url:
        yield url


def test_remote_single_chain_draws_what_local_draws(model, server, monkeypatch):
    """From the same request seeds a remote chain draws the tokens of a local one. (A local decode seeds its
    rounds with 64 bits, a remote one in vLLM's 31-bit range: here the local proposer takes the request seeds
    and, as the server does with a request's seed, samples with ``Randomness(seed)``.)"""
    from fastalign.kernels.rng import prompt_seed
    from fastalign.methods import qalign

    def request_seeds(ctx, rows, subs):
        return [prompt_seed(s, 0) for s in qalign.RemoteProposer.seeds(ctx, rows, subs)]

    kwargs = dict(method="qalign", max_new_tokens=3, steps=8, beta=0.7, seed=11)
    with monkeypatch.context() as patch:
        patch.setattr(qalign.CachedProposer, "seeds", staticmethod(request_seeds))
        local = fastalign.decode([[1, 2]], target=model, reward=reward_fn, **kwargs)
    lm = RemoteLM(server)
    remote = fastalign.decode([[1, 2]], target=lm, reward=RemoteReward(server), **kwargs)
    assert remote.extra["state_path"] == local.extra["state_path"] and remote.sequences == local.sequences
    assert lm.eos_token_ids == {EOS} and remote.stats["target_calls"] == 9  # one request per proposal


def test_remote_batch_of_chains_is_valid_and_reproducible(model, server):
    kwargs = dict(method="qalign", target=RemoteLM(server, max_concurrency=4), reward=RemoteReward(server),
                  max_new_tokens=3, steps=4, chains=3, seed=12)
    a = fastalign.decode([[1, 2], [3, 1, 4]], **kwargs)
    b = fastalign.decode([[1, 2], [3, 1, 4]], **kwargs)
    assert a.extra["state_path"] == b.extra["state_path"]
    for b_, chains in enumerate(a.extra["state_path"]):
        for c, chain in enumerate(chains):
            assert replay(chain, 3, 1.0) == a.extra["final_states"][b_][c]
            assert all(e["reward"] == last_token_reward(e["proposal"]) for e in chain)


def test_remote_chains_follow_the_law(model, server):
    prompt, copies, steps = [2, 3], 400, 4
    out = fastalign.decode([prompt] * copies, method="qalign", target=RemoteLM(server), reward=RemoteReward(server),
                           max_new_tokens=1, steps=steps, seed=2)
    p, target, after = exact_laws(model, prompt, 1, 1.0, steps)
    seen = empirical_law(out.sequences)
    assert total_variation(seen, after) < 0.1 and total_variation(seen, p) > 0.15


def test_remote_errors(model, server):
    for method in ("cards", "sd", "args"):
        with pytest.raises(fastalign.InputError, match="per-token logits, so a local target"):
            fastalign.decode([[1]], method=method, target=RemoteLM(server), draft=model, reward=reward_fn)
    with pytest.raises(fastalign.InputError, match="prompt 0 has 200 tokens.*context length of 'fastalign'"):
        RemoteLM(server).complete([[1] * 200], [2])
    with pytest.raises(RemoteError, match="lists no model"):
        RemoteLM(server, model="other")
    with pytest.raises(RemoteError, match="cannot reach"):
        RemoteReward("http://127.0.0.1:9", timeout=5)([[1]], [[2]])


def test_local_rounds_never_share_a_seed(model, monkeypatch):
    """Every generation round of every local chain gets its own 64-bit seed (docs/design.md 1.4: distinct
    streams never reuse each other's noise). At 1000 prompts x 4 chains x 33 rounds, 31-bit request seeds
    collide (rounds of different chains drew identical noise); the local seeds do not."""
    from types import SimpleNamespace

    from fastalign.methods import qalign
    from fastalign.methods.base import Randomness

    seen = []
    round_context = qalign._round

    def spy(ctx, seeds):
        seen.extend(seeds)
        return round_context(ctx, seeds)

    monkeypatch.setattr(qalign, "_round", spy)
    fastalign.decode([[1, 2], [3]], method="qalign", target=model, reward=reward_fn, max_new_tokens=3, steps=3,
                     chains=2, seed=4)
    assert len(seen) == 2 * 2 * 4 and len(set(seen)) == len(seen)
    assert max(seen) >= 2**32  # the seeds use all 64 bits

    prompts, chains, rounds = 1000, 4, 33
    rows = [b for b in range(prompts) for _ in range(chains)]
    subs = [c for _ in range(prompts) for c in range(chains)]
    local = SimpleNamespace(rng=Randomness(0, prompts))
    remote = SimpleNamespace(rng=Randomness(0, prompts))
    local_seeds, request_seeds = [], []
    for _ in range(rounds):
        local_seeds += qalign.CachedProposer.seeds(local, rows, subs)
        request_seeds += qalign.RemoteProposer.seeds(remote, rows, subs)
    assert len(set(request_seeds)) < len(request_seeds)  # 31 bits: this scale collides
    assert len(set(local_seeds)) == len(local_seeds) == prompts * chains * rounds
