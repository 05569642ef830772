"""The ragged store: the eager KV storage of a ``CachedModel`` (the reference the slot store is checked against).

Per layer a ``transformers`` ``DynamicCache`` grows by one block per forward, ``[B, H, S, D]``; rows are ragged
through the live mask ``live [B, S]`` (``fastalign.models.causal_lm``). Cropping trailing dead columns slices
the tensors; ``compact`` gathers each row's live slots to the right end and drops the columns dead in every
row, by itself when dead slots take more than half of the cache.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from ..validation import check_rows
from . import native


def chain_block(new_live: torch.Tensor) -> torch.Tensor:
    """``[B, T, T]`` bool: each new token of a chain sees the live new tokens up to itself, and itself
    (``new_live [B, T]``; a dead, padding token sees only itself)."""
    T = new_live.shape[1]
    block = torch.ones(new_live.shape[0], T, T, dtype=torch.bool, device=new_live.device).tril_()
    return (block & new_live[:, None, :]) | torch.eye(T, dtype=torch.bool, device=new_live.device)


class RaggedStore:
    """The eager storage of one model's cache (see the module docstring). ``attach`` binds it to a model."""

    def __init__(self):
        self.cache: DynamicCache | None = None
        self.live = torch.zeros(0, 0, dtype=torch.bool)
        self.open_from = 0  # the first column of the open block (``fastalign.models.causal_lm``)

    def attach(self, backbone, cache_arg: str, device: torch.device, dtype: torch.dtype,
               sliding: bool = False) -> None:
        """Run ``backbone`` (which takes its cache as ``cache_arg``) on ``device``. ``sliding``: the model has
        sliding-window layers, so chains get a 4-D mask too (from a 2-D one, transformers would slide the window
        over cache columns, dead slots included, not over the row's tokens)."""
        self.backbone, self.cache_arg, self.device, self.dtype = backbone, cache_arg, device, dtype
        self.sliding = sliding
        self.live = self.live.to(device)

    def reserve(self, new_tokens: int) -> None:
        """Nothing to do: the cache grows as blocks are written (the slot store preallocates)."""

    def reset(self) -> None:
        self.cache = None
        self.live = torch.zeros(0, 0, dtype=torch.bool, device=self.device)
        self.open_from = 0

    @property
    def open_width(self) -> int:
        """Columns of the open block: written since the cache was last tidied, addressable as the last ones."""
        return self.live.shape[1] - self.open_from

    def close_block(self) -> None:
        """End the open block: what is cached now is no longer addressed as the last columns."""
        self.open_from = self.live.shape[1]

    def layers(self):
        return self.cache.layers if self.cache is not None else []

    # ------------------------------------------------------------------ writing a block
    def open_block(self, rows: int, width: int, compilable: bool) -> None:
        """Room for a block of ``width`` tokens over ``rows`` rows (a fresh cache on the first block)."""
        if self.cache is None:
            self.cache = DynamicCache()
            self.live = torch.zeros(rows, 0, dtype=torch.bool, device=self.device)
        check_rows(rows, self.live.shape[0])

    def write(self, tokens, positions, new_live, block, ancestry, padded: bool, **kwargs):
        """Run the model on ``tokens [B, T]`` after the cached slots and append the block to the cache.

        ``positions [B, T]``; ``new_live [B, T]`` (padding is dead); ``block [B, T, T]`` / ``ancestry [B, T, P]``:
        which new tokens, and which of the last ``P`` cached slots, each new token sees (a tree; None: a chain);
        ``padded``: whether ``new_live`` has dead entries. ``kwargs`` go to the model.
        """
        B, T = tokens.shape
        if block is None and self.sliding:
            block = chain_block(new_live)
        if block is None:  # a chain: causal over the live slots, which transformers builds from a 2-D mask
            mask = torch.cat([self.live, new_live], dim=1).long()
        else:
            seen = self.live[:, None, :].expand(B, T, -1)  # cached slots each new token attends to
            if ancestry is not None:  # the tree's earlier nodes (the last P slots): only along the ancestry
                P = ancestry.shape[2]
                seen = torch.cat([seen[:, :, : seen.shape[2] - P], seen[:, :, seen.shape[2] - P:] & ancestry], 2)
            visible = torch.cat([seen, block], dim=2)
            mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device)
            mask = mask.masked_fill_(~visible, torch.finfo(self.dtype).min)[:, None]
        out = self.backbone(input_ids=tokens, attention_mask=mask, position_ids=positions,
                            **{self.cache_arg: self.cache}, use_cache=True, **kwargs)
        self.live = torch.cat([self.live, new_live], dim=1)
        return out

    # ------------------------------------------------------------------ surgery
    def narrow(self, live: torch.Tensor) -> None:
        """Replace the live mask by ``live [B, S]``, which only kills slots (rollback, keep_new)."""
        self.live = live

    def tidy(self) -> None:
        """Crop trailing all-dead columns; compact when dead slots dominate. Ends the open block (this and
        ``compact`` are the only places where this store moves columns, so an open block never moves)."""
        S = self.live.shape[1]
        alive_cols = self.live.any(0).nonzero()
        end = int(alive_cols.max()) + 1 if alive_cols.numel() else 0
        if end < S:
            self.live = self.live[:, :end]
            for layer in self.layers():
                layer.keys, layer.values = layer.keys[:, :, :end], layer.values[:, :, :end]
        if self.live.numel() and 2 * int(self.live.sum(1).max()) < self.live.shape[1]:
            self.compact()
        self.close_block()

    def compact(self) -> None:
        """Move each row's live slots to the right end (order kept) and drop all-dead columns (ends the open
        block: its columns move)."""
        order = torch.argsort(self.live.to(torch.int8), dim=1, stable=True)
        self.live = torch.gather(self.live, 1, order)
        first = self.live.shape[1] - int(self.live.sum(1).max()) if self.live.shape[0] else 0
        order, self.live = order[:, first:], self.live[:, first:]
        layers = self.layers()
        gathered = native.gather_slots_many([t for layer in layers for t in (layer.keys, layer.values)], order)
        for i, layer in enumerate(layers):
            layer.keys, layer.values = gathered[2 * i], gathered[2 * i + 1]
        self.close_block()

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only the given rows, in the given order (repeats allowed)."""
        self.live = self.live[rows]
        for layer in self.layers():
            layer.keys, layer.values = layer.keys[rows], layer.values[rows]
