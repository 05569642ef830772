"""Layer 2: tree topology, KV-slot gathering and an fp32 linear layer for a batch of rows on the CPU, native
(``fastalign._C``) when built, else pure PyTorch (``F.linear`` for the linear layer). The extension is loaded,
and switched off by ``FASTALIGN_NATIVE=0``, in ``fastalign.kernels.extension``.

A draft tree of ``T`` nodes is given per row by a parent array ``parents[b, t]`` in ``[-1, t - 1]``: ``-1``
means the node hangs directly off the accepted prefix, and a parent always precedes its children
(topological order), so a node's depth and ancestors can be computed in one left-to-right sweep.
"""

from __future__ import annotations

import collections
import ctypes
import os
import warnings
from typing import Sequence

import torch

from ..kernels.extension import extension as _C  # None when not built, stale or broken
from ..kernels.extension import import_error, native_available, switched_on

_cuda_gather_broken: str | None = None  # set when the CUDA path failed once (e.g. driver too old)


def native_info() -> dict:
    """What the native layer is doing and why: for bug reports and ``fastalign`` diagnostics."""
    return {
        "available": native_available(),
        "built": _C is not None,
        "cuda": bool(_C is not None and getattr(_C, "has_cuda", False)),
        "cuda_version": getattr(_C, "cuda_version", 0) if _C is not None else 0,
        "cuda_gather_disabled": _cuda_gather_broken,
        "import_error": import_error,
        "forced_off": _C is not None and not native_available(),
        "linear_isa": getattr(_C, "linear_isa", "") if _C is not None else "",
        "op_kernels": op_kernels,  # "c++" (fastalign/_torch_ops.so) or "python"
        "op_kernels_why": op_kernels_why,  # why not C++ (None when they are)
    }


def _check_parents(parents: torch.Tensor) -> None:
    if parents.dim() != 2:
        raise ValueError(f"parents must be [B, T], got shape {tuple(parents.shape)}")
    T = parents.shape[1]
    idx = torch.arange(T, device=parents.device)
    if ((parents < -1) | (parents >= idx)).any():
        raise ValueError("parents[b, t] must lie in [-1, t - 1] (parents precede their children)")


def tree_attention_mask_torch(parents: torch.Tensor) -> torch.Tensor:
    """``mask[b, i, j]`` is True when node ``j`` is node ``i`` or one of its ancestors.  [B, T, T] bool."""
    B, T = parents.shape
    mask = torch.eye(T, dtype=torch.bool, device=parents.device).expand(B, T, T).clone()
    for i in range(T):  # parents precede children: row i = row parent(i) + self
        p = parents[:, i]
        has = p >= 0
        if has.any():
            mask[has, i] |= mask[has, p[has]]
    return mask


def tree_depths_torch(parents: torch.Tensor) -> torch.Tensor:
    """Depth of each node (0 for nodes hanging off the prefix).  [B, T] int64."""
    return tree_attention_mask_torch(parents).sum(-1) - 1


def retrieve_paths_torch(parents: torch.Tensor) -> torch.Tensor:
    """Root-to-leaf paths, one per leaf: ``[B, max_leaves, max_depth + 1]`` node indices, padded with -1.

    Leaves are listed in node order; a row with fewer leaves is padded with all -1 paths.
    """
    B, T = parents.shape
    anc = tree_attention_mask_torch(parents)  # [B, T, T]
    is_parent = torch.zeros(B, T, dtype=torch.bool, device=parents.device)
    for b in range(B):
        p = parents[b]
        is_parent[b, p[p >= 0]] = True
    leaves = ~is_parent
    depth = anc.sum(-1)  # path lengths
    n_leaves = int(leaves.sum(1).max()) if B and T else 0
    L = int(depth.max()) if B and T else 0
    out = torch.full((B, n_leaves, L), -1, dtype=torch.int64, device=parents.device)
    for b in range(B):
        for k, leaf in enumerate(torch.nonzero(leaves[b]).flatten().tolist()):
            nodes = torch.nonzero(anc[b, leaf]).flatten()  # ancestors in node (= depth) order
            out[b, k, : nodes.numel()] = nodes
    return out


