"""``sample``: plain ancestral sampling from the target, the baseline of every other method."""

from __future__ import annotations

from .base import Context, MethodResult, ResponseSampler


def run(ctx: Context, prompts: list[list[int]]) -> MethodResult:
    return MethodResult(ResponseSampler(ctx, prompts).draw(rewind=False))
