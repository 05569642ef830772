"""``beam``: step-level beam search with a process (step) reward, and its diverse variant DVTS (docs/design.md
section 1.3b; Snell et al. 2024, "Scaling LLM Test-Time Compute Optimally"; Beeching et al. 2024, DVTS).

The step reward is the decode's ``step_reward`` (without one, its ``reward`` read on partial responses):
``r(x, s)`` for a prompt ``x`` and a prefix ``s`` that ends at a step boundary (a callable
``step_reward(prompts, partial_responses) -> [N]``, or a process reward model or reward model scored on the
prefix through its cached prefixes, ``RewardModel.append``). Step ``t`` of a beam
gets the score ``s_t = r(x, y_1..y_t)``; a beam's score aggregates its step scores (``aggregate``)::

    last: s_t          min: min_i s_i          prod: prod_i s_i   (meant for scores in [0, 1], e.g. PRM probabilities)

Search, per prompt (``K = beams``, ``W = width``)::

    groups: one group of capacity K (dvts=False), or K / W groups of capacity 1 (dvts=True: the subtrees)
    every group starts with `capacity` beams, all the empty response (the prompt's cache, expanded)
    repeat until every group's capacity is 0:
        expand every live beam W ways (row copies of its cache, select_rows)
        extend every candidate by one step (sampled from the target: ends at a token of `delimiters`, after
            `max_step_tokens` tokens, or where the response ends: EOS or max_new_tokens)
        score every candidate (the step reward of its new prefix) and aggregate
        per group: keep the `capacity` best candidates by aggregated score (ties: the first, in the order
            beam rank, then expansion); a kept candidate that has finished is set aside with its score and
            takes its slot for good (capacity -= 1); the kept unfinished ones are the group's live beams
            (pruning is select_rows of the target's and the reward's caches)

So a prompt ends with exactly K finished beams (dvts=False) or one per subtree (dvts=True), and only finished
beams are ever answers. A DVTS subtree is a greedy search of its own: its candidates are the ``W`` expansions of
its single beam, so subtrees never share a beam after the root. The answer is chosen among the prompt's
finished beams by ``select`` (``fastalign.methods.selection``): ``"best"`` (default: the highest aggregated
score, the first finished among equal scores), ``"sample"`` (by ``softmax(score / lam)``), ``"majority"`` /
``"weighted_majority"`` (a vote over the answers of ``answer_fn``, weighted by ``softmax(score / lam)``).

Randomness. At every step the candidates of a prompt are numbered ``0..C-1`` (groups in order, beams by rank,
then expansion); candidate ``c`` draws its tokens from the prompt's sub-stream ``c`` (purpose ``"token"``),
its counter advancing per drawn token. A prompt's output depends on its own seed alone. ``beams=width=1`` is
``sample``, token for token (one candidate, sub-stream 0, nothing to choose); ``beams=1, width=W,
max_step_tokens=1`` picks at every token the best of ``W`` sampled next tokens by the aggregated step reward
(greedy by step reward over the sampled tokens).

Remote target (``fastalign.models.remote.RemoteLM``, ``base.RemoteSegments.branch``): the expansion of a live
beam is one completion request with ``n = width`` samples that continues its prompt plus response, ``max_tokens``
its step budget (``max_step_tokens``, at most what is left of ``max_new_tokens``), the delimiters sent with the
EOS ids as stop tokens (kept); scoring, pruning and the DVTS bookkeeping stay in the client (the server holds
no rows). Prompt ``b``'s step ``k`` takes the request seed ``s_bk`` (draw ``k`` of its ``"request"`` stream) and
its live beam ``i`` (``i``-th of the prompt's live beams, by rank) the seed ``s_bk + i * width``: on a server
that takes one sample per request (fastalign's), candidate ``c = i * width + j`` is drawn with ``s_bk + c``
(vLLM draws a request's ``n`` samples from its one seed). ``beams=width=1`` is remote ``sample`` token for token
when its first step is the whole response (no delimiters, ``max_step_tokens >= max_new_tokens``); otherwise each
step is a fresh seeded request, and its response follows the target's law.

Cost: the target processes every candidate's step tokens once (batched ``extend`` per token); the reward
model processes each step's segments on top of its cached prefixes (a callable scores the whole prefixes).
Stats: ``beam_steps`` (steps of the batch), ``beam_candidates`` (candidates scored, all prompts),
``beam_finished`` (finished beams set aside, all prompts). ``out.extra``: ``finished`` (per prompt, its
finished beams in the order they were set aside: ``{"tokens", "score" (aggregated), "step_scores",
"subtree" (the group), "path" (the ids of the beams it descends from, one per step; ids are per prompt)}``),
``scores`` (``[B, F]`` aggregated scores of the finished beams, fp64) and ``chosen_index`` (``[B]``, into
``finished``).
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

AGGREGATIONS = ("last", "min", "prod")


def aggregate_step(rule: str, previous: float | None, score: float) -> float:
    """A beam's aggregated score after a step with score ``score``; ``previous`` is None before its first step."""
    if rule == "prod" and score < 0:  # -1 * -2 = 2 would rank two wrong steps above a sound beam's 0
        raise InputError(f"beam: aggregate='prod' needs step scores >= 0, got {score:g}; use aggregate='last' or "
                         "'min', or a reward in [0, 1]")
    if previous is None or rule == "last":
        return score
    if rule == "min":
        return min(previous, score)
    product = previous * score  # "prod"
    if not math.isfinite(product):  # inf scores tie, and inf - inf in the selection weights is NaN
        raise InputError(f"beam: aggregate='prod' overflows float64 ({previous:g} * {score:g}); rescale the reward "
                         "or use aggregate='last' or 'min'")
    return product


