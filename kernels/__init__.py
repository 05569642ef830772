"""fastalign.kernels: stateless tensor functions, each a Triton kernel with a PyTorch reference.

The public function dispatches (``_dispatch.use_triton``); ``*_torch`` is the reference of the same signature.
"""

from ._dispatch import requested_backend, triton_available, use_triton
from .entropy import entropy, entropy_torch
from .sample import sample, sample_torch
from .truncation import truncate_logits

__all__ = [
    "entropy", "entropy_torch", "sample", "sample_torch", "truncate_logits",
    "requested_backend", "triton_available", "use_triton",
]
