"""spec_verify / tree_verify: Triton == reference token for token, and exact-law oracles.

The Triton comparisons run on ``kernel_device`` (conftest): the interpreter on CPU, or the compiled kernels on a GPU
(``TRITON_INTERPRET=0``), the reference on the same device. Inputs are drawn on the CPU, then moved.

The law tests run the (vectorised) references with many independent draws in one batch: every row has its own
drafted tokens, uniforms and race noise (row ``b``'s own stream of the generator), so a batch of ``n`` rows is
``n`` draws.
"""

import warnings

import pytest
import torch

from fastalign.kernels import acceptance_probability, spec_verify, spec_verify_torch, tree_verify_torch
from fastalign.kernels import truncate_logits
from fastalign.kernels.rng import uniform_grid_torch
from fastalign.testing import law_of, tv_threshold
from fastalign.kernels._spec_verify_triton import spec_verify_triton
from fastalign.kernels._tree_verify_triton import tree_verify_triton

warnings.filterwarnings("ignore", category=RuntimeWarning)  # log(0) in the interpreter's numpy

MODES = ("sd", "sss_exact", "sss_paper")


def _chain_inputs(B, K, V, close=0.5, gen=None, draft_positions=None, device="cpu", tokens_from_target=False):
    g = gen or torch.Generator().manual_seed(0)
    tgt = torch.randn(B, K + 1, V, generator=g) * 2
    drf = tgt + close * torch.randn(B, K + 1, V, generator=g)
    ref = drf + 0.7 * torch.randn(B, K + 1, V, generator=g)
    # drafted tokens drawn from the draft so that acceptances happen
    tok = torch.multinomial(torch.softmax(drf[:, :K].reshape(-1, V), -1), 1, generator=g).view(B, K)
    u = torch.rand(B, K, generator=g)
    if tokens_from_target:  # for tests whose draft is the target itself (everything accepted)
        tok = torch.multinomial(torch.softmax(tgt[:, :K].reshape(-1, V), -1), 1, generator=g).view(B, K)
    if draft_positions == K:
        drf = drf[:, :K]
    return tuple(x.to(device) for x in (tgt, drf, ref, tok, u))


def _same_chain(args, kwargs, **tri):
    a = spec_verify_torch(*args, **kwargs)
    b = spec_verify_triton(*args, **kwargs, **tri)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), (a, b)
    return a


# ----------------------------------------------------------------------------------- chain: token for token


@pytest.mark.parametrize("B,K,V,chunks", [(3, 3, 48, {}), (2, 4, 64, {"_block": 16, "_chunk": 32, "_chunk2": 16}),
                                          (1, 1, 40, {"_block": 16, "_chunk": 16, "_chunk2": 16})])
def test_chain_triton_matches_reference_random(B, K, V, chunks, kernel_device):
    g = torch.Generator().manual_seed(B * 100 + K * 10 + V)
    tgt, drf, ref, tok, u = _chain_inputs(B, K, V, gen=g, device=kernel_device)
    outs = {}
    for mode in MODES:
        outs[mode] = _same_chain((tgt, drf, ref, tok, mode, 1.0, 0.8, u, 11), {}, **chunks)
    acc = outs["sd"][0]
    assert ((acc >= 0) & (acc <= K)).all() and ((outs["sd"][1] >= 0) & (outs["sd"][1] < V)).all()


def test_chain_clip_bf16_and_truncation(kernel_device):
    g = torch.Generator().manual_seed(5)
    tgt, drf, ref, tok, u = _chain_inputs(3, 3, 48, gen=g, device=kernel_device)
    # clipped log-ratio (second partial pass), vocabulary split
    _same_chain((tgt, drf, ref, tok, "sss_exact", 2.0, 1.0, u, 3), {"max_log_ratio": 0.5},
                _block=16, _chunk=16, _chunk2=32)
    # bf16 logits, read as bf16 by the kernel
    _same_chain((tgt.bfloat16(), drf.bfloat16(), ref.bfloat16(), tok, "sss_exact", 1.0, 0.7, u, 4), {})
    # top-k / top-p: truncated distributions in every ratio
    _same_chain((tgt, drf, ref, tok, "sss_paper", 1.0, 1.0, u, 5), {"top_k": 10, "top_p": 0.9})


