"""``sd`` and ``sss``: speculative sampling and reward-shifted speculative sampling (docs/design.md 1.2), chain or tree.

Every round, per row::

    draft K tokens x_1..x_K from q_r (chain), or a token tree (tree="sampled" | "topk")
    score them with the target (and the ref, for sss) in ONE forward pass each
    verify (kernels.spec_verify / kernels.tree_verify): accept a prefix (a root-to-node path) and emit one token
    keep the accepted tokens in every cache (chain: rollback; tree: keep_new of the path), drop the rest

The distribution a round's tokens follow is ``t = trunc(p)`` (``sd``) or ``t = trunc(pi)``,
``pi = normalize(p * (q_r / q) ** lam)`` (``sss``, ``variant="exact"``), where ``p, q_r, q`` are the target's,
the (aligned) draft's and the reference draft's tempered distributions and ``trunc`` is top-k / top-p
(docs/design.md section 1: the tilt uses the untruncated distributions, the truncation applies to what is
emitted). The draft proposes from ``trunc(q_r)``, and every acceptance ratio and residual uses exactly that
proposal. ``lam=0`` is SD with the aligned draft (``pi = p``); so is ``ref=None``, with ``allow_no_ref=True``.

``variant="paper"`` is the rule of the published SSS code: accept against ``p`` and emit from ``pi`` (not the
residual), at full acceptance emit from ``pi`` unless ``bonus_on_full_accept=False`` (the published behaviour:
emit nothing). It does **not** follow ``pi`` exactly: it accepts the draft's tokens at the rate of SD, so
when ``q_r`` is close to ``p`` it mostly samples ``p``. Measured by ``test_paper_variant_distance_from_pi``
(vocabulary 5, 3 new tokens, K=2, lam=1, 4000 draws, exact laws enumerated; ``exact`` is at the noise level,
<= 0.01, on both):

=====================================================  =================  ============  ===============
models                                                  TV(p, pi) (exact)  paper, bonus  paper, no bonus
=====================================================  =================  ============  ===============
draft = perturbed target (per-token TV(p, q_r) 0.11)    0.32               0.29          0.29
draft independent of the target (TV(p, q_r) 0.72)       0.92               0.06          0.17
=====================================================  =================  ============  ===============

Caches. A model's cache holds the prompt and every emitted token except its *tail*: the tokens emitted last
round that it has not been fed yet (the target and ref: the round's emitted token ``z``; the draft: ``z`` and,
after a full acceptance, the last draft token if the draft did not feed it). The tail is fed in front of the
next round's first forward pass, so no token is ever fed twice and no prefix is recomputed. A row whose tail
is empty (``bonus_on_full_accept=False`` after a full acceptance) keeps the logits of its last position.

Length cap and EOS. Row ``b`` with ``r_b`` tokens left drafts and verifies at most ``r_b - 1`` tokens (``r_b``
without the bonus): a chain through the kernel's ``num_valid``, a tree by its depth (its first ``num_nodes``
nodes); the tokens drafted past a row's own depth in a deeper batch are fed as dead slots (``live=False``:
never attended to, no position used), so no row ever runs past its context, a round never emits more than
``r_b`` tokens and the law at the cap is exact. Tokens after an EOS are discarded; finished rows leave the
batch (``select_rows``).

Randomness. Round ``n`` of prompt ``b`` draws from prompt ``b``'s streams only, at step ``n``: its draft tokens
(purpose ``draft``, sub-stream = chain position or tree node), its acceptance uniforms (``accept``) and its
emission race (``race``); rows join at the start and stay until they finish, so the round counts agree and a
prompt's tokens do not depend on its batch.

Adaptive length (chains). ``num_draft_tokens="auto"``: row ``b``'s K for round ``n`` is chosen by
``AdaptiveLength`` from row ``b``'s own rounds before ``n`` (the acceptance probabilities of its drafted
positions on the emitted path, ``kernels.acceptance_probability``, the recent ones weighing most) and the
costs of a round (``RoundCosts``, in target calls of one token): K maximises the expected tokens per unit of time,
``E[1 + a + ... + a^K] / (T(K + 1) + K c)`` (``sss``: ``/ (T(K + 1) + c + (K + 1) c)``, the ref and the draft's
bonus call counted), the expectation over the row's Beta posterior of its acceptance ``a``, ``c`` the cost of a
draft call and ``T(w)`` that of a target call of ``w`` tokens. The costs are fixed for the decode call:
``"auto:C"`` gives ``c = C`` and ``T = 1``; ``"auto"`` measures them (``measure_round_costs``: the draft and the
target at every width from 1 to ``MAX_AUTO + 1`` = 9 tokens, on the prefilled caches; once per process, engine
pair and batch size, and again when a call has room for wider target calls than were measured; later calls
reuse them, and skip the draft's prefill when ``sd`` will not draft). ``T`` matters and is not even
monotone, so every width is measured: on the 82M target of ``bench/bench_engine.py`` at batch 1, with BLAS a
call of 2 or 3 tokens cost 1.7–1.8 one-token calls and one of 5 tokens 1.5 (the matrix
library picks its kernel by shape); with fastalign's native loop (``fastalign.models.cpu_linear``) 2 tokens cost
1.0–1.3 calls, and 9 tokens 3.0 with the loop's dot products alone, 1.8–2.1 since its column loop takes more than
four rows (``bench/results/adaptive_cpu_100m.md``, over runs).
The law stays exact: a round's K is fixed before its draws, and any K (0 included)
gives a round that follows ``t``. ``sd`` goes down to K=0: a row at K=0 draws its token from ``trunc(p)`` with
its stream ``token`` at step ``n`` (no verification); a round where no row drafts calls the target alone and
the draft catches up on its next call (``_Stream.defer``). When a draft call costs half a target call or more
(``c >= 0.5``: ``AdaptiveLength.drafts``) ``sd`` is the ``sample`` method, token for token, without the
round machinery (on the toy world a round costs about 2.2 target steps before any drafting: rounds at K=0
would lose to ``sample``); the price: a pair with ``0.5 <= c < 1`` and a high acceptance never drafts. ``sss``
goes down to K=1: ``pi`` needs the draft's and the ref's logits at every emitted position, so the draft runs
every round; at K=1 a round costs one target call of 2 tokens, one ref call and 2 draft calls and emits 1 or 2
tokens. A tuple ``num_draft_tokens=(k0, k1, ...)``
forces K of round ``n`` to ``k[n % len]`` (tests; 0 allowed for ``sd``). Reproducibility: with ``"auto:C"`` or
a tuple a prompt's tokens depend on its seed only (not on its batch: K is per row); with ``"auto"`` they
depend also on the measured costs (timing), the same for every row of the call.

Defaults. ``num_draft_tokens=4``: the draft length K=4 of Chen et al. 2023 ("Accelerating large language model
decoding with speculative sampling"). ``branching=(2, 2, 1, 1)`` (trees): depth 4 like the chain, two children
at the first two levels where a rejection is likeliest (14 nodes); a choice of this library, not from a paper.

``ctx.stats``: ``rounds`` (verification passes), ``draft_tokens_proposed`` (drafted tokens verified, summed
over rows; tree nodes for trees), ``draft_tokens_accepted`` (those in the output: an EOS drops the ones
accepted after it), ``acceptance_rate`` (accepted / proposed),
``accepted_per_target_call`` (accepted draft tokens per row and verification pass: the mean number of tokens a
target call saves; each pass also emits one token of its own). With ``"auto"`` or a tuple (chains) also
``mean_draft_tokens`` (K per row and round, the cap included), ``row_rounds_k0`` (row-rounds at K=0),
``rounds_without_draft`` (rounds, or sampling steps, where the draft was not called) and, with ``"auto"``,
``draft_cost`` (``c``) and ``target_costs`` (``T(1), T(2), ...``). The target and draft call counters include
``measure_round_costs``'s calls.
"""

