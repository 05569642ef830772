"""Triton kernels: one token per row from truncated ``softmax(logits / T)``, by an exponential race.

Two steps, neither materialises a softmax nor sorts the vocabulary:

1. ``_threshold_kernel`` (only with top-k / top-p; one program per row) finds the row's truncation threshold
   ``tau``, an actual element value of ``x = logits / T``, so that the kept set is exactly ``x >= tau``
   (``kernels.truncation``, ties at the boundary kept). Both rules are "keep ``e`` iff ``F(e) < B``" for
   ``F(e) = sum of w(x) over the entries with x > e`` (strictly above), a non-increasing function of ``e``:

   * top-k: ``w = 1``, ``B = k`` (``e`` is kept iff fewer than ``k`` entries beat it);
   * top-p: ``w = exp(x - max)`` over the top-k survivors, ``B = p * sum(w)`` (the mass strictly above a
     kept token is below ``p``: the reference's "mass before < p", boundary ties included).

   ``tau`` is the smallest element value that is kept. It is found by bisection on a pivot ``t`` where each
   streaming pass over the row also returns the nearest element values on both sides of ``t``
   (``a = min{x >= t}``, ``b = max{x < t}``) with their tie weights. Since ``F(b) = sum_{x >= t} w``, one
   pass decides whether ``b`` or ``a`` *is* ``tau`` (snap to an element: exact, no tolerance) or moves a
   bound onto ``a`` / ``b``. Pivots are value midpoints (fast on real logits), falling back to midpoints of
   the order-preserving integer image of fp32 (at most 32 more halvings), so the loop always ends.
   Typical rows take 10-20 passes; bf16 rows (few distinct values) fewer.

2. ``_draw_kernel`` computes ``argmax_v ((x_v - m) - log(-log u_r(v)))`` over the kept entries, with ``u_r`` row
   ``r``'s stream of the shared counter-based generator (``kernels.rng``), first index on ties like ``torch.argmax``,
   and ``m`` the row maximum of ``x`` (0 where not finite; why: ``sample.sample_torch``). ``m`` is the scaled
   maximum of the raw row, which torch reduces beforehand: scaling by a positive number is monotone in fp32.
   With few rows the vocabulary is split across programs (partial argmax per chunk, then the first
   chunk holding the maximum wins, which keeps the first-index rule).

Exactness against ``sample_torch``: the kernels compute ``x`` bit for bit as torch does on the same device
(true division on CPU, multiplication by the fp32 reciprocal on CUDA, no FMA contraction), so top-k
thresholds are identical (an element value, same comparisons). The top-p decision compares fp32 sums
accumulated in a different order (and with Triton's ``exp``) than the reference's softmax + ``cumsum``, so
the kept set can differ only when the mass above a token equals ``p`` to within fp32 rounding (or two
distinct logits round to the same probability at the boundary). The draw uses libdevice ``logf`` on CUDA
(what ``torch.log`` calls); under the CPU interpreter numpy's ``log`` may differ from torch's in the last
bit, so a token can differ only when two perturbed scores agree to within an ulp. None of this happens for
generic inputs; the tests compare token for token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton.language.extra import libdevice

from ._entropy_triton import BLOCK_V, as_rows, num_chunks, program_row_chunk
from .rng import streams_tensor, uniform_triton
from .truncation import check_truncation_args

@triton.jit
def _key(x):
    """fp32 -> int32 with the same order (negative floats have their magnitude bits flipped); -0 -> 0."""
    b = x.to(tl.int32, bitcast=True)
    k = tl.where(b < 0, b ^ 0x7FFFFFFF, b)
    return tl.where(x == 0.0, 0, k)


@triton.jit
def _unkey(k):
    b = tl.where(k < 0, k ^ 0x7FFFFFFF, k)
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _scale(x, scale, CUDA_MATH: tl.constexpr):
    """``x / T`` computed the way torch computes ``logits.float() / T`` on the same device: on CUDA torch
    multiplies by the fp32 reciprocal (``scale = 1 / T``), on CPU it divides (``scale = T``)."""
    if CUDA_MATH:
        return x * scale
    else:
        return x / scale


@triton.jit
def _log(x, CUDA_MATH: tl.constexpr):
    # on CUDA: libdevice logf, the function torch.log calls (tl.log may lower to an approximation)
    if CUDA_MATH:
        return libdevice.log(x)
    else:
        return tl.log(x)


@triton.jit
def _load_scaled(row_ptr, cols, V, scale, CUDA_MATH: tl.constexpr):
    x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
    return _scale(x, scale, CUDA_MATH)


@triton.jit
def _weights(x, valid, tau_k, m, MASS: tl.constexpr):
    """(candidate mask, weight) of each entry: top-k counts every entry, top-p weighs survivors by mass."""
    if MASS:
        cand = valid & (x >= tau_k) & (x > float("-inf"))
        w = tl.where(cand, tl.exp(x - m), 0.0)
    else:
        cand = valid
        w = tl.where(cand, 1.0, 0.0)
    return cand, w


@triton.jit
def _search(row_ptr, V, scale, lo, hi, bound, tau_k, m,
            MASS: tl.constexpr, CUDA_MATH: tl.constexpr, BLOCK: tl.constexpr):
    """Smallest candidate value ``e`` with ``F(e) < bound`` (see module doc), given ``tau in (lo, hi]``."""
    offs = tl.arange(0, BLOCK)
    tau = hi
    done = 0
    step = 0
    # 96 > 24 value steps + 33 integer-image halvings: a guard that is never reached
    while (done == 0) & (step < 96):
        # pivot t in (lo, hi]: value midpoint first; integer-image midpoint when that stalls or after 24 steps
        t = lo * 0.5 + hi * 0.5
        k_lo = _key(lo).to(tl.int64)
        k_hi = _key(hi).to(tl.int64)
        t_key = _unkey(((k_lo + k_hi + 1) >> 1).to(tl.int32))
        use_key = (step >= 24) | (t <= lo) | (t > hi) | (t != t)
        t = tl.where(use_key, t_key, t)

        g = tl.zeros((), tl.float32)  # sum of w over x >= t
        a = tl.full((), float("inf"), tl.float32)  # smallest candidate >= t, and its tie weight
        wa = tl.zeros((), tl.float32)
        b = tl.full((), float("-inf"), tl.float32)  # largest candidate < t, and its tie weight
        wb = tl.zeros((), tl.float32)
        for off in range(0, V, BLOCK):
            cols = off + offs
            valid = cols < V
            x = _load_scaled(row_ptr, cols, V, scale, CUDA_MATH)
            cand, w = _weights(x, valid, tau_k, m, MASS)
            ge = cand & (x >= t)
            lt = cand & (x < t)
            g += tl.sum(tl.where(ge, w, 0.0), axis=0)
            a_blk = tl.min(tl.where(ge, x, float("inf")), axis=0)
            wa_blk = tl.sum(tl.where(ge & (x == a_blk), w, 0.0), axis=0)
            b_blk = tl.max(tl.where(lt, x, float("-inf")), axis=0)
            wb_blk = tl.sum(tl.where(lt & (x == b_blk), w, 0.0), axis=0)
            wa = tl.where(a_blk < a, wa_blk, tl.where(a_blk == a, wa + wa_blk, wa))
            a = tl.minimum(a, a_blk)
            wb = tl.where(b_blk > b, wb_blk, tl.where(b_blk == b, wb + wb_blk, wb))
            b = tl.maximum(b, b_blk)

        # F(b) = g. b kept: tau <= b, and tau == b iff the entry below b is not kept (F = g + wb >= bound).
        # b not kept: tau >= a, and tau == a iff a is kept (F(a) = g - wa < bound).
        b_kept = g < bound
        hit_b = b_kept & (g + wb >= bound)
        hit_a = (~b_kept) & (g - wa < bound)
        tau = tl.where(hit_b, b, tl.where(hit_a, a, tau))
        done = (hit_a | hit_b).to(tl.int32)
        hi = tl.where(b_kept, b, hi)
        lo = tl.where(b_kept, lo, a)
        step += 1
    # unreachable guard: if the loop ran out, hi is an upper bound of tau: keep at least the true set
    return tl.where(done == 1, tau, hi)


@triton.jit(do_not_specialize=["top_k"])
def _threshold_kernel(
    logits_ptr, stride_r, V, scale, top_k, top_p, tau_ptr,
    HAS_K: tl.constexpr, HAS_P: tl.constexpr, CUDA_MATH: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per row: ``tau`` (fp32) such that the truncated set is ``x >= tau``."""
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_r
    offs = tl.arange(0, BLOCK)

    # pass 0: max, smallest finite value, number of finite entries
    m = tl.full((), float("-inf"), tl.float32)
    min_f = tl.full((), float("inf"), tl.float32)
    n_fin = tl.zeros((), tl.int32)
    for off in range(0, V, BLOCK):
        cols = off + offs
        x = _load_scaled(row_ptr, cols, V, scale, CUDA_MATH)
        fin = x > float("-inf")
        m = tl.maximum(m, tl.max(x, axis=0))
        min_f = tl.minimum(min_f, tl.min(tl.where(fin, x, float("inf")), axis=0))
        n_fin += tl.sum(fin.to(tl.int32), axis=0)

    tau_k = tl.full((), float("-inf"), tl.float32)
    if HAS_K:
        # fewer finite entries than k: the k-th largest is -inf and everything is kept
        if top_k == 1:
            tau_k = m  # greedy: the row maximum, no search
        elif n_fin >= top_k:
            lo = _unkey(_key(min_f) - 1)
            tau_k = _search(row_ptr, V, scale, lo, m, top_k.to(tl.float32), tau_k, m, False, CUDA_MATH, BLOCK)
    tau = tau_k
    if HAS_P:
        z = tl.zeros((), tl.float32)
        for off in range(0, V, BLOCK):
            cols = off + offs
            x = _load_scaled(row_ptr, cols, V, scale, CUDA_MATH)
            cand, w = _weights(x, cols < V, tau_k, m, True)
            z += tl.sum(w, axis=0)
        lo = _unkey(_key(tl.maximum(tau_k, min_f)) - 1)
        tau = _search(row_ptr, V, scale, lo, m, top_p * z, tau_k, m, True, CUDA_MATH, BLOCK)
    tl.store(tau_ptr + row, tau)


