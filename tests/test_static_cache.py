"""The compiled path (``fastalign.models.slots``): the same outputs as the eager reference.

Most tests run the static cache uncompiled (``static_cache=True``: the same cache logic and fixed-shape steps,
without torch.compile's tens of seconds per shape); ``test_compiled_*`` compile for real. The cache-equality
and exact-law tests of the other files also run on both layers (fixtures ``layer`` and ``both_layers``).
"""

import collections
import hashlib

import pytest
import torch

import fastalign
from fastalign.errors import InputError
from fastalign.models import slots as static_cache
from fastalign.models.causal_lm import CausalLM
from fastalign.models.ragged import RaggedStore
from fastalign.models.slots import SlotStore, StaticOptions, batch_bucket, width_bucket
from fastalign.testing import (empirical_law, enumerate_law, next_token_probs, perturbed, tiny_causal_lm,
                               tiny_reward_model, total_variation, tv_threshold)

UNCOMPILED = StaticOptions(compile=False)
PADDED = StaticOptions(compile=True)  # with the fixture compile_as_identity: the compiled path, not compiled


@pytest.fixture
def compile_as_identity(monkeypatch):
    """``compile=True`` with ``torch.compile`` replaced by the identity: the compiled path's own logic (blocks
    padded to width buckets, the padding's columns and masks, shape bookkeeping) in seconds, without compiling."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)


@pytest.fixture(scope="module")
def world():
    from fastalign.eval.toyworld import load_toy_world

    return load_toy_world()


def assert_close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_buckets():
    assert [batch_bucket(n) for n in (1, 2, 3, 5, 16, 17, 64, 65, 130)] == [1, 2, 4, 8, 16, 32, 64, 128, 192]
    assert [width_bucket(n) for n in (1, 2, 3, 5, 9, 16, 17)] == [1, 2, 4, 8, 16, 16, None]


CASES = [
    ("sample", {}),
    ("bon", {"n": 3}),
    ("soft_bon", {"n": 3}),
    ("args", {}),
    ("rs", {"reward_threshold": -1.0}),
    ("cards", {"reward_threshold": 1.0, "max_segment_tokens": 6}),
    ("cards", {"reward_threshold": 1.0, "parallel_candidates": 3}),
    ("sd", {"num_draft_tokens": 3}),
    ("sd", {"tree": "topk", "branching": (2, 2, 1)}),
    ("sss", {"num_draft_tokens": 4}),
    ("sss", {"tree": "sampled"}),
    ("sss", {"variant": "paper", "bonus_on_full_accept": False}),
    ("qalign", {"steps": 3, "chains": 2}),
    ("smc", {"particles": 3, "segment_tokens": 4}),
    ("beam", {"beams": 2, "width": 2, "max_step_tokens": 4}),
]


@pytest.mark.parametrize("method,options", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_every_method_gives_the_eager_output(world, method, options, compile_as_identity):
    """Same seed, same prompts (ragged, a batch of 5 that shrinks across row buckets as prompts finish), on the
    static cache uncompiled and on the compiled path (``compile=True``, torch.compile as the identity)."""
    prompts = [p for p in world.prompts[:5]]
    roles = dict(target=world.target, draft=world.aligned_draft if method == "sss" else world.draft,
                 ref=world.ref if method == "sss" else None, reward=world.reward, tokenizer=world.tokenizer)
    outs = {}
    for layer, flags in (("eager", {}), ("static", dict(static_cache=True)), ("padded", dict(compile=True))):
        engine = fastalign.Engine(**roles, **flags)
        outs[layer] = engine.decode(prompts, method=method, max_new_tokens=20, seed=3, **options)
    assert engine.target.store.options.compile and engine.target.store.compiled_shapes  # the padded steps ran
    for layer in ("static", "padded"):
        assert outs[layer].sequences == outs["eager"].sequences, layer
        for key in ("target_calls", "target_tokens", "draft_calls", "draft_tokens", "reward_calls", "reward_tokens"):
            assert outs[layer].stats[key] == outs["eager"].stats[key], (layer, key)


@pytest.mark.parametrize("parallel_candidates", [1, 3])
def test_cards_cost_does_not_depend_on_rounding_between_copies_of_a_segment(world, parallel_candidates):
    """The cards stats compared above are exact because of the tie rule (``methods/cards.py``): a segment identical
    to the best of its streak is a tie, whatever its score. Scores here: a hash of the text plus a drift of
    +-2e-7 per repeat of that text (what rounding in other cache slots does); every streak ends in a forced
    acceptance, often among repeated segments. Both drifts give the same tokens and the same counts."""
    def drifting_reward(sign, seen):
        def reward(prompts, responses):
            scores = []
            for p, r in zip(prompts, responses):
                text = (*p, -1, *r)
                seen[text] += 1
                digest = hashlib.blake2b(repr(text).encode(), digest_size=4).digest()
                scores.append(int.from_bytes(digest, "little") / 2 ** 32 + sign * 2e-7 * seen[text])
            return torch.tensor(scores)
        return reward

    outs, repeats = [], []
    for sign in (1, -1):
        seen = collections.Counter()
        outs.append(fastalign.decode(
            world.prompts[:4], method="cards", target=world.target, tokenizer=world.tokenizer,
            reward=drifting_reward(sign, seen), max_new_tokens=12, seed=0, mode="hard", reward_threshold=100.0,
            max_rejections=4, min_segment_tokens=1, max_segment_tokens=2, parallel_candidates=parallel_candidates))
        repeats.append(max(seen.values()))
    assert outs[0].stats["forced_acceptances"] > 10 and min(repeats) > 3
    assert outs[0].sequences == outs[1].sequences
    for key in ("target_calls", "target_tokens", "reward_calls", "reward_tokens"):
        assert outs[0].stats[key] == outs[1].stats[key], key


@pytest.mark.parametrize("options", [UNCOMPILED, PADDED], ids=["static", "padded"])
def test_compaction_growth_and_row_buckets_match_the_eager_cache(monkeypatch, options, compile_as_identity):
    """A small cache (16 columns) forces compaction and growth; select_rows moves between row buckets."""
    monkeypatch.setattr(static_cache, "LENGTH_STEP", 16)
    model = tiny_causal_lm("llama", context=256)
    lms = [CausalLM(model), CausalLM(model, SlotStore(options))]
    gen = torch.Generator().manual_seed(0)
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10], [11, 12]]
    outs = [lm.prefill(prompts) for lm in lms]
    assert_close(outs[1], outs[0])
    store = lms[1].store
    initial_length, compactions = store.cache.length, []
    compact = store._compact
    monkeypatch.setattr(store, "_compact", lambda upto: compactions.append(1) or compact(upto))
    for step in range(60):
        B = lms[0].batch_size
        kind = step % 5
        fed = None  # which outputs are of live tokens (padding positions carry no meaning)
        if kind == 0:  # a tree block, keep one path per row
            parents = torch.tensor([[-1, 0, -1, 2, 3]] * B)
            toks = torch.randint(1, 60, (B, 5), generator=gen)
            outs = [lm.extend(toks, parents=parents) for lm in lms]
            keep = torch.randint(0, 2, (B, 5), generator=gen).bool()
            for lm in lms:
                lm.keep_new(keep)
        elif kind == 1:  # a padded chain, then a per-row rollback
            toks = torch.randint(1, 60, (B, 3), generator=gen)
            fed = torch.rand(B, 3, generator=gen) > 0.3
            outs = [lm.extend(toks, live=fed) for lm in lms]
            n = torch.minimum(torch.randint(0, 3, (B,), generator=gen), lms[0].lengths)
            for lm in lms:
                lm.rollback(n)
        elif kind == 2:  # rows change: drop some, repeat some (row buckets 8 -> 4 -> 2 -> ...)
            rows = torch.randperm(B, generator=gen)[: max(1, B - 2)]
            if step % 10 == 2:
                rows = torch.cat([rows, rows[:3]])
            for lm in lms:
                lm.select_rows(rows)
            outs = [lm.extend(torch.full((len(rows), 1), 5)) for lm in lms]
        else:  # single tokens
            toks = torch.randint(1, 60, (B, 1), generator=gen)
            outs = [lm.extend(toks) for lm in lms]
        assert lms[1].lengths.tolist() == lms[0].lengths.tolist()
        got, want = (outs[1], outs[0]) if fed is None else (outs[1][fed], outs[0][fed])
        assert_close(got, want)
    assert store.cache.length > initial_length and compactions  # it compacted, and grew
    lms[1].compact()
    assert lms[1].live.shape[1] == int(lms[1].lengths.max())
    assert_close(lms[1].extend(torch.ones(lms[0].batch_size, 1, dtype=torch.long)),
                 lms[0].extend(torch.ones(lms[0].batch_size, 1, dtype=torch.long)))


@pytest.mark.parametrize("options", [UNCOMPILED, PADDED], ids=["static", "padded"])
def test_compaction_between_tree_levels_keeps_each_rows_path(monkeypatch, options, compile_as_identity):
    """A draft tree grown over three calls on a full cache (16 columns): the third call compacts while row 1's
    second level is dead (its tree is shallower). The tree's columns move as a block, so ``keep_new`` keeps each
    row's own path and the next logits equal the eager cache's and a full recompute."""
    monkeypatch.setattr(static_cache, "LENGTH_STEP", 8)
    monkeypatch.setattr(static_cache, "WIDTH_BUCKETS", (1, 2))  # slack 2 * 2 columns: an 8-token prompt gets 16
    model = tiny_causal_lm("llama", context=256)
    lms = [CausalLM(model), CausalLM(model, SlotStore(options))]
    rows = [[1, 2, 3, 4, 5, 6, 7, 8], [9, 10]]
    both = torch.ones(2, 2, dtype=torch.bool)
    for lm in lms:
        lm.prefill(rows)
        # four roots, one kept per row: 3 dead columns in the longest row, for a compaction to reclaim
        lm.extend(torch.tensor([[11, 12, 13, 14]] * 2), parents=torch.full((2, 4), -1))
        lm.keep_new(torch.tensor([[0, 0, 0, 1], [1, 0, 0, 0]], dtype=torch.bool))
    rows = [rows[0] + [14], rows[1] + [11]]
    store = lms[1].store
    assert store.end == 12 and store.cache.length == 16
    compactions = []
    compact = store._compact
    monkeypatch.setattr(store, "_compact", lambda upto: compactions.append(store.end) or compact(upto))
    row1_deep = torch.tensor([[True, True], [False, False]])  # row 1's tree has one level
    levels = [(torch.tensor([[20, 21]] * 2), [-1, -1], both),
              (torch.tensor([[30, 31]] * 2), [-1, -1, 0, 0], row1_deep),
              (torch.tensor([[40, 41]] * 2), [-1, -1, 0, 0, 2, 2], row1_deep)]
    for tokens, parents, live in levels:
        outs = [lm.extend(tokens, parents=torch.tensor([parents] * 2), live=live) for lm in lms]
        assert_close(outs[1][live], outs[0][live])
    assert compactions == [16]  # the third level did not fit: it compacted, inside the tree
    keep = torch.tensor([[1, 0, 1, 0, 1, 0], [0, 1, 0, 0, 0, 0]], dtype=torch.bool)  # 20 30 40 | 21
    for lm in lms:
        lm.keep_new(keep)
    rows = [rows[0] + [20, 30, 40], rows[1] + [21]]
    assert lms[1].lengths.tolist() == lms[0].lengths.tolist() == [len(r) for r in rows]
    nxt = torch.tensor([[50], [51]])
    outs = [lm.extend(nxt) for lm in lms]
    assert_close(outs[1], outs[0])
    with torch.no_grad():
        for b, r in enumerate(rows):
            assert_close(outs[1][b, -1], model(torch.tensor([r + [50 + b]])).logits[0, -1].float())



@pytest.mark.parametrize("flags", [dict(static_cache=True), dict(compile=True)], ids=["static", "padded"])
def test_draft_trees_with_ragged_budgets_on_a_small_cache_give_the_eager_tokens(monkeypatch, flags,
                                                                                 compile_as_identity):
    """``sss`` trees (branching (2, 2, 2), leaves fed for the tilt) whose rows near ``max_new_tokens`` draft
    shallower trees (dead nodes at the deeper levels), on a cache small enough (length step 8, slack 8) to compact
    between a tree's levels: the eager tokens. The eager cache compacting at every tidy gives them too."""
    monkeypatch.setattr(static_cache, "LENGTH_STEP", 8)
    monkeypatch.setattr(static_cache, "WIDTH_BUCKETS", (1, 2, 4))
    target = tiny_causal_lm(vocab_size=16, hidden=16, layers=1, init_range=0.8, context=512)
    draft = perturbed(target, 0.05, 1)
    models = dict(target=target, draft=draft, ref=perturbed(draft, 0.3, 2))
    mid_tree = []  # compactions with dead slots in the open block (a shallower row's tree)
    compact = SlotStore._compact

    def spy(self, upto):
        mid_tree.append(not self.live[:, upto:].all())
        return compact(self, upto)

    monkeypatch.setattr(SlotStore, "_compact", spy)
    eager_tidy = RaggedStore.tidy

    def tidy_and_compact(self):
        eager_tidy(self)
        self.compact()

    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10], [11]]
    for max_new_tokens in (10, 16):
        for seed in range(4):
            kw = dict(method="sss", max_new_tokens=max_new_tokens, seed=seed, tree="sampled", branching=(2, 2, 2))
            eager = fastalign.decode(prompts, **models, **kw).sequences
            assert fastalign.decode(prompts, **models, **flags, **kw).sequences == eager
            with monkeypatch.context() as m:
                m.setattr(RaggedStore, "tidy", tidy_and_compact)
                assert fastalign.decode(prompts, **models, **kw).sequences == eager
    assert any(mid_tree)


