"""The CPU kernels of fastalign's torch ops (``torch.ops.fastalign.linear_rows`` and ``cache_attention``): in C++
(``fastalign/_torch_ops.so``, csrc/torch_ops.cpp) where that library is built for this torch, else the Python
functions of fastalign.models.native. The C++ kernels take the same decisions as their Python twins, call by call
(the loop or the ATen fallback), and give the same bits."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest
import torch

from fastalign.kernels.extension import switched_on
from fastalign.models import native

requires_cpp = pytest.mark.skipif(native.op_kernels != "c++",
                                  reason=f"the ops run their Python kernels here ({native.op_kernels_why})")


def has_cache_loop() -> bool:
    return native.native_available() and bool(getattr(native._C, "has_cache_attention", False))


pytestmark = pytest.mark.usefixtures("one_thread_native_on")


def test_the_kernels_are_cpp_wherever_the_extension_is_built():
    """A build of ``_C`` (``pip install -e .``, scripts/setup.sh) builds the library too, for the torch installed."""
    assert native.native_info()["op_kernels"] == native.op_kernels
    if native._C is None or not switched_on("FASTALIGN_TORCH_OPS"):
        assert native.op_kernels == "python"
        pytest.skip(f"the ops run their Python kernels: {native.op_kernels_why}")
    assert os.path.exists(native.TORCH_OPS_LIBRARY) and native.op_kernels == "c++", native.op_kernels_why


def runs_and_result(kind: str, call):
    """(the loop runs of ``kind`` during ``call()``, its result)."""
    start = native.loop_runs()[kind]
    out = call()
    return native.loop_runs()[kind] - start, out


def same_as_python(kind, op, twin, *args):
    """The op (its registered kernel) and the Python twin take the same path and give the same bits."""
    op_runs, op_out = runs_and_result(kind, lambda: op(*args))
    twin_runs, twin_out = runs_and_result(kind, lambda: twin(*args))
    assert op_runs == twin_runs
    assert op_out.shape == twin_out.shape and op_out.dtype == twin_out.dtype
    assert torch.equal(op_out, twin_out)
    return op_runs


def linear_cases():
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(24, 40, generator=gen), torch.randn(24, generator=gen)
    x = torch.randn(3, 40, generator=gen)
    many = native.LINEAR_MAX_ROWS + 1
    return {  # name: (arguments, whether the loop takes them)
        "rows": ((x, w, b), True),
        "no bias": ((x, w, None), True),
        "one dim": ((x[0], w, b), True),
        "leading dims": ((torch.randn(2, 2, 40, generator=gen), w, b), True),
        "strided x": ((torch.randn(3, 80, generator=gen)[:, ::2], w, b), True),
        "no rows": ((torch.randn(0, 40), w, b), True),
        "most rows": ((torch.randn(native.LINEAR_MAX_ROWS, 40, generator=gen), w, None), True),
        "too many rows": ((torch.randn(many, 40, generator=gen), w, b), False),
        "fp64": ((x.double(), w.double(), b.double()), False),
        "weight not contiguous": ((x, w.t().contiguous().t(), b), False),
        "a bias that broadcasts": ((x, w, torch.randn(1)), False),
        "bias not contiguous": ((x, w, torch.randn(48)[::2]), False),
        "no inputs": ((torch.randn(3, 0), torch.randn(24, 0), b), False),
    }


@requires_cpp
@pytest.mark.parametrize("case", list(linear_cases()))
def test_linear_rows_decides_and_computes_as_its_python_twin(case):
    args, loop = linear_cases()[case]
    runs = same_as_python("linear", native.linear_rows_op, native.linear_rows, *args)
    assert (sum(runs.values()) == 1) == (loop and native.native_linear_supported())


@requires_cpp
@pytest.mark.skipif(not native.native_linear_supported(), reason="no linear loop on this CPU")
def test_linear_rows_leaves_to_f_linear_what_the_loop_does_not_take(monkeypatch):
    (x, w, b), _ = linear_cases()["rows"]
    twins = ("linear", native.linear_rows_op, native.linear_rows)
    with torch.enable_grad():  # a gradient asked through any input
        for asks in ((x.clone().requires_grad_(), w, b), (x, w.clone().requires_grad_(), b),
                     (x, w, b.clone().requires_grad_())):
            assert not same_as_python(*twins, *asks)
    with torch.no_grad():  # none asked: the loop
        assert same_as_python(*twins, x, w.clone().requires_grad_(), b) == {3: 1}
    with torch.inference_mode():
        assert same_as_python(*twins, x, w, b) == {3: 1}
    torch.set_num_threads(2)
    assert not same_as_python(*twins, x, w, b)
    torch.set_num_threads(1)
    for off in ("0", " Off ", "false", "NO", "\tno\n"):  # read at each call, as native_available reads it
        monkeypatch.setenv("FASTALIGN_NATIVE", off)
        assert not same_as_python(*twins, x, w, b)
    for on in ("1", "", "yes", "0ff"):
        monkeypatch.setenv("FASTALIGN_NATIVE", on)
        assert same_as_python(*twins, x, w, b) == {3: 1}


@requires_cpp
def test_the_loop_limits_are_one_setting_for_both_kernels():
    (x, w, b), _ = linear_cases()["rows"]
    (q, k, v, m, scale), _ = attention_cases()["bool mask"]
    previous = native.set_loop_limits(2, 1)
    try:
        assert native.LINEAR_MAX_ROWS == 2 and native.CACHE_ATTENTION_MAX_QUERIES == 1
        assert not same_as_python("linear", native.linear_rows_op, native.linear_rows, x, w, b)
        assert not same_as_python("attention", native.cache_attention_op, native.cache_attention, q, k, v, m, scale)
        native.set_loop_limits(3, 2)
        assert (same_as_python("linear", native.linear_rows_op, native.linear_rows, x, w, b) == {3: 1}) == \
            native.native_linear_supported()
        assert (same_as_python("attention", native.cache_attention_op, native.cache_attention, q, k, v, m, scale)
                == {2: 1}) == has_cache_loop()
    finally:
        assert native.set_loop_limits(*previous) == (3, 2)


def attention_cases():
    gen = torch.Generator().manual_seed(1)
    B, H, Hkv, S, D = 3, 6, 2, 9, 8

    def qkv(T, Hkv=Hkv):
        return (torch.randn(B, H, T, D, generator=gen), torch.randn(B, Hkv, S, D, generator=gen),
                torch.randn(B, Hkv, S, D, generator=gen))

    seen = torch.rand(B, 1, 2, S, generator=gen) > 0.3
    seen[..., 0] = True
    added = torch.zeros(seen.shape).masked_fill(~seen, torch.finfo(torch.float32).min)
    q, k, v = qkv(2)
    most = native.CACHE_ATTENTION_MAX_QUERIES
    long_q, long_k, long_v = qkv(most + 1)
    return {  # name: (arguments, whether the loop takes them)
        "bool mask": ((q, k, v, seen, 0.3), True),
        "added mask": ((q, k, v, added, 0.3), True),
        "no mask": ((q, k, v, None, 0.3), True),
        "a mask shared over rows": ((q, k, v, seen[:1], 0.3), True),
        "a mask shared over queries": ((q, k, v, seen[:, :, :1], 0.3), True),
        "no groups": ((q, *(t.repeat_interleave(3, 1) for t in (k, v)), seen, 0.3), True),
        "keys strided over rows": ((q, k.transpose(0, 1).contiguous().transpose(0, 1), v, seen, 0.3), True),
        "queries as a layer's view": ((torch.randn(B, 2, H, D, generator=gen).transpose(1, 2), k, v, seen, 0.3), True),
        "a mask expanded over rows": ((q, k, v, seen[:1].expand(B, 1, 2, S), 0.3), True),
        "a mask strided over columns": ((q, k, v, torch.stack([seen, seen], -1)[..., 0], 0.3), True),
        "most queries": ((*qkv(most), None, 0.3), True),
        "too many queries": ((long_q, long_k, long_v, None, 0.3), False),
        "fp64": ((q.double(), k.double(), v.double(), None, 0.3), False),
        "head dim strided": ((q, torch.randn(B, Hkv, S, 2 * D, generator=gen)[..., ::2], v, None, 0.3), False),
        "mask of another length": ((q, k, v, seen[..., :-1], 0.3), False),
        "mask over heads": ((q, k, v, seen.expand(B, H, 2, S).contiguous(), 0.3), False),
        "fp16 mask": ((q, k, v, added.half(), 0.3), False),
    }


def sdpa_fallback_runs(case) -> bool:
    """Whether SDPA itself can answer this case's arguments (a mask over heads broadcasts there)."""
    return case not in ("mask of another length", "fp16 mask")


