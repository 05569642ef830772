"""Tree verification for speculative sampling: recursive rejection sampling over a draft token tree.

**Layout** (per row ``b``; ``N`` tree nodes, node ``n`` in ``0..N-1``; position ``0`` is the *root*, i.e. the
last accepted prefix token, and position ``n + 1`` is node ``n``):

* ``tree_tokens [B, N]`` int64: node ``n``'s token;
* ``parents [B, N]`` int64: node ``n``'s parent node, ``-1`` for a child of the root; topological
  (``-1 <= parents[b, n] < n``). The children of a node are all nodes with that parent, **in index order**
  (the order of the ``uniforms``, and of the sibling tests below);
* ``target_logits [B, N+1, V]``: the target at the root (position 0) and at every node (position ``n + 1``),
  as one tree-attention forward pass over ``[root, nodes...]`` gives them;
* ``draft_logits [B, N+1, V]``: ``q_r`` at the root and at every node (the children of node ``n`` were drafted
  from position ``n + 1``). The rows of leaves are only read for the reward tilt at an accepted leaf (an sss
  mode with ``ref_logits`` and ``lam != 0``); otherwise they may hold anything finite;
* ``ref_logits [B, N+1, V]`` or ``None``: ``q`` at the same positions (sss);
* ``uniforms [B, N]`` fp32 in (0, 1): ``uniforms[b, n]`` is the uniform of node ``n``'s acceptance test;
* ``num_nodes [B]`` (optional): row ``b``'s tree is its first ``num_nodes[b]`` nodes (the others are ignored), so
  rows of one batch can have trees of different depths (nodes in level order: a shallower tree is a prefix).

Distributions, the reward-shifted ``pi``, the zero-probability conventions, ``max_log_ratio`` and truncation
are exactly those of ``kernels.spec_verify``.

**Walk** (docs/design.md 1.2). ``t`` is ``p`` (``sd``) or ``pi`` (``sss_exact``). Start at the root with the residual
``res = t(.|root)``. For each child ``c`` of the current node in index order:

* ``tree_kind="sampled"`` (children drawn i.i.d. from ``q_r(.|node)``): accept iff
  ``u_c * q_r(x_c) <= res(x_c)`` and ``res(x_c) > 0``; otherwise ``res = normalize((res - q_r)+)`` (if that is
  all zero, ``res`` is kept: only possible when ``res == q_r`` up to rounding);
* ``tree_kind="topk"`` (children chosen deterministically, distinct tokens): accept iff ``u_c <= res(x_c)``;
  otherwise ``res(x_c) = 0`` and ``res`` is renormalised.

An accepted child becomes the current node (``res = t(.|child)``, its own children are tested next); if no
child of the current node is accepted, the walk emits a token drawn from ``res``; if the current node is a
leaf (every drafted level accepted, or ``N = 0``) it emits a bonus from ``t(.|node)`` — or ``-1`` with
``bonus=False``. Both kinds keep the law of the emitted tokens exactly ``t``. ``t`` and ``q_r`` are the truncated
distributions of ``kernels.spec_verify`` (``pi`` tilted before truncation).
``sss_paper`` (fastalign's tree version of the published rule): the walk runs against ``p`` (as ``sd``) and the
emitted token, at a rejection or at the bonus, is drawn from ``pi`` at the final node instead.

**Outputs**: ``accepted_path [B, D]`` int64 node indices along the accepted path (root excluded), padded with
``-1``, where ``D = max_depth`` if given (must be at least the tree depth; deeper accepted nodes are not
stored) else ``N``; ``accepted_len [B]``; ``next_token [B]``. The draw is an exponential race over
``log res(v) - log(-log u_b(v))`` with row ``b``'s stream of the shared generator (``seed``: an int or per-row
streams ``[B, 2]``; Triton equals the reference token for token under the CPU interpreter, and on CUDA up to
last-bit differences of the arithmetic, as for ``spec_verify``).

**Using it** (methods): feed ``[last accepted token] + tree_tokens`` to the target (and ref) with the tree
mask, take all ``N+1`` logits; the draft's logits at the root and at each expanded node are the ones its
children were drawn from (for an sss tilt, also run the draft on the leaves). Then append
``tree_tokens[b, accepted_path[b, :accepted_len[b]]]`` and ``next_token[b]`` (unless ``-1``), and keep the KV
entries of the accepted path.

**Triton** (``_tree_verify_triton``): one launch, one program per row walking the tree with vocabulary loops
inside (normalisers per visited node, one pass per sampled-child rejection, one race), the residual kept in an
fp32 scratch ``[B, V]``. Fine for the tree sizes of SSS/SpecInfer; it does not split the vocabulary.
"""

