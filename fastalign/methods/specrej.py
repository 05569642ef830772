"""``speculative_rejection``: best-of-N with early pruning (Sun et al. 2024, "Fast Best-of-N Decoding via
Speculative Rejection").

Per prompt, ``n`` candidates start from the prompt's prefilled cache (its rows expanded ``n`` ways, as in
``bon``) and are decoded token by token. Every ``round_tokens`` tokens the partial responses of the unfinished
candidates are scored by the reward and, per prompt, the ``floor(alpha * U)`` lowest of its ``U`` unfinished
candidates are stopped (among equal partial rewards the later candidate goes first); ``floor`` with ``alpha < 1``
always leaves at least one unfinished candidate of a prompt alive. Finished candidates (EOS, or
``max_new_tokens`` tokens) are kept and never scored again until the end. At the end every finished candidate is
scored whole and ``select`` picks one (``fastalign.methods.selection``; default ``"best"``: the highest final
reward, the first among equal rewards). The output is always a finished candidate::

    prefill prompts; expand n
    repeat: decode up to the next prompt's round (sub-stream j of prompt b for candidate j, as bon); a prompt
              whose floor(alpha * U) is 0 decodes its candidates to the end instead (U only falls: it never stops any)
            for the prompts whose round it is: score unfinished partials; stop the floor(alpha * U) lowest;
            drop the stopped and finished candidates' cache rows
    until every candidate is finished or stopped
    score the finished ones whole; select

Randomness: candidate ``j`` of prompt ``b`` draws its tokens from sub-stream ``j`` of the prompt's stream, the
stream ``bon``'s sample ``j`` uses, so with ``alpha=0`` (nothing is ever stopped) the candidates, their final
rewards (one ``RewardModel.score`` call over the same rows) and the output are ``bon``'s, token for token.

Rounds. The paper stops candidates at a "decision token", when the generation fills the memory budget, and
again whenever it fills up; here a prompt's round comes every ``round_tokens`` generated tokens (default 16: on
short responses, like the toy world's 24 tokens, one round happens; on long ones ``alpha=0.5`` halves a prompt's
candidates every 16 tokens), and with ``max_live_tokens`` also as soon as its unfinished candidates' generated
tokens fill that budget (one more token each would pass it; a round that leaves it full is followed by another
after one token). The budget is a trigger, as in the paper, not a bound: a round stops ``floor(alpha * U)``
candidates, which may leave more than fit (and a prompt that can stop none runs to the end). Both clocks are the
prompt's own (its candidates' tokens, not the batch's), so a prompt's rounds, and its output, do not depend on
its batch; the budget is per prompt, over generated tokens (the prompt's prefix is shared). A remote target keeps
the candidates on its server: ``max_live_tokens`` is refused there. ``alpha=0.5`` is the rejection rate of the paper's main experiments. Partial rewards
come from the reward model's cached prefixes (``RewardModel.prefill`` of the partial responses at the first
round that can stop something, ``append`` of the new tokens afterwards, ``select_rows`` to drop rows); a
round where no prompt can stop a candidate (``floor(alpha * U) = 0`` everywhere) scores nothing. Stopped and
finished candidates leave the target's and the reward's caches at a round that stops something
(``select_rows``).

Remote target (``fastalign.models.remote.RemoteLM``, ``base.RemoteSegments``): a round is one completion request
per live candidate that continues its prompt plus response so far for the round's budget; scoring, pruning and
selection stay in the client. Prompt ``b``'s round ``k`` takes the request seed ``s_bk``, draw ``k`` of its
``"request"`` stream, and candidate ``j`` the seed ``s_bk + j``; the first round is one request of ``n``
samples per prompt with ``s_b0``, ``bon``'s request, so with ``alpha=0`` (one round, to the end) the output is
remote ``bon``'s token for token. The tokens differ from a local run's (another sampler), the law does not.

``extra``: ``rewards [B, n]`` (final rewards of finished candidates, NaN for stopped ones), ``chosen_index [B]``,
``candidates`` (``[B][n]`` token lists: a stopped candidate's tokens up to its round), ``pruned_round [B, n]``
(the prompt's own round, counted from 0, that stopped a candidate; -1 if never), ``rounds``: one entry per
scoring round of the batch ``{"round", "tokens" (generated per live candidate so far), "partial_rewards" [B, n]
(NaN where not scored: only the prompts whose round it is and that can stop some are scored), "pruned" (per
prompt, the candidates stopped)}``; a prompt's rows of these entries are its own, whatever the batch.
``stats`` (of the batch): ``candidates_pruned``, ``rejection_rounds``, ``candidate_tokens`` (tokens generated over
all candidates, stopped ones included) and ``reward_scorings`` (reward calls: one per round, plus the final one).
"""

from __future__ import annotations

import math

import torch

from ..errors import InputError
from ..models.remote import RemoteLM
from .base import Context, MethodResult, RemoteSegments, sample_continuations
from .selection import check_select, select as select_candidates