@requires_cpp
@pytest.mark.parametrize("case", list(attention_cases()))
def test_cache_attention_decides_and_computes_as_its_python_twin(case):
    args, loop = attention_cases()[case]
    if not sdpa_fallback_runs(case):  # both hand it to SDPA, which refuses it alike
        for kernel in (native.cache_attention_op, native.cache_attention):
            with pytest.raises(RuntimeError):
                kernel(*args)
        return
    runs = same_as_python("attention", native.cache_attention_op, native.cache_attention, *args)
    assert (sum(runs.values()) == 1) == (loop and has_cache_loop())


@requires_cpp
@pytest.mark.skipif(not has_cache_loop(), reason="no cache attention loop on this CPU")
def test_cache_attention_leaves_to_sdpa_what_the_loop_does_not_take(monkeypatch):
    (q, k, v, m, scale), _ = attention_cases()["bool mask"]
    twins = ("attention", native.cache_attention_op, native.cache_attention)
    with torch.enable_grad():  # a gradient asked through any input
        for asks in ((q.clone().requires_grad_(), k, v), (q, k.clone().requires_grad_(), v),
                     (q, k, v.clone().requires_grad_())):
            assert not same_as_python(*twins, *asks, m, scale)
        added = torch.zeros(m.shape).masked_fill(~m, torch.finfo(torch.float32).min)
        assert same_as_python(*twins, q, k, v, added, scale) == {2: 1}
        assert not same_as_python(*twins, q, k, v, added.requires_grad_(), scale)  # a mask that learns
    with torch.no_grad():
        assert same_as_python(*twins, q.clone().requires_grad_(), k, v, m, scale) == {2: 1}
    torch.set_num_threads(2)
    assert not same_as_python(*twins, q, k, v, m, scale)
    torch.set_num_threads(1)
    monkeypatch.setenv("FASTALIGN_NATIVE", "off")
    assert not same_as_python(*twins, q, k, v, m, scale)
    monkeypatch.setenv("FASTALIGN_NATIVE", "")
    assert same_as_python(*twins, q, k, v, m, scale) == {2: 1}


