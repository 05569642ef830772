"""Counter-based random numbers shared bit for bit by the Triton kernels and their PyTorch references.

The generator is Philox-4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011): a
keyed bijection of a 128-bit counter, the generator of cuRAND, JAX and ``tl.rand``. Word ``col % 4`` of
``philox(key, (col // 4, ctr_lo, ctr_hi, 0))`` is the random number of element ``col`` of a stream (one
Philox evaluation serves four consecutive elements, as ``curand_uniform4`` does):

* ``key`` (64 bits) belongs to a prompt (``prompt_key``: mixed from the prompt's seed), so prompts never share
  noise and a prompt's noise does not depend on its row or on the other prompts of the batch;
* ``ctr`` (64 bits) names the draw inside the prompt (``counter(step, purpose, sub)``: the decoding step, what
  the numbers are for, and a sub-stream such as a sample index, a chain or a tree node), so two distinct
  draws of one prompt use distinct counters and, Philox being a bijection, distinct bits;
* ``col`` is the element index (a vocabulary entry, a drafted position).

A kernel takes its randomness as ``seed``: an int (row ``r`` uses the key of a prompt with that seed and the
counter ``counter(r >> 24, "kernel", r & 0xFFFFFF)``, a purpose no decode uses), or an int64 tensor
``[R, 2]`` of per-row ``(key, ctr)`` pairs (``Randomness`` in ``fastalign.methods.base`` builds them).

Uniforms are ``(bits >> 9) + 0.5`` times ``2**-23``: 23 random bits, every value exact in fp32, the smallest
``2**-24`` and the largest ``1 - 2**-24``, so ``-log(u)`` and ``-log(-log(u))`` are always finite.
"""

from __future__ import annotations

import operator

import numpy as np
import torch

from .extension import extension, native_available

MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57  # Philox-4x32 multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
ROUNDS = 10
UNIFORM_BITS = 23

# purposes: the third field of a counter (8 bits)
PURPOSES = ("token", "accept", "race", "draft", "pick", "index", "mh", "request", "kernel", "resample")


def mix64(x: int) -> int:
    """splitmix64's finaliser: a bijection of 64-bit integers that spreads every input bit (host side)."""
    x &= MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def prompt_seed(seed: int, index: int) -> int:
    """The seed of prompt ``index`` when a decode is given one integer ``seed`` (in ``[0, 2**63)``)."""
    return mix64(mix64(int(seed)) + int(index) + 1) >> 1


def prompt_key(seed: int) -> int:
    """The Philox key (64 bits) of a prompt with this seed, an integer in ``[0, 2**64)``.

    Checked here, where the kernels take a seed: ``int()`` would turn 1.5 and True into seeds, and a seed outside
    the range would share its key with the one 2**64 away.
    """
    if isinstance(seed, bool) or not hasattr(seed, "__index__"):
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    if not 0 <= operator.index(seed) < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed}")
    return mix64(operator.index(seed) ^ 0x5851F42D4C957F2D)


def counter(step: int, purpose: str, sub: int = 0) -> int:
    """The 64-bit counter of one draw of a prompt: ``step`` (32 bits), ``purpose`` (8), ``sub`` (24)."""
    if not 0 <= step < 2**32 or not 0 <= sub < 2**24:
        raise ValueError(f"counter out of range: step {step}, sub {sub}")
    return (int(step) << 32) | (PURPOSES.index(purpose) << 24) | int(sub)


def as_signed64(x: int) -> int:
    """A 64-bit pattern as the int64 value torch stores."""
    x &= MASK64
    return x - (1 << 64) if x >> 63 else x


def streams_tensor(seed, rows: int, device=None) -> torch.Tensor:
    """The kernels' per-row ``(key, ctr)`` int64 tensor ``[rows, 2]`` for a ``seed`` given as an int or as such a
    tensor (checked)."""
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or tuple(seed.shape) != (rows, 2):
            raise ValueError(f"seed as a tensor must be int64 [R, 2] = [{rows}, 2] (key, counter) per row, "
                             f"got {seed.dtype} {tuple(seed.shape)}")
        return (seed if device is None or seed.device == torch.device(device) else seed.to(device)).contiguous()
    key = as_signed64(prompt_key(seed))
    out = torch.empty(rows, 2, dtype=torch.int64, device=device)
    out[:, 0] = key
    r = torch.arange(rows, device=device, dtype=torch.int64)
    out[:, 1] = ((r >> 24) << 32) | (PURPOSES.index("kernel") << 24) | (r & 0xFFFFFF)
    return out