def test_chain_all_accepted_and_none_accepted(kernel_device):
    B, K, V = 3, 4, 32
    g = torch.Generator().manual_seed(1)
    tgt, _, ref, tok, u = _chain_inputs(B, K, V, gen=g, device=kernel_device, tokens_from_target=True)
    acc, nxt = _same_chain((tgt, tgt.clone(), None, tok, "sd", 1.0, 1.0, u, 2), {})
    assert (acc == K).all()
    # the bonus follows the race over p at position K
    gum = -torch.log(-torch.log(uniform_grid_torch(2, B, V, device=kernel_device)))
    expect = (torch.log_softmax(tgt[:, K], -1) + gum).argmax(-1)
    assert torch.equal(nxt, expect)
    # none accepted: the target masks every drafted token
    tgt2 = tgt.clone()
    tgt2[:, :K].scatter_(-1, tok.unsqueeze(-1), float("-inf"))
    acc, nxt = _same_chain((tgt2, tgt, ref, tok, "sss_exact", 1.0, 1.0, u, 2), {})
    assert (acc == 0).all()
    assert (nxt != tok[:, 0]).all()


def test_chain_zero_draft_probability_and_masked_vocabulary(kernel_device):
    B, K, V = 2, 3, 32
    g = torch.Generator().manual_seed(2)
    tgt, drf, ref, tok, u = _chain_inputs(B, K, V, gen=g)
    # masked vocabulary entries everywhere (never the drafted tokens of row 1)
    mask = torch.rand(B, K + 1, V, generator=g) < 0.3
    tgt, drf, ref = (x.masked_fill(mask, float("-inf")) for x in (tgt, drf, ref))
    for x in (tgt, drf, ref):
        x[:, :K].scatter_(-1, tok.unsqueeze(-1), 1.0)
    # a drafted token with zero draft probability: accepted iff the target allows it
    drf[0, 0, tok[0, 0]] = float("-inf")
    drf[1, 0, tok[1, 0]] = float("-inf")
    tgt[1, 0, tok[1, 0]] = float("-inf")
    tgt, drf, ref, tok, u = (x.to(kernel_device) for x in (tgt, drf, ref, tok, u))
    for mode in MODES:
        acc, nxt = _same_chain((tgt, drf, ref, tok, mode, 1.0, 1.0, u, 9), {})
        assert acc[0] >= 1 and acc[1] == 0
        assert not torch.isinf(tgt[1, 0, nxt[1]])  # never emits a masked token
    # one side of the ratio zero: sss still well defined (no NaN), Triton == reference
    ref2 = ref.clone()
    ref2[:, :, :5] = float("-inf")
    _same_chain((tgt, drf, ref2, tok, "sss_exact", 1.5, 1.0, u, 9), {}, _block=16, _chunk=16, _chunk2=16)


def test_chain_lam0_and_no_ref_are_sd(kernel_device):
    g = torch.Generator().manual_seed(3)
    tgt, drf, ref, tok, u = _chain_inputs(3, 3, 40, gen=g, device=kernel_device)
    sd = spec_verify_torch(tgt, drf, ref, tok, "sd", 1.0, 1.0, u, 6)
    for args in ((tgt, drf, ref, tok, "sss_exact", 0.0, 1.0, u, 6), (tgt, drf, None, tok, "sss_exact", 1.0, 1.0, u, 6)):
        out = _same_chain(args, {})
        assert torch.equal(out[0], sd[0]) and torch.equal(out[1], sd[1])
    # and the tilt does change something on these inputs (the test could fail)
    assert any(not torch.equal(spec_verify_torch(tgt, drf, ref, tok, "sss_exact", 1.0, 1.0, u, s)[1],
                               spec_verify_torch(tgt, drf, ref, tok, "sd", 1.0, 1.0, u, s)[1]) for s in range(5))