@pytest.mark.parametrize("flags", [dict(static_cache=True), dict(compile=True)], ids=["static", "padded"])
def test_a_reused_engine_gives_the_eager_tokens_for_longer_prompts_and_more_rows(monkeypatch, flags,
                                                                                 compile_as_identity):
    """One engine, five batches: a short prompt (buffers of 16 columns, 1 row), longer prompts (past those 16
    columns) over more rows, short ones over fewer rows, a longer one in the same row bucket, a short one again.
    Every model's static buffers (target, draft, reward) are reused or replaced as needed: the eager tokens."""
    monkeypatch.setattr(static_cache, "LENGTH_STEP", 16)
    monkeypatch.setattr(static_cache, "WIDTH_BUCKETS", (1, 2))  # slack 4 columns: a 3-token prompt gets 16
    target = tiny_causal_lm(vocab_size=16, hidden=16, layers=1, init_range=0.8, context=512)
    roles = dict(target=target, draft=perturbed(target, 0.05, 1), reward=tiny_reward_model(vocab_size=16))
    engines = fastalign.Engine(**roles), fastalign.Engine(**roles, **flags)
    long = [t % 15 + 1 for t in range(30)]
    buffers = []  # (rows, columns) of the target's buffers after each batch's sample (no row leaves it)
    for prompts in ([[1, 2, 3]], [long, long[:23], [5, 6]], [[4, 5], [6]], [long[:14], [7]], [[8], [9, 10]]):
        for method, options in (("sample", {}), ("sd", {"num_draft_tokens": 3}), ("args", {"k": 2})):
            kw = dict(method=method, max_new_tokens=6, seed=1, **options)
            eager, static = (engine.decode(prompts, **kw) for engine in engines)
            assert static.sequences == eager.sequences, (len(prompts), method)
            if method == "sample":
                buffers.append((engines[1].target.store.cache.rows, engines[1].target.store.cache.length))
    assert buffers == [(1, 16), (4, 48), (2, 16), (2, 32), (2, 32)]  # new, new, new, longer, reused


