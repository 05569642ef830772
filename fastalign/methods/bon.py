"""``bon`` and ``soft_bon``: N samples per prompt, then pick one by reward (``fastalign.methods.selection``).

``bon`` returns the highest-reward sample by default (``select="best"``: the first one among equal rewards);
``soft_bon`` returns sample ``i`` with probability ``softmax(r / lam)_i`` by default (``select="sample"``). Both
take every rule of ``selection.SELECT_RULES`` (``"majority"`` and ``"weighted_majority"`` vote over the answers
of ``answer_fn``; the weights are ``softmax(r / lam)``), so they differ only in their default rule. The N
samples of a prompt share its prefilled KV cache (with a remote target: one request for the N samples of a
prompt).
"""

from __future__ import annotations

import torch

from ..errors import InputError
from .base import Context, MethodResult, ResponseSampler
from .selection import check_select, select as select_candidates


def draw_candidates(ctx: Context, prompts: list[list[int]], n: int) -> tuple[list[list[int]], torch.Tensor]:
    """``n`` samples per prompt (rows ``b*n .. b*n+n-1`` belong to prompt ``b``) and their rewards ``[B, n]``."""
    if not isinstance(n, int) or n < 1:
        raise InputError(f"n must be an integer >= 1, got {n!r}")
    samples = ResponseSampler(ctx, prompts).draw(n, rewind=False)  # prompt b's samples: its sub-streams 0..n-1
    rewards = ctx.reward.score([p for p in prompts for _ in range(n)], samples)
    return samples, rewards.view(len(prompts), n)


def run(ctx: Context, prompts: list[list[int]], n: int = 16, select: str = "best", answer_fn=None,
        lam: float = 1.0) -> MethodResult:
    """``n`` samples per prompt, one chosen by ``select``. ``extra``: ``rewards [B, n]``, ``chosen_index [B]``."""
    answer = check_select(ctx, select, answer_fn, lam)
    samples, rewards = draw_candidates(ctx, prompts, n)
    candidates = [samples[b * n:(b + 1) * n] for b in range(len(prompts))]
    chosen = select_candidates(ctx, select, candidates, rewards, lam, answer)
    return MethodResult([candidates[b][int(i)] for b, i in enumerate(chosen)],
                        {"rewards": rewards, "chosen_index": chosen})


def run_soft(ctx: Context, prompts: list[list[int]], n: int = 16, lam: float = 1.0, select: str = "sample",
             answer_fn=None) -> MethodResult:
    """``bon`` with ``select="sample"`` by default: sample ``i`` with probability ``softmax(r / lam)_i``."""
    return run(ctx, prompts, n, select, answer_fn, lam)
