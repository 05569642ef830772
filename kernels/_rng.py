"""Counter-based random numbers shared by the Triton kernels and their PyTorch references.

A kernel that needs one random number per (row, column) gets it as ``uniform(seed, row * n_cols + col)``:
a 32-bit integer hash of the seed and the element index, so the Triton kernel and the PyTorch reference
draw exactly the same numbers and can be compared token for token. Uniforms lie in (0, 1) with 24 random
bits (never 0 or 1), so ``-log(u)`` is a finite Exp(1) draw.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B1
_M1 = 0x7FEB352D
_M2 = 0x846CA68B


def _hash32_torch(x: torch.Tensor) -> torch.Tensor:
    # lowbias32 (Chris Wellons), in int64 arithmetic reduced mod 2**32
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * _M1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _M2) & _MASK32
    x = x ^ (x >> 16)
    return x


def uniform_torch(seed: int, index: torch.Tensor) -> torch.Tensor:
    """fp32 uniforms in (0, 1) for the int64 element indices ``index`` (same shape)."""
    key = _hash32_torch(torch.tensor(int(seed) & _MASK32, dtype=torch.int64) * _GOLDEN)
    bits = _hash32_torch(index.to(torch.int64) ^ key)
    return ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / 16777216.0)


def uniform_grid_torch(seed: int, n_rows: int, n_cols: int, device=None) -> torch.Tensor:
    """``uniform(seed, row * n_cols + col)`` for a whole ``[n_rows, n_cols]`` grid."""
    index = torch.arange(n_rows * n_cols, device=device, dtype=torch.int64).view(n_rows, n_cols)
    return uniform_torch(seed, index)


try:  # the Triton twin; absent when triton is not installed
    import triton
    import triton.language as tl

    @triton.jit
    def _hash32(x):
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x846CA68B
        x = x ^ (x >> 16)
        return x

    @triton.jit
    def uniform_triton(seed, index):
        """fp32 uniforms in (0, 1); ``seed`` a scalar, ``index`` an integer block (the element indices)."""
        key = _hash32((seed.to(tl.uint32) * 0x9E3779B1).to(tl.uint32))
        bits = _hash32(index.to(tl.uint32) ^ key)
        return ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)

except ImportError:  # pragma: no cover - triton is a dependency, but keep the references importable
    uniform_triton = None