def test_engine_options_and_errors(world):
    engine = fastalign.Engine(target=world.target, compile=True)
    assert isinstance(engine.target.store, SlotStore) and engine.target.store.options.compile
    assert isinstance(fastalign.Engine(target=world.target, static_cache=True).target.store, SlotStore)
    assert type(fastalign.Engine(target=world.target).target) is CausalLM
    with pytest.raises(InputError, match="static cache"):
        fastalign.Engine(target=world.target, compile=True, static_cache=False)
    lm = CausalLM(tiny_causal_lm("llama", context=16), SlotStore(UNCOMPILED))
    with pytest.raises(InputError, match="context length"):
        lm.prefill([list(range(1, 17))], max_new_tokens=4)
    lm.prefill([[1, 2]])
    with pytest.raises(InputError, match="rows"):
        lm.extend(torch.ones(2, 1, dtype=torch.long))


def test_steps_attend_over_a_view_of_the_cache(monkeypatch):
    """A step attends over the cache's first ``view_length`` columns (powers of two from 32, at most the
    cache): the keys and values the layers hand the attention, and the mask, are that long, and the logits are
    the eager cache's as the view grows from 32 to 64 to 128 columns of a 256-column cache."""
    assert [static_cache.view_length(n, 256) for n in (1, 32, 33, 64, 65, 200, 256)] == [32, 32, 64, 64, 128,
                                                                                          256, 256]
    assert static_cache.view_length(200, 128) == 128 and static_cache.view_length(5, 16) == 16
    model = tiny_causal_lm("llama", context=256)
    eager, lm = CausalLM(model), CausalLM(model, SlotStore(StaticOptions(compile=False)))
    handed = []  # the key length each layer-0 update hands the attention
    update = static_cache.SlotLayer.update

    def spy(layer, *args, **kwargs):
        keys, values = update(layer, *args, **kwargs)
        if layer is lm.store.cache.layers[0]:
            handed.append((keys.shape[2], values.shape[2]))
        return keys, values

    monkeypatch.setattr(static_cache.SlotLayer, "update", spy)
    prompts = [[1, 2, 3], [4, 5]]
    assert_close(lm.prefill(prompts, 100), eager.prefill(prompts, 100))
    assert lm.store.cache.length == 256
    for step in range(80):  # the block ends at columns 4 .. 83
        toks = torch.tensor([[step % 50 + 1], [step % 40 + 2]])
        assert_close(lm.extend(toks), eager.extend(toks))
    ends = range(4, 84)
    assert handed[1:] == [(static_cache.view_length(end, 256),) * 2 for end in ends]  # (after the prefill's)
    assert {view for view, _ in handed[1:]} == {32, 64, 128}


