"""The top-level name ``kernels`` when a checkout's root is on ``sys.path``.

This folder is the package ``fastalign.kernels`` (setup.py's ``package_dir``). Run from the root of a checkout
(``python -m fastalign``, ``python -m pytest``), the folder is also importable as ``kernels``, the name of a PyPI
package that transformers imports (Hugging Face's kernel hub). ``kernels/__init__.py`` then hands the name over
to that package through ``installed_kernels``.
"""

import importlib.machinery
import importlib.util
import os
import sys


def installed_kernels(folder: str):
    """Load the package ``kernels`` found on ``sys.path`` outside this checkout's root (the parent of ``folder``,
    this folder), register it as ``sys.modules["kernels"]`` and return it; ``ModuleNotFoundError`` if there is
    none (as if the checkout were not on the path)."""
    root = os.path.dirname(os.path.abspath(folder))
    elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec("kernels", elsewhere)
    if spec is None:
        raise ModuleNotFoundError(f"No module named 'kernels' (the folder {folder} is the package fastalign.kernels, "
                                  "not the PyPI package kernels)", name="kernels")
    sys.modules.pop(__name__, None)  # this module: nothing of the folder stays under the name kernels
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module  # before running it, as the import system does (it may import itself)
    spec.loader.exec_module(module)
    return module
