"""Triton implementation of ``spec_verify`` (see ``kernels.spec_verify`` for the definitions and launch plan).

Launch 1 ``_stats_kernel``, grid ``(B*(K+1), C1)``: partial statistics per (row, position, vocab chunk), one
read of every logits tensor. Slots of ``stats [B*(K+1), C1, 8]`` (each an online (max, sum-exp) pair over
the chunk, of scaled logits ``x = l / T``):

    0,1  x_t                      (target normaliser)
    2,3  x_d                      (draft)
    4,5  x_r                      (ref; with ``GIVEN``, the normaliser of the given ``log pi``)
    6,7  log p + lam * d          (the tilt's logZ, written by launch 1b)

Launch 1b ``_logz_kernel`` (with the tilt, unless ``GIVEN``), same grid: rereads the logits once the first three
normalisers are known and writes slots 6,7 (``d`` clipped with ``max_log_ratio``). Normalisers are carried as
``(max, log sum)`` pairs (``_verify_common.log_norm``), never folded into one logsumexp, which would lose the
log-sum at a small temperature.

Launch 2 ``_decide_race_kernel``, grid ``(B, C2)``: each program recombines the row's partials for every
position (a few hundred floats), gathers the drafted tokens' logits, runs the acceptance tests, takes the first
rejection ``j`` and races its own vocabulary chunk at position ``j`` (residual key and the fallback key).
Launch 3 ``_final_kernel``, grid ``(B,)``: combines the ``C2`` partial argmaxes (first maximum wins, as
``torch.argmax``) and writes ``accepted`` / ``next_token``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._entropy_triton import sm_count
from ._verify_common import (MODE_IDS, argmax_fold, log_norm, log_ratio, logprobs, logz_pass, norms,
                             prepare_verify_inputs)
from .rng import streams_tensor, uniform_triton

NSTAT = tl.constexpr(8)  # floats per (row, position, chunk) in ``stats`` (module doc)


@triton.jit
def _stats_kernel(T, D, R, stats,
                  stb, stk, sdb, sdk, srb, srk,
                  K1, Kd, V, chunk, n_chunks, temperature,
                  TILT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    c = tl.program_id(1)
    b = row // K1
    i = row % K1
    start = c * chunk
    m_t, s_t, m_d, s_d, m_r, s_r = norms(
        T + b.to(tl.int64) * stb + i * stk, D + b.to(tl.int64) * sdb + i * sdk, R + b.to(tl.int64) * srb + i * srk,
        start, start + chunk, tl.where(i < Kd, V, 0), V, temperature, TILT, BLOCK)
    out = stats + (row.to(tl.int64) * n_chunks + c) * NSTAT
    tl.store(out + 0, m_t)
    tl.store(out + 1, s_t)
    tl.store(out + 2, m_d)
    tl.store(out + 3, s_d)
    tl.store(out + 4, m_r)
    tl.store(out + 5, s_r)
    tl.store(out + 6, float("-inf"))
    tl.store(out + 7, 0.0)


@triton.jit
def _combine(stats, rows, n_chunks, slot, offs_c, cmask, rmask):
    """The normaliser ``(m, log s)`` (``log_norm``) over chunks of the (max, sum) pair in ``slot``, for a vector of
    ``rows``."""
    ptr = stats + (rows.to(tl.int64)[:, None] * n_chunks + offs_c[None, :]) * NSTAT + slot
    msk = rmask[:, None] & cmask[None, :]
    m = tl.load(ptr, mask=msk, other=float("-inf"))
    s = tl.load(ptr + 1, mask=msk, other=0.0)
    mm = tl.max(m, 1)
    safe = tl.where(mm == float("-inf"), 0.0, mm)
    return log_norm(mm, tl.sum(s * tl.exp(m - safe[:, None]), 1))


@triton.jit
def _logz_kernel(T, D, R, stats,
                 stb, stk, sdb, sdk, srb, srk,
                 K1, Kd, V, chunk, n_chunks, temperature, lam, r_inf, max_ratio,
                 CLIP: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    c = tl.program_id(1)
    b = row // K1
    i = row % K1
    offs_c = tl.arange(0, BLOCK_C)
    cmask = offs_c < n_chunks
    rows = row + tl.arange(0, 1)
    rmask = rows >= 0
    m_t, l_t = _combine(stats, rows, n_chunks, 0, offs_c, cmask, rmask)
    m_d, l_d = _combine(stats, rows, n_chunks, 2, offs_c, cmask, rmask)
    m_r, l_r = _combine(stats, rows, n_chunks, 4, offs_c, cmask, rmask)
    start = c * chunk
    m_a, s_a = logz_pass(T + b.to(tl.int64) * stb + i * stk, D + b.to(tl.int64) * sdb + i * sdk,
                         R + b.to(tl.int64) * srb + i * srk, start, start + chunk, tl.where(i < Kd, V, 0), V,
                         tl.sum(m_t, 0), tl.sum(l_t, 0), tl.sum(m_d, 0), tl.sum(l_d, 0), tl.sum(m_r, 0),
                         tl.sum(l_r, 0), temperature, lam, r_inf, max_ratio, CLIP, BLOCK)
    # every program reads the normaliser slots of all chunks above, so it may only write slots 6,7 (disjoint)
    out = stats + (row.to(tl.int64) * n_chunks + c) * NSTAT
    tl.store(out + 6, m_a)
    tl.store(out + 7, s_a)


@triton.jit
def _pick(vec, offs, j):
    return tl.sum(tl.where(offs == j, vec, 0.0), 0)


@triton.jit
def _decide_race_kernel(T, D, R, tok_ptr, u_ptr, nv_ptr, stats, pkey, pidx, info,
                        stb, stk, sdb, sdk, srb, srk,
                        K, Kd, V, n_chunks, chunk2, n_chunks2, temperature, lam, r_inf, max_ratio, streams,
                        MODE: tl.constexpr, TILT: tl.constexpr, GIVEN: tl.constexpr, CLIP: tl.constexpr,
                        HAS_NV: tl.constexpr,
                        BLOCK_K1: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    c = tl.program_id(1)
    ninf = float("-inf")
    K1 = K + 1
    offs_k = tl.arange(0, BLOCK_K1)
    kmask = offs_k < K1
    offs_c = tl.arange(0, BLOCK_C)
    cmask = offs_c < n_chunks
    rows = b * K1 + offs_k
    m_t, l_t = _combine(stats, rows, n_chunks, 0, offs_c, cmask, kmask)
    m_d, l_d = _combine(stats, rows, n_chunks, 2, offs_c, cmask, kmask)
    m_r = m_t * 0.0
    l_r = m_r
    m_z = m_r
    l_z = m_r
    if TILT:
        m_r, l_r = _combine(stats, rows, n_chunks, 4, offs_c, cmask, kmask)
        if not GIVEN:
            m_z, l_z = _combine(stats, rows, n_chunks, 6, offs_c, cmask, kmask)

    # acceptance tests at the drafted tokens
    dmask = offs_k < K
    tok = tl.load(tok_ptr + b.to(tl.int64) * K + offs_k, mask=dmask, other=0)
    in_range = (tok >= 0) & (tok < V)
    tokc = tl.minimum(tl.maximum(tok, 0), V - 1)
    gm = dmask & in_range
    xt = tl.load(T + b.to(tl.int64) * stb + offs_k * stk + tokc, mask=gm, other=ninf).to(tl.float32) / temperature
    xd = tl.load(D + b.to(tl.int64) * sdb + offs_k * sdk + tokc, mask=gm, other=ninf).to(tl.float32) / temperature
    lp_tok = (xt - m_t) - l_t
    lqr_tok = (xd - m_d) - l_d
    lt_tok = lp_tok
    if TILT:
        if MODE == 1:
            xr = tl.load(R + b.to(tl.int64) * srb + offs_k * srk + tokc, mask=gm, other=ninf).to(tl.float32)
            xr = xr / temperature
            lq_tok = (xr - m_r) - l_r
            if GIVEN:
                lt_tok = lq_tok
            else:
                lt_tok = ((lp_tok + lam * log_ratio(lqr_tok, lq_tok, r_inf, max_ratio, CLIP)) - m_z) - l_z
    t_tok = tl.where(gm, tl.exp(lt_tok), 0.0)
    qr_tok = tl.where(gm, tl.exp(lqr_tok), 0.0)
    u = tl.load(u_ptr + b.to(tl.int64) * K + offs_k, mask=dmask, other=0.5)
    ok = (u * qr_tok <= t_tok) & (t_tok > 0.0)
    if HAS_NV:
        n = tl.load(nv_ptr + b).to(tl.int32)
        n = tl.minimum(tl.maximum(n, 0), K)
    else:
        n = K
    rej = (ok == 0) & (offs_k < n)
    j = tl.min(tl.where(rej, offs_k, n), 0)
    need_res = (j < n) & (MODE != 2)

    m_t_j, l_t_j = _pick(m_t, offs_k, j), _pick(l_t, offs_k, j)
    m_r_j, l_r_j = _pick(m_r, offs_k, j), _pick(l_r, offs_k, j)
    m_z_j, l_z_j = _pick(m_z, offs_k, j), _pick(l_z, offs_k, j)
    has_d = j < Kd
    vd = tl.where(has_d, V, 0)
    m_d_j = tl.where(has_d, _pick(m_d, offs_k, j), 0.0)
    l_d_j = tl.where(has_d, _pick(l_d, offs_k, j), 0.0)

    # exponential race over this program's vocabulary chunk at position j
    t_base = T + b.to(tl.int64) * stb + j * stk
    d_base = D + b.to(tl.int64) * sdb + j * sdk
    r_base = R + b.to(tl.int64) * srb + j * srk
    best_m = ninf
    idx_m = -1
    best_t = ninf
    idx_t = -1
    start = c * chunk2
    for off in range(start, start + chunk2, BLOCK):
        v = off + tl.arange(0, BLOCK)
        vm = v < V
        lp, lqr, le = logprobs(t_base, d_base, r_base, v, vm, v < vd, m_t_j, l_t_j, m_d_j, l_d_j, m_r_j, l_r_j,
                               m_z_j, l_z_j, temperature, lam, r_inf, max_ratio, TILT, CLIP, GIVEN)
        if MODE == 1:
            lt = le
        else:
            lt = lp
        g = -tl.log(-tl.log(uniform_triton(streams, b, v)))
        if MODE == 2:
            key_t = le + g
        else:
            key_t = lt + g
        w = tl.maximum(tl.exp(lt) - tl.exp(lqr), 0.0)
        key_r = tl.log(w) + g
        key_m = tl.where(vm, tl.where(need_res, key_r, key_t), ninf)
        key_t = tl.where(vm, key_t, ninf)
        best_m, idx_m = argmax_fold(best_m, idx_m, key_m, off)
        best_t, idx_t = argmax_fold(best_t, idx_t, key_t, off)
    pk = pkey + (b.to(tl.int64) * n_chunks2 + c) * 2
    pi = pidx + (b.to(tl.int64) * n_chunks2 + c) * 2
    tl.store(pk, best_m)
    tl.store(pk + 1, best_t)
    tl.store(pi, idx_m)
    tl.store(pi + 1, idx_t)
    if c == 0:
        tl.store(info + b * 3, j)
        tl.store(info + b * 3 + 1, need_res.to(tl.int32))
        tl.store(info + b * 3 + 2, (j == n).to(tl.int32))


@triton.jit
def _final_kernel(pkey, pidx, info, acc_ptr, next_ptr, n_chunks2,
                  BONUS: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK_C)
    cm = offs < n_chunks2
    base = b.to(tl.int64) * n_chunks2 * 2 + offs * 2
    km = tl.load(pkey + base, mask=cm, other=float("-inf"))
    kt = tl.load(pkey + base + 1, mask=cm, other=float("-inf"))
    im = tl.load(pidx + base, mask=cm, other=-1)
    it = tl.load(pidx + base + 1, mask=cm, other=-1)
    bm = tl.max(km, 0)
    cm_first = tl.min(tl.where((km == bm) & cm, offs, BLOCK_C), 0)
    tok_m = tl.sum(tl.where(offs == cm_first, im, 0), 0)
    bt = tl.max(kt, 0)
    ct_first = tl.min(tl.where((kt == bt) & cm, offs, BLOCK_C), 0)
    tok_t = tl.sum(tl.where(offs == ct_first, it, 0), 0)
    j = tl.load(info + b * 3)
    need_res = tl.load(info + b * 3 + 1)
    full = tl.load(info + b * 3 + 2)
    use_t = (need_res == 0) | (bm == float("-inf"))
    tok = tl.where(use_t, tok_t, tok_m).to(tl.int64)
    if not BONUS:
        tok = tl.where(full != 0, -1, tok)
    tl.store(acc_ptr + b, j.to(tl.int64))
    tl.store(next_ptr + b, tok)


def _chunks(V: int, rows: int, block: int, target: int, chunk: int | None):
    """``(chunk, n_chunks)``: vocabulary chunk (a multiple of ``block``) so that ``rows * n_chunks`` is about
    ``target`` programs; ``chunk`` forces a width."""
    if chunk is None:
        n_blocks = triton.cdiv(V, block)
        want = max(1, min(n_blocks, triton.cdiv(target, max(rows, 1))))
        chunk = triton.cdiv(n_blocks, want) * block
    chunk = triton.cdiv(chunk, block) * block
    return chunk, triton.cdiv(V, chunk)


def spec_verify_triton(target_logits, draft_logits, ref_logits, draft_tokens, mode, lam, temperature,
                       uniforms, seed, *, top_k=None, top_p=None, max_log_ratio=None, bonus=True,
                       num_valid=None, _block=None, _chunk=None, _chunk2=None):
    """Triton ``spec_verify`` (inputs already validated by the public function).

    ``_block`` / ``_chunk`` / ``_chunk2`` override the block size and the vocabulary chunk of launch 1 / 2
    (tests use them to exercise the vocabulary split on tiny vocabularies).
    """
    B, K1, V = target_logits.shape
    K = K1 - 1
    Kd = draft_logits.shape[1]
    dev = target_logits.device
    x = prepare_verify_inputs(target_logits, draft_logits, ref_logits, mode, lam, temperature, top_k, top_p,
                              max_log_ratio, _block)
    tok = draft_tokens.to(device=dev, dtype=torch.int64).contiguous()
    u = uniforms.to(device=dev, dtype=torch.float32).contiguous()
    nv = tok if num_valid is None else num_valid.to(device=dev, dtype=torch.int64).contiguous()
    target = 4 * sm_count(dev) if dev.type == "cuda" else 1  # the interpreter gains nothing from a split
    chunk1, c1 = _chunks(V, B * K1, x.block, target, _chunk)
    chunk2, c2 = _chunks(V, B, x.block, target, _chunk2)
    logits = (x.tgt, x.drf, x.ref)

    stats = torch.empty(B * K1 * c1 * NSTAT.value, device=dev, dtype=torch.float32)
    _stats_kernel[(B * K1, c1)](*logits, stats, *x.strides, K1, Kd, V, chunk1, c1, x.temperature,
                                TILT=x.tilt, BLOCK=x.block, num_warps=x.num_warps)
    block_c = max(triton.next_power_of_2(c1), 2)
    if x.tilt and not x.given:
        _logz_kernel[(B * K1, c1)](*logits, stats, *x.strides, K1, Kd, V, chunk1, c1, x.temperature, x.lam,
                                   x.r_inf, x.max_ratio, CLIP=x.clip, BLOCK=x.block, BLOCK_C=block_c,
                                   num_warps=x.num_warps)
    pkey = torch.empty(B * c2 * 2, device=dev, dtype=torch.float32)
    pidx = torch.empty(B * c2 * 2, device=dev, dtype=torch.int32)
    info = torch.empty(B * 3, device=dev, dtype=torch.int32)
    _decide_race_kernel[(B, c2)](*logits, tok, u, nv, stats, pkey, pidx, info, *x.strides,
                                 K, Kd, V, c1, chunk2, c2, x.temperature, x.lam, x.r_inf, x.max_ratio,
                                 streams_tensor(seed, B, dev), MODE=MODE_IDS[mode], TILT=x.tilt, GIVEN=x.given,
                                 CLIP=x.clip, HAS_NV=num_valid is not None,
                                 BLOCK_K1=max(triton.next_power_of_2(K1), 2), BLOCK_C=block_c, BLOCK=x.block,
                                 num_warps=x.num_warps)
    accepted = torch.empty(B, device=dev, dtype=torch.int64)
    next_token = torch.empty(B, device=dev, dtype=torch.int64)
    _final_kernel[(B,)](pkey, pidx, info, accepted, next_token, c2, BONUS=bool(bonus),
                        BLOCK_C=max(triton.next_power_of_2(c2), 2), num_warps=1)
    return accepted, next_token
