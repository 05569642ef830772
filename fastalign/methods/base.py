"""Shared machinery of the methods: the decoding context, randomness, and batched ancestral sampling."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch

from .. import kernels
from ..kernels.rng import (as_signed64, counter, prompt_key, prompt_seed, stream_bits_torch,
                           uniform_streams_torch)
from ..kernels.truncation import TEMPERATURE_FLOOR
from ..models.causal_lm import CausalLM
from ..models.remote import RemoteLM, request_seed
from ..models.reward import RewardModel
from ..validation import check_seed


def prompt_seeds(seed, n_prompts: int) -> list[int]:
    """One seed per prompt: ``seed`` is an int (prompt ``i`` gets ``prompt_seed(seed, i)``), a list of one int per
    prompt, or ``None`` (fresh entropy); checked by ``validation.check_seed``."""
    seed = check_seed(seed.tolist() if torch.is_tensor(seed) else seed, n_prompts)
    if isinstance(seed, list):
        return seed
    if seed is None:
        seed = secrets.randbits(63)
    return [prompt_seed(seed, i) for i in range(n_prompts)]


class Randomness:
    """All randomness of one decode: per prompt, reproducible from the prompt's own seed (docs/design.md 1.4).

    Every draw names its rows by ``(prompt, sub)`` (the prompt index, and a sub-stream such as a sample, a chain
    or a candidate of that prompt) and a ``purpose``; its numbers come from the counter-based generator
    (``kernels.rng``) keyed by the prompt's seed, at the counter ``(step, purpose, sub)``. ``step`` is given
    explicitly (e.g. a speculative round), or counted per ``(prompt, sub, purpose)``: each call advances the
    count of its *active* rows only, so a row's numbers depend on its own history alone, never on its batch row
    or on the other prompts of the batch. Kernels get per-row ``(key, counter)`` streams; host draws (acceptance
    uniforms, categorical picks) are computed from the same streams with the torch generator.
    """

    def __init__(self, seed=None, n_prompts: int = 1):
        self.seeds = prompt_seeds(seed, n_prompts)
        self.keys = [as_signed64(prompt_key(s)) for s in self.seeds]
        self._count: dict[tuple[int, int, str], int] = {}

    def streams(self, prompts, purpose: str, subs=0, steps=None, active=None, device=None) -> torch.Tensor:
        """Per-row ``(key, counter)`` int64 ``[R, 2]`` for rows ``prompts[r]`` (ints) with sub-streams ``subs``
        (an int or one per row). ``steps`` (an int or one per row) or, when None, the rows' counts, advanced for
        the ``active`` rows (default all)."""
        prompts = [int(p) for p in prompts]
        R = len(prompts)
        subs = [int(subs)] * R if isinstance(subs, int) else [int(x) for x in subs]
        if steps is None:
            active = [True] * R if active is None else list(active)
            steps = []
            for p, sub, a in zip(prompts, subs, active):
                n = self._count.get((p, sub, purpose), 0)
                steps.append(n)
                if a:
                    self._count[(p, sub, purpose)] = n + 1
        elif isinstance(steps, int):
            steps = [steps] * R
        table = [[self.keys[p], as_signed64(counter(int(t), purpose, sub))] for p, sub, t in zip(prompts, subs, steps)]
        out = torch.tensor(table, dtype=torch.int64) if R else torch.empty(0, 2, dtype=torch.int64)
        return out if device is None or out.device == torch.device(device) else out.to(device)

    def uniform(self, prompts, n: int, purpose: str, subs=0, steps=None, active=None, device=None) -> torch.Tensor:
        """fp32 uniforms in (0, 1), ``[R, n]``: ``n`` numbers of each row's stream."""
        return uniform_streams_torch(self.streams(prompts, purpose, subs, steps, active), n).to(device)

    def categorical(self, probs: torch.Tensor, prompts, purpose: str, subs=0, steps=None) -> torch.Tensor:
        """One index per row of ``probs [R, N]`` (rows need not be normalised), by an exponential race. [R]"""
        u = self.uniform(prompts, probs.shape[1], purpose, subs, steps).double()
        return torch.argmax(torch.log(probs.double().cpu()) - torch.log(-torch.log(u)), dim=-1)

    def request_seeds(self, prompts, purpose: str, subs=0) -> list[int]:
        """One request seed in ``[0, 2**31 - 1)`` per row (``models.remote.request_seed``), from the rows' streams."""
        bits = stream_bits_torch(self.streams(prompts, purpose, subs), 1)[:, 0]
        return [request_seed(b) for b in bits]

    def local_seeds(self, prompts, purpose: str, subs=0) -> list[int]:
        """One seed in ``[0, 2**64)`` per row, from two numbers of the rows' streams: the seed of a local
        sub-decode. Unlike 31-bit request seeds, which collide among ~10^5 draws, these stay distinct."""
        bits = stream_bits_torch(self.streams(prompts, purpose, subs), 2).tolist()
        return [low | high << 32 for low, high in bits]


