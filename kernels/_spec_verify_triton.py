"""Triton implementation of ``spec_verify`` (see ``kernels.spec_verify`` for the definitions and launch plan).

Launch 1 ``_stats_kernel``, grid ``(B*(K+1), C1)``: partial statistics per (row, position, vocab chunk), one
read of every logits tensor. Slots of ``stats [B*(K+1), C1, 10]`` (each an online (max, sum-exp) pair over
the chunk, of scaled logits ``x = l / T``):

    0,1  x_t                      (target logsumexp)
    2,3  x_d                      (draft)
    4,5  x_r                      (ref)
    6,7  x_t + lam*(x_d - x_r)    over tokens where q_r, q > 0   (unclipped logZ, shifted by lam*(lse_r-lse_d))
    8,9  x_t + lam*o(v)           over the other tokens, o = +R, -R or 0 (the zero-probability stand-ins)

so ``logZ = logaddexp(A + lam*(lse_r - lse_d), S) - lse_t`` needs no second pass. With ``max_log_ratio`` the
clip depends on the normalisers, so ``_logz_clip_kernel`` (same grid) rereads the logits and overwrites slots
6,7 with the partial logsumexp of ``log p + lam * clip(d)`` itself (slots 8,9 emptied).

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

from ._rng import uniform_triton
from .spec_verify import RATIO_INF, _tilt_active
from .truncation import truncate_logits

NSTAT = 10
MODE_IDS = {"sd": 0, "sss_exact": 1, "sss_paper": 2}
NEG_INF = float("-inf")


@triton.jit
def _acc(m, s, x):
    """Fold block ``x`` into the running (max, sum exp(x - max)) pair; safe when everything is -inf."""
    m_new = tl.maximum(m, tl.max(x, 0))
    safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * tl.exp(m - safe) + tl.sum(tl.exp(x - safe), 0)
    return m_new, s


@triton.jit
def _lse2(m1, s1, m2, s2):
    m = tl.maximum(m1, m2)
    safe = tl.where(m == float("-inf"), 0.0, m)
    return m + tl.log(s1 * tl.exp(m1 - safe) + s2 * tl.exp(m2 - safe))


@triton.jit
def _log_ratio(lqr, lq, r_inf, max_ratio, CLIP: tl.constexpr):
    fd = lqr > float("-inf")
    fr = lq > float("-inf")
    d = tl.where(fd & fr, lqr - lq, tl.where(fd, r_inf, tl.where(fr, -r_inf, 0.0)))
    if CLIP:
        d = tl.minimum(tl.maximum(d, -max_ratio), max_ratio)
    return d


@triton.jit
def _stats_kernel(T, D, R, stats,
                  stb, stk, sdb, sdk, srb, srk,
                  K1, Kd, V, chunk, n_chunks, temperature, lam, r_inf,
                  TILT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    c = tl.program_id(1)
    b = row // K1
    i = row % K1
    has_d = i < Kd
    vd = tl.where(has_d, V, 0)
    t_base = T + b.to(tl.int64) * stb + i * stk
    d_base = D + b.to(tl.int64) * sdb + i * sdk
    r_base = R + b.to(tl.int64) * srb + i * srk
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
    start = c * chunk
    for off in range(start, start + chunk, BLOCK):
        v = off + tl.arange(0, BLOCK)
        vm = v < V
        xt = tl.load(t_base + v, mask=vm, other=ninf).to(tl.float32) / temperature
        xd = tl.load(d_base + v, mask=v < vd, other=ninf).to(tl.float32) / temperature
        # online (max, sum-exp) per accumulator, written out (nested jit calls are slow in the interpreter)
        mn = tl.maximum(m_t, tl.max(xt, 0))
        sf = tl.where(mn == ninf, 0.0, mn)
        s_t = s_t * tl.exp(m_t - sf) + tl.sum(tl.exp(xt - sf), 0)
        m_t = mn
        mn = tl.maximum(m_d, tl.max(xd, 0))
        sf = tl.where(mn == ninf, 0.0, mn)
        s_d = s_d * tl.exp(m_d - sf) + tl.sum(tl.exp(xd - sf), 0)
        m_d = mn
        if TILT:
            xr = tl.load(r_base + v, mask=vm, other=ninf).to(tl.float32) / temperature
            mn = tl.maximum(m_r, tl.max(xr, 0))
            sf = tl.where(mn == ninf, 0.0, mn)
            s_r = s_r * tl.exp(m_r - sf) + tl.sum(tl.exp(xr - sf), 0)
            m_r = mn
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
    out = stats + (row.to(tl.int64) * n_chunks + c) * 10
    tl.store(out + 0, m_t)
    tl.store(out + 1, s_t)
    tl.store(out + 2, m_d)
    tl.store(out + 3, s_d)
    tl.store(out + 4, m_r)
    tl.store(out + 5, s_r)
    tl.store(out + 6, m_a)
    tl.store(out + 7, s_a)
    tl.store(out + 8, m_s)
    tl.store(out + 9, s_s)


@triton.jit
def _combine(stats, rows, n_chunks, slot, offs_c, cmask, rmask):
    """logsumexp over chunks of the (max, sum) pair in ``slot`` for a vector of ``rows``."""
    ptr = stats + (rows.to(tl.int64)[:, None] * n_chunks + offs_c[None, :]) * 10 + slot
    msk = rmask[:, None] & cmask[None, :]
    m = tl.load(ptr, mask=msk, other=float("-inf"))
    s = tl.load(ptr + 1, mask=msk, other=0.0)
    mm = tl.max(m, 1)
    safe = tl.where(mm == float("-inf"), 0.0, mm)
    return mm + tl.log(tl.sum(s * tl.exp(m - safe[:, None]), 1))


@triton.jit
def _logz_clip_kernel(T, D, R, stats,
                      stb, stk, sdb, sdk, srb, srk,
                      K1, Kd, V, chunk, n_chunks, temperature, lam, r_inf, max_ratio,
                      BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    c = tl.program_id(1)
    b = row // K1
    i = row % K1
    has_d = i < Kd
    vd = tl.where(has_d, V, 0)
    offs_c = tl.arange(0, BLOCK_C)
    cmask = offs_c < n_chunks
    rows = row + tl.arange(0, 1)
    rmask = rows >= 0
    lse_t = tl.sum(_combine(stats, rows, n_chunks, 0, offs_c, cmask, rmask), 0)
    lse_d = tl.sum(_combine(stats, rows, n_chunks, 2, offs_c, cmask, rmask), 0)
    lse_r = tl.sum(_combine(stats, rows, n_chunks, 4, offs_c, cmask, rmask), 0)
    t_base = T + b.to(tl.int64) * stb + i * stk
    d_base = D + b.to(tl.int64) * sdb + i * sdk
    r_base = R + b.to(tl.int64) * srb + i * srk
    ninf = float("-inf")
    m_a = ninf
    s_a = 0.0
    start = c * chunk
    for off in range(start, start + chunk, BLOCK):
        v = off + tl.arange(0, BLOCK)
        vm = v < V
        lp = tl.load(t_base + v, mask=vm, other=ninf).to(tl.float32) / temperature - lse_t
        lqr = tl.load(d_base + v, mask=v < vd, other=ninf).to(tl.float32) / temperature - lse_d
        lq = tl.load(r_base + v, mask=vm, other=ninf).to(tl.float32) / temperature - lse_r
        key = lp + lam * _log_ratio(lqr, lq, r_inf, max_ratio, True)
        m_a, s_a = _acc(m_a, s_a, tl.where(vm, key, ninf))
    # every program reads the lse slots of all chunks above, so it may only overwrite slots 6..9 (disjoint)
    out = stats + (row.to(tl.int64) * n_chunks + c) * 10
    tl.store(out + 6, m_a)
    tl.store(out + 7, s_a)
    tl.store(out + 8, ninf)
    tl.store(out + 9, 0.0)


@triton.jit
def _pick(vec, offs, j):
    return tl.sum(tl.where(offs == j, vec, 0.0), 0)


@triton.jit
def _decide_race_kernel(T, D, R, tok_ptr, u_ptr, nv_ptr, stats, pkey, pidx, info,
                        stb, stk, sdb, sdk, srb, srk,
                        K, Kd, V, n_chunks, chunk2, n_chunks2, temperature, lam, r_inf, max_ratio, seed,
                        MODE: tl.constexpr, TILT: tl.constexpr, CLIP: tl.constexpr, HAS_NV: tl.constexpr,
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
    lse_t = _combine(stats, rows, n_chunks, 0, offs_c, cmask, kmask)
    lse_d = _combine(stats, rows, n_chunks, 2, offs_c, cmask, kmask)
    if TILT:
        lse_r = _combine(stats, rows, n_chunks, 4, offs_c, cmask, kmask)
        za = _combine(stats, rows, n_chunks, 6, offs_c, cmask, kmask)
        if CLIP:
            logz = za
        else:
            zs = _combine(stats, rows, n_chunks, 8, offs_c, cmask, kmask)
            za = za + lam * (lse_r - lse_d)
            mz = tl.maximum(za, zs)
            logz = mz + tl.log(tl.exp(za - mz) + tl.exp(zs - mz)) - lse_t
    else:
        lse_r = lse_t
        logz = lse_t * 0.0

    # acceptance tests at the drafted tokens
    dmask = offs_k < K
    tok = tl.load(tok_ptr + b.to(tl.int64) * K + offs_k, mask=dmask, other=0)
    in_range = (tok >= 0) & (tok < V)
    tokc = tl.minimum(tl.maximum(tok, 0), V - 1)
    gm = dmask & in_range
    xt = tl.load(T + b.to(tl.int64) * stb + offs_k * stk + tokc, mask=gm, other=ninf).to(tl.float32) / temperature
    xd = tl.load(D + b.to(tl.int64) * sdb + offs_k * sdk + tokc, mask=gm, other=ninf).to(tl.float32) / temperature
    lp_tok = xt - lse_t
    lqr_tok = xd - lse_d
    lt_tok = lp_tok
    if TILT:
        if MODE == 1:
            xr = tl.load(R + b.to(tl.int64) * srb + offs_k * srk + tokc, mask=gm, other=ninf).to(tl.float32) / temperature
            lt_tok = lp_tok + lam * _log_ratio(lqr_tok, xr - lse_r, r_inf, max_ratio, CLIP) - logz
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

    lse_t_j = _pick(lse_t, offs_k, j)
    lse_d_j = _pick(lse_d, offs_k, j)
    lse_r_j = _pick(lse_r, offs_k, j)
    logz_j = _pick(logz, offs_k, j)
    has_d = j < Kd
    vd = tl.where(has_d, V, 0)
    lse_d_j = tl.where(has_d, lse_d_j, 0.0)

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
        lp = tl.load(t_base + v, mask=vm, other=ninf).to(tl.float32) / temperature - lse_t_j
        lqr = tl.load(d_base + v, mask=v < vd, other=ninf).to(tl.float32) / temperature - lse_d_j
        lt = lp
        le = lp
        if TILT:
            lq = tl.load(r_base + v, mask=vm, other=ninf).to(tl.float32) / temperature - lse_r_j
            le = lp + lam * _log_ratio(lqr, lq, r_inf, max_ratio, CLIP) - logz_j
            if MODE == 1:
                lt = le
        g = -tl.log(-tl.log(uniform_triton(seed, b.to(tl.int64) * V + v)))
        if MODE == 2:
            key_t = le + g
        else:
            key_t = lt + g
        w = tl.maximum(tl.exp(lt) - tl.exp(lqr), 0.0)
        key_r = tl.log(w) + g
        key_m = tl.where(need_res, key_r, key_t)
        key_m = tl.where(vm, key_m, ninf)
        key_t = tl.where(vm, key_t, ninf)
        bm = tl.max(key_m, 0)
        im = tl.argmax(key_m, 0)
        take = bm > best_m
        idx_m = tl.where(take, off + im, idx_m)
        best_m = tl.where(take, bm, best_m)
        bt = tl.max(key_t, 0)
        it = tl.argmax(key_t, 0)
        take = bt > best_t
        idx_t = tl.where(take, off + it, idx_t)
        best_t = tl.where(take, bt, best_t)
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


def _n_programs_target(device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _chunks(V: int, rows: int, block: int, target: int, chunk: int | None):
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
    tok = draft_tokens.to(device=dev, dtype=torch.int64).contiguous()
    u = uniforms.to(device=dev, dtype=torch.float32).contiguous()
    nv = tok if num_valid is None else num_valid.to(device=dev, dtype=torch.int64).contiguous()

    block = _block or min(2048 if tgt.element_size() <= 2 else 1024, triton.next_power_of_2(V))
    block = max(block, 16)
    target = _n_programs_target(dev)
    chunk1, c1 = _chunks(V, B * K1, block, target, _chunk)
    chunk2, c2 = _chunks(V, B, block, target, _chunk2)
    clip = tilt and max_log_ratio is not None
    r_inf = float(RATIO_INF if max_log_ratio is None else max_log_ratio)
    max_ratio = float(max_log_ratio) if max_log_ratio is not None else 0.0
    lam = float(lam)
    temperature = float(temperature)

    stats = torch.empty(B * K1 * c1 * NSTAT, device=dev, dtype=torch.float32)
    strides = (tgt.stride(0), tgt.stride(1), drf.stride(0), drf.stride(1), ref.stride(0), ref.stride(1))
    nw = 8 if block >= 2048 else 4
    _stats_kernel[(B * K1, c1)](tgt, drf, ref, stats, *strides, K1, Kd, V, chunk1, c1, temperature, lam,
                                r_inf, TILT=tilt, BLOCK=block, num_warps=nw)
    block_c = max(triton.next_power_of_2(c1), 2)
    if clip:
        _logz_clip_kernel[(B * K1, c1)](tgt, drf, ref, stats, *strides, K1, Kd, V, chunk1, c1, temperature,
                                        lam, r_inf, max_ratio, BLOCK=block, BLOCK_C=block_c, num_warps=nw)
    pkey = torch.empty(B * c2 * 2, device=dev, dtype=torch.float32)
    pidx = torch.empty(B * c2 * 2, device=dev, dtype=torch.int32)
    info = torch.empty(B * 3, device=dev, dtype=torch.int32)
    _decide_race_kernel[(B, c2)](tgt, drf, ref, tok, u, nv, stats, pkey, pidx, info, *strides,
                                 K, Kd, V, c1, chunk2, c2, temperature, lam, r_inf, max_ratio, int(seed),
                                 MODE=MODE_IDS[mode], TILT=tilt, CLIP=clip, HAS_NV=num_valid is not None,
                                 BLOCK_K1=max(triton.next_power_of_2(K1), 2), BLOCK_C=block_c, BLOCK=block,
                                 num_warps=nw)
    accepted = torch.empty(B, device=dev, dtype=torch.int64)
    next_token = torch.empty(B, device=dev, dtype=torch.int64)
    _final_kernel[(B,)](pkey, pidx, info, accepted, next_token, c2, BONUS=bool(bonus),
                        BLOCK_C=max(triton.next_power_of_2(c2), 2), num_warps=1)
    return accepted, next_token
