"""``qalign``: QAlign, Metropolis-Hastings over whole responses (docs/design.md section 1.3).

Target law over complete responses ``y`` (EOS kept when there is one, so ``|y| >= 1``)::

    P(y) ∝ p(y | x) * exp(r(x, y) / beta)

where ``p`` is the target as it samples: the product of its per-token distributions at the decode's
temperature / top-k / top-p. At a temperature ``T != 1`` that is the tempered (truncated) model times the
reward factor, not the whole-sequence law ``p(y)^(1/T)``; the default ``T = 1`` is the model itself.

Chain step (QAlign / QUEST): pick ``i`` uniformly in ``{0, ..., |y| - 1}``, keep ``y[:i]``, sample a new
suffix until EOS or until the response has ``max_new_tokens`` tokens, and accept the proposal ``y'`` with
probability ``min(1, exp((r(y') - r(y)) / beta) * |y| / |y'|)``. The model factors cancel and ``|y| / |y'|``
is the ratio of the index probabilities of the reverse and forward moves (``i < |y'|`` always holds, so
the reverse move exists); the rule keeps ``P`` invariant exactly. The log-ratio is clipped to +-20,
which only matters when two rewards differ by more than ``20 * beta``.

Caching (local target). The prompts are prefilled once and expanded to ``prompts x chains`` rows; their
next-token logits are kept (``[R, V]``): a proposal at ``i = 0`` starts from them. After a proposal the
cache of a row holds ``prompt + y'[:-1]`` (a sampled last token is never fed). Before the next proposal
at index ``i`` the row must hold ``prompt + y[:i]`` and give the logits after it, so it is rolled back to
the longest prefix of its cached tokens that agrees with ``y[:i]``, at most ``i - 1`` tokens, and the
missing tokens ``y[k:i]`` are fed (one batched ``extend`` for all rows). After an accepted proposal, or a
rejected one when the new index is not past the old one, that is a single token (``y[i-1]``, whose
logits were not kept: keeping ``[R, |y|, V]`` logits would cost more than one batched token); after a
rejected proposal and a later index it is the tokens of ``y`` between the two indices; the rejected
suffix itself is dropped by the rollback, without any copy. The prompt is never fed again.
The reward model caches the prompts likewise (``RewardModel.prefill`` once, rows expanded to the chains)
and scores each step's whole proposals on top of them (``score_branches``): only response tokens.

Remote target. ``target`` may be a ``fastalign.models.remote.RemoteLM``: every row's proposal is then one
``/v1/completions`` request (``prompt + y[:i]`` as token ids, ``max_tokens = max_new_tokens - i``, a
seed); prefix reuse is the server's business (vLLM's automatic prefix caching). When a server fails for
good after the initial samples, the ``RemoteError`` carries the steps completed (``partial``).

Randomness. Chain ``c`` of prompt ``b`` draws from prompt ``b``'s streams only (sub-stream ``c``), so its
trajectory does not depend on the other prompts of the batch. Every generation round gives each row one
seed from its stream (the proposer's ``seeds``) and samples the row's tokens as a one-prompt decode with that
seed would. Locally the seed has 64 bits (``Randomness.local_seeds``), so the rounds of all chains never
share noise (31-bit seeds collide among the ~10^5 rounds of a large run); remotely it is the request's seed,
in vLLM's range ``[0, 2**31 - 1)`` (``Randomness.request_seeds``), which a fastalign server samples with
``Randomness(seed)``. A local and a remote chain with the same decode seed thus draw different tokens of the
same law; from the same request seeds they draw the same tokens.

Final answer (``select``), following the QAlign evaluation code (``qalign/utils/pred.py``): the voting
rules pool the states the chains *visit*: the state after each step ``burn_in..steps`` of every chain (a
rejected step repeats the current state; step 0 is the initial sample), as QAlign's
``join_instances_and_repeat_accepts`` does (it uses ``burnin=0``, the default here). Rules:

* ``"last"``: the final state of the prompt's first chain (every chain's is in ``extra["final_states"]``);
* ``"majority"``: the most frequent answer among the pooled states (ties: the answer reached first);
* ``"weighted_majority"``: the answer with the largest total weight ``softmax(r / beta)`` over the pooled
  states (QAlign's weighted vote);
* ``"best_reward"``: the pooled state with the highest reward;
* ``"mbr"``: minimum Bayes risk: the pooled state with the highest mean ``similarity`` to the pool:
  ``"rouge1"`` (default; unigram F1 over token ids, QAlign's ``rouge`` metric), ``"answer"`` (1 when the
  answers agree) or a callable ``similarity(tokens_a, tokens_b) -> float``.

The voting rules (``fastalign.methods.selection.vote``) return the most recently visited state with the
winning answer. States whose answer is ``None`` (nothing extracted) do not vote unless no state has an answer.
``answer_fn`` is a name of ``fastalign.methods.answers.EXTRACTORS`` (``"last_number"``, ``"boxed"``, ``"option"``;
they read the decoded text and need a tokenizer) or a callable given the decoded text when a tokenizer is known,
else the token list (``selection.answer_extractor``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import torch

from ..errors import InputError
from ..models.causal_lm import right_pad
from ..models.remote import RemoteError, RemoteLM
from .base import Context, MethodResult, Randomness, sample_continuations
from .selection import VOTING_RULES, check_select, vote

SELECT_RULES = ("last", "majority", "weighted_majority", "best_reward", "mbr")
MAX_LOG_RATIO = 20.0


def run(ctx: Context, prompts: list[list[int]], beta: float = 1.0, steps: int = 8, chains: int = 1,
        select: str = "last", answer_fn=None, burn_in: int = 0, similarity="rouge1") -> MethodResult:
    """QAlign chains for every prompt. Rows ``b * chains + c`` are chain ``c`` of prompt ``b``.

    Returns the selected response per prompt; ``extra["state_path"][b][c]`` is chain ``c``'s trajectory, a
    list of ``steps + 1`` entries ``{"step", "index", "proposal", "reward", "accepted", "accept_prob"}``
    (entry 0 is the initial sample: index None, accepted True). When a remote server fails after the
    initial samples, the ``RemoteError`` carries the steps completed as ``partial`` (the same result, with
    ``extra["completed_steps"]`` < ``steps``). ``extra["acceptance_rate"]`` is the share of accepted proposals,
    None when no step was done (``steps=0``: the initial samples only, a valid baseline).
    """
    answer = _check_options(ctx, beta, steps, chains, select, answer_fn, burn_in, similarity)
    R = len(prompts) * chains
    rows = torch.arange(len(prompts)).repeat_interleave(chains).tolist()
    subs = [c for _ in prompts for c in range(chains)]
    proposer = RemoteProposer(ctx.target) if isinstance(ctx.target, RemoteLM) else CachedProposer(ctx.target)

    states = proposer.start(ctx, prompts, chains, proposer.seeds(ctx, rows, subs))
    ctx.reward.prefill(prompts)
    ctx.reward.select_rows(rows)
    rewards = score(ctx, states)
    paths = [[_entry(0, None, y, float(r), True, 1.0)] for y, r in zip(states, rewards)]
    accepted_total, done = 0, 0

    def result() -> MethodResult:  # of the steps done so far
        state_path = [paths[b * chains:(b + 1) * chains] for b in range(len(prompts))]
        chosen = [select_state(p, select, answer, beta, min(burn_in, done), similarity) for p in state_path]
        ctx.stats["qalign_proposals"] = R * done
        ctx.stats["qalign_accepted"] = accepted_total
        extra = {
            "state_path": state_path,
            "final_states": [states[b * chains:(b + 1) * chains] for b in range(len(prompts))],
            "final_rewards": rewards.view(len(prompts), chains),
            "acceptance_rate": accepted_total / (R * done) if done else None,  # no step, no proposal: no rate
            "completed_steps": done,
        }
        return MethodResult(chosen, extra)

    for step in range(1, steps + 1):
        lengths = torch.tensor([len(y) for y in states], dtype=torch.float64)
        u_index = ctx.rng.uniform(rows, 1, "index", subs)[:, 0].double()
        index = torch.minimum((u_index * lengths).long(), lengths.long() - 1).tolist()
        try:
            proposals = proposer.propose(ctx, states, index, proposer.seeds(ctx, rows, subs))
            new_rewards = score(ctx, proposals)
        except RemoteError as e:
            e.partial = result()
            raise
        new_lengths = torch.tensor([len(y) for y in proposals], dtype=torch.float64)
        log_ratio = ((new_rewards.double() - rewards.double()) / beta + lengths.log() - new_lengths.log())
        accept_prob = log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO).exp().clamp(max=1.0)
        accept = (ctx.rng.uniform(rows, 1, "mh", subs)[:, 0].double() < accept_prob).tolist()
        for r in range(R):
            paths[r].append(_entry(step, index[r], proposals[r], float(new_rewards[r]), accept[r],
                                   float(accept_prob[r])))
            if accept[r]:
                states[r] = proposals[r]
        rewards = torch.where(torch.tensor(accept), new_rewards, rewards)
        accepted_total += sum(accept)
        done = step
    return result()


def score(ctx: Context, responses: list[list[int]]) -> torch.Tensor:
    """Rewards ``[R]`` fp32 of each row's whole response, on top of the row's cached prompt."""
    return torch.stack([s[0] for s in ctx.reward.score_branches([[y] for y in responses])])


def _entry(step, index, proposal, reward, accepted, accept_prob) -> dict:
    return {"step": step, "index": index, "proposal": list(proposal), "reward": reward,
            "accepted": bool(accepted), "accept_prob": accept_prob}


# ----------------------------------------------------------------------------------------- proposals
class CachedProposer:
    """Proposals from a local ``CausalLM`` whose cache keeps each row's prompt (see the module docstring)."""

    def __init__(self, lm):
        self.lm = lm

    @staticmethod
    def seeds(ctx: Context, rows: list[int], subs: list[int]) -> list[int]:
        """A generation round's seed per row (prompt ``rows[r]``, chain ``subs[r]``): 64 bits, never shared."""
        return ctx.rng.local_seeds(rows, "request", subs)

    def start(self, ctx: Context, prompts, chains: int, seeds: list[int]) -> list[list[int]]:
        """One ancestral sample per row (``prompts x chains`` rows), from one prefill of the prompts."""
        logits = self.lm.prefill(prompts, ctx.max_new_tokens)
        self.lm.expand(chains)
        self.prompt_logits = logits.repeat_interleave(chains, 0)  # [R, V]: where an i = 0 proposal starts
        samples = sample_continuations(_round(ctx, seeds), self.lm, self.prompt_logits, ctx.max_new_tokens,
                                       range(len(seeds)))
        self.cached = [y[:-1] for y in samples]  # response tokens in each row's cache
        ctx.stats["qalign_refed_tokens"] = 0  # (reported at steps=0 too)
        return samples

    def propose(self, ctx: Context, states, index: list[int], seeds: list[int]) -> list[list[int]]:
        """``states[r][:index[r]]`` plus a fresh suffix, per row."""
        keep = [min(_common_prefix(c, y[:i]), max(i - 1, 0)) for c, y, i in zip(self.cached, states, index)]
        self.lm.rollback(torch.tensor([len(c) - k for c, k in zip(self.cached, keep)], device=self.lm.device))
        feed = [y[k:i] for y, k, i in zip(states, keep, index)]
        logits = self.prompt_logits
        if any(feed):
            tokens, live = right_pad(feed, device=self.lm.device)
            fed = self.lm.extend(tokens, live=live)  # [R, T, V]
            last = fed[torch.arange(len(feed), device=fed.device), (live.sum(1) - 1).clamp(min=0)]
            logits = torch.where(live.any(1)[:, None], last, self.prompt_logits)
        ctx.stats["qalign_refed_tokens"] += sum(map(len, feed))
        budgets = [ctx.max_new_tokens - i for i in index]
        suffixes = sample_continuations(_round(ctx, seeds), self.lm, logits, budgets, range(len(seeds)))
        proposals = [y[:i] + s for y, i, s in zip(states, index, suffixes)]
        self.cached = [y[:-1] for y in proposals]
        return proposals