def test_chain_paper_bonus_and_num_valid(kernel_device):
    B, K, V = 3, 3, 32
    g = torch.Generator().manual_seed(4)
    tgt, _, ref, tok, u = _chain_inputs(B, K, V, gen=g, device=kernel_device, tokens_from_target=True)
    drf = tgt.clone()
    acc, nxt = _same_chain((tgt, drf, ref, tok, "sss_paper", 1.0, 1.0, u, 1), {"bonus": True})
    assert (acc == K).all() and (nxt >= 0).all()
    acc, nxt = _same_chain((tgt, drf, ref, tok, "sss_paper", 1.0, 1.0, u, 1), {"bonus": False})
    assert (acc == K).all() and (nxt == -1).all()
    # num_valid: stop at n and draw the bonus there; without a tilt a [B, K, V] draft is enough
    nv = torch.tensor([0, 1, 3], device=kernel_device)
    acc, nxt = _same_chain((tgt, drf[:, :K], None, tok, "sd", 1.0, 1.0, u, 1), {"num_valid": nv})
    assert torch.equal(acc, nv)
    gum = -torch.log(-torch.log(uniform_grid_torch(1, B, V, device=kernel_device)))
    expect = (torch.log_softmax(tgt[torch.arange(B, device=kernel_device), nv], -1) + gum).argmax(-1)  # bonus at n
    assert torch.equal(nxt, expect)
    with pytest.raises(ValueError, match="draft_logits"):
        spec_verify(tgt, drf[:, :K], ref, tok, "sss_exact", 1.0, 1.0, u, 1)
    with pytest.raises(ValueError, match="NaN"):
        bad = tgt.clone()
        bad[0, 0, 0] = float("nan")
        spec_verify(bad, drf, ref, tok, "sd", 1.0, 1.0, u, 1)
    with pytest.raises(ValueError, match=r"uniforms must be \[B, K\] = \(3, 3\), got None"):
        spec_verify(tgt, drf, ref, tok, "sd")  # the acceptance tests' uniforms are not optional


# ------------------------------------------------------------------------------------ tree: token for token

TREES = [
    [-1, -1, 0, 0, 1, 2],   # binary-ish
    [-1, 0, 1, 2, 3, 4],    # a chain
    [-1, -1, -1, 0, 1, 2],  # three root children, one grandchild each
]


def _tree_inputs(parents, V, close=0.3, gen=None, kind="sampled", device="cpu"):
    g = gen
    B, N = parents.shape
    tgt = torch.randn(B, N + 1, V, generator=g) * 2
    drf = tgt + close * torch.randn(B, N + 1, V, generator=g)
    ref = drf + 0.7 * torch.randn(B, N + 1, V, generator=g)
    tok = torch.zeros(B, N, dtype=torch.int64)
    for b in range(B):
        for n in range(N):
            q = torch.softmax(drf[b, parents[b, n] + 1], -1)
            if kind == "topk":  # rank among its siblings
                rank = int((parents[b, :n] == parents[b, n]).sum())
                tok[b, n] = torch.topk(q, rank + 1).indices[rank]
            else:
                tok[b, n] = torch.multinomial(q, 1, generator=g)
    u = torch.rand(B, N, generator=g)
    return tuple(x.to(device) for x in (tgt, drf, ref, tok, u))


@pytest.mark.parametrize("kind", ["sampled", "topk"])
def test_tree_triton_matches_reference(kind, kernel_device):
    g = torch.Generator().manual_seed(7)
    parents = torch.tensor(TREES)
    tgt, drf, ref, tok, u = _tree_inputs(parents, 32, gen=g, kind=kind, device=kernel_device)
    parents = parents.to(kernel_device)
    lens = []
    for mode, kw in (("sd", {}), ("sss_exact", {}), ("sss_paper", {"bonus": False}),
                     ("sss_exact", {"max_log_ratio": 0.7})):
        a = tree_verify_torch(tgt, drf, ref, tok, parents, mode, 1.0, 0.9, u, 5, kind, **kw)
        b = tree_verify_triton(tgt, drf, ref, tok, parents, mode, 1.0, 0.9, u, 5, kind, _block=16, **kw)
        assert all(torch.equal(x, y) for x, y in zip(a, b)), (mode, a, b)
        lens.append(a[1])
        # the path is a real root-to-node path of the tree
        for r in range(3):
            path = a[0][r, : a[1][r]].tolist()
            prev = -1
            for n in path:
                assert parents[r, n] == prev
                prev = n
    assert torch.stack(lens).max() >= 2  # some deep acceptances were exercised


