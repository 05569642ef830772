"""``smc``: particle filtering (sequential Monte Carlo) towards QAlign's target (docs/design.md section 1.3b).

Target law over complete responses ``y`` (EOS kept when there is one)::

    P(y) ∝ p(y | x) * exp(r(x, y) / beta),     Z = sum_y p(y | x) * exp(r(x, y) / beta)

where ``p`` is the target as it samples (its per-token distributions at the decode's temperature / top-k /
top-p, as in ``qalign``). Per prompt, ``particles = N`` rows share the prompt's prefilled cache (``expand``).

Twist. ``psi(s) = exp(r(x, s) / beta)`` for a partial response ``s``: the decode's step reward (``step_reward``: a
process reward model, a reward model or a callable; without one, the ``reward`` read on partial responses) of the
prompt and the prefix, as if it were a whole response. ``r_0 = r(x, [])`` is the reward of the prompt alone. The
target's tilt ``r(x, y)`` is the same reward on the complete response.

Weights (log domain, fp64). Every particle starts with the weight ``w = psi(empty) = exp(r_0 / beta)``
(carried as the constant ``r_0 / beta`` of ``log_z``; the particles' log-weights start at 0). A step extends
every live particle by one segment ``s_(t-1) -> s_t`` sampled from ``p`` and multiplies its weight by the
incremental weight ``psi(s_t) / psi(s_(t-1))``: ``log w += (r_t - r_(t-1)) / beta``. A particle whose
response has ended (EOS, or ``max_new_tokens`` tokens) takes no further step and keeps its weight. The product
of the increments telescopes, so a finished particle's weight is ``exp(r(y) / beta)`` times the factors of the
resamplings: the final twist is the target's tilt. (Any intermediate twist gives an unbiased estimator; the
prompt-only reward as ``r_0`` just keeps the first increment small.)

Resampling. After each step, per prompt, ``ESS = (sum w)^2 / sum w^2``; when ``ESS < ess_threshold * N`` the
prompt's particles are resampled systematically (one uniform ``u`` from the prompt's own stream ``"resample"``,
positions ``(u + i) / N``, ``i = 0..N-1``, against the cumulative normalised weights; finished particles take
part like any other) and every weight is reset to the prompt's mean weight. Resampling is a row gather of the
target's and the reward's caches (``select_rows``).

Estimate of the normalising constant. Since weights are reset to their mean (not to 1), the final mean weight
already carries the product of the epochs' means (design: ``Z_hat = prod_epochs mean_i(w) x final mean``)::

    log Z_hat = r_0 / beta + log mean_i w_i(final)

It is unbiased for ``Z`` at every ``N`` (``out.extra["log_z"]``; ``exp`` of it, not the log, is unbiased).

Segments. A segment ends after ``segment_tokens`` tokens, after a token in ``delimiters`` (optional: token ids,
or strings the tokenizer encodes as one token, e.g. a newline), or where the response ends. Particles move in lockstep: a step ends when every live
particle's segment has ended.

Output (``select``, ``fastalign.methods.selection``): ``"sample"`` (default): one particle per prompt drawn by its
final normalised weight (the consistent estimator of ``P``: its law tends to ``P`` as ``N`` grows); ``"best"``:
the particle with the highest reward ``r(y)`` (the first among ties); ``"majority"`` / ``"weighted_majority"``:
a vote over the answers of ``answer_fn``, unweighted or by the particles' final weights.

Randomness. Particle ``j`` of prompt ``b`` samples its tokens from prompt ``b``'s sub-stream ``j`` (purpose
``"token"``), like sample ``j`` of ``sample`` / ``bon``; a resampled particle keeps its own stream. So
``particles=1`` (never resampled: ESS = N) gives ``sample``'s tokens, token for token.

Remote target (``fastalign.models.remote.RemoteLM``, ``base.RemoteSegments``): a step is one completion request
per live particle that continues its prompt plus response so far, ``max_tokens`` the segment's budget, the
delimiters sent with the EOS ids as stop tokens (kept); weights and resampling (a copy of the client's lists)
stay in the client. Prompt ``b``'s step ``k`` takes the request seed ``s_bk`` (draw ``k`` of its ``"request"``
stream), particle ``j`` the seed ``s_bk + j``; the first step is ``bon``'s request (``n`` samples per prompt).

Cost: the target processes every particle's tokens once (one batched ``extend`` per token); the reward model
processes each step's segments on top of its cached prefixes (``RewardModel.append``; a callable reward scores
the whole prefixes). Stats: ``smc_steps`` (steps of the batch), ``smc_resamplings`` (resampling events, all
prompts), ``smc_mean_ess`` (mean ESS over the prompts' steps, before resampling).
``out.extra``: ``particles`` (``[B][N]`` responses), ``weights`` (``[B, N]`` final normalised weights, fp64),
``log_z`` (``[B]`` fp64), ``rewards`` (``[B, N]`` final rewards), ``chosen_index`` (``[B]``), ``resamplings``
(per prompt), ``ess`` (per prompt, the ESS after each of its steps).
"""

from __future__ import annotations

import math

import torch

from ..errors import InputError
from ..models.remote import RemoteLM
from .base import Context, MethodResult, RemoteSegments
from .segments import delimiter_ids, extend_segments
from .selection import check_select
from .selection import select as select_candidates


def initial_log_weight(r_0: torch.Tensor, beta: float) -> torch.Tensor:
    """The log of every particle's initial weight, ``log psi(empty) = r_0 / beta`` (fp64): the twist of the empty
    response, whose reward ``r_0`` (the prompt alone) the first increment is measured from."""
    return r_0.double() / beta


def log_increment(r_new: torch.Tensor, r_old: torch.Tensor, beta: float) -> torch.Tensor:
    """The incremental log-weight of a step, ``log psi_t - log psi_(t-1) = (r_t - r_(t-1)) / beta`` (fp64)."""
    return (r_new.double() - r_old.double()) / beta


def check_log_weights(log_w: torch.Tensor, beta: float) -> None:
    """Log-weights are finite: finite rewards over a tiny ``beta`` overflow float64, and the weights, ``log_z`` and
    the resampling would all be NaN."""
    if not bool(torch.isfinite(log_w).all()):
        raise InputError(f"smc: reward / beta overflows float64 (beta={beta:g}); use a larger beta")


def reset_weights(log_w: torch.Tensor, ancestors: torch.Tensor) -> torch.Tensor:
    """Log-weights of one prompt's particles after resampling ``ancestors [N]``: all equal to the log of the
    mean weight before resampling (so the final mean weight still carries the epoch's mean)."""
    mean = torch.logsumexp(log_w, 0) - math.log(log_w.shape[0])
    return mean.expand(log_w.shape[0]).clone()


def effective_sample_size(log_w: torch.Tensor) -> torch.Tensor:
    """``(sum w)^2 / sum w^2`` of each row of ``log_w [..., N]`` (fp64), exactly ``N`` where the weights are equal.

    Relative to the row's largest weight (``w / w_max``: equal weights are exactly 1) rather than as
    ``exp(2 logsumexp(log_w) - logsumexp(2 log_w))``, which rounds equal weights to just below or above N, so
    that ``ess_threshold=1`` resampled particles whose weights did not differ."""
    w = torch.exp(log_w - log_w.amax(-1, keepdim=True))
    return (w.sum(-1) ** 2 / (w * w).sum(-1)).clamp(max=log_w.shape[-1])


def systematic_resample(log_w: torch.Tensor, u: float) -> torch.Tensor:
    """Systematic resampling of ``log_w [N]`` with one uniform ``u`` in (0, 1): particle ``i`` takes the ancestor
    whose cumulative normalised weight first exceeds ``(u + i) / N``.  [N] int64."""
    N = log_w.shape[0]
    cdf = torch.cumsum(torch.softmax(log_w, 0), 0)
    positions = (u + torch.arange(N, dtype=torch.float64)) / N
    return torch.searchsorted(cdf, positions, right=True).clamp(max=N - 1)


def check_options(particles, beta, segment_tokens, ess_threshold) -> None:
    if not (isinstance(particles, int) and particles >= 1):
        raise InputError(f"particles must be an integer >= 1, got {particles!r}")
    if not beta > 0:
        raise InputError(f"beta must be > 0, got {beta}")
    if not (isinstance(segment_tokens, int) and segment_tokens >= 1):
        raise InputError(f"segment_tokens must be an integer >= 1, got {segment_tokens!r}")
    if not 0 <= ess_threshold <= 1:
        raise InputError(f"ess_threshold must be in [0, 1], got {ess_threshold}")


