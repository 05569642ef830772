"""Entropy and log-normaliser of ``softmax(logits / T)`` per row."""

from __future__ import annotations

import torch

from ._dispatch import check_finite, use_triton
from .truncation import check_temperature, finite_row_max


def entropy_torch(logits: torch.Tensor, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference. logits ``[R, V]`` fp32/bf16/fp16 -> (entropy ``[R]`` fp32 in nats, logsumexp ``[R]`` fp32).

    ``logsumexp`` is that of ``logits / temperature``; ``-inf`` logits are masked tokens. Computed relative to the
    row maximum, as the kernel does: at a small temperature ``x - logsumexp(x)`` of huge ``x`` loses the
    ``log 2`` of two tied tokens (an entropy of 0 for a fair coin at T = 1e-6).
    """
    x = logits.float() / temperature
    m = finite_row_max(x)
    y = x - m
    lse_y = torch.logsumexp(y, dim=-1, keepdim=True)
    p = torch.exp(y - lse_y)
    plogp = torch.where(p > 0, p * (y - lse_y), torch.zeros_like(p))
    return -plogp.sum(-1), (m + lse_y).squeeze(-1)


def entropy(logits: torch.Tensor, temperature: float = 1.0, *,
            validate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy and logsumexp per row (see ``entropy_torch``); Triton on CUDA tensors.

    ``validate=True`` rejects NaN / +inf logits and all-masked rows (``check_finite``: a host sync and a few
    extra passes over the logits, more than the kernel itself reads); ``validate=False`` skips that for hot
    loops whose logits are known finite (non-finite logits then give unspecified values).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [R, V], got shape {tuple(logits.shape)}")
    check_temperature(temperature)
    if validate:
        check_finite(logits, temperature=temperature)
    if use_triton(logits):
        from ._entropy_triton import entropy_triton

        return entropy_triton(logits, temperature)
    return entropy_torch(logits, temperature)