@triton.jit
def _draw_kernel(
    logits_ptr, stride_r, V, scale, tau_ptr, row_max_ptr, streams,
    out_ptr,                      # [R] int64 tokens (one chunk per row)
    part_val_ptr, part_idx_ptr,   # [R, n_chunks] fp32 / int64 partial argmax (split vocabulary)
    chunk_size, n_chunks,
    HAS_TAU: tl.constexpr, SINGLE: tl.constexpr, CUDA_MATH: tl.constexpr, BLOCK: tl.constexpr,
):
    row, chunk, row_ptr, start, end = program_row_chunk(logits_ptr, stride_r, V, chunk_size)
    offs = tl.arange(0, BLOCK)
    if HAS_TAU:
        tau = tl.load(tau_ptr + row)
    else:
        tau = float("-inf")
    m = _scale(tl.load(row_max_ptr + row).to(tl.float32), scale, CUDA_MATH)
    m = tl.where((m > float("-inf")) & (m < float("inf")), m, 0.0)

    best = tl.full((), float("-inf"), tl.float32)
    best_idx = start.to(tl.int64)
    for off in range(start, end, BLOCK):
        cols = off + offs
        x = _load_scaled(row_ptr, cols, end, scale, CUDA_MATH)
        u = uniform_triton(streams, row, cols)
        g = tl.where((x >= tau) & (cols < end), (x - m) - _log(-_log(u, CUDA_MATH), CUDA_MATH),
                     float("-inf"))
        g_max = tl.max(g, axis=0)
        g_idx = tl.min(tl.where(g == g_max, cols, 2147483647), axis=0).to(tl.int64)
        take = g_max > best  # strict: an earlier block keeps a tie (first index, like torch.argmax)
        best_idx = tl.where(take, g_idx, best_idx)
        best = tl.maximum(best, g_max)

    if SINGLE:
        tl.store(out_ptr + row, best_idx)
    else:
        tl.store(part_val_ptr + row * n_chunks + chunk, best)
        tl.store(part_idx_ptr + row * n_chunks + chunk, best_idx)


