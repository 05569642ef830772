"""spec_verify / tree_verify: Triton == reference token for token, and exact-law oracles.

The Triton comparisons run on ``kernel_device`` (conftest): the interpreter on CPU, or the compiled kernels on a GPU
(``TRITON_INTERPRET=0``), the reference on the same device. Inputs are drawn on the CPU, then moved.

The law tests run the (vectorised) references with many independent draws in one batch: every row has its own
drafted tokens, uniforms and race noise (``u(seed, b * V + v)``), so a batch of ``n`` rows is ``n`` draws.
"""

import warnings

import pytest
import torch

from fastalign.kernels import spec_verify, spec_verify_torch, tree_verify_torch
from fastalign.kernels._rng import uniform_grid_torch
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


def _tv(a, b):
    return 0.5 * (a - b).abs().sum().item()


def _law(tokens, V):
    return torch.bincount(tokens, minlength=V).double() / tokens.numel()


# tiny single-position models: target p, aligned draft q_r, reference q (context-free, V = 5)
LT = torch.tensor([[1.0, 0.2, -0.5, 0.7, -1.0], [0.1, 1.2, -0.3, -0.8, 0.5], [0.6, -0.4, 0.9, 0.0, -0.2]])
LD = torch.tensor([[0.2, 1.0, 0.4, -0.6, 0.3], [1.0, -0.5, 0.2, 0.4, -0.3], [-0.2, 0.8, 0.1, 0.5, 0.3]])
LR = torch.tensor([[0.6, -0.2, 0.5, 0.3, 0.1], [0.2, 0.3, -0.1, 0.6, 0.0], [0.4, 0.1, 0.0, -0.3, 0.6]])
NDRAW = 200_000
TV_OK = 0.01  # sampling error of the TV estimate at NDRAW over 5 tokens is ~0.003


def _pi(i, lam=1.0):
    p, qr, q = (torch.softmax(x[i].double(), -1) for x in (LT, LD, LR))
    w = p * (qr / q) ** lam
    return w / w.sum()


def _chain_batch(K, n, gen):
    V = LT.shape[1]
    tgt = LT[: K + 1].expand(n, K + 1, V)
    drf = LD[: K + 1].expand(n, K + 1, V)
    ref = LR[: K + 1].expand(n, K + 1, V)
    tok = torch.multinomial(torch.softmax(LD[:K], -1), n, replacement=True, generator=gen).T.contiguous()
    u = torch.rand(n, K, generator=gen)
    return tgt, drf, ref, tok, u


@pytest.mark.parametrize("K", [1, 2])
def test_chain_law_sd_and_sss_exact(K):
    g = torch.Generator().manual_seed(20 + K)
    V = LT.shape[1]
    tgt, drf, ref, tok, u = _chain_batch(K, NDRAW, g)
    p0 = torch.softmax(LT[0].double(), -1)
    assert _tv(p0, _pi(0)) > 0.1  # the two candidate laws are far apart
    for mode, want, wrong in (("sd", p0, _pi(0)), ("sss_exact", _pi(0), p0)):
        acc, nxt = spec_verify_torch(tgt, drf, ref, tok, mode, 1.0, 1.0, u, 1000 + K)
        first = torch.where(acc >= 1, tok[:, 0], nxt)
        law = _law(first, V)
        assert _tv(law, want) < TV_OK, (mode, law, want)
        assert _tv(law, wrong) > 0.08
        if K == 2:  # second token, given the round got past position 0: law of position 1
            sel = acc >= 1
            second = torch.where(acc[sel] >= 2, tok[sel, 1], nxt[sel])
            want1 = torch.softmax(LT[1].double(), -1) if mode == "sd" else _pi(1)
            assert _tv(_law(second, V), want1) < 2 * TV_OK


def test_chain_law_sss_paper_differs_from_pi():
    """The published rule does not sample pi: K=1 closed form min(q_r, p) + (1 - sum min(q_r, p)) * pi.

    On these logits TV(paper law, pi) = 0.118 (closed form; TV(p, pi) = 0.356), and the sampled law matches the closed form.
    """
    g = torch.Generator().manual_seed(30)
    V = LT.shape[1]
    tgt, drf, ref, tok, u = _chain_batch(1, NDRAW, g)
    acc, nxt = spec_verify_torch(tgt, drf, ref, tok, "sss_paper", 1.0, 1.0, u, 77)
    law = _law(torch.where(acc >= 1, tok[:, 0], nxt), V)
    p, qr = torch.softmax(LT[0].double(), -1), torch.softmax(LD[0].double(), -1)
    m = torch.minimum(p, qr)
    closed = m + (1 - m.sum()) * _pi(0)
    assert _tv(law, closed) < TV_OK
    gap = _tv(closed, _pi(0))
    assert abs(gap - 0.118) < 0.001, gap
    assert _tv(law, _pi(0)) > 0.08


def _tree_batch(kind, n, gen):
    """Root with 2 children, each with one child; logits depend on depth only (context-free)."""
    V = LT.shape[1]
    parents = torch.tensor([-1, -1, 0, 1]).expand(n, 4)
    depth_of_pos = [0, 1, 1, 2, 2]
    tgt = LT[depth_of_pos].expand(n, 5, V)
    drf = LD[depth_of_pos].expand(n, 5, V)
    ref = LR[depth_of_pos].expand(n, 5, V)
    if kind == "sampled":
        d0 = torch.multinomial(torch.softmax(LD[0], -1), 2 * n, replacement=True, generator=gen).view(n, 2)
        d1 = torch.multinomial(torch.softmax(LD[1], -1), 2 * n, replacement=True, generator=gen).view(n, 2)
    else:
        d0 = torch.topk(LD[0], 2).indices.expand(n, 2)
        d1 = torch.topk(LD[1], 1).indices.expand(n, 2)
    tok = torch.cat([d0, d1], dim=1)
    u = torch.rand(n, 4, generator=gen)
    return tgt, drf, ref, tok, parents, u


@pytest.mark.parametrize("kind", ["sampled", "topk"])
def test_tree_law(kind):
    g = torch.Generator().manual_seed(40)
    V = LT.shape[1]
    tgt, drf, ref, tok, parents, u = _tree_batch(kind, NDRAW, g)
    p0, p1 = (torch.softmax(LT[i].double(), -1) for i in (0, 1))
    for mode, want0, want1, wrong0 in (("sd", p0, p1, _pi(0)), ("sss_exact", _pi(0), _pi(1), p0)):
        path, ln, nxt = tree_verify_torch(tgt, drf, ref, tok, parents, mode, 1.0, 1.0, u, 500, kind)
        rows = torch.arange(NDRAW)
        first = torch.where(ln >= 1, tok[rows, path[:, 0].clamp(min=0)], nxt)
        law0 = _law(first, V)
        assert _tv(law0, want0) < TV_OK, (mode, law0, want0)
        assert _tv(law0, wrong0) > 0.08
        sel = ln >= 1
        second = torch.where(ln[sel] >= 2, tok[rows[sel], path[sel, 1].clamp(min=0)], nxt[sel])
        assert _tv(_law(second, V), want1) < 2 * TV_OK
        assert 0.2 < sel.double().mean() < 1.0  # both branches of the walk were exercised