from __future__ import annotations

import itertools
import operator
import time
import weakref
from typing import NamedTuple

import torch

from ..kernels import acceptance_probability, spec_verify, tree_verify
from ..errors import InputError
from .base import Context, MethodResult, sample_continuations

NUM_DRAFT_TOKENS = 4
BRANCHING = (2, 2, 1, 1)
TREES = (None, "sampled", "topk")
VARIANTS = ("exact", "paper")


class _Stream:
    """One model's side of the loop (target, draft or ref) over the live rows.

    The cache holds each row's prefix minus ``tail [B, W]`` (left-padded tokens not fed yet, ``tail_live``
    marks them); ``logits [B, V]`` are the next-token logits of rows whose tail is empty. Within a round,
    ``round_logits`` collects the logits of the round's positions: position 0 after the prefix, then one
    per fed draft token (chain) or tree node, in feeding order.
    """

    def __init__(self, lm, logits: torch.Tensor):
        self.lm = lm
        self.logits = logits
        B, dev = logits.shape[0], logits.device
        self.tail = torch.zeros(B, 0, dtype=torch.long, device=dev)
        self.tail_live = torch.zeros(B, 0, dtype=torch.bool, device=dev)
        self.round_logits: list[torch.Tensor] = []
        self.fed = 0  # draft tokens / tree nodes fed this round (columns)
        self.fed_live = torch.zeros(B, dtype=torch.long, device=dev)  # of which live, per row
        self.tail_fed = 0  # width of the tail fed this round (written just before the round's tokens)

    def feed(self, tokens: torch.Tensor | None = None, parents: torch.Tensor | None = None,
             live: torch.Tensor | None = None) -> torch.Tensor:
        """Feed ``tokens [B, T]`` (plus the tail on the round's first call); returns their logits ``[B, T, V]``
        (with position 0 in front on the first call).

        ``parents [B, P + T]`` makes the tokens tree nodes: it indexes the round's nodes (``P`` fed before),
        ``-1`` for a root (hanging off the prefix). ``live [B, T]`` (default all) marks the tokens a row really
        feeds; the others are dead slots (a row's live tokens of a round are a prefix of its nodes).
        """
        B, dev = self.logits.shape[0], self.logits.device
        tokens = torch.zeros(B, 0, dtype=torch.long, device=dev) if tokens is None else tokens
        live = torch.ones_like(tokens, dtype=torch.bool) if live is None else live
        first = not self.round_logits
        W = self.tail.shape[1] if first else 0
        if W:
            T = tokens.shape[1]
            block = torch.cat([self.tail, tokens], 1)
            tokens_live = live
            live = torch.cat([self.tail_live, tokens_live], 1)
            if parents is not None:
                assert parents.shape[1] == T, "a tail is fed in front of a whole tree only"
                parents = _chain_then_tree(self.tail_live, parents)
            out = self.lm.extend(block, parents=parents, live=live)
            has_tail = self.tail_live[:, -1]
            head = torch.where(has_tail[:, None], out[:, W - 1], self.logits)
            new = torch.cat([head[:, None], out[:, W:]], 1)
            live = tokens_live
        elif tokens.shape[1]:
            out = self.lm.extend(tokens, parents=parents, live=live)
            new = torch.cat([self.logits[:, None], out], 1) if first else out
        else:
            new = self.logits[:, None]
        self.tail_fed = W if first else self.tail_fed
        self.tail = self.tail[:, :0]
        self.tail_live = self.tail_live[:, :0]
        self.fed += tokens.shape[1]
        self.fed_live = (0 if first else self.fed_live) + live.sum(1)  # a prefix of the round's nodes
        self.round_logits.append(new)
        return new

    def position_logits(self) -> torch.Tensor:
        """The round's logits ``[B, 1 + fed, V]``: position 0, then one per fed token / node."""
        return torch.cat(self.round_logits, 1)

    def advance(self, nodes: torch.Tensor, path: torch.Tensor, accepted: torch.Tensor,
                next_token: torch.Tensor, tree: bool) -> None:
        """Keep the accepted path of the round and make its unfed tokens plus ``next_token`` the new tail.

        ``nodes [B, N]``: the round's draft tokens (chain) or tree nodes; ``path [B, D]``: accepted node
        indices in order, ``-1`` padded; ``accepted [B]``: path lengths; ``next_token [B]``: the emitted token,
        ``-1`` for none.
        """
        B, dev = nodes.shape[0], nodes.device
        rows = torch.arange(B, device=dev)
        logits = self.position_logits()
        fed_live = self.fed_live
        kept = (path >= 0) & (path < fed_live[:, None])  # accepted nodes already in the cache
        if tree:
            in_path = torch.zeros(B, self.fed + 1, dtype=torch.bool, device=dev)
            in_path.scatter_(1, torch.where(kept, path, self.fed), True)
            ones = torch.ones(B, self.tail_fed, dtype=torch.bool, device=dev)
            self.lm.keep_new(torch.cat([ones, in_path[:, : self.fed]], 1))
        elif self.fed:
            self.lm.rollback(fed_live - kept.sum(1))
        # at most one accepted node is unfed: the last one (a draft's last chain token or a leaf)
        last = path.gather(1, (accepted - 1).clamp(min=0)[:, None])[:, 0]
        unfed = (accepted > 0) & (last >= fed_live)
        unfed_token = nodes.gather(1, last.clamp(min=0)[:, None])[:, 0]
        has_next = next_token >= 0
        self.tail = torch.stack([unfed_token, torch.where(has_next, next_token, unfed_token)], 1)
        self.tail_live = torch.stack([unfed & has_next, unfed | has_next], 1)
        at = torch.where(accepted > 0, last + 1, 0)  # the position after the accepted path
        self.logits = logits[rows, at.clamp(max=logits.shape[1] - 1)]
        self.round_logits, self.fed, self.tail_fed = [], 0, 0
        self._trim()

    def defer(self, tokens: torch.Tensor) -> None:
        """A round this model sat out (``sd`` at K=0 in every row): append the emitted ``tokens [B]`` to its
        tail, fed in front of its next call (one forward pass catches it up)."""
        self.tail = torch.cat([self.tail, tokens[:, None]], 1)
        self.tail_live = torch.cat([self.tail_live, (tokens >= 0)[:, None]], 1)
        self._trim()

    def _trim(self) -> None:
        while self.tail.shape[1] and not self.tail_live[:, 0].any():
            self.tail, self.tail_live = self.tail[:, 1:], self.tail_live[:, 1:]

    def select_rows(self, rows: torch.Tensor) -> None:
        self.lm.select_rows(rows)
        self.logits = self.logits[rows]
        self.fed_live = self.fed_live[rows]
        self.tail, self.tail_live = self.tail[rows], self.tail_live[rows]
        self._trim()


