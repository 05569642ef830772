"""``sample``: plain ancestral sampling from the target, the baseline of every other method."""

from __future__ import annotations

from .base import Context, MethodResult, sample_continuations

REQUIRES = ("target",)


def run(ctx: Context, prompts: list[list[int]]) -> MethodResult:
    logits = ctx.target.prefill(prompts, ctx.max_new_tokens)
    return MethodResult(sample_continuations(ctx, ctx.target, logits, ctx.max_new_tokens, range(len(prompts))))
