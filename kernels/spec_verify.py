"""Chain verification for speculative sampling: SD, reward-shifted SSS (exact and paper), one launch per batch.

Definitions (docs/design.md section 1.2). Per row ``b`` and position ``i`` (``0 <= i <= K``), with ``x -> x / T``
the temperature and ``trunc`` the top-k / top-p rule of ``kernels.truncation``:

* ``p_i``   = ``softmax(trunc(target_logits[b, i] / T))``: the target's next-token distribution after the prefix and
  ``x_1..x_i`` (position 0 = after the last accepted prefix token; position ``K`` = the bonus position);
* ``q_r,i`` = ``softmax(trunc(draft_logits[b, i] / T))``: the (aligned) draft's distribution at the same place;
  ``x_{i+1} = draft_tokens[b, i]`` was drawn from it (the proposal *is* the truncated draft);
* ``q_i``   from ``ref_logits[b, i]``: the reference draft (the draft before alignment), sss only.

**Layout.** ``target_logits [B, K+1, V]`` and ``ref_logits [B, K+1, V]`` (the target and the reference are fed
``x_0..x_K`` in one pass). ``draft_logits`` is ``[B, K, V]`` (what drafting ``x_1..x_K`` produced) or
``[B, K+1, V]`` (the draft also fed ``x_K``): position ``K`` of the draft is only read to form ``pi`` at the
bonus position, so it is **required** exactly when the reward tilt is active (an sss mode with ``ref_logits``
given and ``lam != 0``) and ``bonus=True``; in every other case a ``[B, K, V]`` draft suffices (an extra
position is ignored). Logits may be fp32, bf16 or fp16; all math is fp32.

**Reward-shifted target** (sss modes, computed in log space, no probability tensor divided). The tilt is taken
from the *untruncated* tempered distributions ``P = softmax(l_t / T)``, ``Q_r``, ``Q`` and the truncation applies
to the tilted logits (docs/design.md section 1: the emitted law is ``trunc(pi)``)::

    d(v)      = clip(log Q_r(v) - log Q(v), -M, M)       M = max_log_ratio, or no clip when None
    log pi(v) = log_softmax(trunc(log P(v) + lam * d(v)))

(a tilt of truncated distributions would give a token that only one of the two drafts truncates away an
artificial log-ratio of ``+-20``, and ``pi`` would collapse onto it). Tokens with ``P(v) = 0`` keep ``pi(v) = 0``.
Where one side of the ratio is zero (a token masked with ``-inf`` logits in only one of the two drafts) the
log-ratio would be infinite: it is taken as ``+R`` when ``q(v) = 0 < q_r(v)``
and ``-R`` when ``q_r(v) = 0 < q(v)``, with ``R = max_log_ratio`` when given, else ``R = 20`` (``RATIO_INF``, a
factor ``e^20``: effectively the limit, but ``pi`` stays a proper distribution with no inf/NaN). Where both
are zero ``d = 0`` (no tilt). ``ref_logits=None`` or ``lam == 0`` give ``pi = p`` exactly (the tilt is skipped,
so ``sss_exact`` is then token for token ``sd``).

**Modes.** ``t`` is the distribution the acceptance test uses: ``p`` for ``sd`` and ``sss_paper``, ``pi`` for
``sss_exact``. Position ``i < n`` (``n = num_valid[b]``, default ``K``) accepts ``x_{i+1}`` iff
``u_i * q_r,i(x) <= t_i(x)`` and ``t_i(x) > 0`` (no division: a zero draft probability means "accept iff the
target allows it"; a token outside ``[0, V)`` has probability 0 and is rejected). ``accepted[b]`` = the
number of accepted tokens before the first rejection (or ``n``). ``j = accepted[b]``; the emitted token
``next_token[b]`` is drawn at position ``j``:

* ``sd`` / ``sss_exact``: ``j < n`` (a rejection): from ``normalize((t_j - q_r,j)+)``; if that residual is all
  zero (only possible when ``t_j == q_r,j``, up to rounding) from ``t_j``. ``j == n``: the bonus, from ``t_j``.
  The emitted tokens follow ``t`` exactly (``p`` for sd, ``pi`` for sss exact).
* ``sss_paper`` (the rule of the published SSS code): test against ``p``, and emit from ``pi_j`` itself, at a
  rejection and at the bonus alike. This does **not** follow ``pi`` exactly (see the law test in
  ``tests/test_verify_kernels.py`` for a measured total-variation gap). With ``ref=None`` / ``lam=0`` it is
  not SD either (it emits from ``p``, not from the residual): pass ``mode="sd"`` for SD.
* ``bonus=False``: when all ``n`` drafted tokens are accepted no token is emitted: ``next_token[b] = -1``
  (the published paper code's behaviour; valid in every mode).

``num_valid [B]`` (optional, values in ``[0, K]``): row ``b`` only drafted ``num_valid[b]`` tokens (e.g. rows
near ``max_new_tokens`` or rows with an adaptive K); positions ``>= num_valid[b]`` are ignored and the bonus is
drawn at position ``num_valid[b]`` (so ``target_logits[b, num_valid[b]]`` must be the right logits).

**Randomness.** ``uniforms [B, K]`` fp32 in (0, 1) for the acceptance tests. The single draw per row is an
exponential race ``argmax_v log w(v) - log(-log u_b(v))`` over the unnormalised weight ``w`` (residual or
distribution) with ``u_b`` row ``b``'s stream of the shared counter-based generator (``kernels._rng``; ``seed``
is an int or per-row streams ``[B, 2]``): Triton and reference agree token for token.

**Truncation.** With ``top_k`` / ``top_p`` the kernels' inputs are prepared in torch (``truncated_inputs``):
truncated fp32 logits of the target and the draft, and, for the tilt, the truncated tilted logits of ``pi``
(from the untruncated distributions) in the place of the ref's; the kernel then reads ``log pi`` directly.
Without them the kernel reads the raw logits and forms ``pi`` itself.

**Triton** (``_spec_verify_triton``): the vocabulary is split into chunks so that few rows still fill the GPU.
Launch 1, grid ``(B*(K+1), chunks)``: per (row, position, chunk) partial logsumexps of target, draft, ref and
the two partial sums that give ``logZ`` (one read of each logits tensor; with ``max_log_ratio`` a second
partial pass computes the clipped ``logZ``). Launch 2, grid ``(B, chunks)``: every program combines its row's
partials (tiny), gathers the drafted tokens' logits, runs the acceptance tests, finds the first rejection
``j`` and races its vocabulary chunk at position ``j`` only (residual and fallback race at once). Launch 3,
grid ``(B,)``: combines the partial argmaxes. The logits are read about ``1 + 1/(K+1)`` times.
"""