# the largest K "auto" chooses. On the 82M/13M pair of bench_engine a cap of 12 gained 1.5% over 8 replayed on
# recorded acceptance, its target calls past 9 tokens costed as 9 (bench/results/adaptive_replay_cpu_100m.md), and
# nothing in real runs over three sets of seeds (docs/usage.md)
MAX_AUTO = 8
PRIOR = (1.0, 1.0)  # Beta prior of a row's acceptance (accepted, rejected) before its first round: uniform
# what an observation of a row's acceptance weighs after each later one: the acceptance comes in runs (on the 82M
# pair of bench_engine, drafted positions with probability ~0.99 for a dozen tokens, then ~0.65), so the recent
# positions are the ones that predict the next round
MEMORY = 0.8
PROBE_GAP = 4  # sd: a row at K=0 that could pay probes (at its best K >= 1) after this many rounds, then twice as many
_COSTS = weakref.WeakKeyDictionary()  # measure_round_costs's results: target -> draft -> {batch size: RoundCosts}


class RoundCosts(NamedTuple):
    """What a chain round costs, in units of one target call of one token per row: ``draft``, one draft call
    (``c``), and ``target[w - 1]``, one target call of ``w`` tokens per row (``target[0] = 1``; beyond the
    widths measured, the last one). A round at ``K >= 1`` feeds the target ``K + 1`` tokens (the last round's
    token in front of the drafts) and calls the draft ``K`` times."""

    draft: float
    target: tuple[float, ...] = (1.0,)

    def target_at(self, width: int) -> float:
        return self.target[min(width, len(self.target)) - 1]

    def chain_round(self, k: int, extra_draft_calls: int = 0) -> float:
        """A round at ``K = k``: the target at ``k + 1`` tokens and ``k`` draft calls, plus ``extra_draft_calls``
        draft-priced calls (``sss``: the ref's and the draft's bonus call); ``k = 0`` (``sd``) is one target call."""
        return 1.0 if k == 0 else self.target_at(k + 1) + (k + extra_draft_calls) * self.draft


def expected_tokens(accepted: float, rejected: float, k: int) -> float:
    """Tokens a chain round of ``k`` drafted tokens emits on average (the accepted prefix plus the emitted
    token), each draft token accepted with probability ``alpha`` independently and ``alpha`` drawn from the
    row's posterior ``Beta(accepted, rejected)``: ``sum_{i=0..k} E[alpha^i]``, with
    ``E[alpha^i] = prod_{j<i} (accepted + j) / (accepted + rejected + j)``."""
    total, moment = 1.0, 1.0
    for j in range(k):
        moment *= (accepted + j) / (accepted + rejected + j)
        total += moment
    return total


