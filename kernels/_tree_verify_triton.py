"""Triton implementation of ``tree_verify`` (definitions in ``kernels.tree_verify``).

One launch, grid ``(B,)``: a program walks its row's tree exactly as the reference does (nodes in index order;
a node is tested iff its parent is the current node). Per visited node it makes one pass over the vocabulary
for the normalisers (target, draft, ref and the separable ``logZ``; a second one with ``max_log_ratio``) and one
pass writing the residual ``t(.|node)`` into an fp32 scratch row; a rejected sampled child costs two passes
(sum, then write of ``(res - q_r)+``), a rejected top-k child one store; the emission is one race pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._rng import uniform_triton
from ._spec_verify_triton import MODE_IDS, _log_ratio
from .spec_verify import RATIO_INF, _tilt_active
from .truncation import truncate_logits


@triton.jit
def _node_norms(tb, db, rb, V, temperature, lam, r_inf, max_ratio,
                TILT: tl.constexpr, CLIP: tl.constexpr, BLOCK: tl.constexpr):
    ninf = float("-inf")
    m_t = ninf
    s_t = 0.0
    m_d = ninf
    s_d = 0.0
    m_r = ninf
    s_r = 0.0
    m_a = ninf
    s_a = 0.0
    m_s = ninf
    s_s = 0.0
    for off in range(0, V, BLOCK):
        v = off + tl.arange(0, BLOCK)
        vm = v < V
        xt = tl.load(tb + v, mask=vm, other=ninf).to(tl.float32) / temperature
        xd = tl.load(db + v, mask=vm, other=ninf).to(tl.float32) / temperature
        mn = tl.maximum(m_t, tl.max(xt, 0))
        sf = tl.where(mn == ninf, 0.0, mn)
        s_t = s_t * tl.exp(m_t - sf) + tl.sum(tl.exp(xt - sf), 0)
        m_t = mn
        mn = tl.maximum(m_d, tl.max(xd, 0))
        sf = tl.where(mn == ninf, 0.0, mn)
        s_d = s_d * tl.exp(m_d - sf) + tl.sum(tl.exp(xd - sf), 0)
        m_d = mn
        if TILT:
            xr = tl.load(rb + v, mask=vm, other=ninf).to(tl.float32) / temperature
            mn = tl.maximum(m_r, tl.max(xr, 0))
            sf = tl.where(mn == ninf, 0.0, mn)
            s_r = s_r * tl.exp(m_r - sf) + tl.sum(tl.exp(xr - sf), 0)
            m_r = mn
            if not CLIP:
                fd = xd > ninf
                fr = xr > ninf
                both = fd & fr
                ka = tl.where(both, xt + lam * (xd - xr), ninf)
                o = tl.where(fd, r_inf, tl.where(fr, -r_inf, 0.0))
                ks = tl.where(both, ninf, xt + lam * o)
                mn = tl.maximum(m_a, tl.max(ka, 0))
                sf = tl.where(mn == ninf, 0.0, mn)
                s_a = s_a * tl.exp(m_a - sf) + tl.sum(tl.exp(ka - sf), 0)
                m_a = mn
                mn = tl.maximum(m_s, tl.max(ks, 0))
                sf = tl.where(mn == ninf, 0.0, mn)
                s_s = s_s * tl.exp(m_s - sf) + tl.sum(tl.exp(ks - sf), 0)
                m_s = mn
    lse_t = m_t + tl.log(s_t)
    lse_d = m_d + tl.log(s_d)
    lse_r = m_r + tl.log(s_r)
    logz = lse_t * 0.0
    if TILT:
        if CLIP:
            for off in range(0, V, BLOCK):
                v = off + tl.arange(0, BLOCK)
                vm = v < V
                lp = tl.load(tb + v, mask=vm, other=ninf).to(tl.float32) / temperature - lse_t
                lqr = tl.load(db + v, mask=vm, other=ninf).to(tl.float32) / temperature - lse_d
                lq = tl.load(rb + v, mask=vm, other=ninf).to(tl.float32) / temperature - lse_r
                ka = tl.where(vm, lp + lam * _log_ratio(lqr, lq, r_inf, max_ratio, True), ninf)
                mn = tl.maximum(m_a, tl.max(ka, 0))
                sf = tl.where(mn == ninf, 0.0, mn)
                s_a = s_a * tl.exp(m_a - sf) + tl.sum(tl.exp(ka - sf), 0)
                m_a = mn
            logz = m_a + tl.log(s_a)
        else:
            za = m_a + tl.log(s_a) + lam * (lse_r - lse_d)
            zs = m_s + tl.log(s_s)
            mz = tl.maximum(za, zs)
            logz = mz + tl.log(tl.exp(za - mz) + tl.exp(zs - mz)) - lse_t
    return lse_t, lse_d, lse_r, logz


@triton.jit
def _node_logits(tb, db, rb, v, vm, lse_t, lse_d, lse_r, logz, temperature, lam, r_inf, max_ratio,
                 TILT: tl.constexpr, CLIP: tl.constexpr):
    """(log p, log q_r, log pi) of the vocabulary block ``v`` at one node."""
    ninf = float("-inf")
    lp = tl.load(tb + v, mask=vm, other=ninf).to(tl.float32) / temperature - lse_t
    lqr = tl.load(db + v, mask=vm, other=ninf).to(tl.float32) / temperature - lse_d
    lpi = lp
    if TILT:
        lq = tl.load(rb + v, mask=vm, other=ninf).to(tl.float32) / temperature - lse_r
        lpi = lp + lam * _log_ratio(lqr, lq, r_inf, max_ratio, CLIP) - logz
    return lp, lqr, lpi


@triton.jit
def _tree_kernel(T, D, R, tok_ptr, par_ptr, u_ptr, W, path_ptr, len_ptr, next_ptr,
                 stb, stn, sdb, sdn, srb, srn, N, V, DP, temperature, lam, r_inf, max_ratio, seed,
                 MODE: tl.constexpr, TILT: tl.constexpr, CLIP: tl.constexpr, TOPK: tl.constexpr,
                 BONUS: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    wb = W + b * V
    ninf = float("-inf")
    # the root: position 0
    tb = T + b * stb
    db = D + b * sdb
    rb = R + b * srb
    lse_t, lse_d, lse_r, logz = _node_norms(tb, db, rb, V, temperature, lam, r_inf, max_ratio,
                                            TILT, CLIP, BLOCK)
    for off in range(0, V, BLOCK):
        v = off + tl.arange(0, BLOCK)
        vm = v < V
        lp, lqr, lpi = _node_logits(tb, db, rb, v, vm, lse_t, lse_d, lse_r, logz, temperature, lam, r_inf,
                                    max_ratio, TILT, CLIP)
        if MODE == 1:
            tl.store(wb + v, tl.exp(lpi), mask=vm)
        else:
            tl.store(wb + v, tl.exp(lp), mask=vm)
    tl.debug_barrier()
    Z = 1.0
    cur = -1
    has_child = 0
    depth = 0
    for n in range(0, N):
        par = tl.load(par_ptr + b * N + n).to(tl.int32)
        if par == cur:
            has_child = 1
            c = tl.load(tok_ptr + b * N + n)
            valid = (c >= 0) & (c < V)
            cc = tl.minimum(tl.maximum(c, 0), V - 1)
            wc = tl.where(valid, tl.load(wb + cc), 0.0)
            res_c = wc / Z
            u = tl.load(u_ptr + b * N + n)
            pos = cur + 1
            if TOPK:
                ok = u <= res_c
            else:
                xd = tl.load(D + b * sdb + pos * sdn + cc).to(tl.float32) / temperature
                qr_c = tl.where(valid, tl.exp(xd - lse_d), 0.0)
                ok = (u * qr_c <= res_c) & (res_c > 0.0)
            if ok:
                tl.store(path_ptr + b * DP + depth, n, mask=depth < DP)
                depth += 1
                cur = n
                tb = T + b * stb + (n + 1) * stn
                db = D + b * sdb + (n + 1) * sdn
                rb = R + b * srb + (n + 1) * srn
                lse_t, lse_d, lse_r, logz = _node_norms(tb, db, rb, V, temperature, lam, r_inf, max_ratio,
                                                        TILT, CLIP, BLOCK)
                for off in range(0, V, BLOCK):
                    v = off + tl.arange(0, BLOCK)
                    vm = v < V
                    lp, lqr, lpi = _node_logits(tb, db, rb, v, vm, lse_t, lse_d, lse_r, logz, temperature,
                                                lam, r_inf, max_ratio, TILT, CLIP)
                    if MODE == 1:
                        tl.store(wb + v, tl.exp(lpi), mask=vm)
                    else:
                        tl.store(wb + v, tl.exp(lp), mask=vm)
                tl.debug_barrier()
                Z = 1.0
                has_child = 0
            else:
                if TOPK:
                    zn = Z - wc
                    if valid & (zn > 0.0):
                        tl.store(wb + cc, 0.0)
                        Z = zn
                    tl.debug_barrier()
                else:
                    dpos = D + b * sdb + pos * sdn
                    s = 0.0
                    for off in range(0, V, BLOCK):
                        v = off + tl.arange(0, BLOCK)
                        vm = v < V
                        qr = tl.exp(tl.load(dpos + v, mask=vm, other=ninf).to(tl.float32) / temperature - lse_d)
                        w = tl.load(wb + v, mask=vm, other=0.0)
                        s += tl.sum(tl.maximum(w / Z - qr, 0.0), 0)
                    if s > 0.0:
                        for off in range(0, V, BLOCK):
                            v = off + tl.arange(0, BLOCK)
                            vm = v < V
                            qr = tl.exp(tl.load(dpos + v, mask=vm, other=ninf).to(tl.float32) / temperature
                                        - lse_d)
                            w = tl.load(wb + v, mask=vm, other=0.0)
                            tl.store(wb + v, tl.maximum(w / Z - qr, 0.0), mask=vm)
                        Z = s
                    tl.debug_barrier()
    # emission at the current node
    best = ninf
    idx = -1
    for off in range(0, V, BLOCK):
        v = off + tl.arange(0, BLOCK)
        vm = v < V
        g = -tl.log(-tl.log(uniform_triton(seed, b * V + v)))
        if MODE == 2:
            lp, lqr, lpi = _node_logits(tb, db, rb, v, vm, lse_t, lse_d, lse_r, logz, temperature, lam, r_inf,
                                        max_ratio, TILT, CLIP)
            key = lpi + g
        else:
            key = tl.log(tl.load(wb + v, mask=vm, other=0.0)) + g
        key = tl.where(vm, key, ninf)
        bm = tl.max(key, 0)
        im = tl.argmax(key, 0)
        take = bm > best
        idx = tl.where(take, off + im, idx)
        best = tl.where(take, bm, best)
    tok = idx.to(tl.int64)
    if not BONUS:
        tok = tl.where(has_child == 0, -1, tok)
    tl.store(next_ptr + b, tok)
    tl.store(len_ptr + b, depth.to(tl.int64))


def tree_verify_triton(target_logits, draft_logits, ref_logits, tree_tokens, parents, mode, lam, temperature,
                       uniforms, seed, tree_kind, *, top_k=None, top_p=None, max_log_ratio=None, bonus=True,
                       max_depth=None, _block=None):
    """Triton ``tree_verify`` (inputs already validated by the public function)."""
    B, N1, V = target_logits.shape
    N = N1 - 1
    DP = N if max_depth is None else int(max_depth)
    dev = target_logits.device
    tilt = _tilt_active(mode, ref_logits, lam)
    if top_k is not None or top_p is not None:
        target_logits = truncate_logits(target_logits, temperature, top_k, top_p)
        draft_logits = truncate_logits(draft_logits, temperature, top_k, top_p)
        if tilt:
            ref_logits = truncate_logits(ref_logits, temperature, top_k, top_p)
        temperature = 1.0
    tgt = target_logits if target_logits.stride(-1) == 1 else target_logits.contiguous()
    drf = draft_logits if draft_logits.stride(-1) == 1 else draft_logits.contiguous()
    ref = tgt
    if tilt:
        ref = ref_logits if ref_logits.stride(-1) == 1 else ref_logits.contiguous()
    tok = tree_tokens.to(device=dev, dtype=torch.int64).contiguous()
    par = parents.to(device=dev, dtype=torch.int64).contiguous()
    u = uniforms.to(device=dev, dtype=torch.float32).contiguous()
    block = _block or min(2048 if tgt.element_size() <= 2 else 1024, triton.next_power_of_2(V))
    block = max(block, 16)
    clip = tilt and max_log_ratio is not None
    r_inf = float(RATIO_INF if max_log_ratio is None else max_log_ratio)
    max_ratio = float(max_log_ratio) if max_log_ratio is not None else 0.0
    W = torch.empty(B, V, device=dev, dtype=torch.float32)
    path = torch.full((B, max(DP, 1)), -1, device=dev, dtype=torch.int64)
    length = torch.empty(B, device=dev, dtype=torch.int64)
    next_token = torch.empty(B, device=dev, dtype=torch.int64)
    _tree_kernel[(B,)](tgt, drf, ref, tok, par, u, W, path, length, next_token,
                       tgt.stride(0), tgt.stride(1), drf.stride(0), drf.stride(1), ref.stride(0), ref.stride(1),
                       N, V, DP, float(temperature), float(lam), r_inf, max_ratio, int(seed),
                       MODE=MODE_IDS[mode], TILT=tilt, CLIP=clip, TOPK=tree_kind == "topk", BONUS=bool(bonus),
                       BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return path[:, :DP], length, next_token
