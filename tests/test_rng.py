"""The counter-based generator (kernels.rng): Philox-4x32-10 known answers, uniforms strictly inside (0, 1),
Triton == torch bit for bit, greedy sampling at a real vocabulary, and streams that never coincide."""

import math

import pytest
import torch
import triton
import triton.language as tl

from fastalign.kernels import sample_torch
from fastalign.kernels.rng import (PURPOSES, as_signed64, bits_to_uniform_torch, bits_to_uniform_triton, counter,
                                   philox_torch, prompt_key, prompt_seed, stream_bits_torch, streams_tensor,
                                   uniform_grid_torch, uniform_streams_torch, uniform_triton)
from fastalign.methods.base import Randomness, prompt_seeds

M32 = 0xFFFFFFFF
# Random123's kat_vectors for philox4x32_10: (counter, key) -> output
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32, M32, M32, M32), (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@triton.jit
def _uniform_kernel(streams, out, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out + row * n_cols + cols, uniform_triton(streams, row, cols), mask=cols < n_cols)


@triton.jit
def _convert_kernel(bits, out, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    b = tl.load(bits + offs, mask=offs < n, other=0).to(tl.uint32)
    tl.store(out + offs, bits_to_uniform_triton(b), mask=offs < n)


def _kat_torch(ctr, key):
    t = [torch.tensor([x], dtype=torch.int64) for x in (*ctr, *key)]
    return tuple(int(w) for w in philox_torch(*t))


def test_philox_known_answers():
    for ctr, key, want in KAT:
        assert _kat_torch(ctr, key) == want


def test_uniform_conversion_is_strictly_inside_0_1_for_every_value():
    """Every one of the 2**23 uniforms (each 23-bit value, with the 9 dropped bits all 0 and all 1) is in
    (0, 1) in fp32, with a finite exponential and Gumbel; the extremes are 2**-24 and 1 - 2**-24 exactly."""
    m = torch.arange(2**23, dtype=torch.int64) << 9
    for bits in (m, m | 0x1FF):
        u = bits_to_uniform_torch(bits)
        assert u.dtype == torch.float32
        assert bool((u > 0).all()) and bool((u < 1).all())
        assert bool(torch.isfinite(-torch.log(-torch.log(u))).all())
        assert float(u.min()) == 2.0**-24 and float(u.max()) == 1 - 2.0**-24
        assert torch.unique(u).numel() == 2**23  # exact: no two values round together


def test_uniform_conversion_triton_matches_torch_at_the_extremes():
    edge = torch.cat([torch.arange(2**14), M32 - torch.arange(2**14)]).to(torch.int64)
    out = torch.empty(edge.numel(), dtype=torch.float32)
    _convert_kernel[(triton.cdiv(edge.numel(), 4096),)](edge, out, edge.numel(), BLOCK=4096)
    assert torch.equal(out, bits_to_uniform_torch(edge))
    assert bool((out > 0).all()) and bool((out < 1).all())


@pytest.mark.parametrize("key", [0, -1, 2**63 - 1, -(2**63), 0x243F6A8885A308D3])
def test_streams_triton_equals_torch_at_extreme_keys_and_counters(key):
    streams = torch.tensor([[key, c] for c in (0, -1, 2**32 - 1, 2**32, 2**63 - 1)], dtype=torch.int64)
    n = 1000
    out = torch.empty(streams.shape[0], n, dtype=torch.float32)
    _uniform_kernel[(streams.shape[0], triton.cdiv(n, 256))](streams, out, n, BLOCK=256)
    assert torch.equal(out, uniform_streams_torch(streams, n))


def test_stream_elements_are_the_philox_words():
    """Elements 4j .. 4j+3 of stream (key, ctr) are the four words of Philox at counter (j, ctr_lo, ctr_hi, 0)."""
    assert tuple(stream_bits_torch(torch.zeros(1, 2, dtype=torch.int64), 4)[0].tolist()) == KAT[0][2]
    key, ctr = 0x0123456789ABCDEF, 0x00000005FFFFFFFE
    stream = torch.tensor([[as_signed64(key), as_signed64(ctr)]])
    bits = stream_bits_torch(stream, 12)[0].tolist()
    for j in range(3):
        want = _kat_torch((j, ctr & M32, ctr >> 32, 0), (key & M32, key >> 32))
        assert tuple(bits[4 * j: 4 * j + 4]) == want


def test_top_k_1_is_the_argmax_at_a_real_vocabulary():
    """Greedy sampling returns the argmax on every row at V = 152k (a uniform equal to 1 would force a random
    token with probability V * 2**-24 per row, about 0.9%: one of these 128 rows with probability 0.7)."""
    R, V = 128, 152_064
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(R, V, generator=g)
    seeds = Randomness(list(range(R)), R).streams(range(R), "token", steps=3)
    assert torch.equal(sample_torch(logits, 1.0, top_k=1, seed=seeds), logits.argmax(-1))


def test_counters_are_injective_and_checked():
    fields = [(s, p, b) for s in (0, 1, 2**31, 2**32 - 1) for p in PURPOSES for b in (0, 1, 2**23, 2**24 - 1)]
    assert len({counter(*f) for f in fields}) == len(fields)
    with pytest.raises(ValueError):
        counter(2**32, "token", 0)
    with pytest.raises(ValueError):
        counter(0, "token", 2**24)
    assert len({prompt_seed(5, i) for i in range(10_000)}) == 10_000
    assert len({prompt_key(s) for s in range(10_000)}) == 10_000


def test_streams_do_not_coincide_at_real_sizes():
    """No two 64-bit windows (two consecutive numbers) coincide anywhere among the streams of a decode: 4
    prompts x 3 purposes x 8 steps x 16 sub-streams x 1024 elements, plus 8 rows of a 152k vocabulary and an
    int-seeded kernel call of 256 rows. A shifted reuse of noise between calls, rows or positions (the old
    hash's failure) would repeat windows; by chance a repeat has probability about 1e-7."""
    rng = Randomness([3, 4, 5, 6], 4)
    blocks = []
    for purpose in ("token", "accept", "race"):
        for step in range(8):
            prompts = [p for p in range(4) for _ in range(16)]
            subs = [s for _ in range(4) for s in range(16)]
            blocks.append(stream_bits_torch(rng.streams(prompts, purpose, subs, steps=step), 1024))
    windows = [(b[:, :-1] << 32) | b[:, 1:] for b in blocks]
    big = stream_bits_torch(rng.streams([0, 1, 2, 3] * 2, "token", [0] * 4 + [1] * 4, steps=100), 152_064)
    windows.append((big[:, :-1] << 32) | big[:, 1:])
    legacy = stream_bits_torch(streams_tensor(3, 256), 1024)
    windows.append((legacy[:, :-1] << 32) | legacy[:, 1:])
    flat = torch.cat([w.flatten() for w in windows])
    assert torch.unique(flat).numel() == flat.numel()


def test_uniform_grid_int_seed_rows_differ_and_seeds_resolve():
    u = uniform_grid_torch(1, 3, 64)
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[1], u[2])
    assert prompt_seeds(5, 3) == [prompt_seed(5, i) for i in range(3)]
    assert prompt_seeds([9, 9, 1], 3) == [9, 9, 1]
    with pytest.raises(ValueError, match="one per prompt"):
        prompt_seeds([1, 2], 3)
    with pytest.raises(ValueError, match="seed"):
        prompt_seeds(1.5, 1)
    assert math.isfinite(float(uniform_grid_torch(0, 1, 1)))


def test_numpy_and_torch_twins_give_the_same_bits():
    """``stream_bits_torch`` takes NumPy on CPU tensors and torch elsewhere: both must be the same numbers."""
    from fastalign.kernels.rng import stream_bits_numpy, stream_bits_tensor

    gen = torch.Generator().manual_seed(0)
    for rows, cols in ((1, 1), (3, 5), (4, 144), (2, 4099)):
        streams = torch.randint(-2**63, 2**63 - 1, (rows, 2), dtype=torch.int64, generator=gen)
        assert torch.equal(stream_bits_numpy(streams, cols), stream_bits_tensor(streams, cols))


NATIVE_ISAS = ["generic", "avx2", "avx512f"]


@pytest.mark.parametrize("isa", NATIVE_ISAS)
def test_native_philox_gives_the_same_bits_and_uniforms(isa):
    """``_C``'s Philox loop (each of its variants this CPU has) against the NumPy twin: the same words and the same
    uniforms, at lengths around its block of 256 elements, edge keys and counters included."""
    from fastalign.kernels import rng

    if not rng.native_available():
        pytest.skip("fastalign._C is not in use here")
    if isa != "generic" and not _cpu_has(isa):
        pytest.skip(f"this CPU has no {isa}")
    gen = torch.Generator().manual_seed(1)
    edge = torch.tensor([[0, 0], [-1, -1], [2**63 - 1, -2**63], [1, 2**32]], dtype=torch.int64)
    for rows, cols in ((1, 1), (3, 5), (2, 255), (2, 256), (2, 257), (1, 4099), (4, 1024)):
        streams = torch.randint(-2**63, 2**63 - 1, (rows, 2), dtype=torch.int64, generator=gen)
        for s in (streams, edge):
            want = rng.stream_bits_numpy(s, cols)
            assert torch.equal(rng.native_streams(s, cols, torch.int64, isa), want), (rows, cols)
            assert torch.equal(rng.native_streams(s, cols, torch.float32, isa), rng.bits_to_uniform_torch(want))
    assert rng.native_streams(edge, 0, torch.float32, isa).shape == (4, 0)


def _cpu_has(flag: str) -> bool:
    """Whether /proc/cpuinfo lists ``flag`` (False where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(flag in line.split() for line in f if line.startswith("flags"))
    except OSError:
        return False


def test_cpu_streams_take_the_native_loop_unless_switched_off(monkeypatch):
    """On CPU tensors ``stream_bits_torch`` and ``uniform_streams_torch`` run ``_C``'s loop; ``FASTALIGN_NATIVE=0``
    sends them to NumPy; either way the numbers are the same. Bad streams are refused before any pointer is read."""
    from fastalign.kernels import rng

    if not rng.native_available():
        pytest.skip("fastalign._C is not in use here")
    calls = []
    real = rng.native_streams
    monkeypatch.setattr(rng, "native_streams", lambda *a: calls.append(a[2]) or real(*a))
    streams = Randomness([5, 6], 2).streams([0, 1], "token")
    bits, uniforms = stream_bits_torch(streams, 300), uniform_streams_torch(streams, 300)
    assert calls == [torch.int64, torch.float32]
    monkeypatch.setenv("FASTALIGN_NATIVE", "0")
    assert torch.equal(stream_bits_torch(streams, 300), bits)
    assert torch.equal(uniform_streams_torch(streams, 300), uniforms)
    assert len(calls) == 2
    monkeypatch.delenv("FASTALIGN_NATIVE")
    for bad in (streams.to(torch.int32), streams[:, :1], streams[0]):
        with pytest.raises(ValueError, match="int64 \\[R, 2\\]"):
            real(bad, 4, torch.int64)
    for dtype in (torch.float16, torch.int32, torch.float64):  # the loop writes 8-byte words or 4-byte floats only
        with pytest.raises(ValueError, match="int64 words or float32"):
            real(streams, 4, dtype)
    with pytest.raises(ValueError, match="2\\*\\*34"):
        stream_bits_torch(streams, -1)


def test_inactive_rows_do_not_advance_their_count():
    """A row's draw counter counts its own active draws: a row that sat a draw out (it ended at EOS while the
    others still sample) draws next from the counter it would have used alone, whatever the batch did."""
    rng = Randomness([3, 4], 2)
    first = rng.streams([0, 1], "token", active=[True, False])
    second = rng.streams([0, 1], "token")
    assert int(second[0, 1]) == as_signed64(counter(1, "token", 0))  # the active row moved on
    assert torch.equal(second[1], first[1])  # the inactive one did not
    assert torch.equal(second[1], Randomness([3, 4], 2).streams([1], "token")[0])
