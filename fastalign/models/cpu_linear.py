"""Layer 2: a model's linear layers on the native loop for a batch of rows (``native.linear_rows``), for
``CachedModel``.

A decode step of a small batch multiplies a few rows by every weight matrix of the model, so on a CPU its speed
is how fast one core streams the weights (one to four rows) or how close it comes to the core's multiply-add peak
(more); BLAS reaches much less than either at these shapes (``bench/bench_linear_rows.py`` measures both).

``native_twin(module)`` returns a copy of ``module``'s structure that shares every parameter and buffer (the
same objects: no weight is duplicated; tied weights stay tied) and whose large fp32 CPU ``nn.Linear`` layers are
``RowsLinear``: a call with at most ``native.LINEAR_MAX_ROWS`` rows goes to ``torch.ops.fastalign.linear_rows``,
any other to ``F.linear``; its attention, where it was transformers' ``"sdpa"``, is ``attention.grouped_sdpa``
(a decode step's few queries on the native cache attention, more without a copy of the cache's key-value heads
per layer and step; ``attention.use_grouped_sdpa`` says which models switch).
Where the OS has transparent huge pages (Linux), the turned layers' weights move into one mapping aligned to a
huge page, one after the other in the layers' order, which a background thread backs with huge pages: the loop
streams weights on huge pages faster, and only there does every byte of a layer sit on one (``into_one_mapping``).
The module the caller gave keeps its structure, its parameter objects and their values; only where the turned
weights' memory lies changes.
The op is opaque to ``torch.compile`` (a compiled step calls it as one kernel) and its kernel (``native.linear_rows``
or its C++ twin, ``native.py``'s ops section) decides at each call whether the native loop runs or ``F.linear``
does (more than one torch thread, ``FASTALIGN_NATIVE=0``).
"""

from __future__ import annotations

import atexit
import copy
import itertools
import mmap
import threading
import time

import torch

from . import attention, native


linear_rows_op = native.linear_rows_op  # ``native.linear_rows`` as a torch op


MIN_WEIGHT_ELEMENTS = 2**16  # smaller layers stay on F.linear: their weights stay in cache (chosen when a call
# of the op cost ~10 us; its C++ kernel costs ~1 us, and moving the toy world's layers would change its bits)


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
    weights = [twin.get_submodule(name).weight for name in names]
    mapping = into_one_mapping(weights, shared)
    backing = [] if mapping is None else [mapping]  # each storage: its whole huge pages are backed
    backing += [w for w in weights if huge and w.untyped_storage().nbytes() >= huge and not _inside(w, mapping)]
    if backing:
        thread = threading.Thread(target=_collapse_all, args=(backing,), daemon=True, name="fastalign-huge-pages")
        with _HUGE_PAGE_LOCK:  # (engines may be built on several threads)
            _HUGE_PAGE_THREADS[:] = [t for t in _HUGE_PAGE_THREADS if t.is_alive()] + [thread]
        thread.start()
    return twin


WEIGHT_ALIGNMENT = 64  # bytes: where each weight starts in into_one_mapping's mapping (a cache line, as torch's)


def into_one_mapping(weights: list[torch.Tensor], shared: list[torch.Tensor] | None = None) -> torch.Tensor | None:
    """Move ``weights`` (the turned layers' fp32 CPU parameters, in the layers' order) into one private anonymous
    mapping whose start is a huge page's, one after the other at ``WEIGHT_ALIGNMENT``, each on a storage of its own
    (which cannot be resized): ``weight.data`` becomes the copy there (the parameter objects and values stay; the
    old memory is freed). Returns the mapping's range, whole huge pages, as a uint8 tensor, for the background
    thread to back with huge pages; None where nothing moved. Not to overlap with other use of the weights (the
    old memory goes): ``native_twin`` calls it while it builds the copy, one call at a time.

    Why: huge pages are aligned 2 MiB, so a tensor of a few MiB allocated anywhere has only its whole ones inside
    to back (180 of the 82M model's 327 MB of turned weights), and its other pages cost a TLB entry each 4 KiB. In
    one aligned mapping every byte can be on a huge page, and in the layers' order (their call order in a decoder)
    the hardware prefetcher runs on from one layer's weights into the next. One row through the 82M model's step
    weights, the loop alone: 30.8 GB/s against 29.4 scattered, the two interleaved (``bench/bench_linear_rows.py``,
    "back to back").

    Moved: each fp32 CPU weight that is the only tensor on its storage and covers all of it: of ``shared`` (the
    module's parameters and buffers; default ``weights``) and of any other tensor alive (moving one that shares
    would untie the two); only where the OS has transparent huge pages on (``native.huge_pages_on``), the moved
    weights fill at least one, and they are not laid out so already (a second copy of one model)."""
    with _MOVE_LOCK:  # (engines may be built on several threads, over one model)
        return _move(weights, weights if shared is None else shared)


