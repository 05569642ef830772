"""Triton kernel: entropy and logsumexp of ``softmax(logits / T)`` per row, in one streaming pass.

Each program keeps an online softmax state over its slice of the vocabulary:

* ``m``: running max of ``x = logits / T``;
* ``s = sum exp(x - m)``;
* ``t = sum exp(x - m) * (x - m)`` (relative to ``m``, so large logits do not cancel catastrophically);

then ``lse = m + log(s)`` and ``entropy = lse - E[x] = log(s) - t / s``. No probability tensor is written.

Work split (docs/design.md section 3): with many rows one program owns a row; with few rows (fewer than about two
per multiprocessor) the vocabulary is split into chunks, each program reduces one chunk to a partial
``(m, s, t)`` and a tiny second kernel merges the partials of a row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_V = 1024  # vocabulary entries per loop step of a program (fp32: 4 KiB per load)
MIN_CHUNK = 4096  # a split program gets at least this much of the vocabulary, or launch cost dominates


def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device; 1 elsewhere (the interpreter runs programs one by one)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def as_rows(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` checked to be ``[R, V]``, with the vocabulary dimension contiguous (the kernels' row layout)."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [R, V], got shape {tuple(logits.shape)}")
    return logits if logits.stride(-1) == 1 else logits.contiguous()


def num_chunks(R: int, V: int, device: torch.device, chunk_size: int | None = None) -> tuple[int, int]:
    """``(n_chunks, chunk_size)``: how a row's vocabulary is split across programs.

    One program per row when there are at least ~2 rows per multiprocessor; otherwise split so that
    about ``2 * SMs`` programs run (each at least ``MIN_CHUNK`` wide). ``chunk_size`` forces a width.
    """
    if chunk_size is None:
        target = 2 * sm_count(device)
        if R >= target:
            return 1, V
        per_row = triton.cdiv(target, R)
        chunk_size = max(MIN_CHUNK, triton.cdiv(triton.cdiv(V, per_row), BLOCK_V) * BLOCK_V)
    chunk_size = max(1, min(int(chunk_size), V))
    return triton.cdiv(V, chunk_size), chunk_size


@triton.jit
def program_row_chunk(logits_ptr, stride_r, V, chunk_size):
    """This program's ``(row, chunk)`` of the grid ``(R, n_chunks)``, the row's pointer and ``[start, end)``."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    start = chunk * chunk_size
    return row, chunk, logits_ptr + row.to(tl.int64) * stride_r, start, tl.minimum(start + chunk_size, V)


@triton.jit
def _online_update(m, s, t, x):
    """Fold a block ``x`` (fp32, ``-inf`` = masked) into the running state ``(m, s, t)``."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    # everything seen so far may be -inf: use 0 as the reference point then (all terms are 0 anyway)
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    e = tl.exp(x - m_ref)
    d = tl.where(x == float("-inf"), 0.0, x - m_ref)  # avoid 0 * -inf = nan on masked entries
    scale = tl.exp(m - m_ref)
    shift = tl.where(m == float("-inf"), 0.0, m - m_ref)
    t = scale * (t + shift * s) + tl.sum(e * d, axis=0)
    s = scale * s + tl.sum(e, axis=0)
    return m_new, s, t


@triton.jit
def _entropy_chunk_kernel(
    logits_ptr, stride_r, V, temperature,
    out_h_ptr, out_lse_ptr,      # [R] fp32, written when the row is one chunk
    part_ptr,                    # [R, n_chunks, 3] fp32 partial (m, s, t), written otherwise
    chunk_size, n_chunks,
    SINGLE: tl.constexpr, BLOCK: tl.constexpr,
):
    row, chunk, row_ptr, start, end = program_row_chunk(logits_ptr, stride_r, V, chunk_size)
    offs = tl.arange(0, BLOCK)

    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    t = tl.zeros((), tl.float32)
    for off in range(start, end, BLOCK):
        cols = off + offs
        x = tl.load(row_ptr + cols, mask=cols < end, other=float("-inf")).to(tl.float32)
        x = x / temperature  # true division, bit-identical to the reference's ``logits.float() / T``
        m, s, t = _online_update(m, s, t, x)

    if SINGLE:
        tl.store(out_lse_ptr + row, m + tl.log(s))
        tl.store(out_h_ptr + row, tl.log(s) - t / s)
    else:
        base = part_ptr + (row * n_chunks + chunk) * 3
        tl.store(base + 0, m)
        tl.store(base + 1, s)
        tl.store(base + 2, t)


@triton.jit
def _entropy_combine_kernel(part_ptr, out_h_ptr, out_lse_ptr, n_chunks, BLOCK_C: tl.constexpr):
    """Merge the ``n_chunks`` partial states of one row (the same algebra as ``_online_update``)."""
    row = tl.program_id(0)
    c = tl.arange(0, BLOCK_C)
    mask = c < n_chunks
    base = part_ptr + (row * n_chunks + c) * 3
    m_c = tl.load(base + 0, mask=mask, other=float("-inf"))
    s_c = tl.load(base + 1, mask=mask, other=0.0)
    t_c = tl.load(base + 2, mask=mask, other=0.0)
    m = tl.max(m_c, axis=0)  # finite: check_finite guarantees a finite entry per row
    live = m_c != float("-inf")  # a fully masked chunk has s = t = 0 and contributes nothing
    scale = tl.where(live, tl.exp(m_c - m), 0.0)
    shift = tl.where(live, m_c - m, 0.0)
    s = tl.sum(scale * s_c, axis=0)
    t = tl.sum(scale * (t_c + shift * s_c), axis=0)
    tl.store(out_lse_ptr + row, m + tl.log(s))
    tl.store(out_h_ptr + row, tl.log(s) - t / s)


def entropy_triton(logits: torch.Tensor, temperature: float = 1.0,
                   chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy (nats) and logsumexp of ``softmax(logits / temperature)`` per row.

    logits: ``[R, V]`` fp32 / bf16 / fp16, ``-inf`` entries are masked tokens (every row needs a finite
    entry: the public ``entropy`` checks). Returns ``(entropy [R] fp32, logsumexp [R] fp32)``.
    ``chunk_size``: vocabulary entries per program; ``None`` picks it from the row count and the GPU
    (the split path is forced in tests with a small value).
    """
    logits = as_rows(logits)
    R, V = logits.shape
    device = logits.device
    h = torch.empty(R, device=device, dtype=torch.float32)
    lse = torch.empty(R, device=device, dtype=torch.float32)
    if R == 0:
        return h, lse
    n_chunks, chunk_size = num_chunks(R, V, device, chunk_size)
    single = n_chunks == 1
    part = h if single else torch.empty(R, n_chunks, 3, device=device, dtype=torch.float32)
    _entropy_chunk_kernel[(R, n_chunks)](
        logits, logits.stride(0), V, float(temperature), h, lse, part, chunk_size, n_chunks,
        SINGLE=single, BLOCK=BLOCK_V,
    )
    if not single:
        _entropy_combine_kernel[(R,)](part, h, lse, n_chunks, BLOCK_C=triton.next_power_of_2(n_chunks))
    return h, lse