from __future__ import annotations

import torch

from ._dispatch import check_finite, use_triton
from ._rng import uniform_grid_torch
from .truncation import truncate_logits

MODES = ("sd", "sss_exact", "sss_paper")
RATIO_INF = 20.0  # log-ratio used where exactly one of q_r, q is zero (unless max_log_ratio is given)


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
    return x - torch.logsumexp(x, dim=-1, keepdim=True)


def _tilted(lp: torch.Tensor, lqr: torch.Tensor, lq: torch.Tensor, lam: float,
            max_log_ratio: float | None) -> torch.Tensor:
    """log pi = log p + lam * d - logZ (all ``[..., V]``)."""
    s = lp + lam * _log_ratio_torch(lqr, lq, max_log_ratio)
    return s - torch.logsumexp(s, dim=-1, keepdim=True)


def _gumbel(seed, B: int, V: int, device) -> torch.Tensor:
    """``-log(-log u_b(v))``: the race noise, one stream per batch row."""
    u = uniform_grid_torch(seed, B, V, device=device)
    return -torch.log(-torch.log(u))


def _tilt_active(mode: str, ref_logits, lam: float) -> bool:
    return mode != "sd" and ref_logits is not None and float(lam) != 0.0


def _validate_common(target_logits, ref_logits, mode, temperature, positions: str) -> None:
    """The checks ``spec_verify`` and ``tree_verify`` share: mode, ``target_logits [B, positions, V]``, ref shaped
    like the target, temperature."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if target_logits.dim() != 3:
        raise ValueError(f"target_logits must be [B, {positions}, V], got {tuple(target_logits.shape)}")
    if ref_logits is not None and ref_logits.shape != target_logits.shape:
        raise ValueError(f"ref_logits must be [B, {positions}, V] = {tuple(target_logits.shape)}, "
                         f"got {tuple(ref_logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _check_finite_logits(target_logits, draft_logits, ref_logits, mode, lam) -> None:
    """``check_finite`` on every logits tensor the verifier reads (ref only when the tilt is active)."""
    check_finite(target_logits, "target_logits")
    check_finite(draft_logits, "draft_logits")
    if _tilt_active(mode, ref_logits, lam):
        check_finite(ref_logits, "ref_logits")


# Wrong rules the law tests must reject (tests pass them to the references as ``_wrong``; never used otherwise).
WRONG_VARIANTS = (
    "ratio_at_T1",            # the draft's probability in every ratio at temperature 1 (drafts drawn at T)
    "ratio_untruncated",      # the draft's full-vocabulary probability in the ratios (drafts drawn from top-k)
    "tilt_truncated",         # pi tilted from the truncated p, q_r, q
    "residual_from_p",        # sss: the residual (p - q_r)+ instead of (pi - q_r)+
    "bonus_from_p",           # sss: the bonus drawn from p instead of pi
    "residual_unnormalised",  # sampled tree: (res - q_r)+ not renormalised
)


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


def _log_dists(target_logits, draft_logits, ref_logits, mode, lam, temperature, top_k, top_p, max_log_ratio,
               _wrong=None):
    """``(log p, log q_r, log pi)``, each ``[B, P, V]`` fp32 with ``P`` the target's positions (references only):
    ``p`` and ``q_r`` truncated, ``pi`` from ``tilted_logits``.

    A draft one position short (``spec_verify`` with no tilt at the bonus, validated) is padded there with
    ``log p``: that position is never read.
    """
    lp = _log_softmax(truncate_logits(target_logits, temperature, top_k, top_p))
    if _wrong == "ratio_at_T1":
        lqr = _log_softmax(truncate_logits(draft_logits, 1.0, top_k, top_p))
    elif _wrong == "ratio_untruncated":
        lqr = _log_softmax(draft_logits.float() / temperature)
    else:
        lqr = _log_softmax(truncate_logits(draft_logits, temperature, top_k, top_p))
    if lqr.shape[1] < lp.shape[1]:
        lqr = torch.cat([lqr, lp[:, lqr.shape[1]:]], dim=1)
    if not _tilt_active(mode, ref_logits, lam):
        return lp, lqr, lp
    return lp, lqr, tilted_logits(target_logits, draft_logits, ref_logits, lam, temperature, top_k, top_p,
                                  max_log_ratio, _wrong)


def _validate(target_logits, draft_logits, ref_logits, draft_tokens, mode, lam, temperature, uniforms,
              bonus, num_valid):
    _validate_common(target_logits, ref_logits, mode, temperature, "K+1")
    B, K1, V = target_logits.shape
    K = K1 - 1
    if K < 1:
        raise ValueError("target_logits needs K+1 >= 2 positions")
    if draft_logits.dim() != 3 or draft_logits.shape[0] != B or draft_logits.shape[2] != V \
            or draft_logits.shape[1] not in (K, K1):
        raise ValueError(f"draft_logits must be [B, K, V] or [B, K+1, V] = [{B}, {K}|{K1}, {V}], "
                         f"got {tuple(draft_logits.shape)}")
    if _tilt_active(mode, ref_logits, lam) and bonus and draft_logits.shape[1] != K1:
        raise ValueError("the reward tilt at the bonus position needs the draft's logits there: pass "
                         "draft_logits [B, K+1, V] (or bonus=False)")
    if tuple(draft_tokens.shape) != (B, K):
        raise ValueError(f"draft_tokens must be [B, K] = {(B, K)}, got {tuple(draft_tokens.shape)}")
    if tuple(uniforms.shape) != (B, K):
        raise ValueError(f"uniforms must be [B, K] = {(B, K)}, got {tuple(uniforms.shape)}")
    if num_valid is not None and tuple(num_valid.shape) != (B,):
        raise ValueError(f"num_valid must be [B], got {tuple(num_valid.shape)}")


def spec_verify_torch(target_logits, draft_logits, ref_logits, draft_tokens, mode: str = "sd",
                      lam: float = 1.0, temperature: float = 1.0, uniforms=None, seed: int = 0, *,
                      top_k: int | None = None, top_p: float | None = None,
                      max_log_ratio: float | None = None, bonus: bool = True, num_valid=None,
                      validate: bool = True, _wrong: str | None = None):
    """Reference (vectorised over the batch) of ``spec_verify``: same signature, same tokens.

    ``_wrong`` (tests only): one of ``WRONG_VARIANTS``, a plausible bug the law tests must catch.
    """
    if validate:
        _validate(target_logits, draft_logits, ref_logits, draft_tokens, mode, lam, temperature, uniforms,
                  bonus, num_valid)
    B, K1, V = target_logits.shape
    K = K1 - 1
    dev = target_logits.device
    lp, lqr, lpi = _log_dists(target_logits, draft_logits, ref_logits, mode, lam, temperature, top_k, top_p,
                              max_log_ratio, _wrong)                                  # [B, K1, V] each
    lt = lpi if mode == "sss_exact" else lp   # acceptance / residual target
    le = lpi                                  # what sss_paper emits from

    n = torch.full((B,), K, dtype=torch.int64, device=dev) if num_valid is None \
        else num_valid.to(device=dev, dtype=torch.int64).clamp(0, K)
    tok = draft_tokens.to(device=dev, dtype=torch.int64)
    in_range = (tok >= 0) & (tok < V)
    tokc = tok.clamp(0, V - 1).unsqueeze(-1)
    t_tok = torch.exp(lt[:, :K].gather(-1, tokc).squeeze(-1))
    t_tok = torch.where(in_range, t_tok, torch.zeros_like(t_tok))
    qr_tok = torch.exp(lqr[:, :K].gather(-1, tokc).squeeze(-1))
    ok = (uniforms.to(device=dev, dtype=torch.float32) * qr_tok <= t_tok) & (t_tok > 0)
    pos = torch.arange(K, device=dev)
    rej = (~ok) & (pos[None, :] < n[:, None])
    j = torch.where(rej, pos[None, :].expand(B, K), n[:, None].expand(B, K)).amin(dim=1)
    j = torch.minimum(j, n)

    rows = torch.arange(B, device=dev)
    g = _gumbel(seed, B, V, dev)
    lt_j = lt[rows, j]
    key_t = (le[rows, j] if mode == "sss_paper" else lt_j) + g
    if _wrong == "bonus_from_p":
        key_t = torch.where((j == n)[:, None], lp[rows, j] + g, key_t)
    lres = lp[rows, j] if _wrong == "residual_from_p" else lt_j
    w = torch.clamp(torch.exp(lres) - torch.exp(lqr[rows, j]), min=0.0)
    key_res = torch.log(w) + g
    need_res = (j < n) & (mode != "sss_paper")
    res_tok = key_res.argmax(-1)
    degenerate = key_res.amax(-1) == float("-inf")
    next_token = torch.where(need_res & ~degenerate, res_tok, key_t.argmax(-1))
    if not bonus:
        next_token = torch.where(j == n, torch.full_like(next_token, -1), next_token)
    return j, next_token


def spec_verify(target_logits, draft_logits, ref_logits, draft_tokens, mode: str = "sd",
                lam: float = 1.0, temperature: float = 1.0, uniforms=None, seed: int = 0, *,
                top_k: int | None = None, top_p: float | None = None,
                max_log_ratio: float | None = None, bonus: bool = True, num_valid=None,
                validate: bool = True):
    """Verify a drafted chain: returns ``(accepted [B] int64, next_token [B] int64)`` (module docstring).

    ``validate=True`` checks shapes and that no logits are NaN / +inf (``check_finite``: a host sync and a few
    extra passes over the logits); ``validate=False`` skips it (shapes are still assumed right; non-finite
    logits then give unspecified tokens).
    """
    if validate:
        _validate(target_logits, draft_logits, ref_logits, draft_tokens, mode, lam, temperature, uniforms,
                  bonus, num_valid)
        _check_finite_logits(target_logits, draft_logits, ref_logits, mode, lam)
    if use_triton(target_logits):
        from ._spec_verify_triton import spec_verify_triton

        return spec_verify_triton(target_logits, draft_logits, ref_logits, draft_tokens, mode, lam,
                                  temperature, uniforms, seed, top_k=top_k, top_p=top_p,
                                  max_log_ratio=max_log_ratio, bonus=bonus, num_valid=num_valid)
    return spec_verify_torch(target_logits, draft_logits, ref_logits, draft_tokens, mode, lam, temperature,
                             uniforms, seed, top_k=top_k, top_p=top_p, max_log_ratio=max_log_ratio,
                             bonus=bonus, num_valid=num_valid, validate=False)