def gather_slots_torch(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather KV slots: ``x [B, H, S, D]``, ``index [B, S']`` -> ``[B, H, S', D]``."""
    B, H, _, D = x.shape
    return torch.gather(x, 2, index[:, None, :, None].expand(B, H, index.shape[1], D))


# ---------------------------------------------------------------------------------------------- dispatch


def _native_tree(fn_name: str, parents: torch.Tensor) -> torch.Tensor:
    """Runs a ``_C`` tree function on the host (trees are tiny) and returns the result on parents' device."""
    p = parents.detach()
    if not (p.dtype.is_floating_point or p.dtype.is_complex or p.dtype == torch.bool):
        p = p.to(torch.int64)  # other dtypes are passed through so that _C rejects them by name
    out = torch.from_numpy(getattr(_C, fn_name)(p.cpu().contiguous().numpy()))
    return out if parents.device.type == "cpu" else out.to(parents.device)


def tree_attention_mask(parents: torch.Tensor) -> torch.Tensor:
    """``mask[b, i, j]`` is True when node ``j`` is node ``i`` or one of its ancestors.  [B, T, T] bool."""
    if native_available():
        return _native_tree("tree_attention_mask", parents)
    _check_parents(parents)
    return tree_attention_mask_torch(parents)


def tree_depths(parents: torch.Tensor) -> torch.Tensor:
    """Depth of each node (0 for nodes hanging off the prefix).  [B, T] int64."""
    if native_available():
        return _native_tree("tree_depths", parents)
    _check_parents(parents)
    return tree_depths_torch(parents)


def retrieve_paths(parents: torch.Tensor) -> torch.Tensor:
    """Root-to-leaf paths, one per leaf in node order: ``[B, max_leaves, max_depth + 1]``, -1 padded."""
    if native_available():
        return _native_tree("retrieve_paths", parents)
    _check_parents(parents)
    return retrieve_paths_torch(parents)


def _native_gather_ok(xs: Sequence[torch.Tensor], index: torch.Tensor) -> bool:
    """Whether ``_C`` can gather these tensors; anything unusual goes to torch.gather (and its errors)."""
    if not native_available() or not isinstance(index, torch.Tensor) or not xs:
        return False
    if index.dim() != 2 or index.dtype != torch.int64:
        return False
    dev = index.device
    if dev.type == "cuda":
        if not getattr(_C, "has_cuda", False) or _cuda_gather_broken is not None:
            return False
    elif dev.type != "cpu":
        return False
    grad = torch.is_grad_enabled()
    for x in xs:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.device != dev or x.shape[0] != index.shape[0]:
            return False
        if (grad and x.requires_grad) or x.is_complex() or x.layout != torch.strided:
            return False
        if x.shape[3] > 1 and x.stride(3) != 1:
            return False
    return True


def _gather_native(xs: Sequence[torch.Tensor], index: torch.Tensor) -> list[torch.Tensor]:
    global _cuda_gather_broken
    index = index.contiguous()
    B, S2 = index.shape
    outs, descs = [], []
    for x in xs:
        _, H, S, D = x.shape
        es = x.element_size()
        out = torch.empty((B, H, S2, D), dtype=x.dtype, device=x.device)
        outs.append(out)
        descs.append((x.data_ptr(), out.data_ptr(), H, S, D * es, x.stride(0) * es, x.stride(1) * es, x.stride(2) * es))
    if index.device.type == "cpu":
        _C._gather_slots_cpu(descs, index.data_ptr(), B, S2, torch.get_num_threads())
        return outs
    # CUDA: check the indices here (the kernel writes zeros for bad ones rather than reading out of bounds)
    sizes = [x.shape[2] for x in xs if x.shape[1] and x.shape[3]]
    if sizes and index.numel() and bool(((index < 0) | (index >= min(sizes))).any()):
        raise IndexError(f"gather_slots: index out of range for a cache of {min(sizes)} slots")
    try:
        with torch.cuda.device(index.device):
            stream = torch.cuda.current_stream().cuda_stream
            _C._gather_slots_cuda(descs, index.data_ptr(), B, S2, index.device.index or 0, stream)
    except RuntimeError as exc:  # e.g. the driver is older than the toolkit the extension was built with
        _cuda_gather_broken = str(exc)
        warnings.warn(f"{exc}; fastalign falls back to torch.gather for CUDA tensors", RuntimeWarning, stacklevel=3)
        return [gather_slots_torch(x, index) for x in xs]
    return outs


def gather_slots(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather KV slots: ``x [B, H, S, D]``, ``index [B, S']`` (int64) -> ``[B, H, S', D]`` (a new tensor)."""
    if _native_gather_ok((x,), index):
        return _gather_native((x,), index)[0]
    return gather_slots_torch(x, index)


def gather_slots_many(xs: Sequence[torch.Tensor], index: torch.Tensor) -> list[torch.Tensor]:
    """:func:`gather_slots` of several tensors (e.g. every layer's keys and values) with one shared index.

    The tensors may differ in heads, slots, head size and dtype but share the batch size and device; the
    native path does them all in one call (one CUDA launch per 32 tensors).
    """
    xs = list(xs)
    if _native_gather_ok(xs, index):
        return _gather_native(xs, index)
    return [gather_slots_torch(x, index) for x in xs]


# ---------------------------------------------------------------------------------------------- linear rows
# Up to how many rows each loop beats BLAS's matrix product (bench/bench_linear_rows.py, --isa): AVX-512's column
# loop stays ahead up to about 256 rows, AVX2's (eight lanes) 1.3x ahead at 8 and 6% behind at 16 (measured on
# an AVX-512 CPU).
MAX_ROWS_BY_ISA = {"avx512f": 128, "avx2": 8}
LINEAR_MAX_ROWS = MAX_ROWS_BY_ISA.get(getattr(_C, "linear_isa", ""), 0)  # the widest loop's, which runs


def native_linear_supported() -> bool:
    """Whether the extension is in use and has a linear loop for this CPU (AVX2 or AVX-512)."""
    return native_available() and bool(getattr(_C, "linear_isa", ""))


def native_linear_ok(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether ``_C``'s one-thread loop computes ``F.linear(x, weight, bias)``: the extension is in use and has a
    loop for this CPU (AVX2 or AVX-512), torch runs on one thread (the loop has no others), and ``x [..., I]``
    (at most ``LINEAR_MAX_ROWS`` rows), ``weight [O, I]`` and ``bias [O]`` are fp32 CPU tensors, the weight and
    bias contiguous, no gradient asked. (Written out test by test: a compiled decode step asks this for every
    layer, and each microsecond here is a few percent of a small model's step.)"""
    if torch.get_num_threads() != 1 or not native_linear_supported():
        return False
    if not (_plain_cpu_f32(x) and _plain_cpu_f32(weight) and weight.dim() == 2 and weight.is_contiguous()):
        return False
    if x.dim() < 1 or x.shape[-1] != weight.shape[1] or weight.shape[1] == 0:
        return False
    if bias is not None and not (_plain_cpu_f32(bias) and bias.shape == weight.shape[:1] and bias.is_contiguous()):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return False
    return x.shape[:-1].numel() <= LINEAR_MAX_ROWS


def _plain_cpu_f32(t: torch.Tensor) -> bool:
    return t.is_cpu and t.dtype == torch.float32 and t.layout == torch.strided


def linear_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: ``x [..., I]``, ``weight [O, I]``, ``bias [O]`` or None -> ``[..., O]``; by
    ``_C``'s loop (``native_linear``) when ``native_linear_ok`` (a few fp32 rows on one CPU thread, no gradient
    asked), else by ``F.linear``. The two agree up to float rounding (another summation order)."""
    if native_linear_ok(x, weight, bias):
        return _linear_loop(x, weight, bias, "")
    return torch.nn.functional.linear(x, weight, bias)


def native_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  isa: str = "") -> torch.Tensor:
    """``_C``'s loop (``csrc/linear.cpp``) for fp32 CPU tensors ``x [..., I]``, contiguous ``weight [O, I]`` and
    ``bias [O]`` -> ``[..., O]``, any number of rows, on one thread: the weight is streamed once, in memory order;
    up to four rows each output is a dot product, beyond that a chain of multiply-adds with the rows in the lanes
    of a vector, summed in an order that does not depend on the other rows (a row's value depends on the number
    of rows only through which of the two loops runs). ``isa``: the
    loop to run (``"avx512f"``, ``"avx2"``; ``""``: the widest this CPU has). No autograd: the result has no
    gradient (``linear_rows`` leaves inputs that ask for one to ``F.linear``)."""
    if not native_linear_supported():
        raise RuntimeError(f"no native linear loop here ({native_info()})")
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors) or weight.dim() != 2:
        raise ValueError("native_linear takes fp32 CPU tensors and a 2-D weight")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1] or (bias is not None and bias.shape != weight.shape[:1]):
        raise ValueError(f"native_linear: x {tuple(x.shape)}, weight {tuple(weight.shape)}, bias "
                         f"{None if bias is None else tuple(bias.shape)} do not fit")
    return _linear_loop(x, weight.contiguous(), None if bias is None else bias.contiguous(), isa)


def _linear_loop(x, weight, bias, isa: str) -> torch.Tensor:
    """``native_linear`` without its checks (contiguous weight and bias)."""
    O, I = weight.shape
    x = x.contiguous()  # the loop reads x as M rows of I
    out = x.new_empty(x.shape[:-1] + (O,))
    _C._linear_rows_f32(weight.data_ptr(), x.data_ptr(), out.data_ptr(),
                        0 if bias is None else bias.data_ptr(), x.shape[:-1].numel(), O, I, isa)
    return out


def loop_calls(xs: Sequence[torch.Tensor], weights: Sequence[torch.Tensor], isa: str = ""):
    """For benchmarks of the loop alone: a function that runs ``_C``'s loop on each pair of ``xs [M, I]`` and
    ``weights [O, I]`` (fp32 CPU, contiguous) one after the other, with nothing between (outputs allocated here,
    no checks per call). The tensors must stay alive and unchanged while it is used."""
    for x, w in zip(xs, weights):
        native_linear(x[:1], w, isa=isa)  # the checks, once
        if not (x.is_contiguous() and w.is_contiguous() and x.dim() == 2):
            raise ValueError("loop_calls takes contiguous 2-D inputs and weights")
    outs = [torch.empty(x.shape[0], w.shape[0]) for x, w in zip(xs, weights)]
    calls = [(w.data_ptr(), x.data_ptr(), y.data_ptr(), 0, x.shape[0], w.shape[0], w.shape[1], isa)
             for x, w, y in zip(xs, weights, outs)]
    loop = _C._linear_rows_f32

    def run() -> list[torch.Tensor]:
        for call in calls:
            loop(*call)
        return outs

    return run


# ---------------------------------------------------------------------------------------------- cache attention
# Queries per row and head (a decode step's 1, a draft block's few) up to which cache_attention runs the loop:
# 1.6-2.4x SDPA at one or two (12 heads reading 4), 1.1-1.4x at four, even at eight, behind at 16 (its products
# win there): bench/bench_cache_attention.py.
CACHE_ATTENTION_MAX_QUERIES = 4


def cache_attention_fits(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                         max_queries: int | None = None) -> bool:
    """Whether ``_C``'s loop takes these tensors (what a traced model can ask: their properties only): ``query
    [B, H, T, D]`` (``T`` at most ``max_queries``, default ``CACHE_ATTENTION_MAX_QUERIES``), ``key``/``value
    [B, Hkv, S, D]`` (``H`` a multiple of ``Hkv``) fp32 CPU tensors with unit stride over ``D``, ``mask`` None or
    ``[B or 1, 1, T or 1, S]`` (fp32, added, or bool, True where a query sees), and no gradient asked of any."""
    if not all(_plain_cpu_f32(t) and t.dim() == 4 and t.stride(3) == 1 for t in (query, key, value)):
        return False
    B, H, T, D = query.shape
    if key.shape != value.shape or key.shape[0] != B or key.shape[3] != D or key.shape[1] == 0:
        return False
    if H % key.shape[1] or not 0 < T <= (CACHE_ATTENTION_MAX_QUERIES if max_queries is None else max_queries):
        return False
    if mask is not None:
        if not (mask.is_cpu and mask.dtype in (torch.float32, torch.bool) and mask.layout == torch.strided
                and mask.dim() == 4 and mask.shape[0] in (1, B) and mask.shape[1] == 1 and mask.shape[2] in (1, T)
                and mask.shape[3] == key.shape[2]):
            return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (query, key, value, mask)))


def cache_attention_ok(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       mask: torch.Tensor | None) -> bool:
    """Whether ``_C``'s loop computes ``cache_attention(query, key, value, mask)``: the extension is in use and has
    the loop for this CPU (AVX2 and FMA), torch runs on one thread (the loop has no others) and the tensors fit
    (``cache_attention_fits``)."""
    if torch.get_num_threads() != 1 or not native_available() or not getattr(_C, "has_cache_attention", False):
        return False
    return cache_attention_fits(query, key, value, mask)


def cache_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                    scale: float) -> torch.Tensor:
    """Attention of a few queries per row over a cache: ``query [B, H, T, D]``, ``key``/``value [B, Hkv, S, D]``
    (query head ``h`` reads key-value head ``h // (H / Hkv)`` in place), ``mask [B or 1, 1, T or 1, S]`` (fp32,
    added to the scores, or bool, True where a query sees) or None -> ``[B, T, H, D]`` (contiguous: the layout an
    attention layer's output projection reads). By ``_C``'s loop (``csrc/attention.cpp``) when
    ``cache_attention_ok``, else by SDPA; the two agree up to float rounding. In the loop a masked column (with
    finite keys and values, as a cache's are) adds an exact zero, so a row's result is the same over any view of
    the cache that holds its live columns, and whatever the other rows; it depends on the batch only through
    which of the two runs (the block's queries, the threads)."""
    if not cache_attention_ok(query, key, value, mask):
        return torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, scale=scale,
            enable_gqa=key.shape[1] != query.shape[1]).transpose(1, 2).contiguous()
    return _attention_loop(query, key, value, mask, scale)


def cache_attention_loop(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                         scale: float) -> torch.Tensor:
    """``_C``'s loop itself for ``cache_attention``'s arguments, for any number of queries (for benchmarks and
    tests; ``cache_attention`` runs it up to ``CACHE_ATTENTION_MAX_QUERIES``)."""
    if not (native_available() and getattr(_C, "has_cache_attention", False)):
        raise RuntimeError(f"no native cache attention here ({native_info()})")
    if not cache_attention_fits(query, key, value, mask, max_queries=query.shape[2]):
        raise ValueError("cache_attention_loop: the tensors do not fit the loop (cache_attention_fits)")
    return _attention_loop(query, key, value, mask, scale)


def _attention_loop(query, key, value, mask, scale: float) -> torch.Tensor:
    B, H, T, D = query.shape
    H_kv, S = key.shape[1], key.shape[2]
    out = query.new_empty(B, T, H, D)
    if mask is None:
        masked, kind = (0, 0, 0, 0, 0), 0
    else:
        masked = (mask.data_ptr(), mask.stride(0) if mask.shape[0] > 1 else 0, 0,
                  mask.stride(2) if mask.shape[2] > 1 else 0, mask.stride(3))
        kind = 1 if mask.dtype == torch.float32 else 2
    _C._cache_attention_f32((query.data_ptr(), *query.stride()), (key.data_ptr(), *key.stride()),
                            (value.data_ptr(), *value.stride()), masked, kind, (out.data_ptr(), *out.stride()),
                            B, H, H_kv, T, S, D, float(scale))
    return out


def huge_page_bytes() -> int:
    """The size of a transparent huge page here (2 MiB on x86-64 Linux); 0 where the extension is not in use or
    the OS has none."""
    return int(getattr(_C, "huge_page_bytes", 0)) if native_available() else 0


def huge_page_mode() -> str:
    """The OS's transparent huge page mode: ``always``, ``madvise`` or ``never`` (Linux); "" where there is none."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return ""


def huge_pages_on() -> bool:
    """Whether the OS gives transparent huge pages to a process that asks (the mode ``always`` or ``madvise``)."""
    return huge_page_mode() in ("always", "madvise")


def collapse_huge_pages(t: torch.Tensor) -> int:
    """Back the memory of CPU tensor ``t`` (its whole storage) with transparent huge pages now, where it covers
    whole ones (Linux ``MADV_COLLAPSE``, kernel 6.1+; the values do not change): the loop streams weights spread
    over 4 KiB pages ~15% slower. Returns the bytes advised: 0 when none were (no extension, not Linux, a kernel
    without it, memory the kernel declines, a storage smaller than a huge page)."""
    if not native_available() or not t.is_cpu or not hasattr(_C, "_collapse_huge_pages"):
        return 0
    storage = t.untyped_storage()
    return _C._collapse_huge_pages(storage.data_ptr(), storage.nbytes())


# ---------------------------------------------------------------------------------------------- the torch ops
# ``linear_rows`` and ``cache_attention`` as plain dispatcher ops (not ``torch.library.custom_op``, whose Python
# wrapper costs more per call than a small layer's product), which torch.compile calls as one kernel each: their
# fake kernels here, for tracing, and their CPU kernels either C++ (``fastalign/_torch_ops.so``, csrc/torch_ops.cpp,
# on _C's loops) or the Python functions above. Both decide at each call the same way and run the same loops; the
# C++ ones cost about a microsecond a call where Python's cost about ten (bench/bench_op_calls.py), which at batch
# 1 on the 82M model was a fifth of a compiled decode step (docs/internals.md).
_LIBRARY = torch.library.Library("fastalign", "FRAGMENT")
_LIBRARY.define("linear_rows(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
_LIBRARY.define("cache_attention(Tensor query, Tensor key, Tensor value, Tensor? mask, float scale) -> Tensor")


@torch.library.register_fake("fastalign::linear_rows", lib=_LIBRARY)
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.register_fake("fastalign::cache_attention", lib=_LIBRARY)
def _(query, key, value, mask, scale):
    B, H, T, D = query.shape
    return query.new_empty(B, T, H, D)


TORCH_OPS_LIBRARY = os.path.join(os.path.dirname(os.path.dirname(__file__)), "_torch_ops.so")
_torch_ops = None  # the library (ctypes) when its kernels are registered


def _register_kernels() -> tuple[str, str | None]:
    """Register the ops' CPU kernels: C++ where ``_torch_ops.so`` is there, was built for this torch and fits
    this ``_C``, and ``FASTALIGN_TORCH_OPS=0`` is not set (read once, here); else Python. Returns ("c++" or
    "python", why not C++)."""
    global _torch_ops
    _torch_ops, why = _load_cpp_kernels()
    if why is not None and _C is not None and os.path.exists(TORCH_OPS_LIBRARY) and switched_on("FASTALIGN_TORCH_OPS"):
        warnings.warn(why + "; the ops run their Python kernels", RuntimeWarning, stacklevel=2)  # there, not usable
    if _torch_ops is None:
        _LIBRARY.impl("linear_rows", linear_rows, "CPU")
        _LIBRARY.impl("cache_attention", cache_attention, "CPU")
        return "python", why
    _torch_ops.fastalign_set_torch_ops_limits(LINEAR_MAX_ROWS, CACHE_ATTENTION_MAX_QUERIES)
    return "c++", None


def _load_cpp_kernels():
    """(the library with its kernels registered, None) or (None, why not)."""
    if not switched_on("FASTALIGN_TORCH_OPS"):
        return None, "switched off by FASTALIGN_TORCH_OPS"
    if _C is None or not hasattr(_C, "kernel_table"):
        return None, "fastalign._C is not in use"
    if not os.path.exists(TORCH_OPS_LIBRARY):
        return None, f"{TORCH_OPS_LIBRARY} is not built"
    try:
        library = ctypes.CDLL(TORCH_OPS_LIBRARY)
        library.fastalign_torch_ops_built_for.restype = ctypes.c_char_p
        built_for = library.fastalign_torch_ops_built_for().decode()
    except (OSError, AttributeError) as exc:
        return None, f"{TORCH_OPS_LIBRARY} failed to load: {exc}"
    running = f"{torch.__version__} {torch.version.git_version}"
    if built_for != running:
        return None, f"{TORCH_OPS_LIBRARY} was built for torch {built_for!r}, not {running!r}: reinstall fastalign"
    library.fastalign_register_torch_ops.argtypes = (ctypes.c_size_t,)
    library.fastalign_set_torch_ops_limits.argtypes = (ctypes.c_int64, ctypes.c_int64)
    code = library.fastalign_register_torch_ops(_C.kernel_table)
    if code != 0:
        return None, f"{TORCH_OPS_LIBRARY} refused _C's kernel table (code {code}): reinstall fastalign"
    return library, None


def set_loop_limits(linear_rows: int | None = None, cache_attention_queries: int | None = None) -> tuple[int, int]:
    """Set up to how many rows ``linear_rows`` runs its loop (``LINEAR_MAX_ROWS``) and up to how many queries per
    row and head ``cache_attention`` runs its (``CACHE_ATTENTION_MAX_QUERIES``), for the Python kernels and the
    C++ ones alike (None: as it is); returns the previous ``(rows, queries)``. For experiments and tests (0: the
    loop never runs); the defaults are measured. Set them here, not on the module: the C++ kernels keep a copy."""
    global LINEAR_MAX_ROWS, CACHE_ATTENTION_MAX_QUERIES
    previous = LINEAR_MAX_ROWS, CACHE_ATTENTION_MAX_QUERIES
    if linear_rows is not None:
        LINEAR_MAX_ROWS = int(linear_rows)
    if cache_attention_queries is not None:
        CACHE_ATTENTION_MAX_QUERIES = int(cache_attention_queries)
    if _torch_ops is not None:
        _torch_ops.fastalign_set_torch_ops_limits(LINEAR_MAX_ROWS, CACHE_ATTENTION_MAX_QUERIES)
    return previous


op_kernels, op_kernels_why = _register_kernels()
linear_rows_op = torch.ops.fastalign.linear_rows  # ``linear_rows`` as a torch op
cache_attention_op = torch.ops.fastalign.cache_attention  # ``cache_attention`` as a torch op


def loop_runs() -> dict[str, collections.Counter]:
    """How many times each of ``_C``'s loops has run in this process, by its size: ``{"linear": Counter(rows ->
    runs), "attention": Counter(queries per row and head -> runs)}`` (256 and more share 256), from Python and
    from the ops' C++ kernels alike; empty without the extension. For tests and diagnostics: which calls reached a
    loop."""
    if _C is None:
        return {"linear": collections.Counter(), "attention": collections.Counter()}
    linear, attention = _C._loop_runs()
    return {"linear": collections.Counter({i: n for i, n in enumerate(linear) if n}),
            "attention": collections.Counter({i: n for i, n in enumerate(attention) if n})}
