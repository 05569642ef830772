"""Choose between the Triton kernels and their PyTorch references.

``FASTALIGN_KERNELS`` selects the backend:

* ``auto`` (default): Triton for CUDA tensors, the PyTorch reference otherwise;
* ``triton``: always Triton (on CPU tensors this needs ``TRITON_INTERPRET=1`` set before
  triton is imported: that is how the test suite runs the Triton code without a GPU);
* ``torch``: always the PyTorch reference.
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "triton", "torch")


def requested_backend() -> str:
    name = os.environ.get("FASTALIGN_KERNELS", "auto").lower()
    if name not in BACKENDS:
        raise ValueError(f"FASTALIGN_KERNELS={name!r}: expected one of {BACKENDS}")
    return name


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def use_triton(tensor: torch.Tensor) -> bool:
    """True when the Triton kernel should run on ``tensor``."""
    backend = requested_backend()
    if backend == "torch":
        return False
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("FASTALIGN_KERNELS=triton but triton cannot be imported")
        if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                "FASTALIGN_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported"
            )
        return True
    return tensor.is_cuda and triton_available()


def check_finite(logits: torch.Tensor, name: str = "logits", temperature: float | None = None) -> None:
    """Raise on NaN or +inf logits (-inf is a legal mask); every row must keep a finite entry. With
    ``temperature`` (checked beforehand), each row's maximum must also stay finite once divided by it: a
    maximum above ``3.4e38 * T`` scales to +inf, and tokens tied at +inf would be drawn by index.

    One pass and one host sync: a row's max is NaN or +inf exactly when the row holds one, and -inf when
    the whole row is masked. The slower precise diagnosis runs only on failure.
    """
    if logits.numel() == 0:
        return
    m = logits.amax(dim=-1)
    ok = torch.isfinite(m) if temperature is None else torch.isfinite(m) & torch.isfinite(m.float() / temperature)
    if bool(ok.all()):
        return
    if torch.isnan(logits).any():
        raise ValueError(f"{name} contain NaN")
    if torch.isposinf(logits).any():
        raise ValueError(f"{name} contain +inf")
    if bool(torch.isfinite(m).all()):
        raise ValueError(f"{name} / temperature overflows float32: a row's maximum {float(m.abs().max()):g} at "
                         f"temperature {temperature:g} (keep |logits| below 3.4e38 * temperature)")
    raise ValueError(f"{name}: a row is entirely -inf (no token can be drawn)")
