"""``sd`` and ``sss`` (chain and tree) against exact, enumerated laws; caps, EOS, stats and errors.

Models: a tiny target ``p``; the aligned draft ``q_r`` = the target with perturbed weights (so it accepts
often but not always); the reference ``q`` = the draft perturbed further, so that ``pi = p * q_r / q``
(normalised) is far from ``p`` and a method sampling ``p`` instead of ``pi`` fails clearly.
"""

import copy
import functools

import pytest
import torch

import fastalign
from fastalign.kernels import spec_verify_torch
from fastalign.kernels._verify_math import RATIO_INF
from fastalign.testing import (empirical_law, enumerate_law, next_token_probs, perturbed, tilted_next_probs,
                               tiny_causal_lm, total_variation, tv_threshold)

V, EOS = 5, 4
PROMPT = [1, 2]
DRAWS = 4000



@pytest.fixture(scope="module")
def models():
    target = tiny_causal_lm(vocab_size=V, hidden=16, layers=1, init_range=0.8, seed=0)
    draft = perturbed(target, 0.05, 1)
    ref = perturbed(draft, 0.3, 2)
    return target, draft, ref


def p_law(model, prompt, M, temperature=1.0, top_k=None, top_p=None):
    return enumerate_law(lambda y: next_token_probs(model, y, temperature, top_k, top_p), prompt, M, {EOS})


def pi_law(models, prompt, M, temperature=1.0, top_k=None, top_p=None, lam=1.0, max_log_ratio=None):
    """The product of per-token ``trunc(pi)``, pi tilted from the untruncated distributions (docs/design.md 1)."""
    return enumerate_law(lambda y: tilted_next_probs(*models, y, temperature, top_k, top_p, lam, max_log_ratio,
                                                     RATIO_INF), prompt, M, {EOS})


def decode(models, method, n=DRAWS, prompts=(PROMPT,), seed=0, **kw):
    target, draft, ref = models
    if method == "sss":
        kw.setdefault("ref", ref)
    return fastalign.decode([list(p) for p in prompts] * n, method=method, target=target, draft=draft,
                            seed=seed, **kw)


def assert_follows(sequences, exact, *wrong):
    """TV(samples, exact) within the noise of the sample size (99.5th percentile), and every wrong law far."""
    threshold = tv_threshold(exact, len(sequences))
    tv = total_variation(empirical_law(sequences), exact)
    assert tv < threshold, (tv, threshold)
    for law in wrong:
        assert total_variation(exact, law) > 3 * threshold
    return tv, threshold


# ---------------------------------------------------------------------------------------------- exact laws
@pytest.mark.usefixtures("both_layers")
@pytest.mark.parametrize("K, M, sampling", [(1, 3, {}), (3, 4, dict(temperature=0.7, top_k=3))])
def test_sd_chain_follows_the_target(models, K, M, sampling, monkeypatch):
    kept = kept_acceptances(monkeypatch)
    out = decode(models, "sd", num_draft_tokens=K, max_new_tokens=M, **sampling)
    assert_follows(out.sequences, p_law(models[0], PROMPT, M, **sampling), p_law(models[1], PROMPT, M, **sampling))
    # multi-token acceptances are exercised: rounds that keep min(K, 2) accepted draft tokens (67% of rounds at
    # K=1, 10% at K=3: most responses end at an EOS within two tokens)
    assert sum(k >= min(K, 2) for k in kept) > 0.05 * len(kept)


def kept_acceptances(monkeypatch) -> list[int]:
    """Per row and round of the next decode, the accepted draft tokens that reach the output."""
    from fastalign.methods import speculative

    kept, append = [], speculative._append

    def spy_append(ctx, out, rows, emitted, accepted, left, betas=None):
        before = [len(out[r]) for r in rows]
        result = append(ctx, out, rows, emitted, accepted, left, betas)
        kept.extend(min(a, len(out[r]) - b) for r, b, a in zip(rows, before, accepted.tolist()))
        return result

    monkeypatch.setattr(speculative, "_append", spy_append)
    return kept