def _scale_arg(temperature: float, device: torch.device) -> float:
    """The kernels' ``scale`` argument (see ``_scale``): torch's CUDA ``x / T`` is ``x * (1f / float(T))``."""
    if device.type == "cuda":
        one = torch.tensor(1.0, dtype=torch.float32)
        return float(one / torch.tensor(float(temperature), dtype=torch.float32))
    return float(temperature)


def truncation_threshold(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                         top_p: float | None = None) -> torch.Tensor | None:
    """Per-row threshold ``tau [R]`` fp32 with ``truncate_logits`` keeping exactly ``logits / T >= tau``;
    ``None`` when nothing is truncated. logits ``[R, V]`` contiguous along V."""
    R, V = logits.shape
    has_k = top_k is not None and top_k < V
    has_p = top_p is not None and top_p < 1.0
    if not (has_k or has_p) or R == 0:
        return None
    tau = torch.empty(R, device=logits.device, dtype=torch.float32)
    _threshold_kernel[(R,)](
        logits, logits.stride(0), V, _scale_arg(temperature, logits.device), int(top_k) if has_k else 0,
        float(top_p) if has_p else 1.0, tau, HAS_K=has_k, HAS_P=has_p, CUDA_MATH=logits.is_cuda,
        BLOCK=BLOCK_V, enable_fp_fusion=False,
    )
    return tau