# ------------------------------------------------------------------------------------------ torch twin
def _mulhilo(a: int, b: torch.Tensor):
    """``(hi, lo)`` 32-bit words of ``a * b`` for a 32-bit constant ``a`` and 32-bit values ``b`` (int64).

    The product (< 2**64) is computed in int64, which wraps modulo 2**64 (two's complement), so its bit pattern
    is the exact unsigned product; the shift + mask reads the high word whatever the sign.
    """
    p = b * a
    return (p >> 32) & MASK32, p & MASK32


def philox_torch(c0, c1, c2, c3, k0, k1, rounds: int = ROUNDS):
    """Philox-4x32 on int64 tensors holding 32-bit words (broadcast). Returns the four output words."""
    k0 = k0 & MASK32
    k1 = k1 & MASK32
    for _ in range(rounds):
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _W0) & MASK32
        k1 = (k1 + _W1) & MASK32
    return c0, c1, c2, c3


def bits_to_uniform_torch(bits: torch.Tensor) -> torch.Tensor:
    """32 random bits (int64) -> fp32 uniforms strictly inside (0, 1)."""
    return ((bits >> (32 - UNIFORM_BITS)).to(torch.float32) + 0.5) * (1.0 / 2**UNIFORM_BITS)


def stream_bits_torch(streams: torch.Tensor, n_cols: int) -> torch.Tensor:
    """The 32-bit numbers (int64) of elements ``0 .. n_cols - 1`` of the rows' streams ``[R, 2]`` (key, ctr):
    ``[R, n_cols]``. On the CPU the same bits come from ``fastalign._C``'s loop when it is in use, else from NumPy
    (``stream_bits_numpy``): Philox is ~140 tiny integer ops, and once per decoding step torch's per-op cost
    would dominate (NumPy's is a fraction of it, the native loop's nothing)."""
    _check_cols(n_cols)
    if streams.device.type == "cpu":
        if native_available():
            return native_streams(streams, n_cols, torch.int64)
        return stream_bits_numpy(streams, n_cols)
    return stream_bits_tensor(streams, n_cols)


def _check_cols(n_cols: int) -> None:
    if not 0 <= n_cols < 2**34:
        raise ValueError(f"a stream has 2**34 elements, asked for {n_cols}")


def native_streams(streams: torch.Tensor, n_cols: int, dtype: torch.dtype, isa: str = "") -> torch.Tensor:
    """``_C``'s Philox loop (``csrc/philox.cpp``) on CPU ``streams [R, 2]`` int64: the words as int64, or their
    uniforms as fp32 (``dtype``), ``[R, n_cols]``. ``isa``: the loop's variant (``"avx512f"``, ``"avx2"``,
    ``"generic"``; ``""``: the widest this CPU has). Needs the extension (``native_available()``)."""
    if extension is None:
        raise RuntimeError("native_streams needs the extension fastalign._C, which is not in use here")
    if dtype not in (torch.int64, torch.float32):
        raise ValueError(f"native_streams gives int64 words or float32 uniforms, not {dtype}")
    if streams.dtype != torch.int64 or streams.dim() != 2 or streams.shape[1] != 2 or streams.device.type != "cpu":
        raise ValueError(f"streams must be int64 [R, 2] (key, counter) on the CPU, got {streams.dtype} "
                         f"{tuple(streams.shape)} on {streams.device}")
    _check_cols(n_cols)
    s = streams.contiguous()
    out = torch.empty(s.shape[0], n_cols, dtype=dtype)
    run = extension._philox_bits if dtype == torch.int64 else extension._philox_uniform
    run(s.data_ptr(), out.data_ptr(), s.shape[0], n_cols, isa)
    return out


def stream_bits_numpy(streams: torch.Tensor, n_cols: int) -> torch.Tensor:
    """``stream_bits_torch`` in NumPy uint64 arithmetic (CPU tensors; bit for bit the same numbers).

    The two multiply lanes of a Philox round run as one array op: ``a = (c0, c2)`` and ``b = (c1, c3)`` are
    stacked on a leading axis of 2, so a round is a handful of NumPy calls (their fixed cost dominates here).
    """
    s = streams.contiguous().numpy().view(np.uint64)
    m32, s32 = np.uint64(MASK32), np.uint64(32)
    key, ctr = s[:, 0:1], s[:, 1:2]
    groups = (n_cols + 3) // 4
    a = np.empty((2, s.shape[0], groups), dtype=np.uint64)  # (c0, c2)
    a[0] = np.arange(groups, dtype=np.uint64)[None, :]
    a[1] = ctr >> s32
    b = np.empty_like(a)  # (c1, c3)
    b[0] = ctr & m32
    b[1] = 0
    k = np.stack([key & m32, key >> s32])  # (k0, k1), [2, R, 1]
    multipliers = np.array([_M0, _M1], dtype=np.uint64)[:, None, None]
    weyl = np.array([_W0, _W1], dtype=np.uint64)[:, None, None]
    for _ in range(ROUNDS):
        p = a * multipliers  # (c0 * M0, c2 * M1): < 2**64, exact in uint64
        a, b = (p[::-1] >> s32) ^ b ^ k, p[::-1] & m32  # c0' = hi1 ^ c1 ^ k0, c2' = hi0 ^ c3 ^ k1; c1' = lo1, c3' = lo0
        k = (k + weyl) & m32
    words = np.stack([a[0], b[0], a[1], b[1]], axis=-1).reshape(s.shape[0], -1)[:, :n_cols]
    return torch.from_numpy(words.astype(np.int64))