def test_tree_all_accepted_bf16_and_chain_equivalence(kernel_device):
    g = torch.Generator().manual_seed(8)
    parents = torch.tensor([[-1, 0, 1], [-1, 0, 1]])
    tgt, drf, ref, tok, u = _tree_inputs(parents, 24, gen=g, device=kernel_device)
    parents = parents.to(kernel_device)
    # draft == target: the whole chain is accepted, then the bonus (or -1 without)
    a = tree_verify_triton(tgt, tgt, ref, tok, parents, "sd", 1.0, 1.0, u, 3, "sampled", bonus=False)
    assert (a[1] == 3).all() and (a[2] == -1).all()
    assert a[0].tolist() == [[0, 1, 2]] * 2
    b = tree_verify_torch(tgt.bfloat16(), drf.bfloat16(), ref.bfloat16(), tok, parents, "sss_exact", 1.0, 1.0, u, 3)
    c = tree_verify_triton(tgt.bfloat16(), drf.bfloat16(), ref.bfloat16(), tok, parents, "sss_exact", 1.0, 1.0, u, 3,
                           "sampled")
    assert all(torch.equal(x, y) for x, y in zip(b, c))
    # a chain-shaped sampled tree is spec_verify (same uniforms, same race noise), on many random inputs
    g = torch.Generator().manual_seed(9)
    B, K, V = 400, 3, 8
    tgt, drf, ref, tok, u = _chain_inputs(B, K, V, close=0.4, gen=g)
    par = torch.arange(-1, K - 1).expand(B, K)
    for mode in MODES:
        acc, nxt = spec_verify_torch(tgt, drf, ref, tok, mode, 1.0, 1.0, u, 13)
        path, ln, nxt2 = tree_verify_torch(tgt, drf, ref, tok, par, mode, 1.0, 1.0, u, 13)
        assert torch.equal(acc, ln) and torch.equal(nxt, nxt2)
    assert 0 < acc.float().mean() < K


# ------------------------------------------------------------------------------------ exact-law oracles
# Context-free logits (they depend on the position / tree depth only, V = 6): the target p, the aligned draft
# q_r, the reference q. Emitted token i+1 of a round, given the round got that far (accepted >= i), follows
# t_i exactly (t = trunc(p) for sd, trunc(pi) for sss exact): position i < K mixes accepted drafts and residual
# draws, position K is the bonus. Each law is checked at every position against the TV noise threshold of its
# sample size (fastalign.testing.tv_threshold: the 99.9th percentile of TV(exact, n multinomial draws); three
# positions per check, so a correct sampler fails a check with probability below 0.3%), and every case names
# the wrong rules it must reject; test_*_law_rejects shows each of them fails the same check.
LT = torch.tensor([[1.4, 0.2, -0.5, 0.9, -1.0, 0.3], [0.1, 1.2, -0.3, -0.8, 0.9, 0.4],
                   [0.6, -0.4, 1.3, 0.0, -0.2, 0.8]])
LD = torch.tensor([[0.2, 1.3, 0.6, -0.6, 0.3, 1.0], [1.1, -0.5, 0.2, 0.8, -0.3, 0.9],
                   [-0.2, 0.8, 0.1, 1.1, 0.3, -0.4]])
LR = torch.tensor([[0.9, -0.2, 1.2, 0.3, 0.1, -0.5], [0.2, 0.9, -0.1, 1.2, 0.0, -0.6],
                   [0.4, 0.1, 0.0, -0.3, 1.2, 0.2]])
LDS = 0.5 * (LT + LD)  # sd's draft: closer to the target, so that the bonus position is reached often
NDRAW = 60_000


def _draft(mode):
    return LDS if mode == "sd" else LD