class AdaptiveLength:
    """``num_draft_tokens="auto"``: each row's K for the next round, from that row's own past rounds.

    Row ``b``'s acceptance is ``alpha_b ~ Beta(a_b, r_b)`` (the geometric model of a chain round). Its
    pseudo-counts start at ``PRIOR`` (uniform) and learn from the acceptance probability ``beta``
    (``kernels.acceptance_probability``: known from the round's logits, where a count of accepted tokens would
    tell one noisy outcome per position) of each drafted position on the row's emitted path, the accepted ones
    and the first rejected (``_append``). The positions drafted after a rejection are left out: their contexts
    hold the draft's own rejected tokens and are never emitted, and their ``beta`` is lower (on the 82M pair
    of ``bench/bench_engine.py`` at K=8, 0.80 against 0.89 on the path), which pulled K down.
    ``a_b += beta``, ``r_b += 1 - beta``, every earlier observation (the prior included) first
    weighted down by ``MEMORY``, so that the estimate follows the runs the acceptance comes in. K is the ``k``
    in ``[floor, max_k]`` (default ``MAX_AUTO``) that maximises expected tokens per unit of time,
    ``expected_tokens(a_b, r_b, k) / cost(k)``, where ``cost(k)`` is what the round costs in target
    calls (``RoundCosts``: the target at ``k + 1`` tokens, ``k`` draft calls, plus ``ref_calls`` and
    ``bonus_draft_call`` draft-priced calls for ``sss``); ``k = 0`` (``sd`` only) costs ``1``: plain sampling
    from the target. A row's first round drafts (``k >= 1``): the prior alone says little, and the first round
    is what it learns from. A row at 0 learns nothing, so while drafting could pay at all (``2 > 1 + c``) it
    probes after ``PROBE_GAP`` rounds at 0, then after twice as many, and so on: a round at the best ``k >= 1``
    (longer probes learn more per round than K=1 probes, which left rows at 0 after an early rejection).
    Everything here is a function of the row's own history and the costs: never of the round's draws, never of
    other rows.
    """

    def __init__(self, n_prompts: int, costs: RoundCosts, floor: int, ref_calls: int = 0,
                 bonus_draft_call: int = 0, max_k: int = MAX_AUTO):
        self.costs, self.floor, self.max_k = costs, floor, max_k
        self.round_cost = [costs.chain_round(k, ref_calls + bonus_draft_call) for k in range(max_k + 1)]
        self.accepted = [PRIOR[0]] * n_prompts
        self.rejected = [PRIOR[1]] * n_prompts
        self.rounds = [0] * n_prompts
        self.idle = [0] * n_prompts  # rounds at K=0 since the row last drafted
        self.gap = [PROBE_GAP] * n_prompts
        self.can_pay = 2 > 1 + costs.draft  # K=1 at full acceptance beats plain sampling

    def drafts(self) -> bool:
        """Whether ``sd`` drafts at all: iff a draft call costs less than half a target call (``c < 0.5``: some
        K pays at acceptance 0.5 when a round costs its model calls alone, ``1 + K c``). If not, ``sd`` runs the
        ``sample`` method: where calls are that close in cost the rest of a round (verification, bookkeeping)
        decides, and on the toy world a round costs about 2.2 target steps before any drafting."""
        return self.costs.draft < 0.5

    def best(self, accepted: float, rejected: float, floor: int | None = None) -> int:
        """The K of a row with ``accepted`` / ``rejected`` pseudo-counts (prior included), at least ``floor``."""
        floor = self.floor if floor is None else floor
        rates = {k: expected_tokens(accepted, rejected, k) / self.round_cost[k] for k in range(floor, self.max_k + 1)}
        return max(rates, key=lambda k: (rates[k], -k))  # ties: the shorter chain

    def choose(self, rows: list[int]) -> list[int]:
        ks = []
        for r in rows:
            k = self.best(self.accepted[r], self.rejected[r], max(self.floor, int(self.rounds[r] == 0)))
            if k == 0 and self.can_pay and self.idle[r] >= self.gap[r]:  # a probe: the K it would draft
                k, self.gap[r] = self.best(self.accepted[r], self.rejected[r], 1), 2 * self.gap[r]
            ks.append(k)
        return ks

    def update(self, rows: list[int], betas: list[list[float]]) -> None:
        """Row ``rows[i]``'s drafted positions on its emitted path this round had acceptance probabilities
        ``betas[i]``, in chain order (``[]``: it sampled from the target)."""
        for r, row_betas in zip(rows, betas):
            self.rounds[r] += 1
            self.idle[r] = 0 if row_betas else self.idle[r] + 1
            for beta in row_betas:
                self.accepted[r] = MEMORY * self.accepted[r] + beta
                self.rejected[r] = MEMORY * self.rejected[r] + (1.0 - beta)


@torch.no_grad()
def measure_round_costs(target, draft, batch: int, room: int, repeats: int = 5) -> RoundCosts:
    """``RoundCosts`` measured on the just-prefilled caches (tokens are written, then rolled back: the caches are
    as before), once per process per (target, draft, batch), and again when a decode has room for wider calls than
    were measured: a one-token call of the draft, and target calls of every width from 1 to ``MAX_AUTO + 1``
    tokens (at most ``room``, the tokens the caches have room for); each the fastest of ``repeats`` after a
    warm-up call. The calls are interleaved (every width once per repeat), so a slow moment of a shared machine
    slows all of them a little rather than one of them, which would skew the ratios that choose K."""
    known = _COSTS.setdefault(target, weakref.WeakKeyDictionary()).setdefault(draft, {})
    if measured_costs(target, draft, batch, room) is None:
        calls = [(draft, 1)] + [(target, w) for w in range(1, min(MAX_AUTO + 1, room) + 1)]
        for lm, width in calls:  # warm-up (a first call of a shape may compile it)
            _call_time(lm, batch, width)
        times = [float("inf")] * len(calls)
        for _ in range(repeats):
            times = [min(t, _call_time(lm, batch, width)) for t, (lm, width) in zip(times, calls)]
        known[batch] = RoundCosts(times[0] / times[1], tuple(t / times[1] for t in times[1:]))
    return known[batch]