class RemoteProposer:
    """Proposals from a ``RemoteLM``: one completion request per row with the row's prompt and kept prefix."""

    def __init__(self, lm: RemoteLM):
        self.lm = lm

    @staticmethod
    def seeds(ctx: Context, rows: list[int], subs: list[int]) -> list[int]:
        """A generation round's request seed per row, in vLLM's range ``[0, 2**31 - 1)``."""
        return ctx.rng.request_seeds(rows, "request", subs)

    def start(self, ctx: Context, prompts, chains: int, seeds: list[int]) -> list[list[int]]:
        self.row_prompts = [list(p) for p in prompts for _ in range(chains)]
        return self.lm.complete(self.row_prompts, [ctx.max_new_tokens] * len(self.row_prompts),
                                ctx.temperature, ctx.top_k, ctx.top_p, seeds)

    def propose(self, ctx: Context, states, index: list[int], seeds: list[int]) -> list[list[int]]:
        suffixes = self.lm.complete([p + y[:i] for p, y, i in zip(self.row_prompts, states, index)],
                                    [ctx.max_new_tokens - i for i in index],
                                    ctx.temperature, ctx.top_k, ctx.top_p, seeds)
        return [y[:i] + s for y, i, s in zip(states, index, suffixes)]


def _round(ctx: Context, seeds: list[int]) -> Context:
    """The context of one generation round: row ``r`` draws its tokens as a one-prompt decode given the seed list
    ``[seeds[r]]`` would, i.e. as prompt ``r`` of ``Randomness`` with these prompt seeds (its key is
    ``prompt_key(seeds[r])``: all 64 bits of the seed count)."""
    return replace(ctx, rng=Randomness(seeds, len(seeds)))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# ----------------------------------------------------------------------------------------- selection