def _exact_t(mode, i, T, top_k, top_p, lam=1.0):
    """t_i in fp64, from the definitions (docs/design.md 1): trunc(p), or trunc(pi), pi from the untruncated tilt."""
    if mode == "sd":
        return torch.softmax(truncate_logits(LT[i].double(), T, top_k, top_p), -1)
    lp, lqr, lq = (torch.log_softmax(x[i].double() / T, -1) for x in (LT, LD, LR))
    return torch.softmax(truncate_logits(lp + lam * (lqr - lq), 1.0, top_k, top_p), -1)


def _proposal(mode, i, T, top_k, top_p):
    return torch.softmax(truncate_logits(_draft(mode)[i].double(), T, top_k, top_p), -1)


def _position_check(samples, mode, T, top_k, top_p):
    """[(position, n, TV, threshold)] for the emitted tokens of each position (``samples[i]``: 1-D tokens)."""
    V = LT.shape[1]
    out = []
    for i, tokens in enumerate(samples):
        want = _exact_t(mode, i, T, top_k, top_p)
        n = tokens.numel()
        tv = 0.5 * (law_of(tokens, V) - want).abs().sum().item()
        out.append((i, n, tv, tv_threshold(want, n, quantile=0.999, simulations=4000)))
    return out


def _passes(check):
    return all(tv <= thr for _, _, tv, thr in check)


def _chain_inputs_law(mode, K, T, top_k, top_p, n, seed):
    g = torch.Generator().manual_seed(seed)
    V = LT.shape[1]
    tgt, drf, ref = (x[: K + 1].expand(n, K + 1, V) for x in (LT, _draft(mode), LR))
    q = torch.stack([_proposal(mode, i, T, top_k, top_p) for i in range(K)]).float()
    tok = torch.multinomial(q, n, replacement=True, generator=g).T.contiguous()  # drafted from trunc(q_r)
    u = torch.rand(n, K, generator=g)
    return tgt, drf, ref, tok, u


def _chain_samples(acc, nxt, tok, K):
    out = []
    for i in range(K + 1):
        sel = acc >= i
        out.append(torch.where(acc[sel] > i, tok[sel, min(i, K - 1)], nxt[sel]))
    return out


# (mode, T, top_k, top_p, the wrong rules the check must reject)
CHAIN_LAWS = [
    ("sd", 0.6, 4, None, ("ratio_at_T1", "ratio_untruncated")),
    ("sd", 2.0, None, 0.8, ("ratio_at_T1", "ratio_untruncated")),
    ("sss_exact", 0.7, 3, None, ("ratio_at_T1", "ratio_untruncated", "tilt_truncated", "residual_from_p",
                                 "bonus_from_p")),
    ("sss_exact", 1.3, None, 0.8, ("ratio_untruncated", "tilt_truncated", "residual_from_p", "bonus_from_p")),
    ("sss_exact", 0.8, None, None, ("ratio_at_T1", "residual_from_p", "bonus_from_p")),
]


def _chain_law(case, wrong=None, n=NDRAW):
    mode, T, top_k, top_p, _ = case
    K = 2
    tgt, drf, ref, tok, u = _chain_inputs_law(mode, K, T, top_k, top_p, n, seed=7)
    acc, nxt = spec_verify_torch(tgt, drf, ref, tok, mode, 1.0, T, u, 123, top_k=top_k, top_p=top_p, _wrong=wrong)
    return _position_check(_chain_samples(acc, nxt, tok, K), mode, T, top_k, top_p)


def _case_id(case):
    mode, T, top_k, top_p, _ = case
    return f"{mode}-T{T}-k{top_k}-p{top_p}"


@pytest.mark.parametrize("case", CHAIN_LAWS, ids=_case_id)
def test_chain_law(case):
    check = _chain_law(case)
    assert _passes(check), check
    assert all(n > 5000 for _, n, _, _ in check)  # every position, the bonus included, is well sampled


@pytest.mark.parametrize("case, wrong", [(c, w) for c in CHAIN_LAWS for w in c[4]],
                         ids=[f"{_case_id(c)}-{w}" for c in CHAIN_LAWS for w in c[4]])
