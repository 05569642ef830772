"""fastalign._C (csrc/) against the pure-PyTorch fallbacks in fastalign.models.native."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from fastalign.models import native

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

requires_c = pytest.mark.skipif(
    native._C is None, reason=f"fastalign._C is not built here ({native.native_info()['import_error']})"
)


@pytest.fixture(autouse=True)
def _native_on(monkeypatch):
    monkeypatch.delenv("FASTALIGN_NATIVE", raising=False)


# ------------------------------------------------------------------------------------------------ trees


def random_parents(B: int, T: int, gen: torch.Generator, p_root: float = 0.2) -> torch.Tensor:
    """Random topologically ordered trees, a different one per row; about p_root of nodes hang off the prefix."""
    out = torch.empty(B, T, dtype=torch.int64)
    for b in range(B):
        for t in range(T):
            if t == 0 or torch.rand((), generator=gen) < p_root:
                out[b, t] = -1
            else:
                out[b, t] = torch.randint(0, t, (), generator=gen)
    return out


def chain(B: int, T: int) -> torch.Tensor:
    return (torch.arange(T) - 1).expand(B, T).clone()


def star(B: int, T: int, rooted: bool) -> torch.Tensor:
    """All nodes hang off node 0 (rooted) or all off the prefix."""
    p = torch.full((B, T), 0 if rooted else -1, dtype=torch.int64)
    if T:
        p[:, 0] = -1
    return p


def tree_cases():
    gen = torch.Generator().manual_seed(1234)
    cases = {
        "empty_T": torch.empty(2, 0, dtype=torch.int64),
        "single": torch.tensor([[-1]]),
        "chain_1x8": chain(1, 8),
        "chain_3x17": chain(3, 17),
        "star_root_2x9": star(2, 9, rooted=True),
        "star_prefix_2x9": star(2, 9, rooted=False),
        "mixed_rows": torch.stack([chain(1, 7)[0], star(1, 7, True)[0], star(1, 7, False)[0],
                                   torch.tensor([-1, 0, 0, 1, 1, 2, 2])]),
        "binary_full": torch.tensor([[-1, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]]),
        "no_rows_0x5": torch.empty(0, 5, dtype=torch.int64),
        "no_nodes_2x0": torch.empty(2, 0, dtype=torch.int64),
    }
    for B, T in [(1, 5), (4, 12), (3, 33), (2, 64), (8, 3)]:
        cases[f"random_{B}x{T}"] = random_parents(B, T, gen)
        cases[f"random_sparse_{B}x{T}"] = random_parents(B, T, gen, p_root=0.0)
        cases[f"random_forest_{B}x{T}"] = random_parents(B, T, gen, p_root=0.6)
    return cases


TREES = tree_cases()


@requires_c
@pytest.mark.parametrize("name", sorted(TREES))
def test_tree_functions_match_fallback(name):
    parents = TREES[name]
    mask = native.tree_attention_mask(parents)
    depths = native.tree_depths(parents)
    paths = native.retrieve_paths(parents)
    ref_mask = native.tree_attention_mask_torch(parents)
    ref_depths = native.tree_depths_torch(parents)
    ref_paths = native.retrieve_paths_torch(parents)
    assert mask.dtype == torch.bool and depths.dtype == torch.int64 and paths.dtype == torch.int64
    assert mask.shape == ref_mask.shape and torch.equal(mask, ref_mask)
    assert depths.shape == ref_depths.shape and torch.equal(depths, ref_depths)
    assert paths.shape == ref_paths.shape and torch.equal(paths, ref_paths)


@requires_c
def test_tree_known_values():
    parents = torch.tensor([[-1, 0, 0, 1, -1], [-1, 0, 1, 2, 3]])
    assert native.tree_depths(parents).tolist() == [[0, 1, 1, 2, 0], [0, 1, 2, 3, 4]]
    assert native.retrieve_paths(parents).tolist() == [
        [[0, 2, -1, -1, -1], [0, 1, 3, -1, -1], [4, -1, -1, -1, -1]],  # leaves 2, 3, 4 in node order
        [[0, 1, 2, 3, 4], [-1, -1, -1, -1, -1], [-1, -1, -1, -1, -1]],
    ]
    mask = native.tree_attention_mask(parents)
    assert mask[0, 3].tolist() == [True, True, False, True, False]
    assert mask[0, 4].tolist() == [False, False, False, False, True]


@requires_c
def test_tree_accepts_int32_and_noncontiguous():
    parents = TREES["random_4x12"]
    as32 = parents.to(torch.int32)
    assert torch.equal(native.tree_attention_mask(as32), native.tree_attention_mask_torch(parents))
    wide = torch.stack([parents, parents], dim=2).reshape(4, 24)[:, ::2]  # strided view of the same values
    assert not wide.is_contiguous()
    assert torch.equal(native.retrieve_paths(wide), native.retrieve_paths_torch(parents))


@requires_c
@pytest.mark.parametrize("fn", ["tree_attention_mask", "tree_depths", "retrieve_paths"])
def test_tree_input_validation(fn):
    f = getattr(native, fn)
    with pytest.raises(ValueError, match=r"must be \[B, T\]"):
        f(torch.tensor([-1, 0, 1]))
    with pytest.raises(ValueError, match=r"must lie in \[-1, t - 1\]"):
        f(torch.tensor([[-1, 0, 2]]))  # a parent after its child
    with pytest.raises(ValueError, match=r"must lie in \[-1, t - 1\]"):
        f(torch.tensor([[-1, -2]]))
    with pytest.raises(ValueError, match=r"parents\[1, 1\] = 1"):  # the message points at the bad entry
        f(torch.tensor([[-1, 0], [-1, 1]]))
    with pytest.raises(TypeError, match="integer"):
        f(torch.tensor([[-1.0, 0.0]]))
    # the raw module checks the same things
    with pytest.raises(ValueError):
        getattr(native._C, fn)(torch.tensor([[0]]).numpy())


def test_fallback_validation_matches(monkeypatch):
    monkeypatch.setenv("FASTALIGN_NATIVE", "0")
    with pytest.raises(ValueError, match=r"must be \[B, T\]"):
        native.tree_depths(torch.tensor([-1, 0, 1]))
    with pytest.raises(ValueError, match=r"must lie in \[-1, t - 1\]"):
        native.tree_depths(torch.tensor([[-1, 0, 2]]))


@requires_c
def test_env_switch_forces_fallback(monkeypatch):
    assert native.native_available()
    monkeypatch.setenv("FASTALIGN_NATIVE", "0")
    assert not native.native_available()
    assert native.native_info()["forced_off"]
    parents = TREES["random_4x12"]
    assert torch.equal(native.tree_attention_mask(parents), native.tree_attention_mask_torch(parents))
    monkeypatch.setenv("FASTALIGN_NATIVE", "1")
    assert native.native_available()


def test_native_available_when_built():
    """In a development checkout built with `pip install -e .`, the extension must be in use."""
    if native._C is None:
        pytest.skip(f"fastalign._C is not importable: {native.native_info()['import_error']}")
    assert native.native_available()
    from fastalign.kernels.extension import ABI_VERSION

    assert native._C.ABI_VERSION == ABI_VERSION


# ----------------------------------------------------------------------------------------------- gather


def _check_gather(x, index):
    out = native.gather_slots(x, index)
    ref = native.gather_slots_torch(x, index)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.equal(out, ref)


@requires_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8])
@pytest.mark.parametrize("D", [1, 3, 8, 64])
def test_gather_matches_fallback(dtype, D):
    g = torch.Generator().manual_seed(D)
    B, H, S, S2 = 3, 4, 19, 11
    x = (torch.randn(B, H, S, D, generator=g) * 50).to(dtype)
    index = torch.randint(0, S, (B, S2), generator=g)  # repeats allowed, rows differ
    _check_gather(x, index)


@requires_c
def test_gather_strided_inputs():
    g = torch.Generator().manual_seed(0)
    B, H, S, D = 2, 3, 16, 8
    base = torch.randn(B, S, H, D, generator=g)
    x = base.transpose(1, 2)  # [B, H, S, D] view with non-standard strides
    index = torch.randint(0, S, (B, 7), generator=g)
    _check_gather(x, index)
    big = torch.randn(B, H, 40, D, generator=g)
    _check_gather(big[:, :, 5:21], index)  # storage offset + a sliced slot dimension
    _check_gather(big[:, 1:], index)  # sliced heads
    _check_gather(torch.randn(B, H, S, 2 * D, generator=g)[..., ::2], index)  # strided last dim: fallback
    _check_gather(x, index.t().contiguous().t())  # non-contiguous index


@requires_c
def test_gather_edge_shapes():
    x = torch.randn(2, 3, 5, 4)
    _check_gather(x, torch.empty(2, 0, dtype=torch.int64))
    _check_gather(torch.randn(0, 3, 5, 4), torch.empty(0, 2, dtype=torch.int64))
    _check_gather(torch.randn(2, 0, 5, 4), torch.zeros(2, 3, dtype=torch.int64))
    _check_gather(x, torch.tensor([[4, 4, 0], [0, 1, 2]]))


@requires_c
def test_gather_large_multithreaded():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 300, 64, generator=g)  # > 1 MiB gathered: the threaded CPU path
    index = torch.randint(0, 300, (2, 280), generator=g)
    _check_gather(x, index)


@requires_c
def test_gather_many_matches_fallback():
    g = torch.Generator().manual_seed(2)
    B, S2 = 2, 9
    xs = [torch.randn(B, 4, 12, 16, generator=g), torch.randn(B, 4, 12, 16, generator=g).half(),
          torch.randn(B, 2, 20, 5, generator=g).to(torch.bfloat16), torch.randn(B, 1, 12, 128, generator=g)]
    xs += [torch.randn(B, 4, 12, 8, generator=g) for _ in range(40)]  # more than one CUDA launch worth
    index = torch.randint(0, 12, (B, S2), generator=g)
    outs = native.gather_slots_many(xs, index)
    assert len(outs) == len(xs)
    for x, out in zip(xs, outs):
        assert torch.equal(out, native.gather_slots_torch(x, index))


@requires_c
def test_gather_out_of_range_raises():
    x = torch.randn(1, 2, 4, 3)
    with pytest.raises(IndexError, match="out of range"):
        native.gather_slots(x, torch.tensor([[0, 4]]))
    with pytest.raises(IndexError, match="out of range"):
        native.gather_slots(x, torch.tensor([[-1, 0]]))


@requires_c
def test_gather_autograd_and_odd_inputs_use_fallback():
    x = torch.randn(2, 2, 5, 3, requires_grad=True)
    index = torch.tensor([[0, 2], [4, 1]])
    out = native.gather_slots(x, index)
    assert out.grad_fn is not None  # torch.gather keeps the graph
    out.sum().backward()
    assert x.grad.sum().item() == pytest.approx(2 * 2 * 2 * 3)
    with torch.no_grad():
        _check_gather(x, index)
    # an int32 index goes to torch.gather (native takes int64 only) and gives the same result
    assert torch.equal(native.gather_slots(x.detach(), index.to(torch.int32)), native.gather_slots_torch(x.detach(), index))


def test_gather_fallback_when_forced_off(monkeypatch):
    monkeypatch.setenv("FASTALIGN_NATIVE", "0")
    x = torch.randn(2, 3, 6, 4)
    index = torch.tensor([[5, 0], [1, 1]])
    assert torch.equal(native.gather_slots(x, index), native.gather_slots_torch(x, index))
    assert torch.equal(native.gather_slots_many([x, x], index)[1], native.gather_slots_torch(x, index))


# ------------------------------------------------------------------------------------------------- CUDA


def _nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc") or (os.path.exists("/usr/local/cuda/bin/nvcc") and "/usr/local/cuda/bin/nvcc") or None


def test_cuda_source_compiles_with_nvcc(tmp_path):
    """csrc/compact.cu is torch-free, so it compiles wherever a CUDA toolkit is, GPU or not."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("no nvcc (CUDA toolkit) on this machine")
    obj = tmp_path / "compact.o"
    res = subprocess.run([nvcc, "-std=c++17", "-arch=sm_80", "-Xcompiler", "-fPIC", "-c",
                          os.path.join(ROOT, "csrc", "compact.cu"), "-o", str(obj)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert obj.stat().st_size > 0


@pytest.mark.skipif(os.environ.get("FASTALIGN_TEST_CUDA_BUILD") != "1",
                    reason="full CMake build with CUDA sources is slow; set FASTALIGN_TEST_CUDA_BUILD=1")
def test_cmake_build_with_cuda(tmp_path):
    """The whole extension with compact.cu, as on a CUDA machine; it must import even without a GPU."""
    nvcc = _nvcc()
    cmake = shutil.which("cmake")
    if nvcc is None or cmake is None:
        pytest.skip("needs nvcc and cmake")
    build, out = tmp_path / "build", tmp_path / "out"
    subprocess.run([cmake, "-S", ROOT, "-B", str(build), f"-DPython_EXECUTABLE={sys.executable}",
                    "-DFASTALIGN_WITH_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={nvcc}", "-DCMAKE_CUDA_ARCHITECTURES=80",
                    f"-DFASTALIGN_OUTPUT_DIR={out}"], check=True, capture_output=True)
    subprocess.run([cmake, "--build", str(build), "--parallel", "2"], check=True, capture_output=True)
    code = ("import _C; assert _C.has_cuda and _C.cuda_version > 0; "
            "import numpy as np; assert _C.tree_depths(np.array([[-1, 0]])).tolist() == [[0, 1]]; print('ok')")
    res = subprocess.run([sys.executable, "-c", code], cwd=out, capture_output=True, text=True)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr
