"""``cards``: CARDS (cascade reward sampling), segment-level rejection sampling with entropy-cut segments.

Per prompt, until ``max_new_tokens`` tokens are accepted or an accepted segment ends with EOS (docs/design.md 1.1):

1. **Propose** a segment from the accepted prefix. At each step take the target's next-token logits ``l``: if the
   segment has at least ``min_segment_tokens`` tokens and ``H(softmax(l)) >= entropy_threshold`` (temperature 1,
   full vocabulary, nats; the fused ``kernels.entropy``), the segment ends *before* this token and ``l`` becomes
   the first step of the next segment (never recomputed). Otherwise sample a token with ``ctx.sample``
   (its sampling defaults in the registry: T = 0.7, top-k 40). A segment ends after ``max_segment_tokens`` tokens, at EOS, or when the
   response reaches ``max_new_tokens``.
2. **Score** ``r = R(x + prefix + segment)``: the reward model processes only the segment, on top of its
   cached prefix (``RewardModel.score_branches``).
3. **Accept** against ``tau(L)`` (``threshold_schedule``, ``L`` = response length with the segment): soft
   (default) ``u < min(1, exp((r - tau) / accept_beta))``, hard ``r >= tau``. An accepted segment stays in both
   caches (``keep_branches``: the reward model does not process it again).
4. **Reject**: roll the target back to the prefix and propose again. After ``max_rejections`` rejections in a
   row, one more segment is scored and the best of the streak is accepted (``rs.Streak``).

Ties in the best of a streak. Different segments with equal rewards: the first stays the best (``rs.Streak``).
A segment identical to the best so far is the same candidate: the same text has the same reward, but scored in
other cache slots its float value can differ by rounding (and differently on the eager and static caches), so the
rule never looks at the two scores: the latest copy becomes the best, under the first copy's reward. The output is
the same either way; the latest copy is the cheapest (when proposed in this round, it is still in both caches,
so a forced acceptance re-feeds nothing), and the choice, hence the cost counters, no longer depends on rounding.

``reward_threshold`` is ``r_star``: a number, or ``"auto"`` (``rs.calibrate_reward_threshold``: mean + std of the
rewards of 8 plain samples of each prompt). ``accept_beta="auto"`` (default) is 1/3 of those samples' reward std
with ``reward_threshold="auto"``, else the CARDS code's 0.7 (``rs.acceptance_settings``): the soft test then
works on any reward scale. Prompts of a batch proceed independently: in a round, every prompt
still decoding proposes, and each accepts or rejects on its own; finished prompts leave the batch (their cache
rows are dropped in both models). ``parallel_candidates=M`` gives each prompt
``M`` cache rows that propose ``M`` segments at once from the shared prefix; all are scored in one reward call
and judged in order exactly as ``M`` sequential proposals would be (the first that is accepted wins; later
ones are discarded), so the output law does not depend on ``M``. The accepted row's cache is then copied to its
siblings (``CausalLM.select_rows``: a gather, no recompute).

Cost: the target processes each accepted token once, plus every rejected segment's tokens; the reward model
processes every proposed segment once. The one recompute: a forced acceptance of a segment from an earlier
round (rolled back since) feeds its tokens to both models again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import kernels
from ..errors import InputError
from .base import Context, MethodResult, ResponseSampler
from .rs import Streak, acceptance_settings, check_acceptance_options, passes


def threshold_schedule(r_prompt: torch.Tensor, r_star: torch.Tensor, alpha: float, generated: torch.Tensor,
                       max_new_tokens: int) -> torch.Tensor:
    """``tau(L) = min(r_star, r0 + L (r_star - r0) / max_new_tokens)`` with ``r0 = (1 - alpha) R(x) + alpha r_star``.

    ``r_prompt`` is ``R(x)``, the reward of the prompt alone; ``generated`` is ``L``, the response length with
    the candidate segment. All tensor arguments broadcast; returns fp32. The arithmetic is fp64: rewards near
    the fp32 limit (which pass validation) would overflow ``L (r_star - r0)`` to infinity in fp32.
    """
    r_prompt, r_star = torch.as_tensor(r_prompt, dtype=torch.float64), torch.as_tensor(r_star, dtype=torch.float64)
    r0 = (1 - alpha) * r_prompt + alpha * r_star
    fraction = torch.as_tensor(generated, dtype=torch.float64) / max_new_tokens
    return torch.minimum(r_star, r0 + fraction * (r_star - r0)).to(torch.float32)


@dataclass
class Frontier:
    """Per target row, how to get the next-token logits after its cached tokens: ``logits [R, V]`` fp32 where
    ``ready [R]``, else first feed ``pending [R]`` (a sampled token not yet in the cache)."""

    logits: torch.Tensor
    ready: torch.Tensor
    pending: torch.Tensor

    def clone(self) -> "Frontier":
        return Frontier(self.logits.clone(), self.ready.clone(), self.pending.clone())

    def take(self, rows: torch.Tensor, other: "Frontier") -> None:
        """Copy ``other``'s state of the given rows."""
        self.logits[rows], self.ready[rows] = other.logits[rows], other.ready[rows]
        self.pending[rows] = other.pending[rows]

    def select_rows(self, rows: torch.Tensor) -> None:
        self.logits, self.ready, self.pending = self.logits[rows], self.ready[rows], self.pending[rows]


@dataclass
class Candidate:
    tokens: list[int]
    cut: bool  # ended at an entropy cut: the logits after it are known and all its tokens are cached
    row: int  # the target row that proposed it
    round: int  # the proposal round (its tokens are in the cache only during that round)


def propose(ctx: Context, prefix: Frontier, budgets: list[int], entropy_threshold: float, min_tokens: int,
            prompts: list[int], subs: list[int]):
    """One segment per target row (at most ``budgets[r]`` tokens each), batched; row ``r`` draws from the stream
    of prompt ``prompts[r]``, sub-stream ``subs[r]`` (its candidate slot).

    Returns the segments, ``cut [R]`` (ended at an entropy cut), ``fed [R]`` (segment tokens now in the target
    cache, to roll back on rejection) and the rows' frontier after their segment. A prefix token still pending
    is fed on the first step and becomes part of ``prefix`` for good.
    """
    R = len(budgets)
    device = prefix.logits.device
    eos = ctx.target.eos_token_ids
    work = prefix.clone()
    segments: list[list[int]] = [[] for _ in range(R)]
    fed = torch.zeros(R, dtype=torch.long, device=device)
    cut = torch.zeros(R, dtype=torch.bool, device=device)
    # the open rows, on the host (the sampled tokens come to the host anyway) and as a device mask; every
    # open row has ``step`` segment tokens, since a closed row never reopens. Masks are applied with
    # torch.where: boolean indexing would sync with the host.
    open_rows = list(range(R))
    open_ = torch.ones(R, dtype=torch.bool, device=device)
    step = 0
    while open_rows:
        need = open_ & ~work.ready  # step 0: rows whose prefix ends with a pending token; then every open row
        if step > 0 or need.any():
            logits = ctx.target.extend(work.pending[:, None], live=need[:, None])[:, 0]
            work.logits = torch.where(need[:, None], logits, work.logits)
            work.ready = work.ready | need
            if step == 0:  # the prefix's last token: cached for good
                prefix.logits, prefix.ready = work.logits.clone(), work.ready.clone()
            else:
                fed += need.long()
        if step >= min_tokens:
            entropy, _ = kernels.entropy(work.logits, validate=False)  # checked by the model layer
            stop = open_ & (entropy >= entropy_threshold)
            cut |= stop
            stopped = stop.tolist()
            open_rows = [r for r in open_rows if not stopped[r]]
            if not open_rows:
                break
        rows = torch.tensor(open_rows, device=device)
        tokens = ctx.sample(work.logits[rows], [prompts[r] for r in open_rows], [subs[r] for r in open_rows])
        work.pending[rows], work.ready[rows] = tokens, False
        step += 1
        still_open = []
        for r, t in zip(open_rows, tokens.tolist()):
            segments[r].append(t)
            if t not in eos and step < budgets[r]:
                still_open.append(r)
        open_rows = still_open
        open_ = torch.zeros(R, dtype=torch.bool, device=device)
        open_[torch.tensor(open_rows, dtype=torch.long, device=device)] = True
    return segments, cut, fed, work


def check_options(entropy_threshold, alpha, min_segment_tokens, max_segment_tokens, parallel_candidates) -> None:
    if not (isinstance(entropy_threshold, (int, float)) and math.isfinite(entropy_threshold)):
        raise InputError(f"entropy_threshold must be a finite number, got {entropy_threshold!r}")
    if not (isinstance(alpha, (int, float)) and 0 <= alpha <= 1):
        raise InputError(f"alpha must be in [0, 1], got {alpha!r}")
    if not (isinstance(min_segment_tokens, int) and min_segment_tokens >= 1):
        raise InputError(f"min_segment_tokens must be an integer >= 1, got {min_segment_tokens!r}")
    if not (isinstance(max_segment_tokens, int) and max_segment_tokens >= min_segment_tokens):
        raise InputError(f"max_segment_tokens must be an integer >= min_segment_tokens ({min_segment_tokens}), "
                         f"got {max_segment_tokens!r}")
    if not (isinstance(parallel_candidates, int) and parallel_candidates >= 1):
        raise InputError(f"parallel_candidates must be an integer >= 1, got {parallel_candidates!r}")


def run(ctx: Context, prompts: list[list[int]], entropy_threshold: float = 3.0,
        reward_threshold: float | str = "auto", alpha: float = 0.5, accept_beta: float | str = "auto",
        mode: str = "soft", min_segment_tokens: int = 4, max_segment_tokens: int = 64, max_rejections: int = 20,
        parallel_candidates: int = 1) -> MethodResult:
    """CARDS over a batch of prompts (module docstring). Defaults are the CARDS paper's/code's, except
    ``reward_threshold`` (8.5 there, for a Llama-7B reward model) and ``accept_beta`` (0.7 there): ``"auto"``,
    since both depend on the reward's scale (``rs.acceptance_settings``). ``out.extra``: ``reward_threshold``
    (r_star per prompt, ``[B]``), ``accept_beta`` (``[B]``) and ``segment_lengths`` (the accepted segments'
    lengths per prompt)."""
    check_options(entropy_threshold, alpha, min_segment_tokens, max_segment_tokens, parallel_candidates)
    check_acceptance_options(reward_threshold, accept_beta, mode, max_rejections)
    B, M = len(prompts), parallel_candidates
    target, reward = ctx.target, ctx.reward
    logits = target.prefill(prompts, ctx.max_new_tokens)
    r_prompt = reward.prefill(prompts)
    r_star, beta = acceptance_settings(ctx, ResponseSampler(ctx, prompts, logits), reward_threshold,
                                     accept_beta)
    extra = {"reward_threshold": r_star, "accept_beta": beta, "segment_lengths": [[] for _ in range(B)]}
    target.expand(M)
    device = logits.device
    prefix = Frontier(logits.repeat_interleave(M, 0), torch.ones(B * M, dtype=torch.bool, device=device),
                      torch.zeros(B * M, dtype=torch.long, device=device))

    # the batch holds the prompts still decoding: batch row i is prompt ids[i], target rows i*M .. i*M+M-1
    ids = list(range(B))
    responses: list[list[int]] = [[] for _ in range(B)]
    streaks = [Streak() for _ in range(B)]
    stats = {"segments_proposed": 0, "segments_accepted": 0, "rejections": 0, "forced_acceptances": 0}
    round_ = 0
    while ids:
        round_ += 1
        P, R = len(ids), len(ids) * M
        budgets = [min(max_segment_tokens, ctx.max_new_tokens - len(responses[ids[r // M]])) for r in range(R)]
        segments, cut, fed, work = propose(ctx, prefix, budgets, entropy_threshold, min_segment_tokens,
                                           [ids[r // M] for r in range(R)], [r % M for r in range(R)])
        stats["segments_proposed"] += R

        # score all candidates in one reward call, then judge each prompt's candidates in order
        rewards = torch.stack(reward.score_branches([segments[i * M:(i + 1) * M] for i in range(P)]))  # [P, M]
        generated = torch.tensor([[len(responses[b]) + len(segments[i * M + m]) for m in range(M)]
                                  for i, b in enumerate(ids)])
        tau = threshold_schedule(r_prompt[:, None], r_star[ids, None], alpha, generated, ctx.max_new_tokens)
        uniforms = ctx.rng.uniform(ids, M, "accept") if mode == "soft" else None
        ok = passes(rewards, tau, uniforms, mode, beta[ids, None]).tolist()
        accepted: dict[int, Candidate] = {}  # batch row -> accepted candidate
        for i in range(P):
            for m in range(M):
                r = i * M + m
                cand = Candidate(segments[r], bool(cut[r]), r, round_)
                score, streak = float(rewards[i, m]), streaks[i]
                if streak.best is not None and streak.best.tokens == cand.tokens:  # a tie (module docstring)
                    streak.best, score = cand, streak.best_reward
                choice, forced = streak.judge(score, ok[i][m], cand, max_rejections)
                if choice is None:
                    stats["rejections"] += 1
                    continue
                accepted[i] = choice
                stats["forced_acceptances"] += forced
                break

        # target: keep the accepted segments, roll everything else back to the prefix
        fresh = {i: c for i, c in accepted.items() if c.round == round_}
        stale = {i: c for i, c in accepted.items() if c.round != round_}
        fresh_rows = torch.tensor([c.row for c in fresh.values()], dtype=torch.long, device=device)
        fed[fresh_rows] = 0
        target.rollback(fed)
        prefix.take(fresh_rows, work)
        source = {i: c.row for i, c in fresh.items()}  # batch row -> the target row holding its new prefix
        if stale:
            refeed_best(ctx, prefix, {i * M: c for i, c in stale.items()})
            source.update({i: i * M for i in stale})

        # reward model: fresh segments stay where they were scored, stale ones are fed again
        reward.keep_branches([fresh[i].row - i * M if i in fresh else None for i in range(P)])
        if stale:
            reward.append([stale[i].tokens if i in stale else [] for i in range(P)])

        for i, c in accepted.items():
            b = ids[i]
            responses[b] += c.tokens
            extra["segment_lengths"][b].append(len(c.tokens))
            streaks[i] = Streak()
        stats["segments_accepted"] += len(accepted)

        # every row of a prompt takes its accepted row's cache; finished prompts leave the batch
        keep = [i for i, b in enumerate(ids) if not ctx.response_ended(responses[b])]
        rows = torch.arange(R, device=device).view(P, M)
        for i, j in source.items():
            rows[i] = j
        rows = rows[keep].flatten()
        if len(keep) < P or (M > 1 and source):
            target.select_rows(rows)
            prefix.select_rows(rows)
        if len(keep) < P:
            reward.select_rows(keep)
            r_prompt = r_prompt[keep]
            ids, streaks = [ids[i] for i in keep], [streaks[i] for i in keep]
    ctx.stats.update(stats)
    return MethodResult(responses, extra)


def refeed_best(ctx: Context, prefix: Frontier, best: dict[int, Candidate]) -> None:
    """Write earlier-round candidates (``best``: target row -> candidate) after their row's prefix again and
    set the rows' frontier to the candidate's end (the last token stays pending unless it ended at a cut)."""
    R = prefix.ready.shape[0]
    feed = {r: c.tokens if c.cut else c.tokens[:-1] for r, c in best.items()}
    T = max(len(t) for t in feed.values())
    if T:
        tokens = torch.zeros(R, T, dtype=torch.long, device=prefix.logits.device)
        live = torch.zeros(R, T, dtype=torch.bool, device=prefix.logits.device)
        for r, t in feed.items():
            tokens[r, :len(t)] = torch.tensor(t, dtype=torch.long)
            live[r, :len(t)] = True
        logits = ctx.target.extend(tokens, live=live)
    for r, c in best.items():
        if c.cut:
            prefix.logits[r], prefix.ready[r] = logits[r, len(c.tokens) - 1], True
        else:
            prefix.pending[r], prefix.ready[r] = c.tokens[-1], False
