"""fastalign.kernels: stateless tensor functions, each a Triton kernel with a PyTorch reference.

The sources live in the top-level ``kernels/`` folder; setup.py's ``package_dir`` installs it as ``fastalign.kernels``.

The public function dispatches (``_dispatch.use_triton``); ``*_torch`` is the reference of the same signature.
``check_finite`` is the logits check the kernels and the model layer share. The counter-based generator the
kernels draw from (and the methods, for their host draws) is ``fastalign.kernels.rng`` (docs/design.md 1.4).
"""

import sys

if __name__ == "kernels":
    # Imported under its own name: the checkout's root is on sys.path (``python -m`` from the root, pytest), and
    # ``import kernels`` means the PyPI package of that name (Hugging Face's, which transformers imports).
    from ._shadowed import installed_kernels

    sys.modules[__name__] = installed_kernels(__path__[0])
else:
    from ._dispatch import check_finite, requested_backend, triton_available, use_triton
    from .entropy import entropy, entropy_torch
    from .sample import sample, sample_torch
    from .truncation import truncate_logits
    from .spec_verify import acceptance_probability, spec_verify, spec_verify_torch
    from .tree_verify import tree_verify, tree_verify_torch

__all__ = [
    "entropy", "entropy_torch", "sample", "sample_torch", "truncate_logits",
    "check_finite", "requested_backend", "triton_available", "use_triton",
    "entropy_triton", "sample_triton", "truncation_threshold",
]
__all__ += ["acceptance_probability", "spec_verify", "spec_verify_torch", "tree_verify", "tree_verify_torch"]

# The Triton entry points load on first use, so the package (and its references) stays importable without triton.
_LAZY = {
    "entropy_triton": "._entropy_triton",
    "sample_triton": "._sample_triton",
    "truncation_threshold": "._sample_triton",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