_MOVE_LOCK = threading.Lock()


def _move(weights: list[torch.Tensor], shared: list[torch.Tensor]) -> torch.Tensor | None:
    huge = native.huge_page_bytes()
    if not huge or not native.huge_pages_on():
        return None
    owners: dict[int, set[int]] = {}
    for t in shared:
        owners.setdefault(t.untyped_storage().data_ptr(), set()).add(id(t))
    movable = list({id(w): w for w in weights if _alone_on_its_storage(w, owners)}.values())
    if not movable:
        return None
    offsets, end = [], 0
    for w in movable:
        offsets.append(end)
        end = -(-(end + w.untyped_storage().nbytes()) // WEIGHT_ALIGNMENT) * WEIGHT_ALIGNMENT
    first = movable[0].data_ptr()
    if end < huge or (first % huge == 0 and all(w.data_ptr() - first == o for w, o in zip(movable, offsets))):
        return None
    pages = -(-end // huge) * huge  # the last huge page whole, so that it can be backed as well
    try:
        memory = memoryview(mmap.mmap(-1, pages + huge, flags=mmap.MAP_PRIVATE))
    except (OSError, ValueError):  # no memory for it, or no anonymous private mappings here: leave them
        return None
    start = -torch.frombuffer(memory[:1], dtype=torch.uint8).data_ptr() % huge
    # ordinary tensors even inside inference_mode: the caller's model may be trained afterwards
    with torch.inference_mode(False), torch.no_grad():
        for w, offset in zip(movable, offsets):
            at = start + offset
            moved = torch.frombuffer(memory[at:at + w.untyped_storage().nbytes()], dtype=w.dtype).view(w.shape)
            moved.copy_(w)
            w.data = moved  # (the tensors keep the mapping alive)
        return torch.frombuffer(memory[start:start + pages], dtype=torch.uint8)


def _alone_on_its_storage(w: torch.Tensor, owners: dict[int, set[int]]) -> bool:
    """Whether ``w`` (a CPU fp32 tensor) covers its whole storage and no other tensor uses it: none of ``owners``
    (storage address -> ids of the module's tensors on it) and none alive elsewhere (a view, a ``detach()``, a
    parameter of another model), by the storage's count of users."""
    if not (w.is_cpu and w.dtype == torch.float32 and w.layout == torch.strided and w.storage_offset() == 0):
        return False
    storage = w.untyped_storage()
    if storage.nbytes() != w.numel() * w.element_size() or len(owners.get(storage.data_ptr(), ())) != 1:
        return False
    try:
        users = torch._C._storage_Use_Count(storage._cdata)  # w's tensor and ``storage`` itself
    except (AttributeError, RuntimeError):  # (a torch without the count: move nothing)
        return False
    return users == 2


def _inside(t: torch.Tensor, mapping: torch.Tensor | None) -> bool:
    return mapping is not None and mapping.data_ptr() <= t.data_ptr() < mapping.data_ptr() + mapping.numel()


_HUGE_PAGE_THREADS: list[threading.Thread] = []  # started by native_twin (the finished ones are dropped)
_HUGE_PAGE_LOCK = threading.Lock()


def _collapse_all(tensors: list[torch.Tensor]) -> None:
    """Back the turned layers' weights (their mapping, or the tensors themselves) with huge pages
    (``native.collapse_huge_pages``: the values do not change).
    It runs beside the caller (``native_twin`` starts it in a thread): the kernel copies each 2 MiB once, about a
    second a GB, which a large model should not wait for; the loop is right on either kind of page."""
    for t in tensors:
        native.collapse_huge_pages(t)


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


# A thread still inside MADV_COLLAPSE when the interpreter finalises takes the process down ("terminate called
# without an active exception"): exit waits for them, a minute at most (about a second a GB).
atexit.register(wait_for_huge_pages, 60.0)


def twin_is_current(twin: torch.nn.Module, module: torch.nn.Module) -> bool:
    """Whether ``twin`` (``native_twin(module)``) still runs ``module``: the module itself, or a copy sharing every
    parameter and buffer ``module`` has now."""
    if twin is module:
        return True
    now = _shared_tensors(module)
    return len(now) == len(twin._fastalign_shared) and all(a is b for a, b in zip(now, twin._fastalign_shared))
