"""fastalign: fast, exact test-time alignment decoding for Hugging Face causal LMs."""

import importlib

__all__ = ["decode", "Engine", "DecodeOutput", "CausalLM", "RewardModel", "InputError", "native_available", "native_info"]
__version__ = "0.1.0"

# The public names load on first use (PEP 562), so that `import fastalign.cli` (the `fastalign` command's
# --help) does not import torch and transformers.
_LAZY = {"decode": ".api", "Engine": ".api", "DecodeOutput": ".api", "CausalLM": ".models", "RewardModel": ".models",
         "InputError": ".errors", "native_available": ".kernels.extension",
         "native_info": ".models.native"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    try:  # a submodule, e.g. fastalign.kernels
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
