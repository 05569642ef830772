"""What the Triton ``spec_verify`` and ``tree_verify`` kernels share (definitions in ``kernels.spec_verify``).

Device side, ``@triton.jit`` helpers (inlined when compiled): the online ``(max, sum exp)`` fold, the log-ratio
with its zero-probability stand-ins (``log_ratio``), the normalisers of one vocabulary range (``norms``, kept as
``(max, log sum)`` pairs by ``log_norm``, and the tilt's ``logZ`` pass ``logz_pass``), the per-block
``(log p, log q_r, log pi)`` (``logprobs``), and the exponential race's running argmax (``argmax_fold``). Host
side: ``prepare_verify_inputs`` (truncation, layout, block size and the tilt's constants). The torch-side math
(the tilt, ``RATIO_INF``) is in ``kernels._verify_math``.

``GIVEN`` (with top-k / top-p): the third logits tensor holds ``log pi`` itself (the truncated tilt, prepared in
torch by ``_verify_math.tilted_logits``), not the ref's logits; the kernels then read ``pi`` instead of forming it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._verify_math import RATIO_INF, tilt_active, tilted_logits
from .truncation import truncate_logits

MODE_IDS = {"sd": 0, "sss_exact": 1, "sss_paper": 2}


@triton.jit
def _acc(m, s, x):
    """Fold block ``x`` into the running (max, sum exp(x - max)) pair; safe when everything is -inf."""
    m_new = tl.maximum(m, tl.max(x, 0))
    safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * tl.exp(m - safe) + tl.sum(tl.exp(x - safe), 0)
    return m_new, s


@triton.jit
def log_ratio(lqr, lq, r_inf, max_ratio, CLIP: tl.constexpr):
    """``d = log q_r - log q``, ``+-r_inf`` where exactly one side is zero, 0 where both are; clipped if CLIP."""
    fd = lqr > float("-inf")
    fr = lq > float("-inf")
    d = tl.where(fd & fr, lqr - lq, tl.where(fd, r_inf, tl.where(fr, -r_inf, 0.0)))
    if CLIP:
        d = tl.minimum(tl.maximum(d, -max_ratio), max_ratio)
    return d


@triton.jit
def norms(tb, db, rb, start, end, vd, V, temperature, TILT: tl.constexpr, BLOCK: tl.constexpr):
    """Online (max, sum-exp) pairs over the vocabulary range ``[start, end)`` of one position, one read per tensor.

    ``tb`` / ``db`` / ``rb``: the target / draft / ref logits row; the draft reads ``v < vd`` only (``vd = 0``:
    the draft has no such position). Returns ``(m, s)`` of ``x_t``, ``x_d`` and, with TILT, ``x_r``.
    """
    ninf = float("-inf")
    m_t = ninf
    s_t = 0.0
    m_d = ninf
    s_d = 0.0
    m_r = ninf
    s_r = 0.0
    for off in range(start, end, BLOCK):
        v = off + tl.arange(0, BLOCK)
        vm = v < V
        m_t, s_t = _acc(m_t, s_t, tl.load(tb + v, mask=vm, other=ninf).to(tl.float32) / temperature)
        m_d, s_d = _acc(m_d, s_d, tl.load(db + v, mask=v < vd, other=ninf).to(tl.float32) / temperature)
        if TILT:
            m_r, s_r = _acc(m_r, s_r, tl.load(rb + v, mask=vm, other=ninf).to(tl.float32) / temperature)
    return m_t, s_t, m_d, s_d, m_r, s_r


@triton.jit
def log_norm(m, s):
    """A normaliser kept as the pair ``(m, log s)``, so that ``log p = (x - m) - log s``: folded into one
    ``m + log s`` it would lose ``log s`` when ``m`` is huge (a small temperature). ``m`` is 0 where no entry is
    finite (then ``log s = -inf``, as ``m + log s`` was)."""
    return tl.where(m == float("-inf"), 0.0, m), tl.log(s)


@triton.jit
def logprobs(tb, db, rb, v, vm, dm, m_t, l_t, m_d, l_d, m_r, l_r, m_z, l_z, temperature, lam, r_inf, max_ratio,
             TILT: tl.constexpr, CLIP: tl.constexpr, GIVEN: tl.constexpr = False):
    """``(log p, log q_r, log pi)`` of the vocabulary block ``v`` at one position (``dm``: the draft's mask), from
    the normalisers ``(m_*, l_*)`` of ``log_norm`` (``_z``: that of ``log p + lam * d``, the tilt's ``logZ``)."""
    ninf = float("-inf")
    lp = (tl.load(tb + v, mask=vm, other=ninf).to(tl.float32) / temperature - m_t) - l_t
    lqr = (tl.load(db + v, mask=dm, other=ninf).to(tl.float32) / temperature - m_d) - l_d
    lpi = lp
    if TILT:
        lq = (tl.load(rb + v, mask=vm, other=ninf).to(tl.float32) / temperature - m_r) - l_r
        if GIVEN:
            lpi = lq
        else:
            lpi = ((lp + lam * log_ratio(lqr, lq, r_inf, max_ratio, CLIP)) - m_z) - l_z
    return lp, lqr, lpi


@triton.jit
def logz_pass(tb, db, rb, start, end, vd, V, m_t, l_t, m_d, l_d, m_r, l_r, temperature, lam, r_inf, max_ratio,
              CLIP: tl.constexpr, BLOCK: tl.constexpr):
    """(max, sum-exp) of ``log p + lam * d`` (``d`` clipped with CLIP) over ``[start, end)``: the tilt's ``logZ``,
    a second pass once the three normalisers are known (the log-probabilities are then exact near their tops)."""
    m_a = float("-inf")
    s_a = 0.0
    for off in range(start, end, BLOCK):
        v = off + tl.arange(0, BLOCK)
        vm = v < V
        lp, lqr, key = logprobs(tb, db, rb, v, vm, v < vd, m_t, l_t, m_d, l_d, m_r, l_r, 0.0, 0.0, temperature,
                                lam, r_inf, max_ratio, True, CLIP)
        m_a, s_a = _acc(m_a, s_a, tl.where(vm, key, float("-inf")))
    return m_a, s_a


@triton.jit
def argmax_fold(best, idx, key, off):
    """Fold block ``key`` (starting at vocabulary index ``off``) into the running argmax; first maximum wins."""
    bm = tl.max(key, 0)
    im = tl.argmax(key, 0)
    take = bm > best
    return tl.where(take, bm, best), tl.where(take, off + im, idx)


class VerifyInputs(NamedTuple):
    tgt: torch.Tensor
    drf: torch.Tensor
    ref: torch.Tensor  # the target when the tilt is off (never read then); log pi when ``given``
    strides: tuple  # (batch, position) strides of tgt, drf, ref
    temperature: float  # 1.0 once the logits are truncated (they are scaled then)
    lam: float
    tilt: bool
    given: bool  # ``ref`` holds log pi (truncation with the tilt)
    clip: bool
    r_inf: float  # the log-ratio where exactly one side is zero
    max_ratio: float  # the clip (0.0 when unused)
    block: int
    num_warps: int


def prepare_verify_inputs(target_logits, draft_logits, ref_logits, mode, lam, temperature, top_k, top_p,
                          max_log_ratio, block=None) -> VerifyInputs:
    """The kernels' view of the logits: top-k / top-p applied here (``truncate_logits``, fp32, already scaled;
    with the tilt, ``log pi`` from ``tilted_logits`` in the ref's place), the vocabulary dimension contiguous,
    and the vocabulary block (``block`` overrides it, >= 16)."""
    tilt = tilt_active(mode, ref_logits, lam)
    given = False
    if top_k is not None or top_p is not None:
        if tilt:
            ref_logits = tilted_logits(target_logits, draft_logits, ref_logits, lam, temperature, top_k, top_p,
                                       max_log_ratio)
            given = True
        target_logits = truncate_logits(target_logits, temperature, top_k, top_p)
        draft_logits = truncate_logits(draft_logits, temperature, top_k, top_p)
        temperature = 1.0
    tgt = target_logits if target_logits.stride(-1) == 1 else target_logits.contiguous()
    drf = draft_logits if draft_logits.stride(-1) == 1 else draft_logits.contiguous()
    ref = tgt
    if tilt:
        ref = ref_logits if ref_logits.stride(-1) == 1 else ref_logits.contiguous()
    V = tgt.shape[-1]
    block = block or min(2048 if tgt.element_size() <= 2 else 1024, triton.next_power_of_2(V))
    block = max(block, 16)
    return VerifyInputs(
        tgt, drf, ref,
        strides=(tgt.stride(0), tgt.stride(1), drf.stride(0), drf.stride(1), ref.stride(0), ref.stride(1)),
        temperature=float(temperature), lam=float(lam), tilt=tilt, given=given,
        clip=tilt and not given and max_log_ratio is not None,
        r_inf=float(RATIO_INF if max_log_ratio is None else max_log_ratio),
        max_ratio=float(max_log_ratio) if max_log_ratio is not None else 0.0,
        block=block, num_warps=8 if block >= 2048 else 4,
    )