from __future__ import annotations

import torch

from ._dispatch import use_triton
from ._verify_math import check_finite_logits, check_uniforms, gumbel_noise, log_dists, validate_common

TREE_KINDS = ("sampled", "topk")


def _validate(target_logits, draft_logits, ref_logits, tree_tokens, parents, mode, lam, temperature, uniforms,
              max_log_ratio, tree_kind, max_depth, num_nodes=None):
    validate_common(target_logits, ref_logits, mode, temperature, lam, max_log_ratio, "N+1")
    if tree_kind not in TREE_KINDS:
        raise ValueError(f"tree_kind must be one of {TREE_KINDS}, got {tree_kind!r}")
    B, N1, V = target_logits.shape
    N = N1 - 1
    if tuple(draft_logits.shape) != (B, N1, V):
        raise ValueError(f"draft_logits must be [B, N+1, V] = {(B, N1, V)}, got {tuple(draft_logits.shape)}")
    for name, x in (("tree_tokens", tree_tokens), ("parents", parents), ("uniforms", uniforms)):
        if x is None or tuple(x.shape) != (B, N):
            raise ValueError(f"{name} must be [B, N] = {(B, N)}, got {x if x is None else tuple(x.shape)}")
    check_uniforms(uniforms)
    if max_depth is not None and max_depth < 0:
        raise ValueError("max_depth must be >= 0")
    if num_nodes is not None and tuple(num_nodes.shape) != (B,):
        raise ValueError(f"num_nodes must be [B] = [{B}], got {tuple(num_nodes.shape)}")


def _check_parents(parents: torch.Tensor) -> None:
    N = parents.shape[1]
    idx = torch.arange(N, device=parents.device)
    if ((parents < -1) | (parents >= idx[None, :])).any():
        raise ValueError("parents must satisfy -1 <= parents[b, n] < n (topological order, -1 = root)")