SSS_SAMPLING = [
    (1, 3, {}),
    (3, 4, dict(temperature=1.3)),
    (2, 3, dict(temperature=0.8, top_k=3, lam=0.7)),
    (2, 3, dict(temperature=1.5, top_p=0.9, lam=0.5, max_log_ratio=2.0)),
]


@pytest.mark.usefixtures("both_layers")
@pytest.mark.parametrize("K, M, sampling", SSS_SAMPLING)
def test_sss_exact_chain_follows_pi(models, K, M, sampling):
    out = decode(models, "sss", num_draft_tokens=K, max_new_tokens=M, **sampling)
    truncation = {k: sampling[k] for k in ("temperature", "top_k", "top_p") if k in sampling}
    exact = pi_law(models, PROMPT, M, **truncation, lam=sampling.get("lam", 1.0),
                   max_log_ratio=sampling.get("max_log_ratio"))
    assert_follows(out.sequences, exact, p_law(models[0], PROMPT, M, **truncation))


@pytest.mark.parametrize("wrong", ["tilt_truncated", "bonus_from_p", "residual_from_p"])
def test_sss_method_law_rejects_wrong_rules(models, monkeypatch, wrong):
    """The method-level law check fails with a plausible wrong verifier (the reference with ``_wrong``)."""
    from fastalign.methods import speculative

    monkeypatch.setattr(speculative, "spec_verify", functools.partial(spec_verify_torch, _wrong=wrong))
    out = decode(models, "sss", num_draft_tokens=2, max_new_tokens=3, temperature=0.8, top_k=3, lam=0.7)
    exact = pi_law(models, PROMPT, 3, 0.8, 3, None, lam=0.7)
    tv, threshold = total_variation(empirical_law(out.sequences), exact), tv_threshold(exact, DRAWS)
    assert tv > threshold, (wrong, tv, threshold)


@pytest.mark.usefixtures("both_layers")
@pytest.mark.parametrize("method", ["sd", "sss"])
@pytest.mark.parametrize("tree, sampling", [("sampled", dict(temperature=0.8, top_k=3)),
                                            ("topk", dict(temperature=1.3, top_p=0.95))])
def test_tree_follows_the_exact_law(models, method, tree, sampling):
    M = 3
    out = decode(models, method, tree=tree, branching=(2, 2), max_new_tokens=M, **sampling)
    p, pi = p_law(models[0], PROMPT, M, **sampling), pi_law(models, PROMPT, M, **sampling)
    assert_follows(out.sequences, *((p, pi) if method == "sd" else (pi, p)))
    assert len(pi) > 4 and len(p) > 4  # neither law is (nearly) a point mass


@pytest.mark.usefixtures("both_layers")
def test_a_batch_of_different_prompts_gives_each_its_own_law(models):
    prompts = [[1, 2], [3], [2, 0, 1, 3]]  # ragged: left padding in every cache
    out = decode(models, "sss", n=2000, prompts=prompts, num_draft_tokens=2, max_new_tokens=3)
    for i, prompt in enumerate(prompts):
        assert_follows(out.sequences[i::3], pi_law(models, prompt, 3))


def test_lam_zero_and_no_ref_follow_the_target_law(models):
    """sss degrades to SD with the aligned draft without a ref or with lam = 0: both follow trunc(p) (not pi), and
    lam = 0 never runs the ref."""
    M, sampling = 3, dict(temperature=0.9, top_k=4)
    p, pi = p_law(models[0], PROMPT, M, **sampling), pi_law(models, PROMPT, M, **sampling)
    lam0 = decode(models, "sss", lam=0.0, num_draft_tokens=2, max_new_tokens=M, **sampling)
    assert_follows(lam0.sequences, p, pi)
    assert lam0.stats["ref_calls"] == 0
    target, draft, _ = models
    no_ref = fastalign.decode([PROMPT] * DRAWS, method="sss", target=target, draft=draft, num_draft_tokens=2,
                              max_new_tokens=M, seed=1, allow_no_ref=True, **sampling)
    assert_follows(no_ref.sequences, p, pi)