def rank(scores: list[float]) -> list[int]:
    """Indices of ``scores`` from the highest to the lowest; equal scores keep their order (the first first)."""
    return sorted(range(len(scores)), key=lambda i: -scores[i])


def check_options(beams, width, max_step_tokens, aggregate, dvts) -> None:
    for name, value in (("beams", beams), ("width", width), ("max_step_tokens", max_step_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be an integer >= 1, got {value!r}")
    if aggregate not in AGGREGATIONS:
        raise InputError(f"aggregate must be one of {AGGREGATIONS}, got {aggregate!r}")
    if not isinstance(dvts, bool):
        raise InputError(f"dvts must be True or False, got {dvts!r}")
    if dvts and beams % width:
        raise InputError(f"dvts=True splits the beams into beams / width subtrees: beams ({beams}) must be a "
                         f"multiple of width ({width})")


def remote_step(ctx: Context, remote: RemoteSegments, live: list[dict], firsts: list[int], W: int,
                max_step_tokens: int, responses: list[list[int]], done: list[bool]) -> list[list[int]]:
    """Extend every candidate (rows ``i * W + j``: expansion ``j`` of live beam ``i``) by one step drawn by the
    server: one request of ``W`` samples per live beam, seed ``s_bk + firsts[i]`` (``firsts[i]``: the prompt's
    number of its first candidate). ``responses`` and ``done`` are updated in place, as ``extend_segments`` does;
    returns each candidate's new segment."""
    budgets = [min(max_step_tokens, ctx.max_new_tokens - len(beam["tokens"])) for beam in live]
    segments = remote.branch([beam["owner"] for beam in live], firsts, budgets, [beam["tokens"] for beam in live], W)
    for c, segment in enumerate(segments):
        responses[c] += segment
        done[c] = not segment or ctx.response_ended(responses[c])
    return segments


def run(ctx: Context, prompts: list[list[int]], beams: int = 4, width: int = 2, max_step_tokens: int = 32,
        delimiters: list[int | str] | int | str | None = None, aggregate: str = "last", dvts: bool = False,
        select: str = "best", answer_fn=None, lam: float = 1.0) -> MethodResult:
    """Step-level beam search for every prompt (module docstring). Each row of the caches is one live beam (or,
    within a step, one candidate); ``beam[r]`` holds its bookkeeping."""
    check_options(beams, width, max_step_tokens, aggregate, dvts)
    delimiters = set(delimiter_ids(delimiters, ctx.tokenizer, getattr(ctx.target, "vocab_size", None)))
    answer = check_select(ctx, select, answer_fn, lam)
    B, W = len(prompts), width
    target, step_reward = ctx.target, ctx.step_reward
    groups, capacity0 = (beams // width, 1) if dvts else (1, beams)
    capacity = [[capacity0] * groups for _ in range(B)]

    remote = RemoteSegments(ctx, prompts, W, delimiters) if isinstance(target, RemoteLM) else None
    if remote is None:
        logits = target.prefill(prompts, ctx.max_new_tokens)  # [B, V]
    step_reward.prefill(prompts)
    # the live beams: prompt, group, aggregated score, step scores, path, response
    live = [dict(owner=b, group=g, score=None, steps=[], path=[], tokens=[])
            for b in range(B) for g in range(groups) for _ in range(capacity0)]
    rows = [beam["owner"] for beam in live]  # each live beam's row in the current caches
    finished: list[list[dict]] = [[] for _ in range(B)]
    next_id = [0] * B
    steps = scored = 0
    while live:
        steps += 1
        # 1. expand every live beam W ways: row copies of its caches
        parent = [i for i in range(len(live)) for _ in range(W)]
        order = [rows[i] for i in parent]
        if remote is None:
            target.select_rows(order)
            logits = logits[torch.tensor(order, device=logits.device)]
        step_reward.select_rows(order)
        owner = [live[i]["owner"] for i in parent]
        subs, seen = [], [0] * B  # candidate c of its prompt draws from sub-stream c
        for b in owner:
            subs.append(seen[b])
            seen[b] += 1

        # 2. extend every candidate by one step
        responses = [list(live[i]["tokens"]) for i in parent]
        done = [False] * len(parent)
        if remote is None:
            segments, logits = extend_segments(ctx, logits, owner, subs, responses, done, max_step_tokens,
                                               delimiters)
        else:
            segments = remote_step(ctx, remote, live, subs[::W], W, max_step_tokens, responses, done)

        # 3. score the candidates' new prefixes and aggregate
        step_scores = step_reward.append(segments).double().tolist()
        scored += len(parent)
        candidates = [dict(owner=live[i]["owner"], group=live[i]["group"], steps=live[i]["steps"] + [s],
                           score=aggregate_step(aggregate, live[i]["score"], s), path=live[i]["path"],
                           tokens=responses[c], done=done[c])
                      for c, (i, s) in enumerate(zip(parent, step_scores))]

        # 4. per group, keep the best `capacity`; set the finished ones aside, the others live on
        pools: dict[tuple[int, int], list[int]] = {}
        for c, cand in enumerate(candidates):
            pools.setdefault((cand["owner"], cand["group"]), []).append(c)
        live, kept_rows = [], []
        for (b, g), members in pools.items():  # insertion order: prompts, then groups
            kept = [members[k] for k in rank([candidates[c]["score"] for c in members])[:capacity[b][g]]]
            for c in kept:
                cand = candidates[c]
                cand["path"] = cand["path"] + [next_id[b]]
                next_id[b] += 1
                if cand.pop("done"):
                    capacity[b][g] -= 1
                    finished[b].append(dict(tokens=cand["tokens"], score=cand["score"], step_scores=cand["steps"],
                                            subtree=g, path=cand["path"]))
                else:
                    live.append(cand)
                    kept_rows.append(c)
        if kept_rows:  # pruning: keep the live beams' rows
            if remote is None:
                target.select_rows(kept_rows)
                logits = logits[torch.tensor(kept_rows, device=logits.device)]
            step_reward.select_rows(kept_rows)
        rows = list(range(len(live)))

    F = max(len(f) for f in finished)
    scores = torch.full((B, F), -torch.inf, dtype=torch.float64)
    available = torch.zeros(B, F, dtype=torch.bool)
    for b, fs in enumerate(finished):
        for k, beam in enumerate(fs):
            scores[b, k], available[b, k] = beam["score"], True
    candidates_of = [[beam["tokens"] for beam in fs] + [[]] * (F - len(fs)) for fs in finished]
    chosen = [int(i) for i in select_candidates(ctx, select, candidates_of, scores, lam=lam, answer=answer,
                                                available=available)]
    ctx.stats.update({"beam_steps": steps, "beam_candidates": scored,
                      "beam_finished": sum(len(f) for f in finished)})
    extra = {"finished": finished, "scores": scores, "chosen_index": torch.tensor(chosen)}
    return MethodResult([finished[b][chosen[b]]["tokens"] for b in range(B)], extra)
