"""The torch-side math ``spec_verify`` and ``tree_verify`` share (definitions in ``kernels.spec_verify``).

The reward tilt (``tilted_logits``, ``RATIO_INF``, ``tilt_active``), the references' distributions
(``log_dists``), the race noise (``gumbel_noise``), the input checks both verifiers make (``validate_common``,
``check_uniforms``, ``check_finite_logits``) and the wrong rules the law tests inject (``WRONG_VARIANTS``). The
references and the Triton host code (``_verify_common.prepare_verify_inputs``) import them from here, so neither
verifier imports the other.
"""

from __future__ import annotations

import torch

from ._dispatch import check_finite
from .rng import uniform_grid_torch
from .truncation import check_temperature, finite_row_max, truncate_logits

MODES = ("sd", "sss_exact", "sss_paper")
RATIO_INF = 20.0  # log-ratio used where exactly one of q_r, q is zero (unless max_log_ratio is given)

# Wrong rules the law tests must reject (tests pass them to the references as ``_wrong``; never used otherwise).
WRONG_VARIANTS = (
    "ratio_at_T1",            # the draft's probability in every ratio at temperature 1 (drafts drawn at T)
    "ratio_untruncated",      # the draft's full-vocabulary probability in the ratios (drafts drawn from top-k)
    "tilt_truncated",         # pi tilted from the truncated p, q_r, q
    "residual_from_p",        # sss: the residual (p - q_r)+ instead of (pi - q_r)+
    "bonus_from_p",           # sss: the bonus drawn from p instead of pi
    "residual_unnormalised",  # sampled tree: (res - q_r)+ not renormalised
    "normaliser_unshifted",   # log p = x - logsumexp(x), which rounds logsumexp's log-sum away at a small T
)


def _log_ratio_torch(lqr: torch.Tensor, lq: torch.Tensor, max_log_ratio: float | None) -> torch.Tensor:
    r_inf = RATIO_INF if max_log_ratio is None else float(max_log_ratio)
    fd = lqr > float("-inf")
    fr = lq > float("-inf")
    d = torch.where(fd & fr, lqr - lq,
                    torch.where(fd, torch.full_like(lqr, r_inf),
                                torch.where(fr, torch.full_like(lqr, -r_inf), torch.zeros_like(lqr))))
    if max_log_ratio is not None:
        d = d.clamp(-float(max_log_ratio), float(max_log_ratio))
    return d


def _log_softmax(x: torch.Tensor) -> torch.Tensor:
    """``log softmax(x)`` as ``(x - m) - log sum exp(x - m)``, ``m`` the row maximum: at a small temperature
    ``x - logsumexp(x)`` of huge ``x`` rounds the log-normaliser away (two tied tokens got probability 1 each)."""
    y = x - finite_row_max(x)
    return y - torch.logsumexp(y, dim=-1, keepdim=True)


def _tilted(lp: torch.Tensor, lqr: torch.Tensor, lq: torch.Tensor, lam: float,
            max_log_ratio: float | None) -> torch.Tensor:
    """log pi = log p + lam * d - logZ (all ``[..., V]``)."""
    return _log_softmax(lp + lam * _log_ratio_torch(lqr, lq, max_log_ratio))


def gumbel_noise(seed, B: int, V: int, device) -> torch.Tensor:
    """``-log(-log u_b(v))`` ``[B, V]``: the race noise, one stream per batch row (``seed`` as in ``kernels.rng``)."""
    u = uniform_grid_torch(seed, B, V, device=device)
    return -torch.log(-torch.log(u))


def tilt_active(mode: str, ref_logits, lam: float) -> bool:
    """Whether the reward tilt applies: an sss mode, ``ref_logits`` given and ``lam != 0``."""
    return mode != "sd" and ref_logits is not None and float(lam) != 0.0


