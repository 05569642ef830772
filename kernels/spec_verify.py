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
distribution) with ``u_b`` row ``b``'s stream of the shared counter-based generator (``kernels.rng``; ``seed``
is an int or per-row streams ``[B, 2]``): Triton and reference agree token for token under the CPU interpreter
(the same fp32 operations). On CUDA the compiled kernel's ``exp``, ``log`` and division (and its FMA contraction)
may differ from torch's in the last bits, unlike ``sample``'s kernel, so there a token can differ when two race
keys, or the two sides of an acceptance test, agree to within a few ulp: never for generic inputs.

**Truncation.** With ``top_k`` / ``top_p`` the kernels' inputs are prepared in torch (``prepare_verify_inputs``):
truncated fp32 logits of the target and the draft, and, for the tilt, the truncated tilted logits of ``pi``
(from the untruncated distributions) in the place of the ref's; the kernel then reads ``log pi`` directly.
Without them the kernel reads the raw logits and forms ``pi`` itself.

**Triton** (``_spec_verify_triton``): the vocabulary is split into chunks so that few rows still fill the GPU.
Launch 1, grid ``(B*(K+1), chunks)``: per (row, position, chunk) partial (max, sum-exp) pairs of target,
draft and ref (one read of each logits tensor); with the tilt a second partial pass then computes ``logZ`` from
the combined normalisers. Launch 2, grid ``(B, chunks)``: every program combines its row's partials (tiny),
gathers the drafted tokens' logits, runs the acceptance tests, finds the first rejection ``j`` and races its
vocabulary chunk at position ``j`` only (residual and fallback race at once). Launch 3, grid ``(B,)``: combines
the partial argmaxes. The logits are read about ``1 + 1/(K+1)`` times (once more with the tilt). Normalisers
stay (max, log-sum) pairs throughout: ``log p = (x - m) - log s`` keeps the log-sum at a small temperature,
where ``x - (m + log s)`` rounds it away.

