"""Segment stepping, shared by the methods that advance many rows one segment (step) at a time (``smc``, ``beam``).

A segment ends after ``max_tokens`` tokens, after a token in ``delimiters`` (e.g. the ids of a newline), or
where the response ends (an EOS token, or ``max_new_tokens`` tokens in all). Rows move in lockstep: a call
returns when every open row's segment has ended.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from .base import Context


def delimiter_ids(delimiters, tokenizer=None, vocab_size: int | None = None, *,
                  option: str = "delimiters") -> list[int]:
    """``delimiters`` as a list of token ids: None (none), a token id below ``vocab_size`` (the target's, where
    known; the command line's ``--opt delimiters=13``), a string that ``tokenizer`` encodes as exactly one
    known token (``";"``, ``"\\n"``), or a list of these; anything else is an ``InputError`` naming ``option``
    (a delimiter the target never emits would silently never end a segment)."""
    given = delimiters
    if delimiters is None:
        return []
    if not isinstance(delimiters, (list, tuple)):
        delimiters = [delimiters]
    ids = []
    for d in delimiters:
        if isinstance(d, str):
            ids.append(single_token_id(d, tokenizer, option))
        elif isinstance(d, int) and not isinstance(d, bool) and d >= 0:
            if vocab_size is not None and d >= vocab_size:
                raise InputError(f"{option}: token id {d} is outside the target's vocabulary (0 .. {vocab_size - 1})")
            ids.append(d)
        else:
            raise InputError(f"{option} must be a token id (an integer >= 0), a one-token string or a list of "
                             f"these, got {given!r}")
    return ids


def single_token_id(text: str, tokenizer, option: str) -> int:
    """The id of the one token ``tokenizer`` encodes ``text`` as (no special tokens); an ``InputError`` naming
    ``option`` when there is no tokenizer or ``text`` is not one token."""
    if tokenizer is None:
        raise InputError(f"{option}: the string {text!r} needs a tokenizer to become a token id; give token ids")
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise InputError(f"{option}: {text!r} is {len(ids)} tokens for this tokenizer ({ids}); a delimiter is "
                         "one token: give its token id")
    if ids[0] == tokenizer.unk_token_id and text != tokenizer.unk_token:
        raise InputError(f"{option}: {text!r} is not in the tokenizer's vocabulary (it encodes as the unknown "
                         f"token {tokenizer.unk_token!r})")
    return int(ids[0])


def extend_segments(ctx: Context, logits: torch.Tensor, owner: list[int], subs: list[int],
                    responses: list[list[int]], done: list[bool], max_tokens: int,
                    delimiters: set[int]) -> tuple[list[list[int]], torch.Tensor]:
    """Extend every row ``r`` with ``not done[r]`` by one segment sampled from the target (``ctx.target``).

    ``logits [R, V]``: the next-token logits after each row's cached response; row ``r`` draws from prompt
    ``owner[r]``'s sub-stream ``subs[r]`` (``Context.sample``). ``responses`` and ``done`` are updated in place
    (a row is done after an EOS token or ``ctx.max_new_tokens`` tokens; its last token is never fed). Returns
    each row's new segment (empty for rows that were done) and the logits after the rows' new prefixes; the
    target's cache then holds every row's response except a finished row's last token.
    """
    R = len(responses)
    target = ctx.target
    segments: list[list[int]] = [[] for _ in range(R)]
    open_ = [not d for d in done]
    device = logits.device
    while any(open_):
        tokens = ctx.sample(logits, owner, subs, active=open_)
        fed = [False] * R
        for r, token in enumerate(tokens.tolist()):
            if not open_[r]:
                continue
            segments[r].append(token)
            responses[r].append(token)
            if ctx.response_ended(responses[r]):
                done[r], open_[r] = True, False  # its last token is never fed
                continue
            fed[r] = True
            open_[r] = len(segments[r]) < max_tokens and token not in delimiters
        if any(fed):
            live = torch.tensor(fed, device=device)[:, None]
            logits = torch.where(live, target.extend(tokens[:, None], live=live)[:, -1], logits)
    return segments, logits
