"""Layer 3: Hugging Face models that own a batched KV cache: ``CachedModel`` and the ``CausalLM`` interface.

The cache of a batch is rectangular, ``[B, H, S, D]`` per layer, but rows are ragged: every row has its
own set of *live* slots (``self.live [B, S]``). A token's position id is fixed when it is written (the
number of live tokens before it, or prefix length + depth inside a draft tree), so dead slots can sit
anywhere: attention simply never looks at them. That makes every cache operation cheap:

* ``rollback(n)`` kills the last ``n[b]`` live slots of row ``b`` (no copy);
* ``keep_new(mask)`` keeps a subset of the block just written, e.g. the accepted path of a draft tree;
* ``compact()`` gathers the live slots of each row to the right end and drops columns dead in every
  row; the store also runs it by itself when it pays (the ragged store when dead slots take more than
  half of the cache, the slot store when a block would not fit).

The *open block* is what was written since the cache was last tidied (``rollback``, ``keep_new``, ``compact``,
a new prefill): only it may be addressed as "the last columns" (``keep_new``, a tree's earlier nodes in
``parents``), and nothing moves its columns, in either store (the slot store compacts around it). Addressing
columns before it is an error, not a silent reference to whatever slots sit there now.

Where the keys and values live is the model's *store*, chosen by composition: the ragged store
(``fastalign.models.ragged``, eager: the cache grows block by block) or the slot store
(``fastalign.models.slots``: preallocated, with fixed-shape steps compiled by ``torch.compile``). Both give
the same ``live`` mask the same meaning, so everything above is written once, here. Attention is given to
the model as an explicit 4-D additive mask together with explicit position ids, which every causal LM of
``transformers`` accepts (eager and SDPA attention). Sliding-window layers run as full attention, exact while a
sequence fits in the window, so a model with them has the window as its context length (Gemma 3 270M: 512);
recurrent layers and ALiBi biases are not supported.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from ..errors import InputError
from ..kernels import check_finite
from ..validation import check_context_length, check_positions, check_prompts
from . import cpu_linear, native
from .ragged import RaggedStore


def eos_token_ids(model) -> set[int]:
    """The EOS token ids named by a model's generation config and config."""
    ids = set()
    for cfg in (getattr(model, "generation_config", None), model.config):
        eos = getattr(cfg, "eos_token_id", None) if cfg is not None else None
        if eos is None:
            continue
        ids.update([eos] if isinstance(eos, int) else list(eos))
    return ids


def context_length_of(config) -> int | None:
    """The number of positions a model's config allows (None: unknown)."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def sliding_window_of(config) -> int | None:
    """The window of a model's sliding-window layers (None: it has none). Such layers run here as full
    attention, which is exact while a sequence fits in the window (``CachedModel`` caps the context there)."""
    window = getattr(config, "sliding_window", None)
    if not (isinstance(window, int) and window > 0) or getattr(config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(config, "layer_types", None)  # (without them, every layer slides: Mistral)
    if layer_types and not any("sliding" in str(kind) or "chunked" in str(kind) for kind in layer_types):
        return None
    return window


ALIBI_MODEL_TYPES = ("bloom", "mpt")  # (and falcon with alibi=True)


def refuse_alibi(config) -> None:
    """Refuse models whose attention takes ALiBi biases: they read distances from cache columns, not from the
    position ids, so the padding and dead slots of a ragged cache would shift them (and a 4-D mask is refused)."""
    if getattr(config, "model_type", None) in ALIBI_MODEL_TYPES or getattr(config, "alibi", False) is True:
        raise InputError(f"{config.model_type} models with ALiBi attention biases are not supported: the cache's "
                         "padding and dead slots would shift their distances")


def cache_argument(model) -> str:
    """The name under which ``model.forward`` takes its KV cache: ``cache`` (transformers >= 5.x, which warns on
    the older name) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@dataclass
class ModelCounters:
    """What a model has cost: forward calls and tokens it processed (live tokens only)."""

    calls: int = 0
    tokens: int = 0


