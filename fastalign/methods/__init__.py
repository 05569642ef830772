"""Layer 4: one module per method, each a small loop over the model layer and the kernels.

A method module defines ``REQUIRES`` (the models it needs), optionally ``DEFAULTS`` (sampling settings
from its paper, e.g. temperature and top-k) and ``REMOTE_TARGET = True`` (whole-response methods that run
with a ``fastalign.models.remote.RemoteLM`` target), and a ``run(ctx, prompts, **options) -> MethodResult``.
"""

from __future__ import annotations

import importlib

# method name -> (module, function)
METHODS = {
    "sample": ("sample", "run"),
    "bon": ("bon", "run"),
    "soft_bon": ("bon", "run_soft"),
    "args": ("args", "run"),
    "rs": ("rs", "run"),
    "cards": ("cards", "run"),
    "sd": ("speculative", "run_sd"),
    "sss": ("speculative", "run_sss"),
    "qalign": ("qalign", "run"),
}


def get_method(name: str):
    """The module and run function of a method; a clear error for an unknown name."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {sorted(METHODS)}")
    module_name, function = METHODS[name]
    module = importlib.import_module(f"{__name__}.{module_name}")
    return module, getattr(module, function)


def options_in_effect(name: str, options: dict) -> dict:
    """The method's options with their defaults filled in: what a decode call given ``options`` uses."""
    import inspect

    params = inspect.signature(get_method(name)[1]).parameters.values()
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    return {**defaults, **options}


def remote_target_methods() -> list[str]:
    """The methods that take a ``fastalign.models.remote.RemoteLM`` target (they need whole responses only)."""
    return [name for name in METHODS if getattr(get_method(name)[0], "REMOTE_TARGET", False)]
