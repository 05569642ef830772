"""Temperature, top-k and top-p as thresholds: the one definition every kernel and method shares.

Truncation keeps, per row, the tokens whose scaled logit is at or above a threshold, so ties at the boundary
are all kept and the Triton kernels can find the threshold without sorting:

* top-k keeps the tokens whose logit is >= the k-th largest logit of the row;
* top-p keeps the tokens whose probability is >= t, for the largest t at which the kept mass is >= p
  (the smallest "nucleus" of highest-probability tokens, boundary ties included).

Both can apply at once (top-k first, then top-p on the renormalised survivors). The truncated,
renormalised distribution is the proposal *and* the one used in every ratio (docs/design.md section 1).

A tiny temperature overflows: ``logits / T`` leaves the float32 range once ``T < |logit| / 3.4e38`` (and below
1.2e-38 ``T`` is not even a normal float32). The kernels refuse ``T < TEMPERATURE_FLOOR`` (1e-20, which leaves
room for logits up to 1e18 and for ``sss``'s tilt), and, when validating, a row whose maximum overflows once
scaled (``_dispatch.check_finite``); a decode takes such a temperature as the floor
(``methods.base.Context``), and that is greedy: at ``T = 1e-20`` two logits more than 1e-18 apart end up more
than 100 apart, beyond what the sampling noise spans (about 19.5), so only the maximum (or a tie) is drawn.
"""

from __future__ import annotations

import numbers

import torch

TEMPERATURE_FLOOR = 1e-20


def check_temperature(temperature: float) -> None:
    """A temperature is a finite number >= ``TEMPERATURE_FLOOR`` (NaN and inf pass ``<= 0`` checks and would scale
    every logit into NaN or 0; a smaller one overflows): the error of every kernel that divides by it."""
    if not 0 < temperature < float("inf"):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature} (use top_k=1 for greedy)")
    if temperature < TEMPERATURE_FLOOR:
        raise ValueError(f"temperature must be >= {TEMPERATURE_FLOOR} (a smaller one overflows float32), got "
                         f"{temperature} (use top_k=1 for greedy)")


def check_truncation_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """The argument errors of ``truncate_logits`` (also raised by the kernels that truncate without it)."""
    check_temperature(temperature)
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral)):
        raise ValueError(f"top_k must be an integer or None, got {top_k!r}")  # (torch.topk takes no float)
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def truncate_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None) -> torch.Tensor:
    """Scaled, truncated logits: ``logits / temperature`` with dropped tokens set to ``-inf``.

    logits: ``[..., V]`` any float dtype. Returns fp32 of the same shape. ``temperature`` must be > 0
    (greedy decoding is ``top_k=1``).
    """
    check_truncation_args(temperature, top_k, top_p)
    x = (logits if logits.dtype == torch.float32 else logits.float()) / temperature
    V = x.shape[-1]
    if top_k is not None and top_k < V:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        probs = torch.softmax(x, dim=-1)
        sorted_p, _ = torch.sort(probs, dim=-1, descending=True)
        mass_before = sorted_p.cumsum(-1) - sorted_p  # mass of strictly higher-ranked tokens
        # the threshold is the smallest kept probability: the last sorted entry that still starts below p
        n_keep = (mass_before < top_p).sum(-1, keepdim=True).clamp(min=1)
        threshold = sorted_p.gather(-1, n_keep - 1)
        x = x.masked_fill(probs < threshold, float("-inf"))
    return x


def finite_row_max(x: torch.Tensor) -> torch.Tensor:
    """The row maximum ``[..., 1]`` of scaled logits ``x [..., V]``, 0 where it is not finite (an all-masked row,
    or +inf let through unchecked). Kernels work relative to it: at a small temperature ``x`` is huge, and what is
    added to it (sampling noise, ``-logsumexp``) would be rounded away in fp32."""
    return x.amax(dim=-1, keepdim=True).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)  # one op, not three