class CachedModel:
    """A transformers model plus a batched KV cache with ragged rows (see the module docstring).

    ``store`` holds the keys and values: a ``RaggedStore`` (eager, the default) or a ``SlotStore`` (static,
    with compiled fixed-shape steps). ``backbone`` is the module that runs (default: the model itself; a
    reward model runs its base model and reads the head itself). On a CPU in fp32 with one torch thread it runs as
    a copy sharing the weights whose large linear layers take calls of a few rows to the native loop
    (``fastalign.models.cpu_linear.native_twin``; remade at the next batch when the weights were replaced); the
    model given is not modified. A model cast or moved after wrapping (``model.to(...)``) is followed from the
    next batch on (``prefill``).
    """

    def __init__(self, model, store=None, backbone=None):
        self.model = model.eval()
        self.config = model.config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        refuse_alibi(model.config)
        self.context_length = context_length_of(model.config)
        self.sliding_window = sliding_window_of(model.config)
        self.context_why = ""  # where context_length comes from, when not from the positions
        if self.sliding_window is not None and (self.context_length or self.sliding_window) >= self.sliding_window:
            self.context_length = self.sliding_window  # beyond it, full attention would not be the model's
            self.context_why = "the window of its sliding-window layers, which run here as full attention"
        self.counters = ModelCounters()
        self._ones: dict[tuple[int, int], torch.Tensor] = {}  # _all_live's masks
        self.store = store if store is not None else RaggedStore()
        self._given_backbone = backbone if backbone is not None else model
        self._attach()

    def _attach(self) -> None:
        """Bind the store to what runs: the backbone, or its copy with native linear layers (``cpu_linear``)."""
        self.backbone = cpu_linear.native_twin(self._given_backbone)
        self.store.attach(self.backbone, cache_argument(self.backbone), self.device, self.dtype,
                          sliding=self.sliding_window is not None)

    # ----------------------------------------------------------------- state
    @property
    def live(self) -> torch.Tensor:
        """``[B, S]`` bool: which cache slots of each row hold a token."""
        return self.store.live

    @property
    def batch_size(self) -> int:
        return self.live.shape[0]

    @property
    def lengths(self) -> torch.Tensor:
        """Live tokens per row (prompt and everything kept since).  [B] int64."""
        return self.live.sum(1)

    def reset(self) -> None:
        # (the model cast or moved since it was wrapped: a store of the old dtype read its float masks wrongly)
        if self._follow_model() or not cpu_linear.twin_is_current(self.backbone, self._given_backbone):
            self._attach()  # (or its weights were replaced)
        self.store.reset()

    def _follow_model(self) -> bool:
        """Whether the model was cast or moved since this layer last looked (``model.to(...)``); if so, this
        layer now works in its new dtype and on its new device."""
        param = next(self.model.parameters())
        if (param.device, param.dtype) == (self.device, self.dtype):
            return False
        self.device, self.dtype = param.device, param.dtype
        self._ones.clear()
        return True

    @property
    def open_width(self) -> int:
        """Columns of the open block: written since the cache was last tidied, addressable as the last ones."""
        return self.store.open_width

    def close_block(self) -> None:
        """End the open block: what is cached now is no longer addressed as the last columns (e.g. a prefill)."""
        self.store.close_block()

    def _layout(self, new_live: torch.Tensor, parents: torch.Tensor | None):
        """Where a block of ``T`` new tokens sits: ``positions [B, T]``, and for a tree ``block [B, T, T]`` (which
        new tokens each new token sees: its ancestors and itself, padding excluded) and ``ancestry [B, T, P]``
        (which of the tree's ``P`` earlier nodes, the last ``P`` live-or-dead slots, it sees; None when ``P = 0``).
        A chain gets ``block = ancestry = None``. Checks the context length."""
        B, T = new_live.shape
        block = ancestry = None
        if parents is None:
            past = self.live.sum(1, keepdim=True)
            # one token (a decode step): its position is the row's length, live or padding alike
            positions = past if T == 1 else past + (new_live.cumsum(1) - 1).clamp(min=0)
        else:
            parents = parents.to(self.device)
            S = self.live.shape[1]
            P = parents.shape[1] - T  # earlier nodes of the same tree: the last P cached slots
            if P < 0 or P > S:
                raise ValueError(f"parents has {parents.shape[1]} nodes for {T} new tokens and {S} cached slots")
            if P > self.open_width:  # the tree's earlier nodes must be in the open block (module docstring)
                raise ValueError(f"parents continues a tree of {P} nodes, but only {self.open_width} columns were "
                                 "written since the cache was last tidied")
            tree = native.tree_attention_mask(parents)[:, P:]  # [B, T, P + T]
            block = tree[:, :, P:] & new_live[:, None, :]
            block |= torch.eye(T, dtype=torch.bool, device=self.device)  # no query sees nothing
            if P:
                ancestry = tree[:, :, :P]
            past = self.live[:, : S - P].sum(1, keepdim=True)
            positions = past + native.tree_depths(parents)[:, P:]
        # positions never exceed the slot count, so the exact (syncing) check is needed only near the limit
        near_limit = self.context_length is not None and self.live.shape[1] + T > self.context_length
        if near_limit:
            check_positions(int((positions * new_live).max()) + 1, self.context_length, why=self.context_why)
            # a padding token's position (its row's length) may pass the limit; learned position tables (gpt2,
            # opt) would index out of range, so clamp it. After the check only padding can be clamped.
            positions = positions.clamp(max=self.context_length - 1)
        return positions, block, ancestry

    # --------------------------------------------------------------- forward
    @torch.no_grad()
    def write(self, tokens: torch.Tensor, parents: torch.Tensor | None = None, live: torch.Tensor | None = None,
              **kwargs):
        """Write ``tokens [B, T]`` after the live slots of each row and return the model output.

        ``parents [B, T]`` (optional) makes the block a tree (see ``fastalign.models.native``); ``live [B, T]``
        marks padding in the block (not attended to, not counted, dead afterwards). ``parents [B, P + T]``
        continues a tree grown over several calls: its first ``P`` nodes are the last ``P`` slots already
        written (e.g. the previous levels of a draft tree), which the new nodes see only along their ancestry.
        ``kwargs`` go to the model (e.g. ``logits_to_keep``).
        """
        # (once per decode token: the checks skip torch calls that would change nothing; each costs microseconds)
        if tokens.dtype != torch.long or tokens.device != self.device:
            tokens = tokens.to(self.device, torch.long)
        tokens = tokens.contiguous()  # (the compiled steps' inputs: int64, dense)
        B, T = tokens.shape
        self.store.open_block(B, T, compilable=not kwargs)
        if live is None:
            new_live = self._all_live(B, T)
        else:
            new_live = live if live.device == self.device else live.to(self.device)
        positions, block, ancestry = self._layout(new_live, parents)
        out = self.store.write(tokens, positions, new_live, block, ancestry, live is not None, **kwargs)
        self.counters.calls += 1
        self.counters.tokens += B * T if live is None else int(new_live.sum())
        return out

    def _all_live(self, B: int, T: int) -> torch.Tensor:
        """``[B, T]`` bool, all True (a block without padding; kept per shape and only read)."""
        ones = self._ones.get((B, T))
        if ones is None:
            ones = self._ones[(B, T)] = torch.ones(B, T, dtype=torch.bool, device=self.device)
        return ones

    # --------------------------------------------------------- cache surgery
    def rollback(self, num_tokens: torch.Tensor | int) -> None:
        """Drop the last ``num_tokens[b]`` live tokens of each row."""
        n = torch.as_tensor(num_tokens, device=self.device).expand(self.batch_size)
        if (n < 0).any() or (n > self.lengths).any():
            raise ValueError("rollback by a negative count or by more tokens than a row holds")
        after = self.live.flip(1).cumsum(1).flip(1)  # live slots at or after each slot
        self.store.narrow(self.live & (after > n[:, None]))
        self.store.tidy()

    def keep_new(self, keep: torch.Tensor) -> None:
        """Of the last ``T`` columns written (``keep [B, T]``), keep the flagged slots and drop the rest. They must
        all be in the open block (written since the cache was last tidied; ends it)."""
        T = keep.shape[1]
        if T > self.open_width:
            raise ValueError(f"keep_new over {T} columns, but only {self.open_width} were written since the cache "
                             "was last tidied")
        if T:  # (live[:, -0:] would be every slot)
            self.live[:, -T:] &= keep.to(self.device)
        self.store.tidy()

    def set_block_live(self, live: torch.Tensor) -> None:
        """Mark which slots of the last block written (``live [B, T]``) are live, without cropping the dead ones:
        a later call may revive them (a reward model's scored candidates, until one is kept). They must all be in
        the open block, as for ``keep_new`` (before it, the stores' columns need not agree)."""
        T = live.shape[1]
        if T > self.open_width:
            raise ValueError(f"set_block_live over {T} columns, but only {self.open_width} were written since the "
                             "cache was last tidied")
        if T:  # (live[:, -0:] would be every slot)
            self.live[:, -T:] = live.to(self.device)

    def tidy(self) -> None:
        """Crop trailing all-dead columns (and compact when the store decides it pays)."""
        self.store.tidy()

    def compact(self) -> None:
        """Move each row's live slots to the right end (order kept) and drop all-dead columns."""
        self.store.compact()

    def select_rows(self, rows: torch.Tensor | list[int]) -> None:
        """Keep only the given rows, in the given order (repeats allowed)."""
        self.store.select_rows(torch.as_tensor(rows, device=self.device, dtype=torch.long))

    def expand(self, n: int) -> None:
        """Repeat every row ``n`` times in place: row ``b`` becomes rows ``b*n .. b*n+n-1``."""
        self.select_rows(torch.arange(self.batch_size, device=self.device).repeat_interleave(n))