@requires_cpp
def test_the_ops_pass_torch_s_checks_on_the_cpp_kernels():
    for args, _ in list(linear_cases().values())[:3]:
        torch.library.opcheck(native.linear_rows_op, args)
    for name in ("bool mask", "added mask", "no mask"):
        torch.library.opcheck(native.cache_attention_op, attention_cases()[name][0])


@requires_cpp
def test_the_library_registers_once_and_only_on_the_torch_it_was_built_for(monkeypatch):
    library = ctypes.CDLL(native.TORCH_OPS_LIBRARY)
    register = library.fastalign_register_torch_ops
    register.argtypes = (ctypes.c_size_t,)
    assert register(native._C.kernel_table) == 2  # registered already
    assert register(0) == 1  # no table
    wrong = (ctypes.c_int32 * 8)(native._C.kernel_table_version + 1)
    assert register(ctypes.addressof(wrong)) == 1  # a table of another version
    library.fastalign_torch_ops_built_for.restype = ctypes.c_char_p
    assert library.fastalign_torch_ops_built_for().decode() == f"{torch.__version__} {torch.version.git_version}"
    monkeypatch.setattr(torch, "__version__", torch.__version__ + ".post1")  # another build of torch
    library, why = native._load_cpp_kernels()
    assert library is None and "was built for torch" in why


def test_the_python_kernels_where_the_cpp_ones_are_switched_off():
    """``FASTALIGN_TORCH_OPS=0`` (read at import): the ops' Python kernels, the same loops and bits."""
    script = """
import torch
torch.set_num_threads(1)
from fastalign.models import native
assert native.op_kernels == "python" and "FASTALIGN_TORCH_OPS" in native.op_kernels_why, native.op_kernels_why
x, w = torch.randn(3, 40), torch.randn(24, 40)
runs = native.loop_runs()["linear"]
assert torch.equal(native.linear_rows_op(x, w, None), native.linear_rows(x, w, None))
assert (native.loop_runs()["linear"] - runs == {3: 2}) == native.native_linear_supported()
"""
    env = dict(os.environ, FASTALIGN_TORCH_OPS="0", OMP_NUM_THREADS="1")
    env.pop("FASTALIGN_NATIVE", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