@pytest.mark.parametrize("draft_kind", ["perturbed target", "independent"])
def test_paper_variant_distance_from_pi(models, draft_kind):
    """The published rule does not sample pi; the gaps measured here are quoted in the module docstring."""
    if draft_kind == "independent":  # a draft far from the target (per-token TV 0.72 instead of 0.11)
        draft = tiny_causal_lm(vocab_size=V, hidden=16, layers=1, init_range=0.8, seed=1)
        models = (models[0], draft, perturbed(draft, 0.3, 2))
    M = 3
    exact = pi_law(models, PROMPT, M)
    gaps = {}
    for bonus in (True, False):
        out = decode(models, "sss", variant="paper", bonus_on_full_accept=bonus, num_draft_tokens=2,
                     max_new_tokens=M)
        gaps[bonus] = total_variation(empirical_law(out.sequences), exact)
    print(f"{draft_kind}: TV(paper, pi) with bonus {gaps[True]:.3f}, without {gaps[False]:.3f}")
    assert min(gaps.values()) > 3 * tv_threshold(exact, DRAWS)


# ------------------------------------------------------------------------------------------------ mechanics
def without_eos(model):
    model = copy.deepcopy(model)
    model.config.eos_token_id = None
    model.generation_config.eos_token_id = None
    return model


def test_stats_with_a_draft_equal_to_the_target(models):
    target = without_eos(models[0])
    out = fastalign.decode([[1, 2], [3]], method="sd", target=target, draft=copy.deepcopy(target),
                           num_draft_tokens=3, max_new_tokens=9, seed=0)
    st = out.stats
    assert [len(s) for s in out.sequences] == [9, 9]
    # rounds emit 4 + 4 + 1 tokens; the last one may verify no draft token (only 1 token left)
    assert st["rounds"] == 3 and st["target_calls"] == 1 + 3
    assert st["draft_tokens_proposed"] == st["draft_tokens_accepted"] == 2 * 6
    assert st["acceptance_rate"] == 1.0 and st["accepted_per_target_call"] == 2.0
    assert st["generated_tokens"] == 18
    # draft: prefill, 2 steps, tail + 2 steps, tail; the target never sees a token twice, nor a token past a
    # row's own draft length (the last round verifies no draft token)
    assert st["draft_calls"] == 1 + 2 + 3 + 1
    assert st["target_tokens"] == 3 + 2 * (3 + (1 + 3) + (1 + 0))  # the last round feeds no dead draft token


