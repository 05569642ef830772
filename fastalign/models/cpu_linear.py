"""Layer 2: a model's linear layers on the native loop for a batch of rows (``native.linear_rows``), for
``CachedModel``.

A decode step of a small batch multiplies a few rows by every weight matrix of the model, so on a CPU its speed
is how fast one core streams the weights (one to four rows) or how close it comes to the core's multiply-add peak
(more); BLAS reaches much less than either at these shapes (``bench/bench_linear_rows.py`` measures both).

``native_twin(module)`` returns a copy of ``module``'s structure that shares every parameter and buffer (no
weight is copied; tied weights stay tied) and whose large fp32 CPU ``nn.Linear`` layers are ``RowsLinear``: a
call with at most ``native.LINEAR_MAX_ROWS`` rows goes to ``torch.ops.fastalign.linear_rows``, any other to
``F.linear``; its attention, where it was transformers' ``"sdpa"``, is ``attention.grouped_sdpa`` (no copy
of the cache's key-value heads per layer and step; ``attention.use_grouped_sdpa`` says which models switch).
The turned layers' weights are backed with transparent huge pages where the OS allows (Linux, in a background
thread; the values do not change): the loop streams them faster. The module the caller gave is left as it is.
The op is opaque to ``torch.compile`` (a compiled step calls it as one kernel) and decides at each call, in
``native.linear_rows``, whether the native loop runs or ``F.linear`` does (more than one torch thread,
``FASTALIGN_NATIVE=0``).
"""

from __future__ import annotations

import copy
import itertools
import threading
import time

import torch

from . import attention, native


# A plain dispatcher op (not ``torch.library.custom_op``, whose Python wrapper costs more per call than a small
# layer's product): a CPU kernel and a fake one for torch.compile's tracing.
_LIBRARY = torch.library.Library("fastalign", "FRAGMENT")
_LIBRARY.define("linear_rows(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
_LIBRARY.impl("linear_rows", native.linear_rows, "CPU")


@torch.library.register_fake("fastalign::linear_rows", lib=_LIBRARY)
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


linear_rows_op = torch.ops.fastalign.linear_rows  # ``native.linear_rows`` as a torch op


MIN_WEIGHT_ELEMENTS = 2**16  # smaller layers stay on F.linear: their weights stay in cache, and a call costs ~10 us


class RowsLinear(torch.nn.Linear):
    """An ``nn.Linear`` whose calls with at most ``LINEAR_MAX_ROWS`` rows of fp32 CPU input, no gradient asked
    and no autocast, go to ``linear_rows`` (set as the class of a copied layer); any other call is ``F.linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and x.dim() >= 1 and x.shape[:-1].numel() <= native.LINEAR_MAX_ROWS
                and not torch.is_autocast_enabled("cpu")
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
            return linear_rows_op(x, self.weight, self.bias)
        return torch.nn.functional.linear(x, self.weight, self.bias)


def _layers_to_turn(module: torch.nn.Module) -> list[str]:
    """The names of the layers ``native_twin`` turns: exactly ``nn.Linear``, fp32 contiguous CPU weights of at
    least ``MIN_WEIGHT_ELEMENTS``."""
    return [name for name, layer in module.named_modules()
            if type(layer) is torch.nn.Linear and layer.weight.device.type == "cpu"
            and layer.weight.dtype == torch.float32 and layer.weight.layout == torch.strided
            and layer.weight.is_contiguous() and layer.weight.numel() >= MIN_WEIGHT_ELEMENTS]


def _shared_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return list(itertools.chain(module.parameters(), module.buffers()))


def native_twin(module: torch.nn.Module) -> torch.nn.Module:
    """What a ``CachedModel`` runs for ``module``: its weight-sharing copy with the layers of ``_layers_to_turn``
    as ``RowsLinear`` (the module docstring), or ``module`` itself when the loop would not run (not one torch
    thread, no loop on this CPU, ``FASTALIGN_NATIVE=0``), when no layer qualifies, when a module has forward
    hooks (a copy would call the user's hooks on the copy) or when the module cannot be copied.

    The copy is a snapshot of the module tree: ``twin_is_current`` tells when the module's parameters or buffers
    were replaced since (``load_state_dict(assign=True)``, ``.to()``, a resize), and the ``CachedModel`` then
    makes a new one. Other changes to the module tree made later (new hooks, adapters) are not seen."""
    if torch.get_num_threads() != 1 or not native.native_linear_supported():
        return module
    names = _layers_to_turn(module)
    if not names or any(m._forward_hooks or m._forward_pre_hooks for m in module.modules()):
        return module
    shared = _shared_tensors(module)
    try:
        twin = copy.deepcopy(module, memo={id(t): t for t in shared})
    except Exception:  # noqa: BLE001 - something in the tree cannot be copied: run the module as it is
        return module
    for name in names:
        twin.get_submodule(name).__class__ = RowsLinear
    attention.use_grouped_sdpa(twin)  # the copy's own config: the caller's model keeps its attention
    twin._fastalign_shared = shared  # what twin_is_current compares (the same objects: no extra memory)
    huge = native.huge_page_bytes()
    weights = [w for w in (twin.get_submodule(name).weight for name in names)
               if huge and w.untyped_storage().nbytes() >= huge]
    if weights:
        thread = threading.Thread(target=_collapse_all, args=(weights,), daemon=True, name="fastalign-huge-pages")
        with _HUGE_PAGE_LOCK:  # (engines may be built on several threads)
            _HUGE_PAGE_THREADS[:] = [t for t in _HUGE_PAGE_THREADS if t.is_alive()] + [thread]
        thread.start()
    return twin


_HUGE_PAGE_THREADS: list[threading.Thread] = []  # started by native_twin (the finished ones are dropped)
_HUGE_PAGE_LOCK = threading.Lock()


def _collapse_all(weights: list[torch.Tensor]) -> None:
    """Back the turned layers' weights with huge pages (``native.collapse_huge_pages``: the values do not change).
    It runs beside the caller (``native_twin`` starts it in a thread): the kernel copies each 2 MiB once, about a
    second a GB, which a large model should not wait for; the loop is right on either kind of page."""
    for w in weights:
        native.collapse_huge_pages(w)


def wait_for_huge_pages(timeout: float | None = None) -> bool:
    """Wait until ``native_twin``'s threads have asked the kernel for huge pages for every copy made so far (what
    the kernel granted is up to it), at most ``timeout`` seconds in all; True when they have finished. For
    benchmarks and tests: decoding never needs to wait."""
    deadline = None if timeout is None else time.monotonic() + timeout
    with _HUGE_PAGE_LOCK:
        threads = list(_HUGE_PAGE_THREADS)
    for thread in threads:
        thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
    return not any(t.is_alive() for t in threads)


def twin_is_current(twin: torch.nn.Module, module: torch.nn.Module) -> bool:
    """Whether ``twin`` (``native_twin(module)``) still runs ``module``: the module itself, or a copy sharing every
    parameter and buffer ``module`` has now."""
    if twin is module:
        return True
    now = _shared_tensors(module)
    return len(now) == len(twin._fastalign_shared) and all(a is b for a, b in zip(now, twin._fastalign_shared))