def measured_costs(target, draft, batch: int, room: int) -> RoundCosts | None:
    """The ``RoundCosts`` measured before in this process for (target, draft, batch), if they hold every target
    width a decode with ``room`` tokens may call (a first decode with less room measured fewer); else None."""
    costs = _COSTS.get(target, {}).get(draft, {}).get(batch)
    return costs if costs is not None and len(costs.target) >= min(MAX_AUTO + 1, room) else None


def _call_time(lm, batch: int, width: int) -> float:
    """The time of one call of ``lm`` on ``width`` tokens per row (written, then rolled back)."""
    tokens = torch.zeros(batch, width, dtype=torch.long, device=lm.device)
    if lm.device.type == "cuda":
        torch.cuda.synchronize(lm.device)
    start = time.perf_counter()
    lm.extend(tokens)
    if lm.device.type == "cuda":
        torch.cuda.synchronize(lm.device)
    elapsed = time.perf_counter() - start
    lm.rollback(width)
    return elapsed


def _chain_then_tree(tail_live: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
    """Parents of a block ``tail + nodes``: the (left-padded) tail is a chain, the tree's roots hang off its
    last token (off the prefix when a row's tail is empty).  ``[B, W + N]``."""
    B, W = tail_live.shape
    idx = torch.arange(W, device=parents.device)
    prev_live = torch.cat([torch.zeros(B, 1, dtype=torch.bool, device=parents.device), tail_live[:, :-1]], 1)
    tail_parents = torch.where(prev_live & tail_live, idx - 1, -1).expand(B, W)
    root_parent = torch.where(tail_live[:, -1], W - 1, -1)[:, None]
    return torch.cat([tail_parents, torch.where(parents >= 0, parents + W, root_parent)], 1)


def run_sd(ctx: Context, prompts: list[list[int]], num_draft_tokens: int | str | tuple[int, ...] = NUM_DRAFT_TOKENS,
           tree: str | None = None, branching: tuple[int, ...] | None = None) -> MethodResult:
    """Speculative sampling: the output follows the target exactly. ``num_draft_tokens`` is the chain's K
    (``"auto"``: chosen per row and round, 0 = plain target sampling, from the cost of a draft call relative
    to a target call measured before decoding; ``"auto:C"``: the same with that cost ratio fixed to ``C``; a
    tuple: K of round ``n`` is ``K[n % len(K)]``; module docstring, Adaptive length).
    ``tree="sampled" | "topk"`` drafts a tree with ``branching`` children per node at each depth instead."""
    return _speculate(ctx, prompts, "sd", None, num_draft_tokens, tree, branching,
                      lam=0.0, max_log_ratio=None, bonus=True)


def run_sss(ctx: Context, prompts: list[list[int]], num_draft_tokens: int | str | tuple[int, ...] = NUM_DRAFT_TOKENS,
            tree: str | None = None, branching: tuple[int, ...] | None = None, variant: str = "exact",
            lam: float = 1.0, max_log_ratio: float | None = None,
            bonus_on_full_accept: bool = True, allow_no_ref: bool = False) -> MethodResult:
    """Reward-shifted speculative sampling towards ``pi = normalize(p * (q_r / q) ** lam)``.

    ``sss`` needs ``ref`` (the draft before alignment); without it there is no reward tilt, and it runs SD with
    the aligned draft only when asked, ``allow_no_ref=True`` (a baseline of its own), never silently.

    ``max_log_ratio`` (default None: no clip) clips ``log q_r - log q`` to ``[-M, M]`` before the tilt, which
    bounds how far one token's probability can move (``pi / p <= e^(2 |lam| M)``); where exactly one of ``q_r``,
    ``q`` is zero (a ``-inf`` logit: the tilt uses the untruncated distributions, so top-k / top-p never zero
    them) the log-ratio is taken as ``+-M`` (``+-20`` without a clip).

    ``num_draft_tokens="auto"`` / ``"auto:C"`` / a tuple as for ``sd``, but K never goes below 1 (module
    docstring, Adaptive length).
    """
    if variant not in VARIANTS:
        raise InputError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if max_log_ratio is not None and max_log_ratio <= 0:
        raise InputError(f"max_log_ratio must be > 0 (or None), got {max_log_ratio}")
    if ctx.ref is None and not allow_no_ref:
        raise InputError("sss needs ref=... (the draft before alignment) for its reward tilt; pass "
                         "allow_no_ref=True to run SD with the aligned draft instead")
    tilt = ctx.ref is not None and lam != 0
    mode = f"sss_{variant}" if tilt else "sd"
    return _speculate(ctx, prompts, mode, ctx.ref if tilt else None, num_draft_tokens, tree, branching,
                      lam=float(lam), max_log_ratio=max_log_ratio, bonus=bool(bonus_on_full_accept))


def _speculate(ctx: Context, prompts, mode: str, ref, K, tree, branching, lam: float,
               max_log_ratio, bonus: bool) -> MethodResult:
    floor = 0 if ref is None else 1  # sd may stop drafting; sss's law needs the draft at every position
    fixed = isinstance(K, int) and not isinstance(K, bool)
    costs = None  # "auto:C": given
    if fixed and K < 1:
        raise InputError(f"num_draft_tokens must be a positive integer, 'auto' or a tuple, got {K!r}")
    if isinstance(K, (tuple, list)):
        if not K or any(not isinstance(k, int) or isinstance(k, bool) or k < floor for k in K):
            raise InputError(f"a num_draft_tokens schedule must be a non-empty tuple of integers >= {floor} "
                             f"({'sd' if floor == 0 else 'sss'}), got {K!r}")
    elif not fixed:
        K, costs = _auto_option(K)
    if not fixed and tree is not None:
        raise InputError("num_draft_tokens='auto' or a schedule is for chains (tree=None)")
    if tree not in TREES:
        raise InputError(f"tree must be one of {TREES}, got {tree!r}")
    if tree is not None:
        branching = tuple(BRANCHING if branching is None else branching)
        if not branching or any(not isinstance(b, int) or b < 1 for b in branching):
            raise InputError(f"branching must be a non-empty tuple of positive integers, got {branching!r}")
        if tree == "topk" and max(branching) > ctx.target.vocab_size:
            raise InputError(f"branching {branching} asks for more children than the vocabulary has")
    elif branching is not None:
        raise InputError("branching is an option of tree='sampled' | 'topk'")

    M = ctx.max_new_tokens
    if K == "auto" and costs is None:  # measured before in this process: the draft need not be prefilled
        costs = measured_costs(ctx.target, ctx.draft, len(prompts), M)
    if K == "auto" and ref is None and costs is not None and not AdaptiveLength(1, costs, 0).drafts():
        return _sample_instead(ctx, ctx.target.prefill(prompts, M), costs)  # the draft is never used
    target = _Stream(ctx.target, ctx.target.prefill(prompts, M))
    draft = _Stream(ctx.draft, ctx.draft.prefill(prompts, M))
    streams = [target, draft]
    if ref is not None:
        streams.append(_Stream(ref, ref.prefill(prompts, M)))
    # the draft's logits at the bonus position are needed when pi (not p) is drawn there
    draft_at_bonus = ref is not None and bonus
    # validate=False: the model layer has checked every logits tensor, and the shapes are built here
    verify = dict(mode=mode, lam=lam, temperature=ctx.temperature, top_k=ctx.top_k, top_p=ctx.top_p,
                  max_log_ratio=max_log_ratio, bonus=bonus, validate=False)

    dev = ctx.target.device
    out: list[list[int]] = [[] for _ in prompts]
    rows = list(range(len(prompts)))  # original index of each live row (host bookkeeping: no syncs)
    # a tree's depth is its branching's length (num_draft_tokens is K of a chain); a fixed K caps a chain's rounds
    cap = len(branching) if tree is not None else K if fixed else None
    schedule = None
    if K == "auto":
        if costs is None:
            costs = measure_round_costs(ctx.target, ctx.draft, len(prompts), M)
        schedule = AdaptiveLength(len(prompts), costs, floor, ref_calls=int(ref is not None),
                                  bonus_draft_call=int(draft_at_bonus))
        if floor == 0 and not schedule.drafts():  # K=0 for every row and round: sd is the sample method
            return _sample_instead(ctx, target.logits, costs)
    stats = dict(rounds=0, row_rounds=0, proposed=0, k0=0, no_draft=0)
    accepted_total = 0  # accepted draft tokens that reach the output (none after an EOS)
    while rows:
        left = [M - len(out[r]) for r in rows]
        step = stats["rounds"]  # every live row's own round count: rows join at the start and stay to the end
        # the round's K per row: fixed, from the schedule, or from the row's own past (never this round's draws)
        ks = (schedule.choose(rows) if schedule is not None else [K[step % len(K)]] * len(rows)
              if cap is None else [cap] * len(rows))
        # tokens a row may draft and verify: its emitted tokens (accepted + bonus) must fit in what is left
        valid = [min(n - int(bonus), k) for n, k in zip(left, ks)]
        depth = max(1, max(valid))
        stats["k0"] += valid.count(0)
        betas = None  # [B, depth]: the drafted positions' acceptance probabilities ("auto" learns those on the path)
        if tree is None and not fixed and max(valid) == 0 and ref is None:  # sd, no row drafts: p alone
            nodes, accepted, next_token, path = _target_round(ctx, target, rows, step)
            streams[1].defer(next_token)
            stats["no_draft"] += 1
            for s in streams[:1]:
                s.advance(nodes, path, accepted, next_token, False)
        elif tree is None:
            nodes, accepted, next_token, path, betas = _chain_round(
                ctx, streams, ref, depth, valid, draft_at_bonus, verify, rows, step,
                plain=not fixed and ref is None, learn=schedule is not None)
            stats["proposed"] += sum(valid)
        else:
            nodes, accepted, next_token, path, n_nodes = _tree_round(ctx, streams, ref, tree, branching[:depth],
                                                                     valid, draft_at_bonus, verify, rows, step)
            stats["proposed"] += n_nodes
        if not (tree is None and not fixed and max(valid) == 0 and ref is None):
            for s in streams:
                s.advance(nodes, path, accepted, next_token, tree is not None)

        stats["rounds"] += 1
        stats["row_rounds"] += len(rows)
        emitted = torch.cat([nodes.gather(1, path.clamp(min=0)), next_token[:, None]], 1)
        emitted.scatter_(1, accepted[:, None], next_token[:, None])  # the emitted token follows the path
        done, drafted, kept = _append(ctx, out, rows, emitted, accepted, left, betas)
        accepted_total += kept
        if schedule is not None:
            schedule.update(rows, [drafted[i][:v] if v else [] for i, v in enumerate(valid)])
        if any(done):
            keep = [i for i, d in enumerate(done) if not d]
            rows = [rows[i] for i in keep]
            if rows:
                for s in streams:
                    s.select_rows(torch.tensor(keep, device=dev))

    proposed = stats["proposed"]
    ctx.stats.update(
        rounds=stats["rounds"],
        draft_tokens_proposed=proposed,
        draft_tokens_accepted=accepted_total,
        acceptance_rate=accepted_total / proposed if proposed else 0.0,
        accepted_per_target_call=accepted_total / stats["row_rounds"] if stats["row_rounds"] else 0.0,
    )
    if not fixed:  # (fixed K: the recorded stats of tests/test_behaviour.py stay as they are)
        ctx.stats.update(mean_draft_tokens=proposed / stats["row_rounds"] if stats["row_rounds"] else 0.0,
                         row_rounds_k0=stats["k0"], rounds_without_draft=stats["no_draft"])
    if schedule is not None:
        ctx.stats.update(_cost_stats(schedule.costs))
    return MethodResult(out)


def _sample_instead(ctx: Context, logits: torch.Tensor, costs: RoundCosts) -> MethodResult:
    """``sd`` with ``"auto"`` where drafting is not tried (``AdaptiveLength.drafts``: ``c >= 0.5``): the ``sample``
    method from the target's prefilled cache (``logits [B, V]``), token for token."""
    out = sample_continuations(ctx, ctx.target, logits, ctx.max_new_tokens, list(range(logits.shape[0])))
    n = [len(o) for o in out]
    ctx.stats.update(rounds=max(n, default=0), draft_tokens_proposed=0, draft_tokens_accepted=0,
                     acceptance_rate=0.0, accepted_per_target_call=0.0, mean_draft_tokens=0.0,
                     row_rounds_k0=sum(n), rounds_without_draft=max(n, default=0), **_cost_stats(costs))
    return MethodResult(out)


def _cost_stats(costs: RoundCosts) -> dict:
    return dict(draft_cost=costs.draft, target_costs=list(costs.target))


def _target_round(ctx: Context, target: _Stream, rows: list[int], step: int):
    """``sd`` when no row drafts (K=0 everywhere): the target alone, one call (its tail), and the emitted token
    drawn from ``trunc(p)`` by ``_plain_token``, as a K=0 row of a mixed round draws it."""
    p = target.feed()[:, 0]  # [B, V]
    B, dev = p.shape[0], p.device
    next_token = _plain_token(ctx, p, rows, step)
    return (torch.zeros(B, 1, dtype=torch.long, device=dev), torch.zeros(B, dtype=torch.long, device=dev),
            next_token, torch.full((B, 1), -1, dtype=torch.long, device=dev))


def _plain_token(ctx: Context, p: torch.Tensor, rows: list[int], step: int) -> torch.Tensor:
    """The token of a row at K=0 (``sd``, adaptive length): one draw from ``trunc(p)`` of ``p [B, V]``, from the
    row's own stream (purpose ``token``, step = round), whatever the other rows of the round do."""
    return ctx.sample(p, rows, 0, "token", steps=step)


def _auto_option(value: str) -> tuple[str, RoundCosts | None]:
    """``"auto"`` -> ``("auto", None)`` (costs measured); ``"auto:C"`` -> ``("auto", RoundCosts(C))``: a draft
    call costs ``C`` target calls, and every target call costs 1."""
    word, colon, cost = value.partition(":")
    try:
        c = float(cost) if colon else None  # ("auto:", no C: float("") raises)
    except ValueError:
        c = float("nan")
    if word != "auto" or (c is not None and not (0 <= c < float("inf"))):
        raise InputError("num_draft_tokens must be a positive integer, 'auto', 'auto:C' (C >= 0: a draft call's "
                         f"cost relative to a target call) or a tuple, got {value!r}")
    return "auto", None if c is None else RoundCosts(c)


def _verify_randomness(ctx: Context, rows: list[int], step: int, n: int, device):
    """The round's acceptance uniforms ``[B, n]`` (one per drafted token / node) and race streams ``[B, 2]``."""
    return dict(uniforms=ctx.rng.uniform(rows, n, "accept", steps=step, device=device),
                seed=ctx.rng.streams(rows, "race", steps=step, device=device))


def _chain_round(ctx: Context, streams, ref, K: int, valid: list[int], draft_at_bonus: bool, verify,
                 rows: list[int], step: int, plain: bool = False, learn: bool = False):
    """Draft ``K`` tokens, score them, verify. Row ``b`` feeds only its first ``valid[b]`` drafted tokens (the
    rest are dead slots); with ``plain`` (sd, adaptive length) a row at ``valid[b] = 0`` draws its token with
    ``_plain_token``. Returns ``nodes [B, K]``, ``accepted [B]``, ``next_token [B]``, the accepted
    ``path [B, K]`` (node indices, -1 padded) and, with ``learn``, the acceptance probabilities of the drafted
    positions ``[B, K]`` (``kernels.acceptance_probability``; a row's first ``valid[b]`` are its own), else None."""
    target, draft = streams[0], streams[1]
    dev = target.logits.device
    n = torch.tensor(valid, device=dev)
    pos = torch.arange(K, device=dev)
    q_r = [draft.feed()[:, 0]]  # the tail goes in front of the first draft step
    tokens = []
    for i in range(K):
        tokens.append(ctx.sample(q_r[-1], rows, i, "draft", steps=step))
        if i < K - 1 or draft_at_bonus:  # q_r after x_{i+1}: read below n (and at n for the tilt of the bonus)
            q_r.append(draft.feed(tokens[-1][:, None], live=(i + 1 < n + int(draft_at_bonus))[:, None])[:, 0])
    nodes = torch.stack(tokens, 1)
    live = pos[None, :] < n[:, None]
    p = target.feed(nodes, live=live)
    q = streams[2].feed(nodes, live=live) if ref is not None else None
    q_r_all = torch.stack(q_r, 1)
    accepted, next_token = spec_verify(p, q_r_all, q, nodes, num_valid=n,
                                       **_verify_randomness(ctx, rows, step, K, dev), **verify)
    if plain and 0 in valid:  # sd with an adaptive length: rows at K=0 draw as in a round without the draft
        next_token = torch.where(n == 0, _plain_token(ctx, p[:, 0], rows, step), next_token)
    path = torch.where(pos < accepted[:, None], pos, -1)
    betas = None
    if learn:
        law = {k: verify[k] for k in ("mode", "lam", "temperature", "top_k", "top_p", "max_log_ratio")}
        betas = acceptance_probability(p[:, :K], q_r_all[:, :K], None if q is None else q[:, :K], **law)
    return nodes, accepted, next_token, path, betas


def _tree_round(ctx: Context, streams, ref, kind: str, branching: tuple[int, ...], valid: list[int],
                draft_at_bonus: bool, verify, rows: list[int], step: int):
    """Draft a tree level by level (``branching[d]`` children per node at depth ``d``, nodes in level order),
    score it in one tree-attention pass per model, verify. Row ``b``'s tree is the first ``min(valid[b], D)``
    levels (a prefix of the nodes; the deeper ones are dead slots). Returns ``nodes [B, N]``, ``accepted [B]``,
    ``next_token [B]``, the accepted ``path [B, D]`` (node indices, -1 padded) and the live node count."""
    target, draft = streams[0], streams[1]
    frontier = draft.feed()  # [B, n, V]: q_r at the nodes whose children are drawn next (first: the root)
    B, dev = frontier.shape[0], frontier.device
    depth = torch.tensor([min(v, len(branching)) for v in valid], device=dev)
    frontier_ids = torch.tensor([-1], device=dev)
    tokens, parents, node_level = [], [], []
    for level, b in enumerate(branching):
        n = frontier.shape[1]
        start = sum(t.shape[1] for t in tokens)
        if kind == "topk":  # the b most likely tokens (truncation does not change the order)
            children = frontier.topk(b, dim=-1).indices.flatten(1)
        else:  # b i.i.d. draws per node, node j of the tree from its own sub-stream
            subs = [start + j for _ in rows for j in range(n * b)]
            children = ctx.sample(frontier.repeat_interleave(b, 1).flatten(0, 1),
                                  [r for r in rows for _ in range(n * b)], subs, "draft", steps=step).view(B, n * b)
        tokens.append(children)
        parents.append(frontier_ids.repeat_interleave(b))
        node_level.append(torch.full((n * b,), level, device=dev))
        frontier_ids = torch.arange(start, start + n * b, device=dev)
        if level < len(branching) - 1 or draft_at_bonus:  # leaves are fed only for the tilt at the bonus
            live = (level + 1 < depth + int(draft_at_bonus))[:, None].expand(B, n * b)
            frontier = draft.feed(children, torch.cat(parents).expand(B, -1), live=live)
    nodes, tree_parents = torch.cat(tokens, 1), torch.cat(parents).expand(B, -1)
    live = torch.cat(node_level)[None, :] < depth[:, None]  # [B, N]: a prefix of each row's nodes
    num_nodes = live.sum(1)
    q_r = draft.position_logits()
    N = nodes.shape[1]
    if q_r.shape[1] < N + 1:  # unfed leaves: never read (no tilt at the bonus), any finite value will do
        q_r = torch.cat([q_r, q_r.new_zeros(B, N + 1 - q_r.shape[1], q_r.shape[2])], 1)
    p = target.feed(nodes, tree_parents, live=live)
    q = streams[2].feed(nodes, tree_parents, live=live) if ref is not None else None
    path, accepted, next_token = tree_verify(
        p, q_r, q, nodes, tree_parents, tree_kind=kind, max_depth=len(branching), num_nodes=num_nodes,
        **_verify_randomness(ctx, rows, step, N, dev), **verify)
    level_sizes = list(itertools.accumulate(branching, operator.mul))  # nodes per level
    live_nodes = sum(sum(level_sizes[: min(v, len(branching))]) for v in valid)  # = num_nodes.sum(), no sync
    return nodes, accepted, next_token, path, live_nodes


def _append(ctx: Context, out, rows: list[int], emitted: torch.Tensor, accepted: torch.Tensor,
            left: list[int], betas: torch.Tensor | None = None) -> tuple[list[bool], list[list[float]], int]:
    """Append each row's emitted tokens to ``out``: ``emitted [B, D+1]`` holds its ``accepted [B]`` draft tokens
    and then the verifier's own token (-1 where there is none: no bonus at full acceptance). Rows are cut after
    an EOS (kept) and at the ``left`` tokens they may still emit. Returns True where a row is finished (EOS or
    ``max_new_tokens``); each row's acceptance probabilities (``betas [B, K]``; ``[]`` when None) at the
    positions of its emitted tokens, cut at an EOS like the tokens (where the row drafted, these are the
    accepted positions and the first rejected one; at full acceptance the last is the bonus token's, and a row
    at K=0 has the one of a position it did not draft, so the caller keeps the first ``valid[b]``, the
    positions the row drafted; a position drafted after the first rejection has a context that is never
    emitted, the draft's own rejected tokens); and how many accepted draft tokens were appended (those after
    an EOS are not). One device-to-host copy for all three (tokens travel as float64: exact below 2^53)."""
    idx = torch.arange(emitted.shape[1], device=emitted.device)
    n_emit = accepted + (emitted.gather(1, accepted[:, None])[:, 0] >= 0).long()
    eos = ctx.eos_mask(emitted) & (idx < n_emit[:, None])
    first_eos = torch.where(eos, idx, emitted.shape[1]).amin(1)
    count = torch.minimum(n_emit, first_eos + 1)
    ended = first_eos < count
    table = torch.cat([count[:, None], ended.long()[:, None], accepted[:, None], emitted], 1)
    width = table.shape[1]
    if betas is not None:
        table = torch.cat([table.double(), betas.double()], 1)
    done, beta_rows, kept_accepted = [], [], 0
    for r, n, row in zip(rows, left, table.tolist()):
        c, e, a, *toks = (int(x) for x in row[:width])
        kept = min(c, n)
        out[r].extend(toks[:kept])
        kept_accepted += min(a, kept)
        done.append((bool(e) and c <= n) or c >= n)
        beta_rows.append(row[width:width + c])
    return done, beta_rows, kept_accepted