def test_accepted_draft_tokens_after_an_eos_are_not_counted(models):
    """With a draft equal to the target every draft token is accepted and a round of K=3 emits 4 tokens; a row
    that ends at an EOS drafted in its last round keeps only the tokens up to it, and only those count as
    accepted (the verifier accepted the rest too, but they save nothing)."""
    target = models[0]
    out = fastalign.decode([[1, 2], [3], [4, 4, 0]] * 10, method="sd", target=target, draft=copy.deepcopy(target),
                           num_draft_tokens=3, max_new_tokens=40, seed=0)
    lengths = [len(s) for s in out.sequences]
    assert any(n % 4 in (1, 2) for n in lengths)  # some row ended at a drafted EOS, with drafts after it
    st = out.stats
    assert st["draft_tokens_proposed"] == sum(3 * -(-n // 4) for n in lengths)
    assert st["draft_tokens_accepted"] == sum(3 * (n // 4) + min(n % 4, 3) for n in lengths)
    assert st["acceptance_rate"] == st["draft_tokens_accepted"] / st["draft_tokens_proposed"] < 1


@pytest.mark.parametrize("num_draft_tokens", [2, 4, 8])
def test_a_tree_is_as_deep_as_its_branching(models, num_draft_tokens):
    """``num_draft_tokens`` is K of a chain: a tree of depth 6 drafts 6 levels whatever it is (4 by default).
    With a draft equal to the target every node is accepted: 14 tokens in rounds of 6 + 1."""
    target = without_eos(models[0])
    out = fastalign.decode([[1, 2]], method="sd", target=target, draft=copy.deepcopy(target), tree="sampled",
                           branching=(1,) * 6, num_draft_tokens=num_draft_tokens, max_new_tokens=14, seed=0)
    assert len(out.sequences[0]) == 14
    assert out.stats["rounds"] == 2 and out.stats["draft_tokens_accepted"] == 6 + 6


@pytest.mark.parametrize("options", [
    dict(method="sd", num_draft_tokens=3),
    dict(method="sss", num_draft_tokens=2, variant="paper", bonus_on_full_accept=False),
    dict(method="sss", tree="sampled", branching=(2, 1, 1)),
    dict(method="sd", tree="topk", branching=(3,)),
])
@pytest.mark.usefixtures("both_layers")
def test_max_new_tokens_and_eos(models, options):
    target, draft, ref = models
    M = 6
    out = fastalign.decode([[1, 2], [3], [4, 4, 0]] * 20, target=target, draft=draft, ref=ref,
                           max_new_tokens=M, seed=3, **options)
    assert any(len(s) < M for s in out.sequences) and any(len(s) == M for s in out.sequences)
    for s in out.sequences:
        assert 1 <= len(s) <= M and EOS not in s[:-1]
        assert len(s) == M or s[-1] == EOS
    st = out.stats
    assert st["generated_tokens"] == sum(map(len, out.sequences))
    assert 0 < st["draft_tokens_accepted"] <= st["draft_tokens_proposed"]
    assert st["acceptance_rate"] == st["draft_tokens_accepted"] / st["draft_tokens_proposed"]


def test_clear_errors(models):
    target, draft, ref = models
    with pytest.raises(fastalign.InputError, match="needs a draft"):
        fastalign.decode([[1]], method="sd", target=target)
    with pytest.raises(fastalign.InputError, match="needs a draft"):
        fastalign.decode([[1]], method="sss", target=target, ref=ref)
    kw = dict(target=target, draft=draft, ref=ref, max_new_tokens=2)
    for bad, match in [
        (dict(variant="nope"), "variant"),
        (dict(tree="beam"), "tree"),
        (dict(branching=(2, 2)), "branching"),
        (dict(tree="sampled", branching=(2, 0)), "branching"),
        (dict(tree="topk", branching=(V + 1,)), "vocabulary"),
        (dict(num_draft_tokens=0), "num_draft_tokens"),
        (dict(max_log_ratio=0.0), "max_log_ratio"),
    ]:
        with pytest.raises(ValueError, match=match):
            fastalign.decode([[1]], method="sss", **kw, **bad)


# ------------------------------------------------------------------------------------ adaptive draft length
# "auto:0.25" (a draft call costs a quarter of a target call) with the prior (alpha 0.5): K starts at 1 and
# moves with each row's acceptances (0 after rejections, 2 after acceptances), so a batch mixes K = 0, 1, 2.
@pytest.mark.usefixtures("both_layers")
@pytest.mark.parametrize("method, K, M, sampling", [
    ("sd", "auto", 5, dict(temperature=0.7, top_k=3)),
    ("sd", (3, 0, 1, 0, 0, 2), 5, dict(temperature=1.3, top_k=3)),  # forced: K changes, 0 = the target alone
    ("sss", "auto", 4, dict(temperature=0.8, top_k=3, lam=0.7)),
    ("sss", (1, 3, 2), 4, dict(temperature=1.3, top_k=4)),
])
def test_adaptive_length_keeps_the_law(models, method, K, M, sampling):
    out = decode(models, method, num_draft_tokens="auto:0.25" if K == "auto" else K, max_new_tokens=M, **sampling)
    print(method, K, {k: v for k, v in out.stats.items() if "draft" in k or "k0" in k or k == "rounds"})
    sampling = dict(sampling)
    lam = sampling.pop("lam", 1.0)
    p = p_law(models[0], PROMPT, M, **sampling)
    if method == "sd":
        assert_follows(out.sequences, p, p_law(models[1], PROMPT, M, **sampling))
    else:
        assert_follows(out.sequences, pi_law(models, PROMPT, M, lam=lam, **sampling), p)
    st = out.stats
    assert 0 < st["mean_draft_tokens"] and st["draft_tokens_accepted"] > 0
    if method == "sd":
        assert st["row_rounds_k0"] > 0  # rounds at K=0 are exercised
    else:
        assert st["rounds_without_draft"] == 0
    if K == "auto":
        assert st["draft_cost"] == 0.25 and st["target_costs"] == [1.0]  # "auto:C": every target call costs 1
    else:
        assert st["rounds_without_draft"] == (2 if method == "sd" else 0)  # rounds 1 and 3 (4 is EOS-only)


def test_adaptive_length_follows_the_cost_model():
    """K maximises expected tokens per unit of time: none when a draft call costs a target call, longer chains
    as the acceptance grows and when a round has a fixed price; sss never goes below 1; a row's first round
    drafts; a row stuck at 0 probes at growing gaps, with the K it would draft."""
    from fastalign.methods.speculative import MAX_AUTO, AdaptiveLength, RoundCosts, expected_tokens

    # E[sum_{i<=k} alpha^i] over Beta(a, r): uniform 1/(i + 1); a point mass (large counts) the geometric sum
    assert expected_tokens(1, 1, 2) == pytest.approx(1 + 1 / 2 + 1 / 3) and expected_tokens(5, 0, 3) == 4.0
    assert expected_tokens(5e4, 5e4, 2) == pytest.approx(1.75, abs=1e-4)
    # a round's cost: the target at K + 1 tokens (the widest measured beyond them), K draft calls and the extra ones
    two_widths = RoundCosts(0.2, (1.0, 1.5))
    assert [two_widths.chain_round(k) for k in (0, 1, 3)] == pytest.approx([1.0, 1.7, 2.1])
    assert two_widths.chain_round(2, extra_draft_calls=2) == pytest.approx(2.3)
    counts = [(1, 20), (3, 7), (6, 4), (8, 2), (60, 3)]  # acceptance growing
    free = AdaptiveLength(1, RoundCosts(1.0), floor=0)
    assert [free.best(a, r) for a, r in counts] == [0] * 5  # (k + 1) / (1 + k) <= 1
    cheap = AdaptiveLength(1, RoundCosts(0.1), floor=0)
    ks = [cheap.best(a, r) for a, r in counts]
    assert ks == sorted(ks) and ks[0] == 0 and ks[-1] == MAX_AUTO
    assert AdaptiveLength(1, RoundCosts(5.0), floor=1, ref_calls=1, bonus_draft_call=1).best(1, 50) == 1
    # a target call of 2 or more tokens at 1.7 one-token calls (bench_engine's 82M model at batch 1): a round has
    # a fixed price, so a row that drafts drafts longer, and a weak row stops sooner
    priced = AdaptiveLength(1, RoundCosts(0.2, (1.0, 1.7, 1.75, 1.8, 1.85, 1.9, 1.95, 2.0, 2.05)), floor=0)
    flat = AdaptiveLength(1, RoundCosts(0.2), floor=0)
    assert priced.best(8, 2) > flat.best(8, 2) > 0
    assert priced.best(3, 3) == 0 < flat.best(3, 3)
    assert priced.best(1, 1) == 0 and priced.choose([0]) == [priced.best(1, 1, floor=1)] and priced.choose([0])[0] > 1
    row = AdaptiveLength(1, RoundCosts(0.5), floor=0)
    row.rejected[0] = 50.0  # a row that rejects: K=0 after its first round, but drafting could pay, so it probes
    chosen = []
    for _ in range(17):
        chosen += row.choose([0])
        row.update([0], [[0.0] * chosen[-1]])  # every drafted position rejected for sure
    assert [i for i, k in enumerate(chosen) if k] == [0, 5, 14]  # the first round, after 4 rounds at 0, after 8
    weak = AdaptiveLength(1, priced.costs, floor=0)  # at 0 (priced.best(3, 3) == 0) after 4 rounds there
    weak.accepted[0], weak.rejected[0], weak.rounds[0], weak.idle[0] = 3.0, 3.0, 5, 4
    assert weak.choose([0]) == [weak.best(3, 3, floor=1)] and weak.best(3, 3, floor=1) > 1  # a longer probe


def test_adaptive_length_learns_from_acceptance_probabilities():
    """A row's estimate follows the acceptance probabilities of the positions it drafted, the recent ones
    weighing most (MEMORY): easy positions take it to long chains, a few hard ones down to K=0, and a probe of
    easy positions back up; the prior's weight fades."""
    from fastalign.methods.speculative import MAX_AUTO, MEMORY, PRIOR, AdaptiveLength, RoundCosts

    costs = RoundCosts(0.2, (1.0, 1.7, 1.75, 1.8, 1.85, 1.9, 1.95, 2.0, 2.05))
    row = AdaptiveLength(1, costs, floor=0)
    row.update([0], [[0.95] * 8])
    assert row.accepted[0] == pytest.approx(PRIOR[0] * MEMORY ** 8 + 0.95 * sum(MEMORY ** i for i in range(8)))
    assert row.choose([0]) == [MAX_AUTO]
    capped = AdaptiveLength(1, costs, floor=0, max_k=3)  # a caller's own cap (bench_adaptive_replay's --caps)
    capped.update([0], [[0.95] * 8])
    assert capped.choose([0]) == [3]
    row.update([0], [[0.4] * 4])
    assert row.choose([0]) == [0]
    for _ in range(3):  # at K=0: nothing learnt, the row waits for its probe
        row.update([0], [[]])
        assert row.choose([0]) == [0]
    row.update([0], [[]])
    probe = row.choose([0])[0]
    assert probe >= 1
    row.update([0], [[0.95] * probe])
    assert row.choose([0])[0] > probe
    # the same probabilities in another order: the recent ones decide
    late_easy, late_hard = AdaptiveLength(1, costs, floor=0), AdaptiveLength(1, costs, floor=0)
    late_easy.update([0], [[0.4] * 4 + [0.95] * 4])
    late_hard.update([0], [[0.95] * 4 + [0.4] * 4])
    assert late_easy.choose([0])[0] > late_hard.choose([0])[0]


def test_adaptive_length_learns_only_the_emitted_path(models, monkeypatch):
    """A round teaches a row's schedule the acceptance probabilities of its drafted positions on the emitted
    path (the accepted ones and the first rejected), never those drafted after a rejection, whose contexts
    hold the draft's rejected tokens."""
    from fastalign.methods import speculative

    rounds = []  # per round: [ks], [(left, appended, full row of betas)], [learnt]
    choose, append, update = (speculative.AdaptiveLength.choose, speculative._append,
                              speculative.AdaptiveLength.update)

    def spy_choose(self, rows):
        ks = choose(self, rows)
        rounds.append([ks])
        return ks

    def spy_append(ctx, out, rows, emitted, accepted, left, betas=None):
        before = [len(out[r]) for r in rows]
        result = append(ctx, out, rows, emitted, accepted, left, betas)
        full = betas.tolist() if betas is not None else [[] for _ in rows]
        rounds[-1].append([(n, len(out[r]) - b, f) for r, n, b, f in zip(rows, left, before, full)])
        return result

    def spy_update(self, rows, betas):
        rounds[-1].append(betas)
        return update(self, rows, betas)

    monkeypatch.setattr(speculative.AdaptiveLength, "choose", spy_choose)
    monkeypatch.setattr(speculative, "_append", spy_append)
    monkeypatch.setattr(speculative.AdaptiveLength, "update", spy_update)
    fastalign.decode([[1, 2], [3], [2, 2, 1]] * 4, method="sd", target=without_eos(models[0]), draft=models[1],
                     ref=None, num_draft_tokens="auto:0.1", max_new_tokens=12, seed=list(range(12)))
    cut = 0
    for ks, rows, learnt in rounds:
        for k, (left, appended, full), seen in zip(ks, rows, learnt):
            valid = min(left - 1, k)  # sd emits a bonus token: a row drafts at most left - 1
            on_path = min(valid, appended)
            assert seen == pytest.approx(full[:on_path])
            cut += on_path < valid
    assert cut > 0  # rounds where a rejection left drafted positions off the path were exercised


def test_round_costs_are_measured_at_every_width(monkeypatch):
    """measure_round_costs times the draft at one token and the target at every width from 1 to MAX_AUTO + 1
    tokens (at most the room left: a target whose cost is not monotone in the width is priced as it is); the
    caches are rolled back; once per (target, draft, batch). The models advance a fake clock, so the costs are
    exact."""
    import types

    from fastalign.methods import speculative
    from fastalign.methods.speculative import MAX_AUTO, measure_round_costs

    clock = [0.0]
    monkeypatch.setattr(speculative, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    class Timed:
        device = torch.device("cpu")

        def __init__(self, seconds):
            self.seconds, self.calls, self.written = seconds, [], 0

        def extend(self, tokens):
            self.calls.append(tokens.shape)
            self.written += tokens.shape[1]
            clock[0] += self.seconds(tokens.shape[1])

        def rollback(self, n):
            self.written -= n

    def seconds(w):  # 2 and 3 tokens dearer than 4 (another matrix kernel), then growing
        return 4.0 if w == 1 else 8.0 if w in (2, 3) else 6.0 + 0.5 * (w - 4)

    target, draft = Timed(seconds), Timed(lambda w: 2.0)
    costs = measure_round_costs(target, draft, batch=3, room=20)
    assert target.written == draft.written == 0 and {s[0] for s in target.calls + draft.calls} == {3}
    assert sorted({s[1] for s in target.calls}) == list(range(1, MAX_AUTO + 2)) and {s[1] for s in draft.calls} == {1}
    assert costs.target == pytest.approx([seconds(w) / 4.0 for w in range(1, MAX_AUTO + 2)]) and costs.draft == 0.5
    assert costs.target_at(3) == 2.0 > costs.target_at(4) == 1.5
    assert costs.target_at(1) == 1.0 and costs.target_at(50) == costs.target[-1]
    assert measure_round_costs(target, draft, batch=3, room=20) is costs  # once per process and batch
    before = len(target.calls)
    short = measure_round_costs(target, draft, batch=1, room=4)  # only 4 tokens of room: widths 1 to 4
    assert sorted({s[1] for s in target.calls[before:]}) == [1, 2, 3, 4]
    assert short.target == pytest.approx([1.0, 2.0, 2.0, 1.5])
    assert measure_round_costs(target, draft, batch=1, room=3) is short  # less room: the widths are there
    before = len(target.calls)
    wide = measure_round_costs(target, draft, batch=1, room=20)  # more room than measured: measured again
    assert sorted({s[1] for s in target.calls[before:]}) == list(range(1, MAX_AUTO + 2))
    assert len(wide.target) == MAX_AUTO + 1 and measure_round_costs(target, draft, batch=1, room=20) is wide


def test_round_costs_survive_a_slow_moment(monkeypatch):
    """The calls are interleaved (every width once per repeat): a slow moment of the machine as long as five
    calls, which would slow every timed call of one width when widths were timed one after the other, slows each
    width at most once, and the fastest repeats give the exact ratios."""
    import types

    from fastalign.methods import speculative
    from fastalign.methods.speculative import MAX_AUTO, measure_round_costs

    clock, calls = [0.0], [0]
    monkeypatch.setattr(speculative, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    warm = MAX_AUTO + 2  # the warm-up calls: the draft and every target width once
    slow = range(warm + 3, warm + 8)  # five calls in a row, three times slower

    class Timed:
        device = torch.device("cpu")

        def __init__(self, seconds):
            self.seconds = seconds

        def extend(self, tokens):
            clock[0] += self.seconds(tokens.shape[1]) * (3 if calls[0] in slow else 1)
            calls[0] += 1

        def rollback(self, n):
            pass

    target, draft = Timed(lambda w: 2.0 + w), Timed(lambda w: 1.5)
    costs = measure_round_costs(target, draft, batch=2, room=20)
    assert costs.draft == pytest.approx(0.5)
    assert costs.target == pytest.approx([(2.0 + w) / 3.0 for w in range(1, MAX_AUTO + 2)])


def test_adaptive_length_stops_drafting_when_it_cannot_pay(models):
    """sd with a draft as dear as the target (drafting cannot pay at any acceptance), or one that does not pay
    at the prior acceptance, is the sample method, token for token and call for call: with a given cost the
    draft never runs; "auto" prefills it and measures."""
    target = without_eos(models[0])
    kw = dict(method="sd", target=target, draft=models[1], max_new_tokens=6, seed=[5, 6])
    dear = fastalign.decode([[1, 2], [3]], **kw, num_draft_tokens="auto:1")
    assert dear.stats["draft_calls"] == 0 and dear.stats["rounds_without_draft"] == dear.stats["rounds"] == 6
    sample = fastalign.decode([[1, 2], [3]], method="sample", target=target, max_new_tokens=6, seed=[5, 6])
    assert dear.sequences == sample.sequences and dear.stats["target_calls"] == sample.stats["target_calls"]
    assert dear.stats["mean_draft_tokens"] == 0.0 and dear.stats["row_rounds_k0"] == 12
    for cost in ("auto:3.5", "auto:0.5"):  # c >= 0.5: no K pays at the prior acceptance 0.5
        other = fastalign.decode([[1, 2], [3]], **kw, num_draft_tokens=cost)
        assert other.sequences == dear.sequences and other.stats["draft_calls"] == 0
    assert fastalign.decode([[1, 2], [3]], **kw, num_draft_tokens="auto:0.45").stats["draft_calls"] > 0
    measured = fastalign.decode([[1, 2], [3]], **kw, num_draft_tokens="auto")
    assert measured.stats["draft_cost"] > 0 and measured.stats["draft_calls"] >= 1 + 3  # prefill + measurement
    assert len(measured.stats["target_costs"]) == 6 and measured.stats["target_costs"][0] == 1.0  # widths 1..M
    engine = fastalign.Engine(target=target, draft=models[1])  # measured once per process and engine
    first, again = (engine.decode([[1, 2], [3]], method="sd", max_new_tokens=6, seed=[5, 6], num_draft_tokens="auto")
                    for _ in range(2))
    assert again.stats["draft_cost"] == first.stats["draft_cost"] and again.sequences == first.sequences


def test_adaptive_length_errors(models):
    target, draft, ref = models
    kw = dict(target=target, draft=draft, ref=ref, max_new_tokens=2)
    for method, bad, match in [
        ("sd", dict(num_draft_tokens="fast"), "num_draft_tokens"),
        ("sd", dict(num_draft_tokens=(2, -1)), "schedule"),
        ("sss", dict(num_draft_tokens=(2, 0)), "integers >= 1"),
        ("sd", dict(num_draft_tokens=()), "schedule"),
        ("sd", dict(num_draft_tokens="auto:-1"), "auto:C"),
        ("sd", dict(num_draft_tokens="auto:x"), "auto:C"),
        ("sd", dict(num_draft_tokens="auto:"), "auto:C"),
        ("sd", dict(num_draft_tokens="auto:inf"), "auto:C"),
        ("sd", dict(num_draft_tokens="auto", tree="sampled"), "chains"),
    ]:
        with pytest.raises(ValueError, match=match):
            fastalign.decode([[1]], method=method, **kw, **bad)
