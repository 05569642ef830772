"""Picking one response per prompt among several candidates: the ``select`` option of multi-candidate methods.

Rules (``SELECT_RULES``), over a prompt's candidates with rewards ``r`` (only the *available* ones: e.g.
``speculative_rejection``'s finished candidates; the others never win and never vote):

* ``"best"``: the highest reward; among equal rewards the first candidate (``bon``'s rule);
* ``"sample"``: candidate ``i`` with probability ``softmax(r / lam)_i`` (``soft_bon``'s rule), drawn from the
  prompt's own stream (``Randomness.categorical``, purpose ``"pick"``, one number per candidate slot);
* ``"majority"``: the most frequent answer (``answer_fn``); ties go to the answer reached first in candidate
  order;
* ``"weighted_majority"``: the answer with the largest total weight ``softmax(r / lam)`` over its candidates
  (QAlign's weighted vote; ``lam`` is the method's reward temperature: ``lam`` for ``bon`` / ``soft_bon`` /
  ``speculative_rejection``, ``beta`` for ``qalign``); ties as for ``"majority"``.

The voting rules (``vote``) let only candidates with an answer vote (an extractor returns ``None`` when a text
holds none) unless no candidate has one, then all vote (each its own ``None``-answer ballot). A winning answer
is returned as its highest-reward candidate (the first among equal rewards); ``qalign`` keeps its own
representative (the most recently visited state with that answer) and its own rules (``"last"``,
``"best_reward"``, ``"mbr"``), and shares ``vote`` and ``answer_extractor`` with this module.

``answer_fn`` is a name of ``fastalign.methods.answers.EXTRACTORS`` (``"last_number"``, ``"boxed"``,
``"option"``: they read the decoded text and need a tokenizer) or a callable, given the decoded text when a
tokenizer is known, else the token list.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from .answers import get_extractor
from .base import Context

SELECT_RULES = ("best", "sample", "majority", "weighted_majority")
VOTING_RULES = ("majority", "weighted_majority")


def check_select(ctx: Context, select, answer_fn, lam: float = 1.0, rules=SELECT_RULES, needs_answer=None):
    """Validate ``select`` (one of ``rules``), ``answer_fn`` and ``lam``; returns the answer extractor over token
    lists (None when no ``answer_fn`` is given). ``needs_answer`` (default: ``select`` is a voting rule) says
    whether the rule needs ``answer_fn``."""
    if select not in rules:
        raise InputError(f"select must be one of {rules}, got {select!r}")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam > 0:
        raise InputError(f"lam must be a number > 0, got {lam!r}")
    if needs_answer is None:
        needs_answer = select in VOTING_RULES
    if answer_fn is None:
        if needs_answer:
            raise InputError(f"select={select!r} votes over answers: pass answer_fn (a callable or one of "
                             "'last_number', 'boxed', 'option', 'answer')")
        return None
    return answer_extractor(ctx.tokenizer, answer_fn)


def answer_extractor(tokenizer, answer_fn):
    """``answer(tokens) -> hashable | None`` from ``answer_fn`` (see the module docstring); results are cached
    per token sequence."""
    try:
        extract = get_extractor(answer_fn)
    except ValueError as e:
        raise InputError(str(e)) from None
    if tokenizer is None:
        if isinstance(answer_fn, str):
            raise InputError(f"answer_fn={answer_fn!r} reads text: pass a tokenizer (or a callable over tokens)")
        return lambda tokens: extract(list(tokens))
    cache: dict = {}

    def answer(tokens):
        key = tuple(tokens)
        if key not in cache:
            cache[key] = extract(tokenizer.decode(list(tokens), skip_special_tokens=True))
        return cache[key]

    return answer


def vote(answers: list, weights: list[float]):
    """The winning answer and the voters: candidates ``k`` with ``answers[k] is not None`` (all of them when none
    has an answer). Each voter adds ``weights[k]`` to its answer; the largest total wins, the answer reached
    first among equal totals."""
    voters = [k for k, a in enumerate(answers) if a is not None] or list(range(len(answers)))
    totals: dict = {}
    for k in voters:
        totals[answers[k]] = totals.get(answers[k], 0.0) + weights[k]
    return max(totals, key=totals.get), voters  # max keeps the first of equal totals: insertion order


def reward_weights(rewards: torch.Tensor, lam: float, available: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax(r / lam)`` per row of ``rewards [B, N]`` over the ``available [B, N]`` entries (0 elsewhere), in
    fp64 and shifted by the row's best reward: a tiny ``lam`` gives the others 0, never NaN.  [B, N] fp64."""
    r = rewards.double()
    if available is None:
        shifted = r - r.max(1, keepdim=True).values
        return torch.softmax(shifted / lam, dim=1)
    best = torch.where(available, r, -torch.inf).max(1, keepdim=True).values
    return torch.softmax(torch.where(available, (r - best) / lam, -torch.inf), dim=1)


def select(ctx: Context, rule: str, candidates: list[list[list[int]]], rewards: torch.Tensor, lam: float = 1.0,
           answer=None, available: torch.Tensor | None = None, prompts=None,
           weights: torch.Tensor | None = None) -> torch.Tensor:
    """The index of the chosen candidate of each prompt.  [B] int64.

    ``candidates[b][i]``: candidate ``i`` of prompt ``b`` (token list; unavailable ones may be anything);
    ``rewards [B, N]``; ``available [B, N]`` bool (default: all; every row needs one); ``answer``: the
    extractor of ``check_select`` (voting rules); ``prompts``: the decode's index of each row's prompt, whose
    stream a ``"sample"`` draw uses (default ``0..B-1``); ``weights [B, N]``: the candidates' weights for
    ``"sample"`` and ``"weighted_majority"`` (e.g. SMC's importance weights; default ``softmax(r / lam)`` over
    the available ones).
    """
    B, N = rewards.shape
    prompts = range(B) if prompts is None else prompts
    if rule == "best":
        r = rewards if available is None else torch.where(available, rewards, -torch.inf)
        return r.argmax(1)
    weights = reward_weights(rewards, lam, available) if weights is None else weights
    if rule == "sample":
        return ctx.rng.categorical(weights, prompts, "pick")
    if rule == "majority":
        weights = torch.ones(B, N, dtype=torch.float64)
    chosen = []
    for b in range(B):
        ks = [i for i in range(N) if available is None or bool(available[b, i])]
        answers = [answer(candidates[b][i]) for i in ks]
        winner, voters = vote(answers, [float(weights[b, i]) for i in ks])
        winners = [ks[v] for v in voters if answers[v] == winner]
        chosen.append(max(winners, key=lambda i: (float(rewards[b, i]), -i)))
    return torch.tensor(chosen, dtype=torch.long)