def test_chain_law_rejects(case, wrong):
    check = _chain_law(case, wrong)
    assert not _passes(check), (wrong, check)


@pytest.mark.parametrize("case", CHAIN_LAWS, ids=_case_id)
def test_acceptance_probability_is_the_acceptance_rate(case):
    """``acceptance_probability`` (what the adaptive draft length learns from) is the rate at which the verifier
    accepts a drafted position once it is reached: measured on a law test's draws, within 4.5 binomial standard
    deviations at each of K=2 positions (a correct rule fails with probability below 1e-5); the same check
    rejects the probability at temperature 1, untruncated, and (sss) against p instead of pi."""
    mode, T, top_k, top_p, _ = case
    K = 2
    tgt, drf, ref, tok, u = _chain_inputs_law(mode, K, T, top_k, top_p, NDRAW, seed=11)
    acc, _ = spec_verify_torch(tgt, drf, ref, tok, mode, 1.0, T, u, 5, top_k=top_k, top_p=top_p)
    reached = [acc >= i for i in range(K)]
    sizes = torch.tensor([r.sum().item() for r in reached], dtype=torch.float64)
    rate = torch.stack([(acc[r] > i).double().mean() for i, r in enumerate(reached)])

    def fits(**change):
        law = dict(mode=mode, lam=1.0, temperature=T, top_k=top_k, top_p=top_p) | change
        beta = acceptance_probability(tgt[:1, :K], drf[:1, :K], ref[:1, :K], **law)[0].double()
        assert beta.shape == (K,)
        return bool(((rate - beta).abs() <= 4.5 * (beta * (1 - beta) / sizes).sqrt()).all())

    assert fits() and sizes.min() > 20_000
    wrong = [dict(temperature=1.0)]
    if top_k is not None or top_p is not None:
        wrong.append(dict(top_k=None, top_p=None))
    if mode == "sss_exact":
        wrong.append(dict(mode="sd"))
    for change in wrong:
        assert not fits(**change), change


@pytest.mark.parametrize("case", [CHAIN_LAWS[0], CHAIN_LAWS[3]], ids=_case_id)
def test_chain_law_triton_is_the_reference(case, kernel_device):
    """The Triton kernel draws exactly the reference's tokens on these inputs, hence the same law."""
    mode, T, top_k, top_p, _ = case
    args = [x.contiguous().to(kernel_device) for x in _chain_inputs_law(mode, 2, T, top_k, top_p, 24, seed=3)]
    tgt, drf, ref, tok, u = args
    _same_chain((tgt, drf, ref, tok, mode, 1.0, T, u, 5), dict(top_k=top_k, top_p=top_p))


def test_chain_law_sss_paper_differs_from_pi():
    """The published rule does not sample pi: K=1 closed form min(q_r, p) + (1 - sum min(q_r, p)) * pi."""
    n = 200_000
    V = LT.shape[1]
    tgt, drf, ref, tok, u = _chain_inputs_law("sss_paper", 1, 1.0, None, None, n, seed=30)
    acc, nxt = spec_verify_torch(tgt, drf, ref, tok, "sss_paper", 1.0, 1.0, u, 77)
    law = law_of(torch.where(acc >= 1, tok[:, 0], nxt), V)
    p, qr, pi = torch.softmax(LT[0].double(), -1), torch.softmax(LD[0].double(), -1), _exact_t("sss", 0, 1.0, None, None)
    m = torch.minimum(p, qr)
    closed = m + (1 - m.sum()) * pi
    thr = tv_threshold(closed, n)
    assert 0.5 * (law - closed).abs().sum() < thr
    assert 0.5 * (closed - pi).abs().sum() > 10 * thr


# a small temperature: tied maxima at logit 30, where x = 30 / T is huge (3e7 at T = 1e-6, fp32 spacing 2)
SMALL_T_TARGET = torch.tensor([30.0, 30.0, 30.0, -20.0])  # p = (1/3, 1/3, 1/3, 0) at every temperature
SMALL_T_DRAFT = torch.tensor([30.0, 30.0, -20.0, -20.0])  # q = (1/2, 1/2, 0, 0)


