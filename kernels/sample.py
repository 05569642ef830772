"""Sampling one token per row: temperature, top-k, top-p, seeded, by an exponential race."""

from __future__ import annotations

import torch

from ._dispatch import check_finite, use_triton
from .rng import uniform_grid_torch
from .truncation import check_truncation_args, finite_row_max, truncate_logits


def sample_torch(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed=0) -> torch.Tensor:
    """Reference. logits ``[R, V]`` -> tokens ``[R]`` int64, one draw per row from the truncated
    ``softmax(logits / temperature)`` (``kernels.truncation``).

    The draw is ``argmax_v (x_v - m) - log E_v`` with ``E_v = -log u_r(v)`` (Exp(1) noise from row ``r``'s stream
    of the shared counter-based generator), which picks ``v`` with probability ``softmax(x)_v`` and needs no
    normalisation. ``seed``: an int, or per-row streams ``[R, 2]`` int64 (``kernels.rng``).

    ``m`` is the row maximum of ``x`` (0 where it is not finite): at a small temperature ``x`` is huge, and noise
    added to it would be rounded away (at ``x = 3e7`` the fp32 spacing is 2), so tied logits would go to the
    first index instead of an even draw. Shifted, the top tokens sit at 0 where the noise keeps its precision.
    """
    x = truncate_logits(logits, temperature, top_k, top_p)
    u = uniform_grid_torch(seed, x.shape[0], x.shape[1], device=x.device)
    return torch.argmax((x - finite_row_max(x)) - torch.log(-torch.log(u)), dim=-1)


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, seed=0, *, validate: bool = True) -> torch.Tensor:
    """One token per row (see ``sample_torch``); Triton on CUDA tensors.

    ``validate=True`` rejects NaN / +inf logits and all-masked rows (``check_finite``: a host sync and a few
    extra passes over the logits); ``validate=False`` skips that for hot loops whose logits are known finite
    (non-finite logits then give unspecified tokens).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [R, V], got shape {tuple(logits.shape)}")
    if validate:
        check_truncation_args(temperature, top_k, top_p)
        check_finite(logits, temperature=temperature)
    if use_triton(logits):
        from ._sample_triton import sample_triton

        return sample_triton(logits, temperature, top_k, top_p, seed)
    return sample_torch(logits, temperature, top_k, top_p, seed)
