"""The slot store: a preallocated static KV cache and fixed-shape model steps compiled with ``torch.compile``.

A ``CachedModel`` (``CausalLM``, a reward model's cache) over a ``SlotStore`` has the interface and the meaning
it has over the ``RaggedStore`` (the eager reference): the methods run on either unchanged, with the same laws.
The logits agree up to float rounding (another summation order over other columns: ~1e-6 in fp32), so the
tokens are the eager ones in fp32 on the tested models and equal up to that rounding in bf16 / fp16. What
differs is storage:

* per layer, keys and values ``[R, H, S, D]`` allocated once: ``R`` is the batch rounded up to a bucket
  (``BATCH_BUCKETS``; rows past the batch are padding), ``S`` a maximum length;
* every block is written at one column range ``[end, end + T)`` shared by all rows; rows differ only by
  their live masks (``_live_buf [R, S]``), so ``live`` (the view ``_live_buf[:B, :end]``) means exactly what it
  means in the eager cache, and ``rollback`` / ``keep_new`` are the same mask updates (``CachedModel``'s);
* cropping trailing dead columns moves ``end`` back (no copy); ``compact`` gathers the live slots within
  the same buffers and runs only when a block would not fit; ``select_rows`` gathers rows in place.
* that compaction can run inside any call, e.g. between the levels of a draft tree, so it keeps the open block
  (``fastalign.models.causal_lm``: the columns written since the cache was last tidied, which callers address
  as the last columns) as it is, dead slots included, right after the compacted columns: ``keep_new`` and a
  tree's ``parents`` then find their columns where the eager cache has them.

A step is one forward over a view of the cache, its first ``V`` columns (``view_length``: the smallest power
of two from 32 that holds every live slot and the block, at most ``S``; the same bits as attending over all
``S``, whose extra columns are masked), with an additive mask ``[R, 1, Tb, V]`` built inside the step from
the live mask and the block's own visibility (causal, or a tree). A short sequence in a long cache then does
not pay for the whole cache at every step (the 82M model at batch 16, 80 tokens in 128 columns: the attention
went from 11.7 to 7.0 ms a step). Its shapes depend only on ``(R, Tb, Tq, V, S)`` (``Tq``: 1, or ``Tb`` for
a tree's block): a block of ``T`` tokens is padded to the width bucket ``Tb`` (``WIDTH_BUCKETS``: 1, 2, 4,
8, 16; the padding is dead, beyond ``end``) and compiled with ``torch.compile(dynamic=False)``, ``V`` as the
one dynamic size: one graph per ``(R, Tb, Tq, S)`` serves every view (a graph per view would multiply the
compilations: a cold compile of the 82M model's decode step, before torch's on-disk cache has it, took 39 s
for one graph over the whole cache, 78 s for a graph per view of three, 31 s for the one graph of every
view), reused by every later call of those shapes (decode steps, speculative verify blocks, tree blocks,
reward branch blocks). Every live slot lies before ``end`` (each operation on the live mask keeps it so),
which is why the view holds them all. Wider blocks (a prefill) run the same step uncompiled. With
``compile=False`` the same code runs without ``torch.compile``: that is how the tests check the static cache
quickly.

On a CUDA device the compiled steps are also captured as CUDA graphs (``step_compilation`` decides, from the
options and the device, in one place: ``torch.compile(mode="reduce-overhead")``, i.e. inductor's cudagraph
trees, one graph per shape, a view's length included: the trees record a graph for each size of a dynamic
dimension). What a graph needs holds here: fixed shapes per bucket; no host sync inside the
step (the mask is built on the device, every shape decision is made before the call); the keys and values
are marked as static addresses (``torch._dynamo.mark_static_address``: the graph writes them in place, and a
new buffer, after a resize or for another batch, has the graph recorded again rather than copied or
recompiled); the small per-call inputs (tokens, positions, masks, columns) are copied by torch into the
graph's static input buffers; and the output (logits or hidden states), which the next replay overwrites, is
cloned before the step returns, each call starting a new cudagraph step
(``torch.compiler.cudagraph_mark_step_begin``). ``StaticOptions.cuda_graphs=False`` or
``FASTALIGN_CUDA_GRAPHS=0`` turns the graphs off (torch.compile's default mode, as on a CPU).

The KV write is the gpt-fast recipe: ``index_copy_`` of the block into the preallocated tensors, through a
``transformers`` ``Cache`` subclass (``SlotCache``), so any HF causal LM that takes an explicit 4-D mask and
position ids works unchanged (Llama-, GPT-2- and OPT-style models are tested).
"""