def run(ctx: Context, prompts: list[list[int]], n: int = 16, alpha: float = 0.5, round_tokens: int = 16,
        max_live_tokens: int | None = None, select: str = "best", answer_fn=None, lam: float = 1.0) -> MethodResult:
    """Speculative rejection for every prompt; rows of the batch are live candidates (see the module docstring)."""
    _check_options(n, alpha, round_tokens, max_live_tokens)
    if max_live_tokens is not None and isinstance(ctx.target, RemoteLM):
        raise InputError("max_live_tokens bounds the candidates' tokens in the local cache; a RemoteLM target "
                         "holds them on its server: use round_tokens")
    answer = check_select(ctx, select, answer_fn, lam)
    B, M = len(prompts), ctx.max_new_tokens
    decoder = (RemoteSegments if isinstance(ctx.target, RemoteLM) else CachedCandidates)(ctx, prompts, n)
    # candidate c = b * n + j; the batch's rows hold candidates `rows` (in that order)
    rows = list(range(B * n))
    responses: list[list[int]] = [[] for _ in rows]
    finished = [False] * (B * n)
    pruned_round = torch.full((B, n), -1, dtype=torch.long)
    rounds: list[dict] = []
    scored = None  # tokens of each row's response in the reward's cache; None until the first scoring
    tokens = 0  # generated per candidate of a prompt that can still stop some, so far
    last_round = [0] * B  # `tokens` at each prompt's last round
    prompt_rounds = [0] * B  # each prompt's rounds so far

    def live_tokens(b: int) -> tuple[int, int]:
        """Prompt ``b``'s unfinished candidates: their number and their generated tokens."""
        mine = [len(responses[c]) for c in rows if c // n == b and not finished[c]]
        return len(mine), sum(mine)

    def tokens_to_round(b: int) -> int:
        """Tokens per candidate until prompt ``b``'s next round: ``round_tokens`` after its last one, or sooner
        when its unfinished candidates fill ``max_live_tokens`` (at least 1: a round that leaves it full is
        followed by another after one token)."""
        due = round_tokens - (tokens - last_round[b])
        if max_live_tokens is not None:
            live, held = live_tokens(b)
            due = min(due, max(1, (max_live_tokens - held) // max(1, live)))
        return due

    while True:
        # a prompt that can stop nothing now never can again (U only falls): its candidates run to the end
        can_stop = _stop_counts(rows, finished, n, B, alpha)
        budget = min([M - tokens] + [tokens_to_round(b) for b in range(B) if can_stop[b]])
        budgets = [0 if finished[c] else budget if can_stop[c // n] else M - len(responses[c]) for c in rows]
        segments = decoder.advance(rows, budgets, responses)
        tokens += budget
        for c, segment in zip(rows, segments):
            if segment:
                responses[c] += segment
                finished[c] = ctx.response_ended(responses[c])
        if all(finished[c] for c in rows):
            break
        # the prompts whose round it is: round_tokens since their last one, or their candidates' tokens full
        due = [tokens - last_round[b] >= round_tokens for b in range(B)]
        if max_live_tokens is not None:
            for b in range(B):
                live, held = live_tokens(b)
                due[b] = due[b] or held + live > max_live_tokens  # full: one more token each would not fit
        # a due prompt that can stop none is not scored: it never can again, and it runs to the end
        stop = [k if d else 0 for k, d in zip(_stop_counts(rows, finished, n, B, alpha), due)]
        if any(stop):
            last_round = [tokens if k else t for k, t in zip(stop, last_round)]
            rows, scored, keep = _prune(ctx, prompts, rows, responses, finished, scored, stop, n, pruned_round,
                                        prompt_rounds, rounds, tokens)
            decoder.keep(keep)

    done = [[finished[b * n + j] for j in range(n)] for b in range(B)]
    kept = [c for c in range(B * n) if finished[c]]
    final = ctx.reward.score([prompts[c // n] for c in kept], [responses[c] for c in kept])
    rewards = torch.full((B * n,), math.nan)
    rewards[kept] = final
    rewards = rewards.view(B, n)
    available = torch.tensor(done)
    candidates = [responses[b * n:(b + 1) * n] for b in range(B)]
    chosen = select_candidates(ctx, select, candidates, torch.where(available, rewards, 0.0), lam, answer,
                               available)
    ctx.stats["candidates_pruned"] = int((pruned_round >= 0).sum())
    ctx.stats["rejection_rounds"] = len(rounds)
    ctx.stats["candidate_tokens"] = sum(map(len, responses))
    ctx.stats["reward_scorings"] = len(rounds) + 1
    return MethodResult([candidates[b][int(i)] for b, i in enumerate(chosen)],
                        {"rewards": rewards, "chosen_index": chosen, "pruned_round": pruned_round,
                         "rounds": rounds, "candidates": candidates})


def _stop_counts(rows: list[int], finished: list[bool], n: int, B: int, alpha: float) -> list[int]:
    """Per prompt, how many of its unfinished candidates a round stops: ``floor(alpha * U)``."""
    unfinished = [0] * B
    for c in rows:
        unfinished[c // n] += not finished[c]
    return [math.floor(alpha * u) for u in unfinished]


def _prune(ctx: Context, prompts, rows, responses, finished, scored, stop, n, pruned_round, prompt_rounds, rounds,
           tokens):
    """For the prompts whose round it is and that can stop some (``stop[b] > 0``): score their unfinished
    candidates' partial responses and stop the ``stop[b]`` lowest; then drop the stopped and the finished rows
    from the reward's cache. A row's cached prefix only grows at its own prompt's rounds (so a reward that marks
    each scored piece, a PRM's ``step_tag``, sees the same pieces whatever the batch). Returns the new ``rows``,
    ``scored`` and the batch rows kept (for the target's rows: ``keep`` of the decoder)."""
    if scored is None:  # first scoring round: the reward caches every unfinished row, with its partial response
        scoring = [r for r, c in enumerate(rows) if not finished[c]]  # where its prompt is scored now
        pieces = [responses[rows[r]] if stop[rows[r] // n] else [] for r in scoring]
        scores = ctx.reward.prefill([prompts[rows[r] // n] for r in scoring], pieces)
        scored = [0] * len(rows)
        for r, piece in zip(scoring, pieces):
            scored[r] = len(piece)
    else:  # the reward's rows are the batch's rows (all unfinished at the last round): feed the new tokens
        scoring = list(range(len(rows)))
        new = [responses[c][s:] if stop[c // n] and not finished[c] else [] for c, s in zip(rows, scored)]
        scores = ctx.reward.append(new)
        scored = [s + len(x) for s, x in zip(scored, new)]
    partial = dict(zip(scoring, scores.tolist()))
    B = len(prompts)
    table = torch.full((B, n), math.nan)
    by_prompt: list[list[tuple[float, int]]] = [[] for _ in range(B)]
    for r, c in enumerate(rows):
        if stop[c // n] and not finished[c]:
            table[c // n, c % n] = partial[r]
            by_prompt[c // n].append((partial[r], -(c % n)))
    stopped = []
    for b in range(B):
        lowest = sorted(by_prompt[b])[: stop[b]]  # lowest partial reward first; the later candidate among ties
        stopped.append(sorted(-j for _, j in lowest))
        if stop[b]:
            pruned_round[b, stopped[b]] = prompt_rounds[b]
            prompt_rounds[b] += 1
    rounds.append({"round": len(rounds), "tokens": tokens, "partial_rewards": table, "pruned": stopped})
    keep = [r for r, c in enumerate(rows) if not finished[c] and (c % n) not in stopped[c // n]]
    reward_row = {r: i for i, r in enumerate(scoring)}
    ctx.reward.select_rows([reward_row[r] for r in keep])
    return [rows[r] for r in keep], [scored[r] for r in keep], keep


class CachedCandidates:
    """The candidates as rows of a local target's cache: the prompts prefilled once and expanded ``n`` ways; a
    round samples each live row's next tokens (``sample_continuations``, sub-stream ``j`` of prompt ``b``)."""

    def __init__(self, ctx: Context, prompts: list[list[int]], n: int):
        self.ctx, self.lm, self.n = ctx, ctx.target, n
        self.logits = self.lm.prefill(prompts, ctx.max_new_tokens)  # [B * n, V] after the expansion
        if n > 1:
            self.lm.expand(n)
            self.logits = self.logits.repeat_interleave(n, 0)
        self.started = False

    def advance(self, rows: list[int], budgets: list[int], responses: list[list[int]]) -> list[list[int]]:
        """Up to ``budgets[r]`` more tokens for the candidate ``rows[r]`` (0: it rides along); one list per row."""
        n, lm = self.n, self.lm
        if self.started:  # the cache holds each row's response but its last token: feed it to the live rows
            live = torch.tensor([b > 0 for b in budgets], device=self.logits.device)
            last = torch.tensor([responses[c][-1] for c in rows], device=self.logits.device)
            self.logits = lm.extend(last[:, None], live=live[:, None])[:, -1]
        self.started = True
        return sample_continuations(self.ctx, lm, self.logits, budgets, [c // n for c in rows],
                                    [c % n for c in rows])

    def keep(self, keep: list[int]) -> None:
        """Keep only the batch rows ``keep`` (in that order)."""
        self.lm.select_rows(keep)
        self.logits = self.logits[keep]


def _check_options(n, alpha, round_tokens, max_live_tokens) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"n must be an integer >= 1, got {n!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha < 1:
        raise InputError(f"alpha must be a number in [0, 1) (the share of unfinished candidates stopped per "
                         f"round), got {alpha!r}")
    if isinstance(round_tokens, bool) or not isinstance(round_tokens, int) or round_tokens < 1:
        raise InputError(f"round_tokens must be an integer >= 1, got {round_tokens!r}")
    if max_live_tokens is not None and (isinstance(max_live_tokens, bool) or not isinstance(max_live_tokens, int)
                                        or max_live_tokens < n):
        raise InputError(f"max_live_tokens must be None or an integer >= n ({n}: one token per candidate), "
                         f"got {max_live_tokens!r}")
