"""Shared machinery of the methods: the decoding context, randomness, and batched ancestral sampling."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import kernels
from ..models import CausalLM, RewardModel


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