def sample_triton(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, seed: int = 0, chunk_size: int | None = None) -> torch.Tensor:
    """One token per row, equal to ``sample_torch`` for the same arguments (see the module doc).

    logits: ``[R, V]`` fp32 / bf16 / fp16, ``-inf`` = masked (every row needs a finite entry: the public
    ``sample`` checks). Returns tokens ``[R]`` int64. ``chunk_size``: vocabulary entries per program of
    the draw; ``None`` picks it from the row count and the GPU.
    """
    logits = as_rows(logits)
    check_truncation_args(temperature, top_k, top_p)  # the reference's argument errors
    R, V = logits.shape
    device = logits.device
    out = torch.empty(R, device=device, dtype=torch.int64)
    if R == 0:
        return out
    tau = truncation_threshold(logits, temperature, top_k, top_p)
    n_chunks, chunk_size = num_chunks(R, V, device, chunk_size)
    single = n_chunks == 1
    if single:
        part_val, part_idx = out, out  # unused
    else:
        part_val = torch.empty(R, n_chunks, device=device, dtype=torch.float32)
        part_idx = torch.empty(R, n_chunks, device=device, dtype=torch.int64)
    _draw_kernel[(R, n_chunks)](
        logits, logits.stride(0), V, _scale_arg(temperature, device), tau if tau is not None else out,
        logits.amax(dim=1), streams_tensor(seed, R, device), out, part_val, part_idx, chunk_size, n_chunks,
        HAS_TAU=tau is not None, SINGLE=single, CUDA_MATH=logits.is_cuda, BLOCK=BLOCK_V,
        enable_fp_fusion=False,  # no FMA contraction: x and x - log(E) rounded exactly as torch does
    )
    if single:
        return out
    # first chunk holding the row maximum: chunks are in vocabulary order, so this is the first index
    best_chunk = part_val.argmax(dim=1, keepdim=True)
    return part_idx.gather(1, best_chunk).squeeze(1)
