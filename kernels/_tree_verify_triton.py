"""Triton implementation of ``tree_verify`` (definitions in ``kernels.tree_verify``).

One launch, grid ``(B,)``: a program walks its row's tree exactly as the reference does (nodes in index order;
a node is tested iff its parent is the current node). Per visited node it makes one pass over the vocabulary
for the normalisers (target, draft, ref; a second one for the tilt's ``logZ``) and one pass writing the
residual ``t(.|node)`` into an fp32 scratch row; a rejected sampled child costs two passes
(sum, then write of ``(res - q_r)+``), a rejected top-k child one store; the emission is one race pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._verify_common import MODE_IDS, argmax_fold, log_norm, logprobs, logz_pass, norms, prepare_verify_inputs
from .rng import streams_tensor, uniform_triton


@triton.jit
def _enter_node(tb, db, rb, wb, V, temperature, lam, r_inf, max_ratio,
                MODE: tl.constexpr, TILT: tl.constexpr, CLIP: tl.constexpr, BLOCK: tl.constexpr,
                GIVEN: tl.constexpr):
    """Normalisers ``(m, log s)`` of the target, draft, ref and ``logZ`` at a node (``log_norm``), and its residual
    ``t(.|node)`` (``p``, or ``pi`` for sss_exact) written to the scratch row ``wb``."""
    m_t, s_t, m_d, s_d, m_r, s_r = norms(tb, db, rb, 0, V, V, V, temperature, TILT, BLOCK)
    m_t, l_t = log_norm(m_t, s_t)
    m_d, l_d = log_norm(m_d, s_d)
    m_r, l_r = log_norm(m_r, s_r)
    m_z = 0.0
    l_z = 0.0
    if TILT and not GIVEN:
        m_a, s_a = logz_pass(tb, db, rb, 0, V, V, V, m_t, l_t, m_d, l_d, m_r, l_r, temperature, lam, r_inf,
                             max_ratio, CLIP, BLOCK)
        m_z, l_z = log_norm(m_a, s_a)
    for off in range(0, V, BLOCK):
        v = off + tl.arange(0, BLOCK)
        vm = v < V
        lp, lqr, lpi = logprobs(tb, db, rb, v, vm, vm, m_t, l_t, m_d, l_d, m_r, l_r, m_z, l_z, temperature, lam,
                                r_inf, max_ratio, TILT, CLIP, GIVEN)
        if MODE == 1:
            tl.store(wb + v, tl.exp(lpi), mask=vm)
        else:
            tl.store(wb + v, tl.exp(lp), mask=vm)
    tl.debug_barrier()
    return m_t, l_t, m_d, l_d, m_r, l_r, m_z, l_z


@triton.jit
def _minus_draft(wb, dpos, v, vm, Z, m_d, l_d, temperature):
    """``(res - q_r)+`` on the vocabulary block ``v``: the residual after rejecting a sampled child."""
    qr = tl.exp((tl.load(dpos + v, mask=vm, other=float("-inf")).to(tl.float32) / temperature - m_d) - l_d)
    w = tl.load(wb + v, mask=vm, other=0.0)
    return tl.maximum(w / Z - qr, 0.0)


@triton.jit
def _tree_kernel(T, D, R, tok_ptr, par_ptr, u_ptr, W, path_ptr, len_ptr, next_ptr,
                 stb, stn, sdb, sdn, srb, srn, N, V, DP, temperature, lam, r_inf, max_ratio, streams, nn_ptr,
                 MODE: tl.constexpr, TILT: tl.constexpr, GIVEN: tl.constexpr, CLIP: tl.constexpr,
                 TOPK: tl.constexpr, HAS_NN: tl.constexpr,
                 BONUS: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    wb = W + b * V
    ninf = float("-inf")
    # the root: position 0
    tb = T + b * stb
    db = D + b * sdb
    rb = R + b * srb
    m_t, l_t, m_d, l_d, m_r, l_r, m_z, l_z = _enter_node(tb, db, rb, wb, V, temperature, lam, r_inf, max_ratio,
                                                         MODE, TILT, CLIP, BLOCK, GIVEN)
    Z = 1.0
    cur = -1
    has_child = 0
    depth = 0
    n_nodes = N
    if HAS_NN:
        n_nodes = tl.minimum(tl.maximum(tl.load(nn_ptr + b).to(tl.int32), 0), N)
    for n in range(0, n_nodes):
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
                qr_c = tl.where(valid, tl.exp((xd - m_d) - l_d), 0.0)
                ok = (u * qr_c <= res_c) & (res_c > 0.0)
            if ok:
                tl.store(path_ptr + b * DP + depth, n, mask=depth < DP)
                depth += 1
                cur = n
                tb = T + b * stb + (n + 1) * stn
                db = D + b * sdb + (n + 1) * sdn
                rb = R + b * srb + (n + 1) * srn
                m_t, l_t, m_d, l_d, m_r, l_r, m_z, l_z = _enter_node(tb, db, rb, wb, V, temperature, lam, r_inf,
                                                                     max_ratio, MODE, TILT, CLIP, BLOCK, GIVEN)
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
                        s += tl.sum(_minus_draft(wb, dpos, v, v < V, Z, m_d, l_d, temperature), 0)
                    if s > 0.0:
                        for off in range(0, V, BLOCK):
                            v = off + tl.arange(0, BLOCK)
                            vm = v < V
                            tl.store(wb + v, _minus_draft(wb, dpos, v, vm, Z, m_d, l_d, temperature), mask=vm)
                        Z = s
                    tl.debug_barrier()
    # emission at the current node
    best = ninf
    idx = -1
    for off in range(0, V, BLOCK):
        v = off + tl.arange(0, BLOCK)
        vm = v < V
        g = -tl.log(-tl.log(uniform_triton(streams, b, v)))
        if MODE == 2:
            lp, lqr, lpi = logprobs(tb, db, rb, v, vm, vm, m_t, l_t, m_d, l_d, m_r, l_r, m_z, l_z, temperature,
                                    lam, r_inf, max_ratio, TILT, CLIP, GIVEN)
            key = lpi + g
        else:
            key = tl.log(tl.load(wb + v, mask=vm, other=0.0)) + g
        best, idx = argmax_fold(best, idx, tl.where(vm, key, ninf), off)
    tok = idx.to(tl.int64)
    if not BONUS:
        tok = tl.where(has_child == 0, -1, tok)
    tl.store(next_ptr + b, tok)
    tl.store(len_ptr + b, depth.to(tl.int64))


def tree_verify_triton(target_logits, draft_logits, ref_logits, tree_tokens, parents, mode, lam, temperature,
                       uniforms, seed, tree_kind, *, top_k=None, top_p=None, max_log_ratio=None, bonus=True,
                       max_depth=None, num_nodes=None, _block=None):
    """Triton ``tree_verify`` (inputs already validated by the public function)."""
    B, N1, V = target_logits.shape
    N = N1 - 1
    DP = N if max_depth is None else int(max_depth)
    dev = target_logits.device
    x = prepare_verify_inputs(target_logits, draft_logits, ref_logits, mode, lam, temperature, top_k, top_p,
                              max_log_ratio, _block)
    tok = tree_tokens.to(device=dev, dtype=torch.int64).contiguous()
    par = parents.to(device=dev, dtype=torch.int64).contiguous()
    u = uniforms.to(device=dev, dtype=torch.float32).contiguous()
    W = torch.empty(B, V, device=dev, dtype=torch.float32)
    path = torch.full((B, max(DP, 1)), -1, device=dev, dtype=torch.int64)
    length = torch.empty(B, device=dev, dtype=torch.int64)
    next_token = torch.empty(B, device=dev, dtype=torch.int64)
    _tree_kernel[(B,)](x.tgt, x.drf, x.ref, tok, par, u, W, path, length, next_token, *x.strides,
                       N, V, DP, x.temperature, x.lam, x.r_inf, x.max_ratio, streams_tensor(seed, B, dev),
                       tok if num_nodes is None else num_nodes.to(device=dev, dtype=torch.int64).contiguous(),
                       MODE=MODE_IDS[mode], TILT=x.tilt, GIVEN=x.given, CLIP=x.clip, TOPK=tree_kind == "topk",
                       HAS_NN=num_nodes is not None, BONUS=bool(bonus),
                       BLOCK=x.block, num_warps=x.num_warps)
    return path[:, :DP], length, next_token