@dataclass
class Context:
    """What a method gets: the wrapped models of the roles it uses (None otherwise; ``Method.models_for``),
    sampling settings and randomness.

    A ``temperature`` below ``TEMPERATURE_FLOOR`` (1e-20; smaller ones overflow float32 logits) is taken as
    the floor, which decodes greedily (``kernels/truncation.py``): every method then sees a safe temperature.
    """

    target: CausalLM | None
    draft: CausalLM | None
    ref: CausalLM | None
    reward: RewardModel | None
    tokenizer: object | None
    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    rng: Randomness
    stats: dict = field(default_factory=dict)  # method-specific counters, merged into out.stats
    step_reward: RewardModel | None = None  # the reward read on partial responses (smc's twist, beam's steps)

    def __post_init__(self):
        self.temperature = max(float(self.temperature), TEMPERATURE_FLOOR)

    def sample(self, logits: torch.Tensor, prompts, subs=0, purpose: str = "token", steps=None,
               active=None) -> torch.Tensor:
        """One token per row of ``logits [R, V]`` from the truncated tempered distribution.  [R] int64.

        Row ``r`` belongs to prompt ``prompts[r]``, sub-stream ``subs`` (``Randomness.streams``); without
        ``steps`` each row draws the next number of its own stream (``active`` rows advance).
        ``logits`` come from the model layer, which has already checked them (``check_finite``), so the
        kernel does not check them again (that would be one more pass and host sync per token).
        """
        seeds = self.rng.streams(prompts, purpose, subs, steps, active, device=logits.device)
        return kernels.sample(logits, self.temperature, self.top_k, self.top_p, seed=seeds, validate=False)

    def response_ended(self, response: list[int]) -> bool:
        """Whether ``response`` is complete: it ends with an end-of-sequence token of the target, or it has
        ``max_new_tokens`` tokens (the one rule every method applies)."""
        return bool(response) and (response[-1] in self.target.eos_token_ids
                                   or len(response) >= self.max_new_tokens)

    def eos_mask(self, tokens: torch.Tensor, lm: CausalLM | None = None) -> torch.Tensor:
        """True where ``tokens`` is an end-of-sequence token of ``lm`` (the target by default)."""
        return torch.isin(tokens, (lm or self.target).eos_tensor)


@dataclass
class MethodResult:
    sequences: list[list[int]]
    extra: dict = field(default_factory=dict)


def sample_continuations(ctx: Context, lm: CausalLM, next_logits: torch.Tensor,
                         budgets: list[int] | int, prompts, subs=0) -> list[list[int]]:
    """Batched ancestral sampling from the rows' cached prefixes.

    Row ``r`` belongs to prompt ``prompts[r]``, sub-stream ``subs`` (an int or one per row): its tokens are
    the next numbers of that stream (``Context.sample``), whatever the other rows do.
    ``next_logits [R, V]`` are the logits after each row's cached prefix; row ``r`` gets at most
    ``budgets[r]`` tokens and stops after an EOS token (kept). Finished rows ride along as padding (dead
    slots, not counted). On return the cache of each row holds its prefix plus its continuation except
    the last token.
    """
    R = next_logits.shape[0]
    budgets = [budgets] * R if isinstance(budgets, int) else list(budgets)
    eos = lm.eos_token_ids
    out: list[list[int]] = [[] for _ in range(R)]
    active = [b > 0 for b in budgets]
    logits = next_logits
    while True:
        tokens = ctx.sample(logits, prompts, subs, active=active)
        for r, token in enumerate(tokens.tolist()):  # one device-to-host copy per step
            if active[r]:
                out[r].append(token)
                active[r] = token not in eos and len(out[r]) < budgets[r]
        if not any(active):
            return out
        live = None if all(active) else torch.tensor(active, device=logits.device)[:, None]  # (None: all live)
        logits = lm.extend(tokens[:, None], live=live)[:, -1]