def run(ctx: Context, prompts: list[list[int]], particles: int = 16, beta: float = 1.0, segment_tokens: int = 16,
        delimiters: list[int | str] | int | str | None = None, ess_threshold: float = 0.5, select: str = "sample",
        answer_fn=None) -> MethodResult:
    """Particle filtering for every prompt (module docstring). Rows ``b * N + j`` are particle ``j`` of prompt
    ``b``; the returned response per prompt is chosen by ``select``."""
    check_options(particles, beta, segment_tokens, ess_threshold)
    delimiters = set(delimiter_ids(delimiters, ctx.tokenizer, getattr(ctx.target, "vocab_size", None)))
    answer = check_select(ctx, select, answer_fn)
    B, N = len(prompts), particles
    R = B * N
    target, step_reward = ctx.target, ctx.step_reward
    owner = [b for b in range(B) for _ in range(N)]  # the prompt of each row
    subs = [j for _ in range(B) for j in range(N)]  # each row's particle index: its token sub-stream

    remote = RemoteSegments(ctx, prompts, N, delimiters) if isinstance(target, RemoteLM) else None
    if remote is None:
        logits = target.prefill(prompts, ctx.max_new_tokens).repeat_interleave(N, 0)  # [R, V]
        target.expand(N)
    r_0 = step_reward.prefill(prompts).double()  # [B]: the reward of the prompt alone
    check_log_weights(initial_log_weight(r_0, beta), beta)
    step_reward.select_rows(torch.arange(B).repeat_interleave(N).tolist())
    r_prev = r_0.repeat_interleave(N)  # [R]: each particle's reward so far
    log_w = torch.zeros(B, N, dtype=torch.float64)  # relative to the initial weight exp(r_0 / beta)

    responses: list[list[int]] = [[] for _ in range(R)]
    done = [False] * R
    resamplings, ess_path = [0] * B, [[] for _ in range(B)]
    steps = 0
    while not all(done):
        steps += 1
        # a prompt whose particles have all ended is left alone, as it would be decoded alone (the loop ends)
        ended = [all(done[b * N:(b + 1) * N]) for b in range(B)]
        # 1. extend every live particle by one segment
        moved = [not d for d in done]
        if remote is None:
            segments, logits = extend_segments(ctx, logits, owner, subs, responses, done, segment_tokens, delimiters)
        else:
            budgets = [0 if d else min(segment_tokens, ctx.max_new_tokens - len(y)) for d, y in zip(done, responses)]
            segments = remote.advance(list(range(R)), budgets, responses)
            for r, segment in enumerate(segments):
                if segment:
                    responses[r] += segment
                    done[r] = ctx.response_ended(responses[r])

        # 2. reweight by the twist's increment
        r_new = step_reward.append(segments).double()
        inc = log_increment(r_new, r_prev, beta)
        check_log_weights(inc, beta)
        log_w += torch.where(torch.tensor(moved), inc, torch.zeros_like(inc)).view(B, N)
        r_prev = torch.where(torch.tensor(moved), r_new, r_prev)

        # 3. resample the prompts whose ESS fell below the threshold (not once all their particles have ended)
        rows = torch.arange(R)
        resampled = False
        for b, ess in enumerate(effective_sample_size(log_w).tolist()):
            if ended[b]:
                continue
            ess_path[b].append(ess)
            if not all(done[b * N:(b + 1) * N]) and ess < ess_threshold * N:
                u = float(ctx.rng.uniform([b], 1, "resample")[0, 0])
                ancestors = systematic_resample(log_w[b], u)
                log_w[b] = reset_weights(log_w[b], ancestors)
                rows[b * N:(b + 1) * N] = b * N + ancestors
                resamplings[b] += 1
                resampled = True
        if resampled:
            order = rows.tolist()
            if remote is None:
                target.select_rows(rows)
                logits = logits[rows.to(logits.device)]
            step_reward.select_rows(order)
            r_prev = r_prev[rows]
            responses = [list(responses[i]) for i in order]
            done = [done[i] for i in order]

    weights = torch.softmax(log_w, 1)  # [B, N]
    log_z = initial_log_weight(r_0, beta) + torch.logsumexp(log_w, 1) - math.log(N)
    final_rewards = r_prev.view(B, N)
    particles_of = [responses[b * N:(b + 1) * N] for b in range(B)]
    chosen = [int(i) for i in select_candidates(ctx, select, particles_of, final_rewards, answer=answer,
                                                weights=weights)]
    ctx.stats.update({"smc_steps": steps, "smc_resamplings": sum(resamplings),
                      "smc_mean_ess": sum(map(sum, ess_path)) / max(1, sum(map(len, ess_path)))})
    extra = {"particles": particles_of, "weights": weights, "log_z": log_z,
             "rewards": final_rewards.float(), "chosen_index": torch.tensor(chosen), "resamplings": resamplings,
             "ess": ess_path}
    return MethodResult([responses[b * N + chosen[b]] for b in range(B)], extra)