def test_a_view_gives_the_bits_of_the_whole_cache(monkeypatch):
    """Attending over a view or over the whole cache (its extra columns masked) gives the same bits: a chain
    decode and a verify block, over views of 32 and 64 columns against the cache's 128."""
    model = tiny_causal_lm("llama", context=256)
    outs = {}
    for name, view_min in (("view", 32), ("whole", 1024)):
        monkeypatch.setattr(static_cache, "VIEW_MIN", view_min)
        lm = CausalLM(model, SlotStore(StaticOptions(compile=False)))
        got = [lm.prefill([[1, 2, 3], [4, 5]], 60)]
        for step in range(40):
            got.append(lm.extend(torch.tensor([[step % 50 + 1], [step % 40 + 2]])))
        got.append(lm.extend(torch.tensor([[1, 2, 3], [4, 5, 6]])))
        outs[name] = got
    assert all(torch.equal(a, b) for a, b in zip(outs["view"], outs["whole"]))


def test_one_compiled_step_serves_every_view():
    """Under torch.compile the view's length is a dynamic size: the decode steps of views 32, 64 and 128 of a
    128-column cache (the whole cache included), then 32 again after a new prefill in the same buffers, run one
    compiled entry (a graph per view would multiply the compilations), with the eager cache's logits."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    model = tiny_causal_lm("llama", context=256)
    eager, lm = CausalLM(model), CausalLM(model, SlotStore(StaticOptions(compile=True)))
    for prompts, steps in (([[1, 2, 3], [4, 5]], 80), ([[6], [7, 8, 9]], 5)):
        assert_close(lm.prefill(prompts, 60), eager.prefill(prompts, 60))
        assert lm.store.cache.length == 128
        for step in range(steps):
            toks = torch.tensor([[step % 50 + 1], [step % 40 + 2]])
            assert_close(lm.extend(toks), eager.extend(toks))
    assert {shape[3] for shape in lm.store.compiled_shapes} == {32, 64, 128}
    assert len(_debug_get_cache_entry_list(lm.store._step_function.__code__)) == 1


def test_compiled_steps_match_the_eager_cache():
    """torch.compile for real: a decode step (width 1) and a verify block (width 3 -> bucket 4) over 3 rows
    (bucket 4), reused across calls and across a new prefill, equal the eager cache's logits."""
    model = tiny_causal_lm("llama")
    eager, compiled = CausalLM(model), CausalLM(model, SlotStore(StaticOptions(compile=True)))
    for prompts in ([[1, 2, 3], [4, 5], [6]], [[7], [8, 9], [10, 11, 12]]):
        assert_close(compiled.prefill(prompts, 16), eager.prefill(prompts, 16))
        for step in range(4):
            toks = torch.tensor([[step + 1], [step + 2], [step + 3]])
            assert_close(compiled.extend(toks), eager.extend(toks))
            block = toks + torch.tensor([[0, 1, 2]])
            assert_close(compiled.extend(block), eager.extend(block))
            for lm in (compiled, eager):
                lm.rollback(torch.tensor([3, 1, 2]))
    assert compiled.store.compiled_shapes == {(4, 1, 1, 32, 128), (4, 4, 1, 32, 128)}