def visited_states(path: list[dict]) -> list[tuple[list[int], float]]:
    """The chain's state (tokens, reward) after each step ``0..steps`` of its ``state_path``."""
    out, current = [], None
    for entry in path:
        if entry["accepted"]:
            current = (entry["proposal"], entry["reward"])
        out.append(current)
    return out


def select_state(chains: list[list[dict]], rule: str, answer=None, beta: float = 1.0, burn_in: int = 0,
                 similarity="rouge1") -> list[int]:
    """The response chosen by ``rule`` from one prompt's chain trajectories (see the module docstring).

    ``answer(tokens) -> hashable | None`` extracts the answer of a response (voting rules, ``"answer"`` MBR).
    """
    visited = [visited_states(p) for p in chains]
    if rule == "last":
        return list(visited[0][-1][0])
    pool = [v[t] for t in range(burn_in, len(visited[0])) for v in visited]  # step-major, as QAlign pools
    if rule == "best_reward":
        return list(max(pool, key=lambda s: s[1])[0])
    if rule == "mbr":
        return list(_mbr([s[0] for s in pool], similarity, answer))
    answers = [answer(s[0]) for s in pool]
    if rule == "majority":
        weights = [1.0] * len(pool)
    else:  # weighted_majority
        weights = torch.softmax(torch.tensor([s[1] for s in pool], dtype=torch.float64) / beta, 0).tolist()
    winner, voters = vote(answers, weights)
    return list(next(pool[k][0] for k in reversed(voters) if answers[k] == winner))


