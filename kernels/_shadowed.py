"""The top-level name ``kernels`` when a checkout's root is on ``sys.path``.

This folder is the package ``fastalign.kernels`` (setup.py's ``package_dir``). Run from the root of a checkout
(``python -m fastalign``, ``python -m pytest``, a vLLM server started there), the folder is also importable as
``kernels``, the name of a PyPI package that transformers probes for and imports (Hugging Face's kernel hub).
``kernels/__init__.py`` then hands the name over to that package through ``installed_kernels``.
"""

import importlib.machinery
import importlib.util
import os
import sys
import types


class _Absent(types.ModuleType):
    """What ``import kernels`` gives when no PyPI package ``kernels`` is installed. It has no ``__file__`` and
    no ``__version__``: transformers' availability check (``find_spec`` found the folder, then it imports)
    reads such a module as a namespace folder shadowing the name, i.e. the package is not installed. Raising
    instead would break ``import transformers`` wherever the package is optional (transformers < 5.25)."""

    def __init__(self, folder: str):
        super().__init__("kernels")
        self._folder = folder

    def __getattr__(self, name):
        raise AttributeError(f"module 'kernels' has no attribute {name!r}: the PyPI package kernels is not "
                             f"installed, and the folder {self._folder} is the package fastalign.kernels")


def installed_kernels(folder: str):
    """Load the package ``kernels`` found on ``sys.path`` outside this checkout's root (the parent of ``folder``,
    this folder), register it as ``sys.modules["kernels"]`` and return it; an empty ``_Absent`` module if there
    is none."""
    root = os.path.dirname(os.path.abspath(folder))
    elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec("kernels", elsewhere)
    sys.modules.pop(__name__, None)  # this module: nothing of the folder stays under the name kernels
    if spec is None:
        sys.modules["kernels"] = _Absent(folder)
        return sys.modules["kernels"]
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module  # before running it, as the import system does (it may import itself)
    spec.loader.exec_module(module)
    return module