def counting(store):
    """Count the calls that go through the store's torch.compile'd step (the others take its direct code)."""
    calls, compiled = [], store._compiled_step
    store._compiled_step = lambda *args: calls.append(1) or compiled(*args)
    return calls


def compiled_decode_steps(steps: int):
    """An eager and a compiled model layer over one tiny Llama, a prompt prefilled and ``steps`` one-token steps
    taken with equal logits; with the count of calls through the compiled function (``counting``)."""
    model = tiny_causal_lm("llama")
    eager, compiled = CausalLM(model), CausalLM(model, SlotStore(StaticOptions(compile=True)))
    calls = counting(compiled.store)
    assert_close(compiled.prefill([[1, 2, 3]], 16), eager.prefill([[1, 2, 3]], 16))
    for step in range(steps):
        toks = torch.tensor([[step + 1]])
        assert_close(compiled.extend(toks), eager.extend(toks))
    return eager, compiled, calls


def test_compiled_steps_call_each_shapes_code_directly():
    """After a shape's first call (under full guards), its later calls on the same buffers run the code torch.compile
    runs for it as a plain function (``compiled_code``), with the eager cache's logits; new buffers (a new batch
    bucket, a grown cache) look the code up again; a rollback or new prefill in the same buffers keeps it."""
    model = tiny_causal_lm("llama")
    eager, compiled = CausalLM(model), CausalLM(model, SlotStore(StaticOptions(compile=True)))
    store = compiled.store
    calls = counting(store)
    for prompts in ([[1, 2, 3], [4, 5], [6]], [[7], [8, 9], [10, 11, 12]]):
        assert_close(compiled.prefill(prompts, 16), eager.prefill(prompts, 16))
        for step in range(3):
            toks = torch.tensor([[step + 1], [step + 2], [step + 3]])
            assert_close(compiled.extend(toks), eager.extend(toks))
        for lm in (compiled, eager):
            lm.rollback(torch.tensor([2, 1, 0]))
    assert len(calls) == 1  # one shape, one set of buffers: every later step took the direct code
    assert list(store._direct) == [(4, 1, 1, 32, 128)] and callable(store._direct[(4, 1, 1, 32, 128)][0])

    prompts = [[1, 2], [3]]  # 2 rows: a new bucket and new buffers, the same code compiled for another shape
    assert_close(compiled.prefill(prompts, 16), eager.prefill(prompts, 16))
    for step in range(3):
        toks = torch.tensor([[step + 4], [step + 5]])
        assert_close(compiled.extend(toks), eager.extend(toks))
    assert len(calls) == 2 and list(store._direct) == [(2, 1, 1, 32, 128)]