def rouge1(a: list[int], b: list[int]) -> float:
    """Unigram F1 between two token-id sequences (multiset overlap)."""
    overlap = sum((Counter(a) & Counter(b)).values())
    return 2.0 * overlap / (len(a) + len(b)) if overlap else 0.0


def _mbr(states: list[list[int]], similarity, answer) -> list[int]:
    """The state maximising the mean similarity to the pool; pooled repeats are weighted, not recomputed."""
    if similarity == "rouge1":
        sim = rouge1
    elif similarity == "answer":
        def sim(a, b):
            x = answer(a)
            return float(x is not None and x == answer(b))
    else:
        sim = similarity
    counts = Counter(tuple(s) for s in states)
    unique = list(counts)  # first-visit order
    gains = [sum(counts[v] * sim(list(u), list(v)) for v in unique) for u in unique]
    return list(unique[max(range(len(unique)), key=gains.__getitem__)])


def _check_options(ctx, beta, steps, chains, select, answer_fn, burn_in, similarity):
    """Validate the options; returns the answer extractor over token lists (None when not needed)."""
    if not beta > 0:
        raise InputError(f"beta must be > 0, got {beta}")
    if not isinstance(steps, int) or steps < 0:
        raise InputError(f"steps must be a non-negative integer, got {steps!r}")
    if not isinstance(chains, int) or chains < 1:
        raise InputError(f"chains must be a positive integer, got {chains!r}")
    if not isinstance(burn_in, int) or not 0 <= burn_in <= steps:
        raise InputError(f"burn_in must be an integer in [0, steps={steps}], got {burn_in!r}")
    if not (similarity in ("rouge1", "answer") or callable(similarity)):
        raise InputError(f"similarity must be 'rouge1', 'answer' or a callable, got {similarity!r}")
    needs_answer = select in VOTING_RULES or (select == "mbr" and similarity == "answer")
    return check_select(ctx, select, answer_fn, beta, SELECT_RULES, needs_answer)
