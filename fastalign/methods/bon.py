"""``bon`` and ``soft_bon``: N samples per prompt, then pick by reward.

``bon`` returns the highest-reward sample (the first one among equal rewards); ``soft_bon`` returns sample
``i`` with probability ``softmax(r / lam)_i``. The N samples of a prompt share its prefilled KV cache (with a
remote target: one request for the N samples of a prompt).
"""

from __future__ import annotations

import torch

from .base import Context, MethodResult, ResponseSampler


def draw_candidates(ctx: Context, prompts: list[list[int]], n: int) -> tuple[list[list[int]], torch.Tensor]:
    """``n`` samples per prompt (rows ``b*n .. b*n+n-1`` belong to prompt ``b``) and their rewards ``[B, n]``."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    samples = ResponseSampler(ctx, prompts).draw(n, rewind=False)  # prompt b's samples: its sub-streams 0..n-1
    rewards = ctx.reward.score([p for p in prompts for _ in range(n)], samples)
    return samples, rewards.view(len(prompts), n)


def run(ctx: Context, prompts: list[list[int]], n: int = 16) -> MethodResult:
    samples, rewards = draw_candidates(ctx, prompts, n)
    best = rewards.argmax(1)
    chosen = [samples[b * n + int(i)] for b, i in enumerate(best)]
    return MethodResult(chosen, {"rewards": rewards, "chosen_index": best})


def run_soft(ctx: Context, prompts: list[list[int]], n: int = 16, lam: float = 1.0) -> MethodResult:
    if lam <= 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    samples, rewards = draw_candidates(ctx, prompts, n)
    # in fp64 (an fp32 lam may round to 0) and shifted by the best reward: a tiny lam then gives -inf
    # (probability 0) to the others, never inf - inf = NaN
    shifted = rewards.double() - rewards.double().max(1, keepdim=True).values
    pick = ctx.rng.categorical(torch.softmax(shifted / lam, dim=1), range(len(prompts)), "pick")
    chosen = [samples[b * n + int(i)] for b, i in enumerate(pick)]
    return MethodResult(chosen, {"rewards": rewards, "chosen_index": pick})