class RemoteSegments:
    """Segments of responses continued by a ``RemoteLM`` (``speculative_rejection``, ``smc``, ``beam``).

    ``advance`` (``speculative_rejection``, ``smc``): response ``c`` belongs to prompt ``c // n`` and is its
    sub-stream ``j = c % n``. A step is one completion request per live response: its prompt plus its response
    so far, ``max_tokens`` its budget, and ``stops`` (a segment's delimiters) ending it like EOS (kept). Prompt
    ``b``'s step ``k`` takes the request seed ``s_bk``, draw ``k`` of its own ``"request"`` stream (counted over
    the steps where it has live responses), and response ``j`` the seed ``s_bk + j``. The first step, from the
    prompts alone, is one request of ``n`` samples per prompt with ``s_b0``: ``bon``'s request
    (``ResponseSampler``), so a first step that runs to the end draws ``bon``'s samples.

    ``branch`` (``beam``): several samples of each of some prefixes, one request per prefix (``n`` samples,
    seed ``s_bk + first``: on a server that takes one sample per request, sample ``j`` is drawn with seed
    ``s_bk + first + j``). ``advance`` is ``branch`` with one sample per request (``first = j``), or, at the
    first step, one prefix per prompt (the prompt alone) with ``n`` samples (``first = 0``).

    The server holds no rows: resampling and pruning are the client's lists (vLLM's prefix caching keeps
    re-prompting the growing prefixes cheap).
    """

    def __init__(self, ctx: Context, prompts: list[list[int]], n: int, stops=()):
        self.ctx, self.n, self.prompts, self.stops = ctx, n, [list(p) for p in prompts], sorted(stops)
        self.started = False

    def advance(self, rows: list[int], budgets: list[int], responses: list[list[int]]) -> list[list[int]]:
        """The next segment (at most ``budgets[r]`` tokens; 0: none) of response ``rows[r]``, whose tokens so far
        are ``responses[rows[r]]``; one list per row."""
        n = self.n
        live = [(c, m) for c, m in zip(rows, budgets) if m > 0]
        if not self.started:  # every response of every prompt, from the prompt alone: one request per prompt
            budget = dict(live)
            owners = sorted({c // n for c, _ in live})
            out = self.branch(owners, [0] * len(owners), [budget[b * n] for b in owners], [[]] * len(owners), n)
            got = {b * n + j: out[i * n + j] for i, b in enumerate(owners) for j in range(n)}
        else:
            out = self.branch([c // n for c, _ in live], [c % n for c, _ in live], [m for _, m in live],
                              [responses[c] for c, _ in live], 1)
            got = {c: segment for (c, _), segment in zip(live, out)}
        return [got.get(c, []) for c in rows]

    def branch(self, owners: list[int], firsts: list[int], budgets: list[int], responses: list[list[int]],
               n: int) -> list[list[int]]:
        """``n`` next segments (at most ``budgets[i]`` >= 1 tokens each) of each prefix ``i``: prompt ``owners[i]``
        plus ``responses[i]``, one request with seed ``s_bk + firsts[i]`` (``s_bk``: the next draw of prompt
        ``b``'s ``"request"`` stream, one draw per prompt and call). Rows ``i * n + j``: sample ``j`` of prefix
        ``i``."""
        ctx = self.ctx
        prompts_of = sorted(set(owners))
        seeds = dict(zip(prompts_of, ctx.rng.request_seeds(prompts_of, "request")))
        self.started = True
        return ctx.target.complete([self.prompts[b] + list(y) for b, y in zip(owners, responses)], list(budgets),
                                   ctx.temperature, ctx.top_k, ctx.top_p,
                                   seed=[seeds[b] + f for b, f in zip(owners, firsts)], n=n,
                                   stop_token_ids=self.stops)

    def keep(self, keep: list[int]) -> None:
        """Nothing to drop: the server holds no rows."""


class ResponseSampler:
    """Whole responses to a fixed batch of prompts, drawn again and again (``sample``, ``bon``, ``rs``).

    A local target prefills the prompts once (``logits``: the next-token logits after them, or pass those of
    a cache that already holds exactly the prompts) and every draw starts from the cached prompts. A remote
    target (``fastalign.models.remote.RemoteLM``) gets one request per prompt for its ``n`` samples, seeded from
    the prompt's stream of ``ctx.rng``; the server's sampling follows the same law. Sample ``j`` of a prompt
    is its sub-stream ``j``, so a prompt's draws depend on its own seed only.
    """

    def __init__(self, ctx: Context, prompts: list[list[int]], logits: torch.Tensor | None = None):
        self.ctx, self.prompts = ctx, [list(p) for p in prompts]
        self.ids = list(range(len(self.prompts)))  # the decode's index of each row's prompt (its random streams)
        self.remote = isinstance(ctx.target, RemoteLM)
        if not self.remote and logits is None:
            logits = ctx.target.prefill(self.prompts, ctx.max_new_tokens)
        self.logits = logits

    def draw(self, n: int = 1, rewind: bool = True) -> list[list[int]]:
        """``n`` responses per prompt (rows ``b*n .. b*n+n-1`` belong to prompt ``b``). ``rewind``: leave the
        local cache holding the prompts again, for another draw (else it holds row ``b*n+j``'s response)."""
        ctx, lm, B = self.ctx, self.ctx.target, len(self.prompts)
        if self.remote:
            return lm.complete(self.prompts, [ctx.max_new_tokens] * B, ctx.temperature, ctx.top_k, ctx.top_p,
                               seed=ctx.rng.request_seeds(self.ids, "request"), n=n)
        if n > 1:
            lm.expand(n)
        responses = sample_continuations(ctx, lm, self.logits.repeat_interleave(n, 0) if n > 1 else self.logits,
                                         ctx.max_new_tokens, [b for b in self.ids for _ in range(n)],
                                         [j for _ in self.ids for j in range(n)])
        if rewind:
            if n > 1:
                lm.select_rows(torch.arange(B) * n)
            lm.rollback(torch.tensor([len(responses[b * n]) - 1 for b in range(B)]))
        return responses

    def keep(self, rows: list[int]) -> None:
        """Keep only the prompts ``rows`` (indices into the current batch), in that order."""
        self.prompts = [self.prompts[i] for i in rows]
        self.ids = [self.ids[i] for i in rows]
        if not self.remote:
            self.ctx.target.select_rows(rows)
            self.logits = self.logits[rows]
