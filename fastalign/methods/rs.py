"""``rs``: item-level rejection sampling of whole responses against a reward threshold ``r_star``.

Each prompt draws a response from the target, scores it, and accepts it (soft, the default, as in the CARDS
code) when ``u < min(1, exp((r - r_star) / accept_beta))``, or (hard) when ``r >= r_star``; otherwise it draws
again from the same cached prompt. After ``max_rejections`` rejections in a row one more response is drawn
and the best of all of them is accepted (the forced acceptance of the CARDS code). Prompts of a batch proceed
independently: prompts that accepted leave the batch while the others draw again.

This module also holds what ``cards`` shares with it: the acceptance test, the forced-acceptance rule
(``Streak``) and the ``reward_threshold="auto"`` calibration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import Context, MethodResult, sample_continuations

REQUIRES = ("target", "reward")
DEFAULTS = {"temperature": 0.7, "top_k": 40}  # the CARDS code's sampling settings (T = 0.7, top-k 40)

AUTO_SAMPLES = 8  # plain samples per prompt that calibrate reward_threshold="auto"
MODES = ("soft", "hard")


def check_acceptance_options(reward_threshold, accept_beta: float, mode: str, max_rejections: int) -> None:
    if not (reward_threshold == "auto" or (isinstance(reward_threshold, (int, float))
                                           and math.isfinite(reward_threshold))):
        raise ValueError(f"reward_threshold must be a finite number or 'auto', got {reward_threshold!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not accept_beta > 0:
        raise ValueError(f"accept_beta must be > 0, got {accept_beta}")
    if not (isinstance(max_rejections, int) and max_rejections >= 0):
        raise ValueError(f"max_rejections must be an integer >= 0, got {max_rejections!r}")


def calibrate_reward_threshold(ctx: Context, prompts: list[list[int]], prompt_logits: torch.Tensor) -> torch.Tensor:
    """``reward_threshold="auto"``: per prompt, ``r_star = mean + std`` (unbiased std) of the rewards of
    ``AUTO_SAMPLES`` (8) plain samples of up to ``max_new_tokens`` tokens drawn with the decode's sampling
    settings.  Returns ``[B]`` fp32.

    Needs the target cache to hold exactly the prompts (``prompt_logits [B, V]`` after them) and the reward
    cache the prompts; both are left as they were. A sampled response beats ``r_star`` with probability
    about 16% when its rewards are roughly normal, so acceptance is selective but not hopeless.
    """
    B, n = len(prompts), AUTO_SAMPLES
    ctx.target.expand(n)
    samples = sample_continuations(ctx, ctx.target, prompt_logits.repeat_interleave(n, 0), ctx.max_new_tokens,
                                   [b for b in range(B) for _ in range(n)], [j for _ in range(B) for j in range(n)])
    ctx.target.select_rows(torch.arange(B) * n)
    ctx.target.rollback(torch.tensor([len(samples[b * n]) - 1 for b in range(B)]))
    rewards = torch.stack(ctx.reward.score_branches([samples[b * n:(b + 1) * n] for b in range(B)]))  # [B, n]
    return rewards.mean(1) + rewards.std(1)


def passes(rewards: torch.Tensor, thresholds: torch.Tensor, uniforms: torch.Tensor | None, mode: str,
           accept_beta: float) -> torch.Tensor:
    """The acceptance test, elementwise: hard ``r >= tau``, soft ``u < min(1, exp((r - tau) / accept_beta))``."""
    if mode == "hard":
        return rewards >= thresholds
    return uniforms < torch.exp((rewards - thresholds) / accept_beta).clamp(max=1.0)


@dataclass
class Streak:
    """One prompt's rejections in a row since its last acceptance, and the best candidate seen in them."""

    rejections: int = 0
    best_reward: float = -math.inf
    best: object = None

    def judge(self, reward: float, passed: bool, candidate, max_rejections: int):
        """One candidate of the sequential rule: returns ``(accepted candidate or None, forced)``.

        After ``max_rejections`` rejections in a row the candidate is scored and the best seen (this one
        included; the first among equals) is accepted whatever the test says.
        """
        if reward > self.best_reward:
            self.best_reward, self.best = reward, candidate
        if self.rejections >= max_rejections:
            return self.best, True
        if passed:
            return candidate, False
        self.rejections += 1
        return None, False


def run(ctx: Context, prompts: list[list[int]], reward_threshold: float | str = "auto", accept_beta: float = 0.7,
        mode: str = "soft", max_rejections: int = 20) -> MethodResult:
    """Rejection sampling over a batch of prompts (module docstring); defaults as in the CARDS code, except
    ``reward_threshold="auto"`` (see ``calibrate_reward_threshold``). ``out.extra["reward_threshold"]``: ``[B]``."""
    check_acceptance_options(reward_threshold, accept_beta, mode, max_rejections)
    B = len(prompts)
    logits = ctx.target.prefill(prompts, ctx.max_new_tokens)
    ctx.reward.prefill(prompts)
    r_star = (calibrate_reward_threshold(ctx, prompts, logits) if reward_threshold == "auto"
              else torch.full((B,), float(reward_threshold)))

    chosen: list[list[int] | None] = [None] * B
    ids = list(range(B))  # prompts still drawing: batch row i is prompt ids[i]
    streaks = [Streak() for _ in range(B)]
    threshold = r_star
    stats = {"responses_proposed": 0, "rejections": 0, "forced_acceptances": 0}
    while ids:
        responses = sample_continuations(ctx, ctx.target, logits, ctx.max_new_tokens, ids)
        ctx.target.rollback(torch.tensor([len(r) - 1 for r in responses]))  # back to the prompt
        rewards = torch.cat(ctx.reward.score_branches([[r] for r in responses]))
        uniforms = ctx.rng.uniform(ids, 1, "accept")[:, 0] if mode == "soft" else None
        ok = passes(rewards, threshold, uniforms, mode, accept_beta).tolist()
        stats["responses_proposed"] += len(ids)
        for i, b in enumerate(ids):
            accepted, forced = streaks[i].judge(float(rewards[i]), ok[i], responses[i], max_rejections)
            if accepted is None:
                stats["rejections"] += 1
            else:
                chosen[b] = accepted
                stats["forced_acceptances"] += forced
        keep = [i for i, b in enumerate(ids) if chosen[b] is None]  # accepted prompts leave the batch
        if len(keep) < len(ids):
            ctx.target.select_rows(keep)
            ctx.reward.select_rows(keep)
            logits, threshold = logits[keep], threshold[keep]
            ids, streaks = [ids[i] for i in keep], [streaks[i] for i in keep]
    ctx.stats.update(stats)
    return MethodResult(chosen, {"reward_threshold": r_star})
