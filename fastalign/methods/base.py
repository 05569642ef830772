"""Shared machinery of the methods: the decoding context, randomness, and batched ancestral sampling."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import kernels
from ..models import CausalLM, RewardModel
from ..remote import RemoteLM


class Randomness:
    """All randomness of one decode, reproducible from ``seed``.

    Uniforms (acceptance tests) come from one CPU ``torch.Generator``; kernels that draw tokens get a fresh
    integer seed from the same generator for the shared counter-based RNG (``kernels._rng``). Results
    therefore depend only on the seed, not on the device.
    """

    def __init__(self, seed: int | None):
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(int(seed))

    def kernel_seed(self) -> int:
        return int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator))

    def uniform(self, *shape: int, device=None) -> torch.Tensor:
        """fp32 uniforms in [0, 1) of the given shape."""
        return torch.rand(shape, generator=self.generator).to(device)

    def categorical(self, probs: torch.Tensor) -> torch.Tensor:
        """One index per row of ``probs [R, N]`` (rows need not be normalised)."""
        return torch.multinomial(probs.float().cpu(), 1, generator=self.generator)[:, 0]


@dataclass
class Context:
    """What a method gets: the wrapped models (None when not given), sampling settings and randomness."""

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

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """One token per row of ``logits [R, V]`` from the truncated tempered distribution.  [R] int64.

        ``logits`` come from the model layer, which has already checked them (``check_finite``), so the
        kernel does not check them again (that would be one more pass and host sync per token).
        """
        return kernels.sample(logits, self.temperature, self.top_k, self.top_p, seed=self.rng.kernel_seed(),
                              validate=False)

    def eos_mask(self, tokens: torch.Tensor, lm: CausalLM | None = None) -> torch.Tensor:
        """True where ``tokens`` is an end-of-sequence token of ``lm`` (the target by default)."""
        return torch.isin(tokens, (lm or self.target).eos_tensor)


@dataclass
class MethodResult:
    sequences: list[list[int]]
    extra: dict = field(default_factory=dict)


def sample_continuations(ctx: Context, lm: CausalLM, next_logits: torch.Tensor,
                         budgets: list[int] | int) -> list[list[int]]:
    """Batched ancestral sampling from the rows' cached prefixes.

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
        tokens = ctx.sample(logits)
        for r, token in enumerate(tokens.tolist()):  # one device-to-host copy per step
            if active[r]:
                out[r].append(token)
                active[r] = token not in eos and len(out[r]) < budgets[r]
        if not any(active):
            return out
        live = torch.tensor(active, device=logits.device)[:, None]
        logits = lm.extend(tokens[:, None], live=live)[:, -1]


class ResponseSampler:
    """Whole responses to a fixed batch of prompts, drawn again and again (``sample``, ``bon``, ``rs``).

    A local target prefills the prompts once (``logits``: the next-token logits after them, or pass those of
    a cache that already holds exactly the prompts) and every draw starts from the cached prompts. A remote
    target (``fastalign.remote.RemoteLM``) gets one request per prompt for its ``n`` samples, seeded from
    ``ctx.rng``; the server's sampling follows the same law.
    """

    def __init__(self, ctx: Context, prompts: list[list[int]], logits: torch.Tensor | None = None):
        self.ctx, self.prompts = ctx, [list(p) for p in prompts]
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
                               seed=ctx.rng.kernel_seed(), n=n)
        if n > 1:
            lm.expand(n)
        responses = sample_continuations(ctx, lm, self.logits.repeat_interleave(n, 0) if n > 1 else self.logits,
                                         ctx.max_new_tokens)
        if rewind:
            if n > 1:
                lm.select_rows(torch.arange(B) * n)
            lm.rollback(torch.tensor([len(responses[b * n]) - 1 for b in range(B)]))
        return responses

    def keep(self, rows: list[int]) -> None:
        """Keep only the prompts ``rows`` (indices into the current batch), in that order."""
        self.prompts = [self.prompts[i] for i in rows]
        if not self.remote:
            self.ctx.target.select_rows(rows)
            self.logits = self.logits[rows]