def test_direct_code_runs_only_in_the_global_state_it_was_picked_in():
    """A shape's direct code was picked under one global state (grad mode, autocast, deterministic algorithms,
    ...): a call in another state goes through the compiled function under full guards (which compile for that
    state), and the next call back in the first state takes the direct code again; tokens of another integer
    dtype are taken as int64."""
    eager, compiled, calls = compiled_decode_steps(2)
    assert len(calls) == 1
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert_close(compiled.extend(torch.tensor([[5]])), eager.extend(torch.tensor([[5]])))
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert len(calls) == 2
    toks = torch.tensor([[6]], dtype=torch.int32)
    assert_close(compiled.extend(toks), eager.extend(toks.long()))
    assert len(calls) == 2


def test_compiled_code_is_found_by_full_guards_or_not_at_all(monkeypatch):
    """``compiled_code`` picks the cache entry whose guards accept the arguments (one per shape here), gives None
    for arguments no entry accepts, and None (never an error) when torch's cache cannot be read; the store then
    keeps calling its compiled step, with the same logits."""
    import torch._dynamo.eval_frame as eval_frame

    def f(x, y, **kwargs):
        return x * 2 + y

    function = type(f)(f.__code__.replace(), f.__globals__, "f")
    compiled = torch.compile(function, dynamic=False)
    small, large = (torch.ones(2), torch.ones(2)), (torch.ones(3), torch.ones(3))
    compiled(*small), compiled(*large)
    for args in (small, large):
        code = static_cache.compiled_code(function, args)
        assert code is not None and torch.equal(code(*args), f(*args))
    assert static_cache.compiled_code(function, (torch.ones(4), torch.ones(4))) is None

    def unreadable(code):
        raise RuntimeError("no cache here")

    monkeypatch.setattr(eval_frame, "_debug_get_cache_entry_list", unreadable)
    assert static_cache.compiled_code(function, small) is None
    _, lm, calls = compiled_decode_steps(3)
    assert len(calls) == 3 and lm.store._direct == {(1, 1, 1, 32, 128): False}