def tree_verify_torch(target_logits, draft_logits, ref_logits, tree_tokens, parents, mode: str = "sd",
                      lam: float = 1.0, temperature: float = 1.0, uniforms=None, seed: int = 0,
                      tree_kind: str = "sampled", *, top_k: int | None = None, top_p: float | None = None,
                      max_log_ratio: float | None = None, bonus: bool = True, max_depth: int | None = None,
                      num_nodes=None, validate: bool = True, _wrong: str | None = None):
    """Reference of ``tree_verify`` (vectorised over the batch: one step per node index).

    ``_wrong`` (tests only): one of ``_verify_math.WRONG_VARIANTS``, a plausible bug the law tests must catch.
    """
    if validate:
        _validate(target_logits, draft_logits, ref_logits, tree_tokens, parents, mode, lam, temperature,
                  uniforms, max_log_ratio, tree_kind, max_depth, num_nodes)
        _check_parents(parents)
    B, N1, V = target_logits.shape
    N = N1 - 1
    D = N if max_depth is None else int(max_depth)
    dev = target_logits.device
    lp, lqr, lpi = log_dists(target_logits, draft_logits, ref_logits, mode, lam, temperature, top_k, top_p,
                              max_log_ratio, _wrong)
    lt = lpi if mode == "sss_exact" else lp
    qr = torch.exp(lqr)
    rows = torch.arange(B, device=dev)
    tok = tree_tokens.to(device=dev, dtype=torch.int64)
    par = parents.to(device=dev, dtype=torch.int64)
    u = uniforms.to(device=dev, dtype=torch.float32)

    cur = torch.full((B,), -1, dtype=torch.int64, device=dev)     # current node (-1 = root)
    w = torch.exp(lt[:, 0])                                       # unnormalised residual at the current node
    Z = torch.ones(B, dtype=torch.float32, device=dev)
    has_child = torch.zeros(B, dtype=torch.bool, device=dev)
    depth = torch.zeros(B, dtype=torch.int64, device=dev)
    path = torch.full((B, D + 1), -1, dtype=torch.int64, device=dev)  # column D collects overflow, dropped
    n_nodes = torch.full((B,), N, dtype=torch.int64, device=dev) if num_nodes is None \
        else num_nodes.to(device=dev, dtype=torch.int64)
    for n in range(N):
        test = (par[:, n] == cur) & (n < n_nodes)
        if not bool(test.any()):
            continue
        has_child |= test
        c = tok[:, n]
        valid = (c >= 0) & (c < V)
        cc = c.clamp(0, V - 1)
        wc = torch.where(valid, w[rows, cc], torch.zeros_like(Z))
        res_c = wc / Z
        if tree_kind == "topk":
            ok = u[:, n] <= res_c
        else:
            qr_c = torch.where(valid, qr[rows, cur + 1, cc], torch.zeros_like(Z))
            ok = (u[:, n] * qr_c <= res_c) & (res_c > 0)
        acc = test & ok
        rej = test & ~ok
        # rejected: update the residual
        if tree_kind == "topk":
            Z_new = Z - wc
            upd = rej & valid & (Z_new > 0)
            w = torch.where(upd[:, None] & (torch.arange(V, device=dev)[None, :] == cc[:, None]),
                            torch.zeros_like(w), w)
            Z = torch.where(upd, Z_new, Z)
        else:
            w_new = torch.clamp(w / Z[:, None] - qr[rows, cur + 1], min=0.0)
            Z_new = w_new.sum(-1)
            if _wrong == "residual_unnormalised":  # the acceptance tests then see (res - q_r)+ unscaled
                Z_new = torch.where(Z_new > 0, torch.ones_like(Z_new), Z_new)
            upd = rej & (Z_new > 0)
            w = torch.where(upd[:, None], w_new, w)
            Z = torch.where(upd, Z_new, Z)
        # accepted: descend
        if bool(acc.any()):
            path[rows[acc], depth[acc].clamp(max=D)] = n
            depth = depth + acc.long()
            cur = torch.where(acc, torch.full_like(cur, n), cur)
            w = torch.where(acc[:, None], torch.exp(lt[:, n + 1]), w)
            Z = torch.where(acc, torch.ones_like(Z), Z)
            has_child = has_child & ~acc
    g = gumbel_noise(seed, B, V, dev)
    if mode == "sss_paper":
        key = lpi[rows, cur + 1] + g
    else:
        key = torch.log(w) + g
    if _wrong == "bonus_from_p":
        key = torch.where(has_child[:, None], key, lp[rows, cur + 1] + g)
    next_token = key.argmax(-1)
    if not bonus:
        next_token = torch.where(has_child, next_token, torch.full_like(next_token, -1))
    return path[:, :D], depth, next_token


def tree_verify(target_logits, draft_logits, ref_logits, tree_tokens, parents, mode: str = "sd",
                lam: float = 1.0, temperature: float = 1.0, uniforms=None, seed: int = 0,
                tree_kind: str = "sampled", *, top_k: int | None = None, top_p: float | None = None,
                max_log_ratio: float | None = None, bonus: bool = True, max_depth: int | None = None,
                num_nodes=None, validate: bool = True):
    """Verify a draft tree: ``(accepted_path [B, D], accepted_len [B], next_token [B])`` (module docstring).

    ``validate=True`` checks shapes, the parent array and finiteness (host syncs and extra passes);
    ``validate=False`` skips it.
    """
    if validate:
        _validate(target_logits, draft_logits, ref_logits, tree_tokens, parents, mode, lam, temperature,
                  uniforms, max_log_ratio, tree_kind, max_depth, num_nodes)
        _check_parents(parents)
        check_finite_logits(target_logits, draft_logits, ref_logits, mode, lam, temperature)
    if use_triton(target_logits):
        from ._tree_verify_triton import tree_verify_triton

        return tree_verify_triton(target_logits, draft_logits, ref_logits, tree_tokens, parents, mode, lam,
                                  temperature, uniforms, seed, tree_kind, top_k=top_k, top_p=top_p,
                                  max_log_ratio=max_log_ratio, bonus=bonus, max_depth=max_depth,
                                  num_nodes=num_nodes)
    return tree_verify_torch(target_logits, draft_logits, ref_logits, tree_tokens, parents, mode, lam,
                             temperature, uniforms, seed, tree_kind, top_k=top_k, top_p=top_p,
                             max_log_ratio=max_log_ratio, bonus=bonus, max_depth=max_depth, num_nodes=num_nodes,
                             validate=False)
