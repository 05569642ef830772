"""The optional compiled extension ``fastalign._C`` (sources in ``csrc/``), loaded once for every layer.

It is loaded here, at the bottom, so that the kernels' CPU random-number streams (``rng``) and the model layer's
native parts (``fastalign.models.native``: tree topology, KV-slot gathering, the linear loop) share one
loader and one switch: ``FASTALIGN_NATIVE=0`` in the environment turns every use off (read at each call). A
missing, stale or broken build leaves ``extension`` None and each user on its pure-Python twin.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

ABI_VERSION = 5  # must match FASTALIGN_C_ABI_VERSION in csrc/module.cpp

import_error: str | None = None  # why ``extension`` is None (None when it loaded)
try:
    from fastalign import _C as extension  # type: ignore[attr-defined]

    if getattr(extension, "ABI_VERSION", None) != ABI_VERSION:
        import_error = (
            f"fastalign._C is a stale build (ABI {getattr(extension, 'ABI_VERSION', None)}, expected "
            f"{ABI_VERSION}); rebuild it with `pip install --no-build-isolation -e .`"
        )
        warnings.warn(import_error + "; using the pure-PyTorch fallback", RuntimeWarning, stacklevel=2)
        extension = None
except ImportError as exc:  # not built: the normal pure-Python install
    extension = None
    if importlib.util.find_spec("fastalign._C") is None:
        import_error = "fastalign._C is not built (installed without the native extension)"
    else:  # pragma: no cover - present but unloadable
        import_error = f"fastalign._C failed to load: {exc}"
        warnings.warn(import_error + "; using the pure-PyTorch fallback", RuntimeWarning, stacklevel=2)
except Exception as exc:  # pragma: no cover - a broken build
    extension, import_error = None, f"fastalign._C failed to load: {exc!r}"
    warnings.warn(import_error + "; using the pure-PyTorch fallback", RuntimeWarning, stacklevel=2)


def native_available() -> bool:
    """True when the compiled extension ``fastalign._C`` is in use, False on the pure-Python fallback.

    ``FASTALIGN_NATIVE=0`` in the environment forces the fallback (read at each call).
    """
    return extension is not None and switched_on("FASTALIGN_NATIVE")


def switched_on(name: str) -> bool:
    """Whether the environment leaves switch ``name`` on: anything but 0, false, off or no (any case, ASCII
    blanks around ignored, as ``csrc/torch_ops.cpp`` reads ``FASTALIGN_NATIVE``); unset is on."""
    return os.environ.get(name, "1").strip(" \t\n\r\f\v").lower() not in ("0", "false", "off", "no")