def left_pad(rows: list[list[int]], pad: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists: returns ``tokens [B, L]`` int64 and ``live [B, L]`` bool."""
    L = max(len(r) for r in rows)
    tokens = torch.full((len(rows), L), pad, dtype=torch.long)
    live = torch.zeros(len(rows), L, dtype=torch.bool)
    for b, r in enumerate(rows):
        if r:
            tokens[b, L - len(r):] = torch.tensor(r, dtype=torch.long)
            live[b, L - len(r):] = True
    return tokens.to(device), live.to(device)


def right_pad(rows: list[list[int]], pad: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists: returns ``tokens [B, L]`` int64 and ``live [B, L]`` bool (L >= 1)."""
    L = max(1, max(len(r) for r in rows))
    tokens = torch.full((len(rows), L), pad, dtype=torch.long)
    live = torch.zeros(len(rows), L, dtype=torch.bool)
    for b, r in enumerate(rows):
        if r:
            tokens[b, : len(r)] = torch.tensor(r, dtype=torch.long)
            live[b, : len(r)] = True
    return tokens.to(device), live.to(device)


class CausalLM(CachedModel):
    """A causal LM (``AutoModelForCausalLM``) with a ragged batched KV cache; logits come back in fp32."""

    def __init__(self, model, store=None):
        super().__init__(model, store)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.eos_token_ids = eos_token_ids(model)
        self.eos_tensor = torch.tensor(sorted(self.eos_token_ids), dtype=torch.long, device=self.device)
        self._can_keep_last = "logits_to_keep" in inspect.signature(model.forward).parameters

    def _follow_model(self) -> bool:
        moved = super()._follow_model()
        if moved:
            self.eos_tensor = self.eos_tensor.to(self.device)
        return moved

    def add_stop_tokens(self, ids) -> None:
        """Make ``ids`` end a response like EOS (e.g. a chat template's end-of-turn token)."""
        self.eos_token_ids = self.eos_token_ids | {int(i) for i in ids}
        self.eos_tensor = torch.tensor(sorted(self.eos_token_ids), dtype=torch.long, device=self.device)

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], max_new_tokens: int = 0) -> torch.Tensor:
        """Start a new cache holding the (ragged) prompts; returns next-token logits ``[B, V]`` fp32."""
        prompts = check_prompts(prompts, vocab_size=self.vocab_size, model="model")
        check_context_length(prompts, max_new_tokens, self.context_length, why=self.context_why)
        self.reset()
        self.store.reserve(max_new_tokens)
        tokens, live = left_pad(prompts, device=self.device)
        kwargs = {"logits_to_keep": 1} if self._can_keep_last else {}
        out = self.write(tokens, None, live, **kwargs)
        self.close_block()  # the prompts: never addressed as a block, so compaction may move them
        return self._check(out.logits[:, -1].float())

    @torch.no_grad()
    def extend(self, tokens: torch.Tensor, parents: torch.Tensor | None = None,
               live: torch.Tensor | None = None) -> torch.Tensor:
        """Append ``tokens [B, T]`` (a chain, or a tree given ``parents``); returns logits ``[B, T, V]`` fp32.

        ``logits[:, t]`` is the next-token distribution after token ``t`` (and its ancestors). A tree may be
        grown over several calls: ``parents [B, P + T]`` then also covers its ``P`` nodes written before.
        """
        if tokens.dim() == 1:
            tokens = tokens[:, None]
        logits = self.write(tokens, parents, live).logits
        return self._check(logits if logits.dtype == torch.float32 else logits.float())

    def _check(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.shape[-1] != self.vocab_size:  # some models pad the output embedding
            logits = logits[..., : self.vocab_size]
        check_finite(logits, "the model's logits")
        return logits