def validate_common(target_logits, ref_logits, mode, temperature, lam, max_log_ratio, positions: str) -> None:
    """The checks ``spec_verify`` and ``tree_verify`` share: mode, ``target_logits [B, positions, V]``, ref shaped
    like the target, temperature, and the tilt's ``lam`` (finite) and ``max_log_ratio`` (None or finite > 0: NaN
    or a negative clip would tilt by NaN or by a reversed interval)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if target_logits.dim() != 3:
        raise ValueError(f"target_logits must be [B, {positions}, V], got {tuple(target_logits.shape)}")
    if ref_logits is not None and ref_logits.shape != target_logits.shape:
        raise ValueError(f"ref_logits must be [B, {positions}, V] = {tuple(target_logits.shape)}, "
                         f"got {tuple(ref_logits.shape)}")
    check_temperature(temperature)
    if not abs(float(lam)) < float("inf"):
        raise ValueError(f"lam must be a finite number, got {lam}")
    if max_log_ratio is not None and not 0 < float(max_log_ratio) < float("inf"):
        raise ValueError(f"max_log_ratio must be None or a finite number > 0, got {max_log_ratio}")


def check_uniforms(uniforms: torch.Tensor) -> None:
    """The acceptance uniforms lie in [0, 1] (a NaN, negative or larger value would skew the acceptance test
    ``u * q_r <= p`` silently). One host sync, made only when validating."""
    if uniforms.numel() and not bool(((uniforms >= 0) & (uniforms <= 1)).all()):
        raise ValueError("uniforms must lie in [0, 1] (the acceptance tests' randomness), got values outside it")


def check_finite_logits(target_logits, draft_logits, ref_logits, mode, lam, temperature) -> None:
    """``check_finite`` on every logits tensor the verifier reads (ref only when the tilt is active), scaled by
    ``temperature``."""
    check_finite(target_logits, "target_logits", temperature)
    check_finite(draft_logits, "draft_logits", temperature)
    if tilt_active(mode, ref_logits, lam):
        check_finite(ref_logits, "ref_logits", temperature)


def tilted_logits(target_logits, draft_logits, ref_logits, lam, temperature, top_k, top_p, max_log_ratio,
                  _wrong=None) -> torch.Tensor:
    """``log pi`` ``[B, P, V]`` fp32 (normalised): the tilt of the untruncated tempered distributions, truncated.

    A draft one position short of the target (no tilt needed at the bonus) is padded with the ref there.
    """
    if draft_logits.shape[1] < target_logits.shape[1]:
        draft_logits = torch.cat([draft_logits, ref_logits[:, draft_logits.shape[1]:]], dim=1)
    if _wrong == "tilt_truncated":
        lp, lqr, lq = (_log_softmax(truncate_logits(x, temperature, top_k, top_p))
                       for x in (target_logits, draft_logits, ref_logits))
        return _tilted(lp, lqr, lq, float(lam), max_log_ratio)
    lp, lqr, lq = (_log_softmax(x.float() / temperature) for x in (target_logits, draft_logits, ref_logits))
    s = lp + float(lam) * _log_ratio_torch(lqr, lq, max_log_ratio)
    return _log_softmax(truncate_logits(s, 1.0, top_k, top_p))


def log_dists(target_logits, draft_logits, ref_logits, mode, lam, temperature, top_k, top_p, max_log_ratio,
              _wrong=None):
    """``(log p, log q_r, log pi)``, each ``[B, P, V]`` fp32 with ``P`` the target's positions (references only):
    ``p`` and ``q_r`` truncated, ``pi`` from ``tilted_logits``.

    A draft one position short (``spec_verify`` with no tilt at the bonus, validated) is padded there with
    ``log p``: that position is never read.
    """
    lp = _log_softmax(truncate_logits(target_logits, temperature, top_k, top_p))
    if _wrong == "normaliser_unshifted":
        lp, lqr = (x - torch.logsumexp(x, dim=-1, keepdim=True)
                   for x in (truncate_logits(y, temperature, top_k, top_p) for y in (target_logits, draft_logits)))
    elif _wrong == "ratio_at_T1":
        lqr = _log_softmax(truncate_logits(draft_logits, 1.0, top_k, top_p))
    elif _wrong == "ratio_untruncated":
        lqr = _log_softmax(draft_logits.float() / temperature)
    else:
        lqr = _log_softmax(truncate_logits(draft_logits, temperature, top_k, top_p))
    if lqr.shape[1] < lp.shape[1]:
        lqr = torch.cat([lqr, lp[:, lqr.shape[1]:]], dim=1)
    if not tilt_active(mode, ref_logits, lam):
        return lp, lqr, lp
    return lp, lqr, tilted_logits(target_logits, draft_logits, ref_logits, lam, temperature, top_k, top_p,
                                  max_log_ratio, _wrong)
