"""Per-prompt seeds (docs/design.md 1.4): a prompt's output depends only on its own seed, prompt and models, for every
method: the same tokens alone, at any row, and among any other prompts. Also: a row is never fed past its
context in batched sd / sss (chains and trees in a mixed batch)."""

import copy

import pytest
import torch

import fastalign
from fastalign.testing import tiny_causal_lm

V = 8
PROMPTS = [[1, 2, 3], [4], [2, 6, 1, 5, 3], [7, 7]]
SEEDS = [11, 2**40 + 3, 5, 11]  # prompts 0 and 3 share a seed: allowed, each still its own output
M = 6


def weights_reward(prompts, responses):
    w = [0.3, 0.1, 0.5, 0.2, 0.4, 0.0, 0.6, 0.0]
    return torch.tensor([sum(w[t] for t in r) + 0.01 * len(r) for r in responses], dtype=torch.float32)


@pytest.fixture(scope="module")
def models():
    target = tiny_causal_lm(vocab_size=V, hidden=16, layers=1, init_range=0.6, seed=0)
    draft = copy.deepcopy(target)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    ref = tiny_causal_lm(vocab_size=V, hidden=16, layers=1, init_range=0.6, seed=2)
    return target, draft, ref


METHODS = [
    ("sample", dict(temperature=0.9, top_k=5)),
    ("bon", dict(n=3)),
    ("soft_bon", dict(n=3, lam=0.5)),
    ("args", dict(mode="sampled", k=3)),
    ("rs", dict(reward_threshold=0.6, max_rejections=3)),
    ("cards", dict(reward_threshold=0.6, max_rejections=2, min_segment_tokens=1, entropy_threshold=1.0,
                   parallel_candidates=2)),
    # "auto": the calibration draws 8 samples per prompt in one batch; a row that ended early must not advance
    # its counters while the others still draw
    ("rs", dict(reward_threshold="auto", max_rejections=3)),
    ("cards", dict(reward_threshold="auto", max_rejections=2, min_segment_tokens=1, entropy_threshold=1.0)),
    ("qalign", dict(steps=3, chains=2, select="best_reward")),
    ("speculative_rejection", dict(n=4, alpha=0.5, round_tokens=2)),
    ("speculative_rejection", dict(n=3, alpha=0.4, round_tokens=1, select="sample")),
    # a memory budget: each prompt's rounds come when its own candidates fill it, whatever the batch
    ("speculative_rejection", dict(n=4, alpha=0.5, round_tokens=100, max_live_tokens=9)),
    ("smc", dict(particles=3, segment_tokens=2, ess_threshold=1.0)),
    ("smc", dict(particles=2, segment_tokens=3, delimiters=[1, 4], select="best")),
    ("beam", dict(beams=2, width=2, max_step_tokens=2, delimiters=[1])),
    ("beam", dict(beams=4, width=2, dvts=True, max_step_tokens=1, aggregate="min", select="sample")),
    ("sd", dict(num_draft_tokens=3, temperature=0.8, top_p=0.9)),
    ("sss", dict(num_draft_tokens=2, temperature=0.8, top_k=5)),
    # adaptive length: each row's K from its own acceptances (with a fixed cost), and a forced schedule with
    # rounds where no row drafts (the draft catches up later)
    ("sd", dict(num_draft_tokens="auto:0.3", temperature=0.8, top_p=0.9)),
    ("sd", dict(num_draft_tokens=(2, 0, 0, 1, 3))),
    ("sss", dict(num_draft_tokens="auto:0.3", top_k=5)),
    ("sss", dict(tree="sampled", branching=(2, 2), top_p=0.95)),
    ("sss", dict(tree="topk", branching=(2, 1), variant="paper")),
]


def _decode(models, method, options, prompts, seed):
    target, draft, ref = models
    return fastalign.decode(prompts, method=method, target=target, draft=draft, ref=ref, reward=weights_reward,
                            max_new_tokens=M, seed=seed, **options).sequences


@pytest.mark.parametrize("method, options", METHODS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(METHODS)])
def test_output_depends_only_on_the_prompt_and_its_seed(models, method, options):
    together = _decode(models, method, options, PROMPTS, SEEDS)
    order = [2, 0, 3, 1]
    shuffled = _decode(models, method, options, [PROMPTS[i] for i in order], [SEEDS[i] for i in order])
    assert [shuffled[order.index(i)] for i in range(4)] == together
    for i in range(len(PROMPTS)):  # every prompt alone (0 and 3 share a seed)
        assert _decode(models, method, options, [PROMPTS[i]], [SEEDS[i]]) == [together[i]]
    # among other prompts, at another row (a prompt never in the first batch, twice)
    mixed = _decode(models, method, options, [[3, 3, 3], PROMPTS[2], [5], PROMPTS[2]], [1, SEEDS[2], 2, SEEDS[2]])
    assert mixed[1] == mixed[3] == together[2]
    # an int seed gives each prompt its own derived seed: a prompt is reproducible, rows are not copies
    a = _decode(models, method, options, [PROMPTS[0]] * 3, 7)
    assert a == _decode(models, method, options, [PROMPTS[0]] * 3, 7)


def test_int_seed_is_the_list_of_derived_seeds(models):
    from fastalign.methods.base import prompt_seeds

    one = _decode(models, "sample", {}, PROMPTS, 123)
    assert one == _decode(models, "sample", {}, PROMPTS, prompt_seeds(123, len(PROMPTS)))
    many = _decode(models, "sample", {}, [PROMPTS[0]] * 16, 123)
    assert len({tuple(s) for s in many}) > 1
    with pytest.raises(fastalign.InputError, match="2 values for 4 prompts"):
        _decode(models, "sample", {}, PROMPTS, [1, 2])


@pytest.mark.parametrize("options", [
    dict(method="sd", num_draft_tokens=4),
    dict(method="sss", num_draft_tokens=3),
    dict(method="sss", num_draft_tokens=3, bonus_on_full_accept=False),
    dict(method="sd", num_draft_tokens="auto:0.1"),
    dict(method="sd", num_draft_tokens=(0, 4, 0, 2)),
    dict(method="sss", num_draft_tokens=(4, 1), bonus_on_full_accept=False),
    dict(method="sd", tree="sampled", branching=(2, 2, 1, 1)),
    dict(method="sss", tree="topk", branching=(2, 2, 2)),
])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_no_row_is_fed_past_its_context(options, arch):
    """A 16-position model: prompt 10 + max_new_tokens 6 is valid, in a batch with short prompts that draft
    deeper than the long row may (the long row always stops at position 15). gpt2's learned position table
    has exactly 16 rows, so a padding token placed past it (the long row riding along) would fail there."""
    target, draft, ref = (tiny_causal_lm(arch, vocab_size=V, hidden=16, layers=1, init_range=0.6, seed=seed,
                                         context=16) for seed in (0, 1, 2))
    for m in (target, draft, ref):  # no EOS: every row runs to max_new_tokens
        m.config.eos_token_id = None
        m.generation_config.eos_token_id = None
    prompts = [[1] * 10, [2], [3, 4], [1] * 10]
    out = fastalign.decode(prompts, target=target, draft=draft, ref=ref, max_new_tokens=6, seed=0, **options)
    assert [len(s) for s in out.sequences] == [6] * 4
    alone = fastalign.decode(prompts[:1], target=target, draft=draft, ref=ref, max_new_tokens=6,
                             seed=[fastalign.methods.base.prompt_seeds(0, 4)[0]], **options)
    assert alone.sequences[0] == out.sequences[0]