def stream_bits_tensor(streams: torch.Tensor, n_cols: int) -> torch.Tensor:
    """``stream_bits_torch`` in torch int64 arithmetic (any device)."""
    key = streams[:, 0:1]
    ctr = streams[:, 1:2]
    c0 = torch.arange((n_cols + 3) // 4, device=streams.device, dtype=torch.int64)[None, :]
    zero = torch.zeros((), dtype=torch.int64, device=streams.device)
    words = philox_torch(c0, ctr & MASK32, (ctr >> 32) & MASK32, zero, key & MASK32, (key >> 32) & MASK32)
    R = streams.shape[0]
    return torch.stack(torch.broadcast_tensors(*words), dim=-1).view(R, -1)[:, :n_cols]


def uniform_streams_torch(streams: torch.Tensor, n_cols: int) -> torch.Tensor:
    """fp32 uniforms ``[R, n_cols]``: element ``(r, c)`` of stream ``streams[r]``."""
    if streams.device.type == "cpu" and native_available():
        return native_streams(streams, n_cols, torch.float32)
    return bits_to_uniform_torch(stream_bits_torch(streams, n_cols))


def uniform_grid_torch(seed, n_rows: int, n_cols: int, device=None) -> torch.Tensor:
    """Uniforms ``[n_rows, n_cols]`` for a kernel ``seed`` (an int or per-row streams, see the module doc)."""
    return uniform_streams_torch(streams_tensor(seed, n_rows, device), n_cols)


try:  # the Triton twin; absent when triton is not installed
    import triton
    import triton.language as tl

    @triton.jit
    def philox_triton(c0, c1, c2, c3, k0, k1, ROUNDS_: tl.constexpr = 10):
        """Philox-4x32 on uint32 blocks; equal to ``philox_torch`` word for word."""
        for _ in tl.static_range(ROUNDS_):
            _c0 = c0
            _c2 = c2
            c0 = tl.umulhi(_c2, 0xCD9E8D57) ^ c1 ^ k0
            c2 = tl.umulhi(_c0, 0xD2511F53) ^ c3 ^ k1
            c1 = _c2 * 0xCD9E8D57
            c3 = _c0 * 0xD2511F53
            k0 = k0 + 0x9E3779B9
            k1 = k1 + 0xBB67AE85
        return c0, c1, c2, c3

    @triton.jit
    def uniform_triton(streams_ptr, row, cols):
        """fp32 uniforms in (0, 1) for element indices ``cols`` (an integer block) of the stream of ``row``
        (``streams_ptr``: the int64 ``[R, 2]`` (key, ctr) tensor)."""
        key = tl.load(streams_ptr + row.to(tl.int64) * 2)
        ctr = tl.load(streams_ptr + row.to(tl.int64) * 2 + 1)
        k0 = (key & 0xFFFFFFFF).to(tl.uint32)
        k1 = ((key >> 32) & 0xFFFFFFFF).to(tl.uint32)
        c1 = (ctr & 0xFFFFFFFF).to(tl.uint32)
        c2 = ((ctr >> 32) & 0xFFFFFFFF).to(tl.uint32)
        c = cols.to(tl.int64)
        c0 = ((c >> 2) & 0xFFFFFFFF).to(tl.uint32)
        word = c & 3
        zero = tl.zeros_like(c0)
        w0, w1, w2, w3 = philox_triton(c0, c1 + zero, c2 + zero, zero, k0 + zero, k1 + zero)
        b = tl.where(word == 0, w0, tl.where(word == 1, w1, tl.where(word == 2, w2, w3)))
        return bits_to_uniform_triton(b)

    @triton.jit
    def bits_to_uniform_triton(b):
        """uint32 random bits -> fp32 uniforms strictly inside (0, 1) (``bits_to_uniform_torch``)."""
        return ((b >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)

except ImportError:  # pragma: no cover - triton is a dependency, but keep the references importable
    uniform_triton = None
