"""``args``: ARGS, alignment as reward-guided search (Khanov et al., ICLR 2024).

Per token, the ``k`` most likely next tokens ``v`` under the target are scored by
``s(v) = log p(v) + w * r(x, y<t + v)``, with ``p = softmax(l / T)``, and the rewards of all candidates of all rows
come from ONE reward call over the rows' cached prefixes (``RewardModel.score_branches`` with ``k`` one-token
branches per row; the chosen token then stays in the reward cache, ``keep_branches``). ``mode="greedy"`` (the
paper's ARGS-greedy, the default) takes ``argmax s``; ``mode="sampled"`` (ARGS-stochastic) draws ``v`` with
probability ``softmax(s)_v`` over the candidates, i.e. proportional to ``p(v) exp(w r)``. Defaults are the paper's
HH-RLHF setting: ``k = 10``, ``w = 1.5`` (the repository's README example uses ``w = 1.0``), and T = 1 (the paper
ranks the raw logits, which differ from ``log p`` by a constant).
The original code's stochastic variant draws from ``softmax((logit + w r) / tau)``: that is ``temperature=tau``
with ``w / tau`` here. The candidate set is ``k``; ``top_k`` / ``top_p`` do not apply (passing them is an error).
"""

from __future__ import annotations

import torch

from .. import kernels
from ..errors import InputError
from .base import Context, MethodResult

MODES = ("greedy", "sampled")


def run(ctx: Context, prompts: list[list[int]], k: int = 10, w: float = 1.5, mode: str = "greedy") -> MethodResult:
    if not (isinstance(k, int) and k >= 1):
        raise InputError(f"k must be an integer >= 1, got {k!r}")
    if mode not in MODES:
        raise InputError(f"mode must be one of {MODES}, got {mode!r}")
    if ctx.top_k is not None or ctx.top_p is not None:
        raise InputError("args scores its own k candidates per token: pass k=..., not top_k / top_p")
    B = len(prompts)
    logits = ctx.target.prefill(prompts, ctx.max_new_tokens)
    ctx.reward.prefill(prompts)
    k = min(k, logits.shape[-1])
    responses: list[list[int]] = [[] for _ in range(B)]
    active = [True] * B  # on the host: the chosen tokens are host values, so no device flags to sync
    eos = ctx.target.eos_token_ids
    ctx.stats["candidates_scored"] = 0
    for step in range(ctx.max_new_tokens):
        _, logsumexp = kernels.entropy(logits, ctx.temperature, validate=False)  # checked by the model layer
        top_logits, candidates = torch.topk(logits, k, dim=-1)  # [B, k]
        logp = (top_logits / ctx.temperature - logsumexp[:, None]).cpu()
        rows = [b for b in range(B) if active[b]]
        cands = candidates.tolist()
        rewards = ctx.reward.score_branches([[[v] for v in cands[b]] if active[b] else [] for b in range(B)])
        ctx.stats["candidates_scored"] += len(rows) * k
        tilt = w * torch.stack([rewards[b] for b in rows])  # [A, k]
        if not torch.isfinite(tilt).all():  # finite rewards times a huge w: float32 overflow, no ranking left
            raise InputError(f"args: w * reward overflows float32 (w={w:g}); use a smaller w")
        score = logp[rows] + tilt
        picks = (score.argmax(-1) if mode == "greedy"
                 else ctx.rng.categorical(torch.softmax(score, -1), rows, "pick", steps=step))
        choice: list[int | None] = [None] * B
        for b, i in zip(rows, picks.tolist()):
            choice[b] = i
            responses[b].append(cands[b][i])
            active[b] = cands[b][i] not in eos
        ctx.reward.keep_branches(choice)
        if step + 1 == ctx.max_new_tokens or not any(active):
            break
        tokens = torch.tensor([cands[b][c] if c is not None else 0 for b, c in enumerate(choice)],
                              device=logits.device)
        logits = ctx.target.extend(tokens[:, None], live=torch.tensor(active, device=logits.device)[:, None])[:, 0]
    return MethodResult(responses)