**Code.** The torch math this module shares with ``tree_verify`` (the tilt, ``RATIO_INF``, the distributions,
the race noise, the input checks, ``WRONG_VARIANTS``) is in ``kernels._verify_math``; the Triton helpers the two
Triton files share, and ``prepare_verify_inputs``, are in ``kernels._verify_common``.
"""

from __future__ import annotations

import torch

from ._dispatch import use_triton
from ._verify_math import (check_finite_logits, check_uniforms, gumbel_noise, log_dists, tilt_active,
                           validate_common)


def _validate(target_logits, draft_logits, ref_logits, draft_tokens, mode, lam, temperature, uniforms,
              max_log_ratio, bonus, num_valid):
    validate_common(target_logits, ref_logits, mode, temperature, lam, max_log_ratio, "K+1")
    B, K1, V = target_logits.shape
    K = K1 - 1
    if K < 1:
        raise ValueError("target_logits needs K+1 >= 2 positions")
    if draft_logits.dim() != 3 or draft_logits.shape[0] != B or draft_logits.shape[2] != V \
            or draft_logits.shape[1] not in (K, K1):
        raise ValueError(f"draft_logits must be [B, K, V] or [B, K+1, V] = [{B}, {K}|{K1}, {V}], "
                         f"got {tuple(draft_logits.shape)}")
    if tilt_active(mode, ref_logits, lam) and bonus and draft_logits.shape[1] != K1:
        raise ValueError("the reward tilt at the bonus position needs the draft's logits there: pass "
                         "draft_logits [B, K+1, V] (or bonus=False)")
    if tuple(draft_tokens.shape) != (B, K):
        raise ValueError(f"draft_tokens must be [B, K] = {(B, K)}, got {tuple(draft_tokens.shape)}")
    if uniforms is None or tuple(uniforms.shape) != (B, K):
        got = None if uniforms is None else tuple(uniforms.shape)
        raise ValueError(f"uniforms must be [B, K] = {(B, K)}, got {got}")
    check_uniforms(uniforms)
    if num_valid is not None and tuple(num_valid.shape) != (B,):
        raise ValueError(f"num_valid must be [B], got {tuple(num_valid.shape)}")


def spec_verify_torch(target_logits, draft_logits, ref_logits, draft_tokens, mode: str = "sd",
                      lam: float = 1.0, temperature: float = 1.0, uniforms=None, seed: int = 0, *,
                      top_k: int | None = None, top_p: float | None = None,
                      max_log_ratio: float | None = None, bonus: bool = True, num_valid=None,
                      validate: bool = True, _wrong: str | None = None):
    """Reference (vectorised over the batch) of ``spec_verify``: same signature, same tokens.

    ``_wrong`` (tests only): one of ``_verify_math.WRONG_VARIANTS``, a plausible bug the law tests must catch.
    """
    if validate:
        _validate(target_logits, draft_logits, ref_logits, draft_tokens, mode, lam, temperature, uniforms,
                  max_log_ratio, bonus, num_valid)
    B, K1, V = target_logits.shape
    K = K1 - 1
    dev = target_logits.device
    lp, lqr, lpi = log_dists(target_logits, draft_logits, ref_logits, mode, lam, temperature, top_k, top_p,
                              max_log_ratio, _wrong)                                  # [B, K1, V] each
    lt = _acceptance_target(mode, lp, lpi)    # acceptance / residual target
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
    g = gumbel_noise(seed, B, V, dev)
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


def _acceptance_target(mode: str, lp: torch.Tensor, lpi: torch.Tensor) -> torch.Tensor:
    """``log t``, the distribution the acceptance test uses: ``pi`` for ``sss_exact``, ``p`` otherwise."""
    return lpi if mode == "sss_exact" else lp


def acceptance_probability(target_logits, draft_logits, ref_logits=None, mode: str = "sd", lam: float = 1.0,
                           temperature: float = 1.0, *, top_k: int | None = None, top_p: float | None = None,
                           max_log_ratio: float | None = None) -> torch.Tensor:
    """The probability that position ``i``'s drafted token is accepted, given the position is reached:
    ``beta [B, K]`` fp32, ``beta[b, i] = sum_v min(t_i(v), q_r,i(v))`` (one minus the total variation between
    ``t``, the distribution the test uses, and the proposal ``q_r``; module docstring).

    ``target_logits [B, K, V]``, ``draft_logits [B, K, V]``, ``ref_logits`` shaped like the target or None (the
    first ``K`` positions of each are read, ``K`` the shorter of the two); any float dtype. Plain torch, no
    randomness: the mean of ``beta`` is what a count of accepted tokens estimates, without the count's noise.
    """
    K = min(target_logits.shape[1], draft_logits.shape[1])
    ref = None if ref_logits is None else ref_logits[:, :K]
    lp, lqr, lpi = log_dists(target_logits[:, :K], draft_logits[:, :K], ref, mode, lam, temperature, top_k,
                             top_p, max_log_ratio)                                    # [B, K, V] each
    return torch.minimum(_acceptance_target(mode, lp, lpi).exp(), lqr.exp()).sum(-1)


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
                  max_log_ratio, bonus, num_valid)
        check_finite_logits(target_logits, draft_logits, ref_logits, mode, lam, temperature)
    if use_triton(target_logits):
        from ._spec_verify_triton import spec_verify_triton

        return spec_verify_triton(target_logits, draft_logits, ref_logits, draft_tokens, mode, lam,
                                  temperature, uniforms, seed, top_k=top_k, top_p=top_p,
                                  max_log_ratio=max_log_ratio, bonus=bonus, num_valid=num_valid)
    return spec_verify_torch(target_logits, draft_logits, ref_logits, draft_tokens, mode, lam, temperature,
                             uniforms, seed, top_k=top_k, top_p=top_p, max_log_ratio=max_log_ratio,
                             bonus=bonus, num_valid=num_valid, validate=False)
