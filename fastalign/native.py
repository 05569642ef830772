"""Layer 2: tree topology and KV-slot gathering, native (``fastalign._C``) when built, else pure PyTorch.

A draft tree of ``T`` nodes is given per row by a parent array ``parents[b, t]`` in ``[-1, t - 1]``: ``-1``
means the node hangs directly off the accepted prefix, and a parent always precedes its children
(topological order), so a node's depth and ancestors can be computed in one left-to-right sweep.
"""

from __future__ import annotations

import torch

try:  # the optional C++/CUDA extension
    from fastalign import _C  # type: ignore[attr-defined]
except Exception:  # pragma: no cover - depends on the build
    _C = None


def native_available() -> bool:
    """True when the compiled extension ``fastalign._C`` is in use, False on the pure-Python fallback."""
    return _C is not None


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
    n_leaves = int(leaves.sum(1).max()) if T else 0
    L = int(depth.max()) if T else 0
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


def tree_attention_mask(parents: torch.Tensor) -> torch.Tensor:
    _check_parents(parents)
    return tree_attention_mask_torch(parents)


def tree_depths(parents: torch.Tensor) -> torch.Tensor:
    _check_parents(parents)
    return tree_depths_torch(parents)


def retrieve_paths(parents: torch.Tensor) -> torch.Tensor:
    _check_parents(parents)
    return retrieve_paths_torch(parents)


def gather_slots(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return gather_slots_torch(x, index)
