"""``rs``: item-level rejection sampling of whole responses against a reward threshold ``r_star``.

Each prompt draws a response from the target, scores it, and accepts it (soft, the default, as in the CARDS
code) when ``u < min(1, exp((r - r_star) / accept_beta))``, or (hard) when ``r >= r_star``; otherwise it draws
again from the same cached prompt. After ``max_rejections`` rejections in a row one more response is drawn
and the best of all of them is accepted (the forced acceptance of the CARDS code). Prompts of a batch proceed
independently: prompts that accepted leave the batch while the others draw again. A prompt's copies of a
response are scored once and share that reward (``score_once``).

This module also holds what ``cards`` shares with it: the acceptance test, the forced-acceptance rule
(``Streak``) and the ``"auto"`` calibration of ``reward_threshold`` and ``accept_beta`` (``acceptance_settings``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import InputError
from .base import Context, MethodResult, ResponseSampler


AUTO_SAMPLES = 8  # plain samples per prompt that calibrate reward_threshold="auto"
# accept_beta="auto": the CARDS code's 0.7 with a number r_star (its Llama-7B reward model's units); with
# reward_threshold="auto", AUTO_BETA_PER_STD times the std of the calibration rewards. 1/3 keeps the soft rule
# selective on any scale: a response one std below r_star passes with probability exp(-3) = 5%, one at r_star
# always, and on the toy world's reward model (std about 2) it is close to the CARDS code's 0.7.
CARDS_ACCEPT_BETA = 0.7
AUTO_BETA_PER_STD = 1 / 3
MODES = ("soft", "hard")


def check_acceptance_options(reward_threshold, accept_beta: float, mode: str, max_rejections: int) -> None:
    if not (reward_threshold == "auto" or (isinstance(reward_threshold, (int, float))
                                           and math.isfinite(reward_threshold))):
        raise InputError(f"reward_threshold must be a finite number or 'auto', got {reward_threshold!r}")
    if mode not in MODES:
        raise InputError(f"mode must be one of {MODES}, got {mode!r}")
    if not (accept_beta == "auto" or (isinstance(accept_beta, (int, float)) and 0 < accept_beta < math.inf)):
        raise InputError(f"accept_beta must be a number > 0 or 'auto', got {accept_beta!r}")
    if not (isinstance(max_rejections, int) and max_rejections >= 0):
        raise InputError(f"max_rejections must be an integer >= 0, got {max_rejections!r}")


def score_once(ctx: Context, branches: list[list[list[int]]], known: list[dict] | None = None) -> list[torch.Tensor]:
    """``ctx.reward.score_branches(branches)`` (row ``i``'s candidate responses on top of its cached prefix,
    ``[M_i]`` fp32 each), scoring each distinct response of a row once, and none whose reward ``known[i]`` (the
    row's rewards so far, by response; updated) already holds: copies get the first copy's reward.

    A reward is a function of the text. Scored again in other cache slots or batch rows, a copy's float value
    differs by rounding (a few ulps in fp32), and a greedy decode's threshold would then fall between equal
    responses; copies scored once are equal, and cost nothing more.
    """
    known = [{} for _ in branches] if known is None else known
    new = [list(dict.fromkeys(tuple(r) for r in row if tuple(r) not in seen)) for row, seen in zip(branches, known)]
    if any(new):
        for seen, row, rewards in zip(known, new, ctx.reward.score_branches([[list(r) for r in row] for row in new])):
            seen.update(zip(row, rewards.tolist()))
    return [torch.tensor([seen[tuple(r)] for r in row], dtype=torch.float32) for row, seen in zip(branches, known)]


def acceptance_settings(ctx: Context, sampler: ResponseSampler, reward_threshold, accept_beta,
                        known: list[dict] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r_star, accept_beta)`` per prompt (``[B]`` fp32 each), resolving ``"auto"``.

    ``reward_threshold="auto"`` draws the calibration samples (``calibrate_reward_threshold``): ``r_star`` is
    their mean + std, and ``accept_beta="auto"`` becomes ``AUTO_BETA_PER_STD`` (1/3) times their std, so that
    the soft test ``exp((r - tau) / accept_beta)`` measures a reward gap in the reward's own spread and means
    the same on a reward in [0, 1] as on one in [-10, 10]. With a number for ``reward_threshold`` nothing is
    drawn and ``accept_beta="auto"`` is the CARDS code's 0.7. A number for ``accept_beta`` is used as given.
    A zero std (every sample scored alike) makes the soft test the hard one, ``r >= tau``. ``known``: per prompt,
    the rewards scored so far, by response (``score_once``).
    """
    B = len(sampler.prompts)
    if reward_threshold == "auto":
        r_star, std = calibrate_reward_threshold(ctx, sampler, return_std=True, known=known)
        beta = AUTO_BETA_PER_STD * std
    else:
        r_star, beta = torch.full((B,), float(reward_threshold)), torch.full((B,), CARDS_ACCEPT_BETA)
    if accept_beta != "auto":
        beta = torch.full((B,), float(accept_beta))
    return r_star, beta.clamp_min(torch.finfo(torch.float32).tiny)


def calibrate_reward_threshold(ctx: Context, sampler: ResponseSampler, return_std: bool = False,
                               known: list[dict] | None = None):
    """``reward_threshold="auto"``: per prompt, ``r_star = mean + std`` (unbiased std) of the rewards of
    ``AUTO_SAMPLES`` (8) plain samples of up to ``max_new_tokens`` tokens drawn with the decode's sampling
    settings.  Returns ``[B]`` fp32 (and the std ``[B]`` with ``return_std``).

    The statistics are computed in float64 (an fp32 mean of equal rewards can round above them), and when all
    samples of a prompt score alike (e.g. greedy sampling) ``r_star`` is that common reward and the std 0, so
    that a response scoring it passes. Copies of a response are scored once (``score_once``: the same text has
    the same reward). Needs the reward cache to hold the sampler's prompts; the sampler and
    the reward cache are left as they were. A sampled response beats ``r_star`` with probability about 16%
    when its rewards are roughly normal, so acceptance is selective but not hopeless.
    """
    B, n = len(sampler.prompts), AUTO_SAMPLES
    samples = sampler.draw(n)
    rewards = torch.stack(score_once(ctx, [samples[b * n:(b + 1) * n] for b in range(B)], known))  # [B, n]
    rewards = rewards.double()
    alike = rewards.amax(1) == rewards.amin(1)  # zero spread: the threshold is the common reward, exactly
    std = torch.where(alike, 0.0, rewards.std(1))
    r_star = torch.where(alike, rewards[:, 0], rewards.mean(1) + std).float()
    return (r_star, std.float()) if return_std else r_star


def passes(rewards: torch.Tensor, thresholds: torch.Tensor, uniforms: torch.Tensor | None, mode: str,
           accept_beta: float | torch.Tensor) -> torch.Tensor:
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
        if self.best is None or reward > self.best_reward:  # the first candidate always counts as a best
            self.best_reward, self.best = reward, candidate
        if self.rejections >= max_rejections:
            return self.best, True
        if passed:
            return candidate, False
        self.rejections += 1
        return None, False


def run(ctx: Context, prompts: list[list[int]], reward_threshold: float | str = "auto",
        accept_beta: float | str = "auto", mode: str = "soft", max_rejections: int = 20) -> MethodResult:
    """Rejection sampling over a batch of prompts (module docstring); defaults as in the CARDS code, except
    ``reward_threshold="auto"`` and ``accept_beta="auto"`` (see ``acceptance_settings``). A number for
    ``reward_threshold`` lies in [-3.4e38, 3.4e38], one for ``accept_beta`` in (0, 3.4e38]: rewards are float32
    (``fastalign.validation.OPTION_LIMITS``). ``out.extra``: ``reward_threshold`` and ``accept_beta`` (per
    prompt, ``[B]``)."""
    check_acceptance_options(reward_threshold, accept_beta, mode, max_rejections)
    B = len(prompts)
    sampler = ResponseSampler(ctx, prompts)
    ctx.reward.prefill(prompts)
    known = [{} for _ in range(B)]  # per prompt: the rewards scored so far, by response (score_once)
    r_star, beta = acceptance_settings(ctx, sampler, reward_threshold, accept_beta, known)

    chosen: list[list[int] | None] = [None] * B
    ids = list(range(B))  # prompts still drawing: batch row i is prompt ids[i]
    streaks = [Streak() for _ in range(B)]
    threshold, scale = r_star, beta
    stats = {"responses_proposed": 0, "rejections": 0, "forced_acceptances": 0}
    while ids:
        responses = sampler.draw()
        rewards = torch.cat(score_once(ctx, [[r] for r in responses], [known[b] for b in ids]))
        uniforms = ctx.rng.uniform(ids, 1, "accept")[:, 0] if mode == "soft" else None
        ok = passes(rewards, threshold, uniforms, mode, scale).tolist()
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
            sampler.keep(keep)
            ctx.reward.select_rows(keep)
            threshold, scale = threshold[keep], scale[keep]
            ids, streaks = [ids[i] for i in keep], [streaks[i] for i in keep]
    ctx.stats.update(stats)
    return MethodResult(chosen, {"reward_threshold": r_star, "accept_beta": beta})