def test_compiled_engine_decodes_what_eager_decodes(world):
    prompts = world.prompts[:2]
    kw = dict(method="sample", max_new_tokens=12, seed=5)
    compiled = fastalign.Engine(target=world.target, tokenizer=world.tokenizer, compile=True)
    eager = fastalign.Engine(target=world.target, tokenizer=world.tokenizer)
    assert compiled.decode(prompts, **kw).sequences == eager.decode(prompts, **kw).sequences
    assert compiled.target.store.compiled_shapes  # the decode steps ran compiled


V, EOS, PROMPT, DRAWS = 5, 4, [1, 2], 4000


@pytest.fixture(scope="module")
def bf16_models():
    """A tiny target and a perturbed draft (``tests/test_speculative.py``), cast to bf16."""
    target = tiny_causal_lm(vocab_size=V, hidden=16, layers=1, init_range=0.8)
    draft = perturbed(target, 0.05, 1)
    return target.to(torch.bfloat16), draft.to(torch.bfloat16)


def bf16_law(model, max_new_tokens):
    """The exact law of responses that the bf16 ``model`` itself defines (its logits by full recompute)."""
    return enumerate_law(lambda y: next_token_probs(model, y), PROMPT, max_new_tokens, {EOS})


def assert_follows(sequences, law, wrong):
    threshold = tv_threshold(law, len(sequences))
    assert total_variation(empirical_law(sequences), law) < threshold
    assert total_variation(law, wrong) > 3 * threshold


@pytest.mark.parametrize("flags", [dict(static_cache=True), dict(compile=True)], ids=["static", "padded"])
def test_bf16_sd_follows_the_bf16_target_law(bf16_models, flags, compile_as_identity):
    """In bf16 the static cache's logits round differently from the eager cache's and a near-tie can flip a
    token (README, "What the same tokens means"), but the law is exact: ``sd`` (K=2, 3 tokens) follows the bf16
    target's own law, and not the draft's."""
    target, draft = bf16_models
    out = fastalign.decode([PROMPT] * DRAWS, method="sd", target=target, draft=draft, num_draft_tokens=2,
                           max_new_tokens=3, seed=0, **flags)
    assert_follows(out.sequences, bf16_law(target, 3), bf16_law(draft, 3))


def test_compiled_bf16_sample_follows_the_bf16_target_law(bf16_models):
    """torch.compile for real, in bf16: ``sample`` (3 tokens, 4000 rows in one batch) follows the bf16 target's
    law."""
    target, draft = bf16_models
    engine = fastalign.Engine(target=target, compile=True)
    out = engine.decode([PROMPT] * DRAWS, method="sample", max_new_tokens=3, seed=0)
    assert engine.target.store.compiled_shapes  # the decode steps ran compiled
    assert_follows(out.sequences, bf16_law(target, 3), bf16_law(draft, 3))


def test_cli_compile_and_threads_flags(world):
    from fastalign.cli import DEFAULT_THREADS, build_parser, engine_factory

    args = build_parser().parse_args(["generate", "--toy", "--compile", "--threads", "2", "hello"])
    assert args.compile and args.threads == 2
    engine = engine_factory(args, world)("sample")
    assert isinstance(engine.target.store, SlotStore) and engine.target.store.options.compile
    args = build_parser().parse_args(["generate", "--toy", "hello"])
    assert not args.compile and args.threads == DEFAULT_THREADS == 1
    assert type(engine_factory(args, world)("sample").target) is CausalLM