def _small_t_first_tokens(T, n, tree, wrong=None):
    """The first emitted token of ``n`` verifications of one drafted token (drawn from q) at each of 2 positions,
    chain (``spec_verify``) or a root with one child (``tree_verify``)."""
    g = torch.Generator().manual_seed(5)
    tgt, drf = (x.expand(n, 2, 4).contiguous() for x in (SMALL_T_TARGET, SMALL_T_DRAFT))
    tok = torch.randint(0, 2, (n, 1), generator=g)
    u = torch.rand(n, 1, generator=g)
    if tree:
        _, ln, nxt = tree_verify_torch(tgt, drf, None, tok, torch.full((n, 1), -1), temperature=T, uniforms=u,
                                       seed=9, _wrong=wrong)
    else:
        ln, nxt = spec_verify_torch(tgt, drf, None, tok, temperature=T, uniforms=u, seed=9, _wrong=wrong)
    return torch.where(ln > 0, tok[:, 0], nxt)


@pytest.mark.parametrize("tree", [False, True], ids=["chain", "tree"])
@pytest.mark.parametrize("T", [1.0, 1e-4, 1e-6, 1e-9])
def test_verify_law_at_a_small_temperature(T, tree):
    """The first token's law is p = (1/3, 1/3, 1/3, 0) at every temperature. With log p = x - logsumexp(x) the
    log-sum of the three ties (log 3) rounds away once x is huge: each tied token got probability 1, the drafted
    one was always accepted, and the law became (1/2, 1/2, 0, 0). The check rejects that rule."""
    n = 20_000
    want = torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0], dtype=torch.float64)
    thr = tv_threshold(want, n, quantile=0.999, simulations=4000)
    assert 0.5 * (law_of(_small_t_first_tokens(T, n, tree), 4) - want).abs().sum().item() <= thr
    if T <= 1e-6:
        wrong = law_of(_small_t_first_tokens(T, n, tree, "normaliser_unshifted"), 4)
        assert 0.5 * (wrong - want).abs().sum().item() > thr


@pytest.mark.parametrize("mode", ["sd", "sss_exact", "sss_paper"])
@pytest.mark.parametrize("max_log_ratio", [None, 3.0])
def test_verify_triton_is_the_reference_at_a_small_temperature(mode, max_log_ratio, kernel_device):
    """Token for token at T = 1e-6 (the kernels keep each normaliser as (max, log-sum), as the reference does),
    chain and tree, with the tilt's logZ pass clipped and unclipped."""
    n, T = 12, 1e-6
    g = torch.Generator().manual_seed(2)
    ref_row = torch.tensor([30.0, -20.0, 30.0, 30.0])
    tgt, drf, ref = (x.expand(n, 3, 4).contiguous().to(kernel_device)
                     for x in (SMALL_T_TARGET, SMALL_T_DRAFT, ref_row))
    tok = torch.randint(0, 2, (n, 2), generator=g).to(kernel_device)
    u = torch.rand(n, 2, generator=g).to(kernel_device)
    chain = (tgt, drf, ref, tok, mode, 0.7, T, u, 4)
    want = spec_verify_torch(*chain, max_log_ratio=max_log_ratio)
    got = spec_verify_triton(*chain, max_log_ratio=max_log_ratio)
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    parents = torch.tensor([[-1, 0]], device=kernel_device).expand(n, 2)
    tree = (tgt, drf, ref, tok, parents, mode, 0.7, T, u, 4, "sampled")
    want = tree_verify_torch(*tree, max_log_ratio=max_log_ratio)
    got = tree_verify_triton(*tree, max_log_ratio=max_log_ratio)
    assert all(torch.equal(a, b) for a, b in zip(want, got))


# trees: branching (2, 2), nodes in level order; logits depend on the depth only
TREE_PARENTS = torch.tensor([-1, -1, 0, 0, 1, 1])
TREE_DEPTH_OF_POS = [0, 1, 1, 2, 2, 2, 2]  # position 0 = the root, position n + 1 = node n