from __future__ import annotations

import functools
import inspect
import os
import types
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..errors import InputError
from ..validation import check_rows
from . import native
from .ragged import chain_block

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # beyond 64 rows: multiples of 64
WIDTH_BUCKETS = (1, 2, 4, 8, 16)  # wider blocks run uncompiled at their own width
LENGTH_STEP = 128  # the cache length S is a multiple of this
VIEW_MIN = 32  # the shortest attention view of the cache (views: powers of two up to S)
RECOMPILE_LIMIT = 256  # shapes x models share one compiled function: torch's default limit (8) is too low


def batch_bucket(rows: int) -> int:
    for b in BATCH_BUCKETS:
        if rows <= b:
            return b
    return -(-rows // 64) * 64


def width_bucket(width: int) -> int | None:
    """The compiled width for a block of ``width`` tokens, or None (run uncompiled)."""
    return next((w for w in WIDTH_BUCKETS if width <= w), None)


def _round_length(n: int) -> int:
    return max(LENGTH_STEP, -(-n // LENGTH_STEP) * LENGTH_STEP)


def view_length(used: int, length: int) -> int:
    """The columns a step attends over when the columns ``[0, used)`` of a cache of ``length`` hold its live
    slots and its block: the smallest power of two from ``VIEW_MIN`` that is at least ``used``, at most
    ``length``."""
    view = VIEW_MIN
    while view < used:
        view *= 2
    return min(view, length)


# --------------------------------------------------------------------------- the transformers Cache
class _Write:
    """Where the current block goes, shared by the layers of one cache: ``columns [Tb]``, and ``view``, the
    leading columns the step attends over (``view_length``)."""

    columns: torch.Tensor
    view: int = 0


class SlotLayer(CacheLayerMixin):
    """One layer's preallocated keys and values ``[R, H, S + 1, D]``; ``update`` writes the block at the shared
    columns (``index_copy_``) and returns the buffers' first ``view`` columns, ``view <= S`` (attention is
    masked by the 4-D mask, of as many columns). The spare last column is never written or read: it keeps
    every view a strict prefix of the buffer, so that one compiled step serves every view (torch compiles a
    view of the whole buffer, which is contiguous, apart, and the guards that tell the two apart are not among
    those a call with ``skip_guard_eval_unsafe`` evaluates)."""

    is_compileable = True
    is_sliding = False

    def __init__(self, write: _Write, rows: int, length: int, static_addresses: bool = False):
        super().__init__()
        self.write, self.rows, self.length = write, rows, length
        self.static_addresses = static_addresses

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        H, D, Dv = key_states.shape[1], key_states.shape[3], value_states.shape[3]
        kw = dict(dtype=key_states.dtype, device=key_states.device)
        self.keys = torch.zeros(self.rows, H, self.length + 1, D, **kw)
        self.values = torch.zeros(self.rows, H, self.length + 1, Dv, **kw)
        if self.static_addresses:
            # CUDA graphs: the step writes these in place, so they must be static inputs of the graph (else
            # cudagraph trees skip a graph that mutates an input); unguarded: a new buffer (a resize, another
            # batch) re-records the graph instead of recompiling
            torch._dynamo.mark_static_address(self.keys, guard=False)
            torch._dynamo.mark_static_address(self.values, guard=False)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys.index_copy_(2, self.write.columns, key_states)
        self.values.index_copy_(2, self.write.columns, value_states)
        view = self.write.view  # a dynamic size under torch.compile (no branch on it)
        return self.keys[:, :, :view], self.values[:, :, :view]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.write.view, 0

    def get_seq_length(self) -> int:
        return 0  # positions are always given explicitly

    def get_max_length(self) -> int:
        return self.length


class SlotCache(Cache):
    """A ``transformers`` cache of ``SlotLayer`` s (created as the model asks for them, on the first call)."""

    def __init__(self, rows: int, length: int, static_addresses: bool = False):
        self.write = _Write()
        super().__init__(layer_class_to_replicate=functools.partial(SlotLayer, self.write, rows, length,
                                                                    static_addresses))
        self.rows, self.length, self.static_addresses = rows, length, static_addresses

    @property
    def initialized(self) -> bool:
        return bool(self.layers) and all(layer.is_initialized for layer in self.layers)


# --------------------------------------------------------------------------- options
@dataclass(frozen=True)
class StaticOptions:
    """How the static path runs.

    ``compile``: compile the fixed-shape steps with ``torch.compile`` (False: run the same steps as they are,
    e.g. in tests). ``mode``: torch.compile's mode (None: chosen by ``step_compilation``: the default on a
    CPU, ``"reduce-overhead"``, i.e. CUDA graphs, on a CUDA device). ``cpp_wrapper``: inductor's C++ wrapper on
    the CPU (less Python per call).
    ``skip_guards``: once a shape is compiled, call it with torch's ``skip_guard_eval_unsafe`` stance, so a
    step evaluates only the guards that tell this model's compiled shapes apart. Safe here because every
    model has its own compiled function (its own code object) and the shape key ``(R, Tb, Tq, V, S)`` is all that
    varies between its calls (no grad, no keyword arguments, fixed dtypes); a new shape is always compiled
    under full guards first. Without CUDA graphs, a shape's later calls on the same buffers go further: they
    call the code torch.compile runs for it directly (``compiled_code``: no frame hook, no guard dispatch), the
    entry picked once by its full guards, while torch's global state (grad mode, autocast, ...) is the one it was
    picked in. ``cuda_graphs``: on a CUDA device, capture the compiled steps as CUDA graphs
    (None: yes unless ``FASTALIGN_CUDA_GRAPHS=0``; False: torch.compile's default mode, as on a CPU; ignored
    when ``mode`` is given). ``step_compilation`` turns these and the device into torch.compile's settings.
    """

    compile: bool = True
    mode: str | None = None
    cpp_wrapper: bool = True
    skip_guards: bool = True
    cuda_graphs: bool | None = None


CUDA_GRAPHS_ENV = "FASTALIGN_CUDA_GRAPHS"


@dataclass(frozen=True)
class StepCompilation:
    """How a store's fixed-shape steps are compiled (``step_compilation``). ``compile``: whether they are;
    ``mode`` / ``options``: torch.compile's; ``graphs``: whether the steps replay as CUDA graphs, which turns on
    what graphs need (static KV addresses, a cudagraph step per call, outputs cloned)."""

    compile: bool
    mode: str | None = None
    options: dict | None = None
    graphs: bool = False


def cuda_graphs_from_env() -> bool:
    """``FASTALIGN_CUDA_GRAPHS``: unset or ``1`` (graphs on a CUDA device), ``0`` (off, for debugging)."""
    value = os.environ.get(CUDA_GRAPHS_ENV, "1").strip().lower()
    if value not in ("0", "1", "true", "false", "on", "off", "yes", "no", ""):
        raise InputError(f"{CUDA_GRAPHS_ENV}={value!r}: expected 1 (CUDA graphs on a GPU, the default) or 0 (off)")
    return value not in ("0", "false", "off", "no")


def step_compilation(options: StaticOptions, device: torch.device) -> StepCompilation:
    """The one place that decides how the steps of a model on ``device`` compile.

    Not compiling: nothing. A CPU: ``options.mode`` (None: torch.compile's default) with inductor's C++ wrapper
    (``options.cpp_wrapper``), no graphs. A CUDA device: ``options.mode`` when given, else ``"reduce-overhead"``
    (CUDA graphs) unless ``options.cuda_graphs`` is False, or is None and ``FASTALIGN_CUDA_GRAPHS=0``; then the
    default mode. ``graphs`` is whether the chosen mode captures CUDA graphs on that device."""
    if not options.compile:
        return StepCompilation(compile=False)
    device = torch.device(device)
    if device.type != "cuda":
        inductor = {"cpp_wrapper": True} if options.cpp_wrapper and device.type == "cpu" else None
        return StepCompilation(True, options.mode, inductor, graphs=False)
    wanted = options.cuda_graphs if options.cuda_graphs is not None else cuda_graphs_from_env()
    mode = options.mode if options.mode is not None else ("reduce-overhead" if wanted else None)
    from torch._inductor import list_mode_options

    graphs = mode is not None and bool(list_mode_options(mode).get("triton.cudagraphs", False))
    return StepCompilation(True, mode, None, graphs)


def _configure_dynamo() -> None:
    import torch._dynamo.config as dynamo

    dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)
    dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT)


def compiled_code(function, args: tuple):
    """What ``torch.compile(function)`` runs for a call with ``args``, as a plain function: the bytecode dynamo
    wrote for it (it gathers the graph's inputs, calls the compiled graph and returns), found among the entries of
    torch's compile cache for ``function``'s code by evaluating each entry's guards in full on ``args``.

    Calling it skips dynamo's frame hook and guard dispatch (tens of microseconds a call, much of a small step's
    time). Valid for the calls whose guards would pick the same entry: ``SlotStore`` uses it per shape, for one
    set of buffers, in the global state it was picked in (checked at each call: grad mode, autocast, ...). None
    when not exactly one entry accepts ``args``, or this torch does not expose its cache
    (``_debug_get_cache_entry_list``, a private interface; any failure gives None, and calls stay on the
    compiled function)."""
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        bound = inspect.signature(function).bind(*args)
        bound.apply_defaults()
        frame_locals = dict(bound.arguments)
        entries = [e for e in _debug_get_cache_entry_list(function.__code__) if e.guard_manager.check(frame_locals)]
        if len(entries) != 1 or any(name.startswith("__resume_at") for name in entries[0].code.co_names):
            return None  # (a graph break: its resumed part would run uncompiled outside dynamo's frame hook)
        return types.FunctionType(entries[0].code, function.__globals__, function.__name__)
    except Exception:
        return None


# --------------------------------------------------------------------------- the store
class SlotStore:
    """The static storage of one model's cache (see the module docstring). ``attach`` binds it to a model."""

    def __init__(self, options: StaticOptions = StaticOptions()):
        self.options = options
        self.reserved = 0  # columns to allocate beyond a prefill (``reserve``: max_new_tokens)
        self.rows = 0
        self.end = 0
        self.open_from = 0  # the first column of the open block
        self.cache = None
        self.compiled_shapes: set[tuple[int, int, int, int, int]] = set()  # (R, Tb, Tq, V, S) run compiled so far
        self._blocks: dict[tuple[int, int, int, int], torch.Tensor] = {}
        self._compiled_step = None
        self._step_function = None  # the function ``_compiled_step`` compiles (its code keys torch's cache)
        # shape -> (compiled code, the global state it was picked in), or False (none)
        self._direct: dict[tuple[int, int, int, int, int], object] = {}
        self._width = 0  # the width of the block opened last (its bucket, when it runs compiled)
        self._compiled = False
        self.compilation = StepCompilation(compile=False)  # (attach decides)

    def attach(self, backbone, cache_arg: str, device: torch.device, dtype: torch.dtype,
               sliding: bool = False) -> None:
        """Run ``backbone`` (which takes its cache as ``cache_arg``) on ``device``; compile its step. (``sliding``,
        as for ``RaggedStore.attach``, changes nothing here: every step's mask is 4-D.)"""
        self.backbone, self.cache_arg, self.device, self.dtype = backbone, cache_arg, device, dtype
        self._live_buf = torch.zeros(0, 0, dtype=torch.bool, device=device)
        self.cache, self.rows, self.end, self.open_from = None, 0, 0, 0  # attached again: start afresh
        self.compiled_shapes = set()  # a new step function compiles its shapes anew
        self._direct = {}
        self.compilation = step_compilation(self.options, device)
        if self.compilation.compile:
            _configure_dynamo()
            # a code object of its own: torch's compile cache (and its guards) is per code object
            step = types.FunctionType(SlotStore._step.__code__.replace(), globals(), "_step")
            self._step_function = step
            self._compiled_step = torch.compile(step, dynamic=False, mode=self.compilation.mode,
                                                options=self.compilation.options)

    def reserve(self, new_tokens: int) -> None:
        """Allocate room for ``new_tokens`` more columns at the next prefill (a decode's ``max_new_tokens``)."""
        self.reserved = new_tokens

    # ---------------------------------------------------------------- state
    @property
    def live(self) -> torch.Tensor:
        """``[B, end]`` view of the live mask: the same meaning as the ragged store's ``live``."""
        return self._live_buf[: self.rows, : self.end]

    def narrow(self, live: torch.Tensor) -> None:
        """Replace the live mask by ``live [B, S']`` (``S' <= end``), which only kills slots, in place."""
        B, width = live.shape
        if B != self.rows or width > self.end:
            raise RuntimeError("the static cache's live mask is only ever narrowed in place")
        self._live_buf[:B, :width] = live
        self._live_buf[:, width: self.end] = False
        self.end = width
        self.open_from = min(self.open_from, width)

    def reset(self) -> None:
        self.rows, self.end, self.open_from = 0, 0, 0
        self._live_buf.zero_()

    @property
    def open_width(self) -> int:
        """Columns of the open block: written since the cache was last tidied, addressable as the last ones."""
        return self.end - self.open_from

    def close_block(self) -> None:
        """End the open block: what is cached now is no longer addressed as the last columns."""
        self.open_from = self.end

    def layers(self):
        return self.cache.layers if self.cache is not None else []

    # ---------------------------------------------------------------- allocation
    def _allocate(self, rows: int, length: int) -> None:
        """Fresh buffers for ``rows`` rows (a bucket) and ``length`` columns; keys/values appear on the first call."""
        self.cache = SlotCache(rows, length, self.compilation.graphs)
        self._live_buf = torch.zeros(rows, length, dtype=torch.bool, device=self.device)
        self._direct.clear()  # new buffers: each shape's code is looked up again, under full guards

    def _resize(self, rows: int, length: int, row_index: torch.Tensor | None = None) -> None:
        """New buffers of ``rows x length`` holding the current rows (or ``row_index`` of them) at the same columns."""
        old, old_live = self.cache, self._live_buf
        index = torch.arange(self.rows, device=self.device) if row_index is None else row_index
        self.cache = SlotCache(rows, length, self.compilation.graphs)
        self._direct.clear()
        n, w = index.shape[0], min(self.end, length)
        for layer in old.layers:
            new = SlotLayer(self.cache.write, rows, length, self.compilation.graphs)
            new.lazy_initialization(layer.keys[:1], layer.values[:1])
            new.keys[:n, :, :w] = layer.keys[index, :, :w]
            new.values[:n, :, :w] = layer.values[index, :, :w]
            self.cache.layers.append(new)
        self._live_buf = torch.zeros(rows, length, dtype=torch.bool, device=self.device)
        self._live_buf[:n, :w] = old_live[index, :w]

    def _make_room(self, B: int, width: int) -> None:
        """Buffers for a block of ``width`` columns over ``B`` rows: allocate, compact or grow as needed."""
        if self.rows == 0:  # a fresh batch (prefill)
            length = _round_length(width + self.reserved + 2 * WIDTH_BUCKETS[-1])
            if self.cache is None or self.cache.rows != batch_bucket(B) or self.cache.length < length:
                self._allocate(batch_bucket(B), length)
            self.rows = B
            return
        check_rows(B, self.rows)
        if self.end + width <= self.cache.length:
            return
        self._compact(self.open_from)  # the open block moves as it is (module docstring)
        if self.end + width > self.cache.length:
            self._resize(self.cache.rows, _round_length(2 * (self.end + width)))

    # ---------------------------------------------------------------- forward
    def _step(self, tokens, positions, seen, block, columns, **kwargs):
        """One forward of ``tokens [R, Tb]`` written at ``columns [Tb]``: query ``t`` of row ``b`` sees the cached
        slots ``seen [R, 1 or Tb, V]`` (the view's columns) and the block's tokens ``block [R, Tb, Tb]``. Returns
        logits or hidden states."""
        R, Tb = tokens.shape
        self.cache.write.view = seen.shape[2]  # the columns the layers hand the attention (a dynamic size)
        visible = seen.expand(R, Tb, seen.shape[2]).index_copy(2, columns, block)
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=visible.device)
        mask = mask.masked_fill(~visible, torch.finfo(self.dtype).min)[:, None]
        out = self.backbone(input_ids=tokens, attention_mask=mask, position_ids=positions,
                            **{self.cache_arg: self.cache}, use_cache=True, **kwargs)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state

    def open_block(self, rows: int, width: int, compilable: bool) -> None:
        """Room for a block of ``width`` tokens over ``rows`` rows; it runs compiled (at its width bucket) when
        ``compilable`` (no extra model arguments), compiling is on and the batch is under way (not a prefill)."""
        bucket = width_bucket(width) if compilable else None
        self._compiled = bucket is not None and self.options.compile and self.rows > 0 and self.cache.initialized
        self._width = bucket if self._compiled else width
        self._make_room(rows, self._width)

    @torch.no_grad()
    def write(self, tokens, positions, new_live, block, ancestry, padded: bool, **kwargs):
        """``RaggedStore.write`` over the slots (same arguments, same meaning), after ``open_block``."""
        B, T = tokens.shape
        width = self._width
        R, S, start = self.cache.rows, self.cache.length, self.end
        dev = self.device
        view = view_length(start + width, S)  # every live slot and the block lie in the first `view` columns

        # the step's inputs, padded to R rows and `width` columns (padding: dead, sees only itself); `seen`
        # contiguous: one layout for every call of a shape
        seen = self._live_buf[:, None, :view].contiguous()
        if ancestry is not None:
            P = ancestry.shape[2]
            seen = seen.expand(R, width, view).clone()
            seen[:B, :T, start - P: start] &= ancestry
        if (R, width) != (B, T):
            tokens, positions = _pad(tokens, R, width), _pad(positions, R, width)
        if block is None and (T == 1 or not padded):  # a chain without padding: a constant
            block = self._causal_block(R, width, B, T)
        else:
            if block is None:
                block = chain_block(new_live)
            if (R, width) != (B, T):
                padded = torch.eye(width, dtype=torch.bool, device=dev).repeat(R, 1, 1)
                padded[:B, :T, :T] = block
                block = padded
        columns = torch.arange(start, start + width, device=dev)
        self.cache.write.columns = columns
        if self._compiled:
            args = (self, tokens, positions, seen, block, columns)
            shape = (R, width, seen.shape[1], view, S)
            direct = self._direct.get(shape)
            if direct and direct[1].check():  # this shape's compiled code, called as a plain function, in the
                out = direct[0](*args)        # global state (grad mode, autocast, ...) it was picked in
            else:
                # (another global state than the direct code's: full guards, which recompile for it)
                known = shape in self.compiled_shapes and self.options.skip_guards and not direct
                if not known:
                    # a call that may trace: the view's length is a dynamic size of the compiled step, not a
                    # constant (one graph serves every view; module docstring). Marked only here: it costs ~40 us,
                    # a tenth of a toy-world step
                    torch._dynamo.maybe_mark_dynamic(seen, 2)
                if self.compilation.graphs:
                    # a new cudagraph step: what earlier replays returned may be overwritten (it was cloned)
                    torch.compiler.cudagraph_mark_step_begin()
                with torch.compiler.set_stance(skip_guard_eval_unsafe=known):
                    out = self._compiled_step(*args)
                if self.compilation.graphs:
                    out = out[:B, :T].clone() if out.shape[1] >= T else out[:B].clone()  # the next replay overwrites it
                elif self.options.skip_guards and shape not in self._direct:
                    code = compiled_code(self._step_function, args)
                    self._direct[shape] = code is not None and (code, torch._C._dynamo.guards.GlobalStateGuard())
                self.compiled_shapes.add(shape)
        else:
            out = self._step(tokens, positions, seen, block, columns, **kwargs)

        self._live_buf[:B, start: start + T] = new_live
        self.end = start + T
        if out.shape[:2] != (B, T):  # padding rows or columns (or logits_to_keep cut the block)
            out = out[:B, :T] if out.shape[1] >= T else out[:B]
        return SimpleNamespace(logits=out, last_hidden_state=out)

    def _causal_block(self, R: int, width: int, B: int, T: int) -> torch.Tensor:
        """``[R, width, width]``: causal over the first ``T`` columns of the first ``B`` rows, padding sees only
        itself (cached: decode steps use the same one every time)."""
        key = (R, width, B, T)
        block = self._blocks.get(key)
        if block is None:
            block = torch.eye(width, dtype=torch.bool, device=self.device).repeat(R, 1, 1)
            block[:B, :T, :T] = torch.ones(T, T, dtype=torch.bool, device=self.device).tril_()
            self._blocks[key] = block
        return block

    # ---------------------------------------------------------------- cache surgery
    def tidy(self) -> None:
        """Crop trailing all-dead columns (``end`` moves back; nothing is copied); ends the open block."""
        alive_cols = self.live.any(0).nonzero()
        self.end = int(alive_cols.max()) + 1 if alive_cols.numel() else 0
        self.close_block()

    def compact(self) -> None:
        """Move each row's live slots to the right end of ``[0, max length)`` (order kept), in the same buffers
        (ends the open block, like the ragged store's)."""
        self._compact(self.end)
        self.close_block()

    def _compact(self, upto: int) -> None:
        """Compact columns ``[0, upto)``: each row's live slots there go to the right end of ``[0, w)`` (order
        kept; ``w`` the most live slots a row has there); columns ``[upto, end)`` follow as they are."""
        if self.rows == 0 or self.end == 0:
            return
        live = self.live
        order = torch.argsort(live[:, :upto].to(torch.int8), dim=1, stable=True)
        width = int(live[:, :upto].sum(1).max())
        after = torch.arange(upto, self.end, device=self.device).expand(self.rows, -1)
        order = torch.cat([order[:, upto - width:], after], 1)
        end = order.shape[1]
        gathered = native.gather_slots_many(
            [t[: self.rows, :, : self.end] for layer in self.layers() for t in (layer.keys, layer.values)], order)
        for i, layer in enumerate(self.layers()):
            layer.keys[: self.rows, :, :end] = gathered[2 * i]
            layer.values[: self.rows, :, :end] = gathered[2 * i + 1]
        new_live = torch.gather(live, 1, order)
        self._live_buf[:, : self.end] = False
        self._live_buf[: self.rows, :end] = new_live
        self.end, self.open_from = end, width

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only the given rows, in the given order (repeats allowed); the buffers change size only when the
        batch moves to another bucket."""
        n = rows.shape[0]
        if n == 0:  # every row has finished
            self.reset()
            return
        if batch_bucket(n) != self.cache.rows:
            self._resize(batch_bucket(n), self.cache.length, rows)
        else:
            w = self.end
            for layer in self.layers():
                layer.keys[:n, :, :w] = layer.keys[rows, :, :w]
                layer.values[:n, :, :w] = layer.values[rows, :, :w]
            live = self._live_buf[rows]
            self._live_buf.zero_()
            self._live_buf[:n] = live
        self.rows = n


def _pad(x: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    """``x [B, T]`` zero-padded to ``[rows, width]``."""
    out = x.new_zeros(rows, width)
    out[: x.shape[0], : x.shape[1]] = x
    return out