def _tree_inputs_law(kind, mode, T, top_k, top_p, n, seed):
    g = torch.Generator().manual_seed(seed)
    V = LT.shape[1]
    LDm = _draft(mode)
    tgt, drf, ref = (x[TREE_DEPTH_OF_POS].expand(n, 7, V) for x in (LT, LDm, LR))
    if kind == "sampled":
        d0 = torch.multinomial(_proposal(mode, 0, T, top_k, top_p).float(), 2 * n, replacement=True, generator=g)
        d1 = torch.multinomial(_proposal(mode, 1, T, top_k, top_p).float(), 4 * n, replacement=True, generator=g)
        tok = torch.cat([d0.view(n, 2), d1.view(n, 4)], 1)
    else:
        tok = torch.cat([torch.topk(LDm[0], 2).indices, torch.topk(LDm[1], 2).indices.repeat(2)]).expand(n, 6)
    u = torch.rand(n, 6, generator=g)
    return tgt, drf, ref, tok, TREE_PARENTS.expand(n, 6), u


def _tree_samples(path, ln, nxt, tok, D):
    rows = torch.arange(tok.shape[0])
    out = []
    for d in range(D + 1):
        sel = ln >= d
        at = tok[rows[sel], path[sel, min(d, D - 1)].clamp(min=0)]
        out.append(torch.where(ln[sel] > d, at, nxt[sel]))
    return out


# (kind, mode, T, top_k, top_p, the wrong rules the check must reject)
TREE_LAWS = [
    ("sampled", "sd", 0.5, 4, None, ("residual_unnormalised", "ratio_at_T1", "ratio_untruncated")),
    ("sampled", "sss_exact", 1.3, None, 0.85, ("residual_unnormalised", "ratio_untruncated", "tilt_truncated",
                                               "bonus_from_p")),
    ("topk", "sd", 0.7, None, 0.9, ()),
    ("topk", "sss_exact", 0.8, 4, None, ("tilt_truncated", "bonus_from_p")),
]


def _tree_law(case, wrong=None, n=NDRAW):
    kind, mode, T, top_k, top_p, _ = case
    tgt, drf, ref, tok, parents, u = _tree_inputs_law(kind, mode, T, top_k, top_p, n, seed=11)
    path, ln, nxt = tree_verify_torch(tgt, drf, ref, tok, parents, mode, 1.0, T, u, 321, kind, top_k=top_k,
                                      top_p=top_p, _wrong=wrong)
    return _position_check(_tree_samples(path, ln, nxt, tok, 2), mode, T, top_k, top_p)


def _tree_id(case):
    kind, mode, T, top_k, top_p, _ = case
    return f"{kind}-{mode}-T{T}-k{top_k}-p{top_p}"


@pytest.mark.parametrize("case", TREE_LAWS, ids=_tree_id)
def test_tree_law(case):
    check = _tree_law(case)
    assert _passes(check), check
    assert all(n > 3000 for _, n, _, _ in check)


@pytest.mark.parametrize("case, wrong", [(c, w) for c in TREE_LAWS for w in c[5]],
                         ids=[f"{_tree_id(c)}-{w}" for c in TREE_LAWS for w in c[5]])
def test_tree_law_rejects(case, wrong):
    check = _tree_law(case, wrong)
    assert not _passes(check), (wrong, check)


@pytest.mark.parametrize("case", [TREE_LAWS[1], TREE_LAWS[3]], ids=_tree_id)
def test_tree_law_triton_is_the_reference(case, kernel_device):
    kind, mode, T, top_k, top_p, _ = case
    tgt, drf, ref, tok, parents, u = (x.contiguous().to(kernel_device)
                                      for x in _tree_inputs_law(kind, mode, T, top_k, top_p, 12, seed=4))
    kw = dict(top_k=top_k, top_p=top_p)
    a = tree_verify_torch(tgt, drf, ref, tok, parents, mode, 1.0, T, u, 9, kind, **kw)
    b = tree_verify_triton(tgt, drf, ref, tok, parents, mode, 1.0, T, u, 9, kind, **kw)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
