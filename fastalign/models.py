"""Layer 3: Hugging Face models that own a batched KV cache.

The cache of a batch is rectangular, ``[B, H, S, D]`` per layer, but rows are ragged: every row has its
own set of *live* slots (``self.live [B, S]``). A token's position id is fixed when it is written (the
number of live tokens before it, or prefix length + depth inside a draft tree), so dead slots can sit
anywhere: attention simply never looks at them. That makes every cache operation cheap:

* ``rollback(n)`` kills the last ``n[b]`` live slots of row ``b`` (no copy);
* ``keep_new(mask)`` keeps a subset of the block just written, e.g. the accepted path of a draft tree;
* ``compact()`` gathers the live slots of each row to the right end and drops columns dead in every
  row; it runs by itself when dead slots take more than half of the cache.

Attention is given to the model as an explicit 4-D additive mask ``[B, 1, T, S + T]`` together with
explicit position ids, which every causal LM of ``transformers`` accepts (eager and SDPA attention).
Models with sliding-window or recurrent layers are not supported.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from . import native
from .kernels import check_finite
from .validation import InputError, check_rewards  # noqa: F401 (InputError: re-exported, its historic home)


def _eos_ids(model) -> set[int]:
    ids = set()
    for cfg in (getattr(model, "generation_config", None), model.config):
        eos = getattr(cfg, "eos_token_id", None) if cfg is not None else None
        if eos is None:
            continue
        ids.update([eos] if isinstance(eos, int) else list(eos))
    return ids


def _context_length(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def cache_argument(model) -> str:
    """The name under which ``model.forward`` takes its KV cache: ``cache`` (transformers >= 5.x, which warns on
    the older name) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@dataclass
class ModelCounters:
    """What a model has cost: forward calls and tokens it processed (live tokens only)."""

    calls: int = 0
    tokens: int = 0


class CachedModel:
    """A transformers model plus a ragged batched KV cache (see the module docstring)."""

    def __init__(self, model, backbone=None):
        self.model = model.eval()
        self._backbone = backbone if backbone is not None else model
        self.config = model.config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.context_length = _context_length(model.config)
        self.counters = ModelCounters()
        self._cache_arg = cache_argument(self._backbone)
        self.cache: DynamicCache | None = None
        self.live = torch.zeros(0, 0, dtype=torch.bool, device=self.device)

    # ----------------------------------------------------------------- state
    @property
    def batch_size(self) -> int:
        return self.live.shape[0]

    @property
    def lengths(self) -> torch.Tensor:
        """Live tokens per row (prompt and everything kept since).  [B] int64."""
        return self.live.sum(1)

    def reset(self) -> None:
        self.cache = None
        self.live = torch.zeros(0, 0, dtype=torch.bool, device=self.device)

    def _layers(self):
        return self.cache.layers if self.cache is not None else []

    def _layout(self, new_live: torch.Tensor, parents: torch.Tensor | None):
        """Where a block of ``T`` new tokens sits: ``positions [B, T]``, and for a tree ``block [B, T, T]`` (which
        new tokens each new token sees: its ancestors and itself, padding excluded) and ``ancestry [B, T, P]``
        (which of the tree's ``P`` earlier nodes, the last ``P`` live-or-dead slots, it sees; None when ``P = 0``).
        A chain gets ``block = ancestry = None``. Checks the context length."""
        B, T = new_live.shape
        block = ancestry = None
        if parents is None:
            past = self.live.sum(1, keepdim=True)
            positions = past + (new_live.cumsum(1) - 1).clamp(min=0)
        else:
            parents = parents.to(self.device)
            S = self.live.shape[1]
            P = parents.shape[1] - T  # earlier nodes of the same tree: the last P cached slots
            if P < 0 or P > S:
                raise ValueError(f"parents has {parents.shape[1]} nodes for {T} new tokens and {S} cached slots")
            tree = native.tree_attention_mask(parents)[:, P:]  # [B, T, P + T]
            block = tree[:, :, P:] & new_live[:, None, :]
            block |= torch.eye(T, dtype=torch.bool, device=self.device)  # no query sees nothing
            if P:
                ancestry = tree[:, :, :P]
            past = self.live[:, : S - P].sum(1, keepdim=True)
            positions = past + native.tree_depths(parents)[:, P:]
        # positions never exceed the slot count, so the exact (syncing) check is needed only near the limit
        near_limit = self.context_length is not None and self.live.shape[1] + T > self.context_length
        if near_limit and int((positions * new_live).max()) >= self.context_length:
            raise InputError(
                f"sequence longer than the model's context length ({self.context_length} positions)"
            )
        return positions, block, ancestry

    # --------------------------------------------------------------- forward
    @torch.no_grad()
    def _run(self, tokens: torch.Tensor, parents: torch.Tensor | None, live: torch.Tensor | None, **kwargs):
        """Write ``tokens [B, T]`` after the live slots of each row and return the model output.

        ``parents [B, T]`` (optional) makes the block a tree (see ``fastalign.native``); ``live [B, T]``
        marks padding in the block (not attended to, not counted, dead afterwards). ``parents [B, P + T]``
        continues a tree grown over several calls: its first ``P`` nodes are the last ``P`` slots already
        written (e.g. the previous levels of a draft tree), which the new nodes see only along their ancestry.
        """
        tokens = tokens.to(self.device)
        B, T = tokens.shape
        if self.cache is None:
            self.cache = DynamicCache()
            self.live = torch.zeros(B, 0, dtype=torch.bool, device=self.device)
        if B != self.batch_size:
            raise InputError(f"batch of {B} rows given to a cache of {self.batch_size} rows")
        new_live = torch.ones(B, T, dtype=torch.bool, device=self.device) if live is None else live.to(self.device)
        positions, block, ancestry = self._layout(new_live, parents)
        if block is None:  # a chain: causal over the live slots, which transformers builds from a 2-D mask
            mask = torch.cat([self.live, new_live], dim=1).long()
        else:
            seen = self.live[:, None, :].expand(B, T, -1)  # cached slots each new token attends to
            if ancestry is not None:  # the tree's earlier nodes (the last P slots): only along the ancestry
                P = ancestry.shape[2]
                seen = torch.cat([seen[:, :, : seen.shape[2] - P], seen[:, :, seen.shape[2] - P:] & ancestry], 2)
            visible = torch.cat([seen, block], dim=2)
            mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device)
            mask = mask.masked_fill_(~visible, torch.finfo(self.dtype).min)[:, None]
        out = self._backbone(input_ids=tokens, attention_mask=mask, position_ids=positions,
                             **{self._cache_arg: self.cache}, use_cache=True, **kwargs)
        self.live = torch.cat([self.live, new_live], dim=1)
        self.counters.calls += 1
        self.counters.tokens += int(new_live.sum())
        return out

    # --------------------------------------------------------- cache surgery
    def rollback(self, num_tokens: torch.Tensor | int) -> None:
        """Drop the last ``num_tokens[b]`` live tokens of each row."""
        n = torch.as_tensor(num_tokens, device=self.device).expand(self.batch_size)
        if (n < 0).any() or (n > self.lengths).any():
            raise ValueError("rollback by a negative count or by more tokens than a row holds")
        after = self.live.flip(1).cumsum(1).flip(1)  # live slots at or after each slot
        self.live = self.live & (after > n[:, None])
        self._tidy()

    def keep_new(self, keep: torch.Tensor) -> None:
        """Of the last block written (``keep [B, T]``), keep the flagged slots and drop the rest."""
        T = keep.shape[1]
        if T:  # (live[:, -0:] would be every slot)
            self.live[:, -T:] &= keep.to(self.device)
        self._tidy()

    def compact(self) -> None:
        """Move each row's live slots to the right end (order kept) and drop all-dead columns."""
        order = torch.argsort(self.live.to(torch.int8), dim=1, stable=True)
        self.live = torch.gather(self.live, 1, order)
        first = self.live.shape[1] - int(self.lengths.max()) if self.batch_size else 0
        order, self.live = order[:, first:], self.live[:, first:]
        layers = self._layers()
        gathered = native.gather_slots_many([t for layer in layers for t in (layer.keys, layer.values)], order)
        for i, layer in enumerate(layers):
            layer.keys, layer.values = gathered[2 * i], gathered[2 * i + 1]

    def _tidy(self) -> None:
        """Crop trailing all-dead columns; compact when dead slots dominate."""
        S = self.live.shape[1]
        alive_cols = self.live.any(0).nonzero()
        end = int(alive_cols.max()) + 1 if alive_cols.numel() else 0
        if end < S:
            self.live = self.live[:, :end]
            for layer in self._layers():
                layer.keys, layer.values = layer.keys[:, :, :end], layer.values[:, :, :end]
        if self.live.numel() and 2 * int(self.lengths.max()) < self.live.shape[1]:
            self.compact()

    def select_rows(self, rows: torch.Tensor | list[int]) -> None:
        """Keep only the given rows, in the given order (repeats allowed)."""
        rows = torch.as_tensor(rows, device=self.device, dtype=torch.long)
        self.live = self.live[rows]
        for layer in self._layers():
            layer.keys, layer.values = layer.keys[rows], layer.values[rows]

    def expand(self, n: int) -> None:
        """Repeat every row ``n`` times in place: row ``b`` becomes rows ``b*n .. b*n+n-1``."""
        self.select_rows(torch.arange(self.batch_size, device=self.device).repeat_interleave(n))


def _validate_prompts(prompts, context_length: int | None, extra: int = 0) -> list[list[int]]:
    if len(prompts) == 0:
        raise InputError("no prompts given")
    out = []
    for i, p in enumerate(prompts):
        p = [int(t) for t in (p.tolist() if torch.is_tensor(p) else p)]
        if len(p) == 0:
            raise InputError(f"prompt {i} is empty")
        if context_length is not None and len(p) + extra > context_length:
            raise InputError(
                f"prompt {i} has {len(p)} tokens; with {extra} new tokens it exceeds the "
                f"context length of {context_length}"
            )
        out.append(p)
    return out


def left_pad(rows: list[list[int]], pad: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists: returns ``tokens [B, L]`` int64 and ``live [B, L]`` bool."""
    L = max(len(r) for r in rows)
    tokens = torch.full((len(rows), L), pad, dtype=torch.long)
    live = torch.zeros(len(rows), L, dtype=torch.bool)
    for b, r in enumerate(rows):
        if r:
            tokens[b, L - len(r):] = torch.tensor(r, dtype=torch.long)
            live[b, L - len(r):] = True
    return tokens.to(device), live.to(device)


def right_pad(rows: list[list[int]], pad: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists: returns ``tokens [B, L]`` int64 and ``live [B, L]`` bool (L >= 1)."""
    L = max(1, max(len(r) for r in rows))
    tokens = torch.full((len(rows), L), pad, dtype=torch.long)
    live = torch.zeros(len(rows), L, dtype=torch.bool)
    for b, r in enumerate(rows):
        if r:
            tokens[b, : len(r)] = torch.tensor(r, dtype=torch.long)
            live[b, : len(r)] = True
    return tokens.to(device), live.to(device)


class CausalLM(CachedModel):
    """A causal LM (``AutoModelForCausalLM``) with a ragged batched KV cache; logits come back in fp32."""

    def __init__(self, model):
        super().__init__(model)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.eos_token_ids = _eos_ids(model)
        self.eos_tensor = torch.tensor(sorted(self.eos_token_ids), dtype=torch.long, device=self.device)
        self._can_keep_last = "logits_to_keep" in inspect.signature(model.forward).parameters

    def add_stop_tokens(self, ids) -> None:
        """Make ``ids`` end a response like EOS (e.g. a chat template's end-of-turn token)."""
        self.eos_token_ids = self.eos_token_ids | {int(i) for i in ids}
        self.eos_tensor = torch.tensor(sorted(self.eos_token_ids), dtype=torch.long, device=self.device)

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], max_new_tokens: int = 0) -> torch.Tensor:
        """Start a new cache holding the (ragged) prompts; returns next-token logits ``[B, V]`` fp32."""
        prompts = _validate_prompts(prompts, self.context_length, max_new_tokens)
        self.reset()
        tokens, live = left_pad(prompts, device=self.device)
        kwargs = {"logits_to_keep": 1} if self._can_keep_last else {}
        out = self._run(tokens, None, live, **kwargs)
        return self._check(out.logits[:, -1].float())

    @torch.no_grad()
    def extend(self, tokens: torch.Tensor, parents: torch.Tensor | None = None,
               live: torch.Tensor | None = None) -> torch.Tensor:
        """Append ``tokens [B, T]`` (a chain, or a tree given ``parents``); returns logits ``[B, T, V]`` fp32.

        ``logits[:, t]`` is the next-token distribution after token ``t`` (and its ancestors). A tree may be
        grown over several calls: ``parents [B, P + T]`` then also covers its ``P`` nodes written before.
        """
        if tokens.dim() == 1:
            tokens = tokens[:, None]
        return self._check(self._run(tokens, parents, live).logits.float())

    def _check(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.shape[-1] != self.vocab_size:  # some models pad the output embedding
            logits = logits[..., : self.vocab_size]
        check_finite(logits, "the model's logits")
        return logits


class RewardModel:
    """A reward: an HF sequence-classification model (read at the last real token) or a callable.

    A callable has the signature ``reward(prompts: list[list[int]], responses: list[list[int]]) -> [N]``.

    ``score`` scores whole (prompt, response) pairs. The cached interface keeps a prefix per row:
    ``prefill(prefixes)`` then ``score_branches(branches)`` scores each row's candidate continuations on top
    of the cached prefix (one forward over a tree of branches, only the new tokens are processed);
    ``keep_branches(choices)`` then extends the prefixes with chosen candidates without recomputing them, and
    ``append(tokens)`` extends them with any tokens. With a callable reward, or when the reward
    model has its own tokenizer (re-tokenisation through text), the same interface scores the full texts.
    ``static`` (a ``static_cache.StaticOptions``) keeps the cached prefixes in a static cache (compiled path).
    """

    def __init__(self, reward, tokenizer=None, policy_tokenizer=None, static=None):
        self.is_model = isinstance(reward, torch.nn.Module)
        self.counters = ModelCounters()
        self.fn = None if self.is_model else reward
        self.retokenize = (
            self.is_model and tokenizer is not None and policy_tokenizer is not None
            and tokenizer.get_vocab() != policy_tokenizer.get_vocab()
        )
        self.tokenizer, self.policy_tokenizer = tokenizer, policy_tokenizer
        if self.is_model:
            head = getattr(reward, "score", None) or getattr(reward, "classifier", None)
            if head is None:
                raise InputError("reward model has neither a `score` nor a `classifier` head")
            self.head = head
            if static is None:
                self.lm = CachedModel(reward, backbone=reward.base_model)
            else:
                from .static_cache import StaticCachedModel

                self.lm = StaticCachedModel(reward, backbone=reward.base_model, options=static)
            self.context_length = self.lm.context_length
            self.counters = self.lm.counters
        self.prefixes: list[list[int]] = []
        self.prompt_lengths: list[int] = []
        self._prefix_score: torch.Tensor | None = None
        self._scored = None  # the last score_branches block, until keep_branches or another call

    @property
    def cached(self) -> bool:
        return self.is_model and not self.retokenize

    def _texts_to_reward_ids(self, rows: list[list[int]]) -> list[list[int]]:
        texts = self.policy_tokenizer.batch_decode(rows, skip_special_tokens=True)
        return [self.tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]

    def _read(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)[..., 0].float()

    @torch.no_grad()
    def score(self, prompts: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
        """Reward of each (prompt, response) pair, no cache.  ``[N]`` fp32 on the CPU."""
        if not self.is_model:
            self.counters.calls += 1
            self.counters.tokens += sum(len(p) + len(r) for p, r in zip(prompts, responses))
            return check_rewards(self.fn(prompts, responses), prompts)
        rows = [list(p) + list(r) for p, r in zip(prompts, responses)]
        if self.retokenize:
            rows = self._texts_to_reward_ids(rows)
        tmp = CachedModel(self.lm.model, backbone=self.lm._backbone)
        tokens, live = left_pad(rows, device=tmp.device)
        hidden = tmp._run(tokens, None, live).last_hidden_state[:, -1]
        self.counters.calls += 1
        self.counters.tokens += tmp.counters.tokens
        return check_rewards(self._read(hidden), prompts, "the reward model's score")

    # ----------------------------------------------------------- cached use
    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], prefixes: list[list[int]] | None = None) -> torch.Tensor:
        """Cache ``prompt + prefix`` per row; returns the reward of each ``[B]`` (of the prompt alone if empty)."""
        prefixes = prefixes or [[] for _ in prompts]
        self._scored = None
        self.prompts = [list(p) for p in prompts]
        self.prefixes = [list(p) + list(s) for p, s in zip(prompts, prefixes)]
        self.prompt_lengths = [len(p) for p in prompts]
        if not self.cached:
            self._prefix_score = self.score(self.prompts, [r[len(p):] for p, r in zip(self.prompts, self.prefixes)])
            return self._prefix_score
        self.lm.reset()
        tokens, live = left_pad(self.prefixes, device=self.lm.device)
        self._prefix_score = check_rewards(self._read(self.lm._run(tokens, None, live).last_hidden_state[:, -1]),
                                           self.prompts, "the reward model's score")
        return self._prefix_score

    @torch.no_grad()
    def score_branches(self, branches: list[list[list[int]]]) -> list[torch.Tensor]:
        """``branches[b]`` is a list of candidate continuations of row ``b``'s prefix; returns, per row, the
        reward of ``prompt + prefix + candidate`` for each candidate (``[M_b]`` fp32). The prefixes are unchanged
        (the block stays in the cache as dead slots, for ``keep_branches`` to revive one candidate per row).
        """
        self._forget_scored()
        if not self.cached:
            prompts, responses = [], []
            for b, cands in enumerate(branches):
                for c in cands:
                    prompts.append(self.prompts[b])
                    responses.append(self.prefixes[b][self.prompt_lengths[b]:] + list(c))
            flat = self.score(prompts, responses) if prompts else torch.zeros(0)
            out = list(torch.split(flat, [len(cands) for cands in branches]))
            self._scored = (branches, None, 0, out)
            return out
        tokens, parents, live, ends = pack_branches(branches, device=self.lm.device)
        hidden = self.lm._run(tokens, parents, live).last_hidden_state  # [B, T, H]
        self.lm.live[:, -tokens.shape[1]:] = False  # dead until keep_branches revives a chosen candidate
        scores = self._read(hidden).cpu()  # [B, T]
        out = []
        for b, cands in enumerate(branches):
            row = []
            for m, c in enumerate(cands):
                row.append(scores[b, ends[b][m]] if len(c) else self._prefix_score[b])
            out.append(torch.stack(row) if row else torch.zeros(0))
        if out:
            check_rewards(torch.cat(out), [self.prompts[b] for b, cands in enumerate(branches) for _ in cands],
                          "the reward model's score")
        self._scored = (branches, ends, tokens.shape[1], out)
        return out

    @torch.no_grad()
    def keep_branches(self, choices: list[int | None]) -> torch.Tensor:
        """Right after ``score_branches``: extend row ``b``'s prefix by its candidate ``choices[b]`` (``None``:
        by nothing), keeping the slots already computed for it; returns the new prefix rewards ``[B]``."""
        if self._scored is None:
            raise RuntimeError("keep_branches must directly follow score_branches")
        branches, ends, T, scores = self._scored
        self._scored = None
        self._prefix_score = self._prefix_score.clone()
        keep = torch.zeros(len(branches), T, dtype=torch.bool)
        for b, c in enumerate(choices):
            if c is None or len(branches[b][c]) == 0:
                continue
            self.prefixes[b] = self.prefixes[b] + list(branches[b][c])
            self._prefix_score[b] = scores[b][c]
            if self.cached:
                end = ends[b][c]
                keep[b, end - len(branches[b][c]) + 1: end + 1] = True  # a candidate is a contiguous chain
        if self.cached:
            self.lm.live[:, -T:] = keep.to(self.lm.device)
            self.lm._tidy()
        return self._prefix_score

    def _forget_scored(self) -> None:
        """Drop the dead block of an unused ``score_branches`` call."""
        if self._scored is not None:
            self._scored = None
            if self.cached:
                self.lm._tidy()

    @torch.no_grad()
    def append(self, segments: list[list[int]]) -> torch.Tensor:
        """Extend each row's prefix by its accepted segment; returns the new prefix rewards ``[B]``."""
        self._forget_scored()
        for b, s in enumerate(segments):
            self.prefixes[b] = self.prefixes[b] + list(s)
        if not self.cached:
            self._prefix_score = self.score(
                self.prompts, [r[n:] for r, n in zip(self.prefixes, self.prompt_lengths)]
            )
            return self._prefix_score
        if any(len(s) for s in segments):
            tokens, live = right_pad(segments, device=self.lm.device)
            hidden = self.lm._run(tokens, None, live).last_hidden_state
            last = (live.sum(1) - 1).clamp(min=0)
            new = self._read(hidden[torch.arange(len(segments)), last]).cpu()
            has = torch.tensor([len(s) > 0 for s in segments])
            self._prefix_score = check_rewards(torch.where(has, new, self._prefix_score), self.prompts,
                                               "the reward model's score")
            self.lm._tidy()  # padding slots of the block are dead
        return self._prefix_score

    def select_rows(self, rows: list[int]) -> None:
        """Keep only the given rows (repeats allowed), like ``CachedModel.select_rows``."""
        self._forget_scored()
        self.prompts = [self.prompts[r] for r in rows]
        self.prefixes = [list(self.prefixes[r]) for r in rows]
        self.prompt_lengths = [self.prompt_lengths[r] for r in rows]
        self._prefix_score = self._prefix_score[torch.as_tensor(rows, dtype=torch.long)]
        if self.cached:
            self.lm.select_rows(rows)


def pack_branches(branches: list[list[list[int]]], device=None):
    """Pack per-row candidate continuations as one tree block per row (each candidate a chain off the prefix).

    Returns ``tokens [B, T]``, ``parents [B, T]``, ``live [B, T]`` and ``ends``: per row, the index in the
    block of each candidate's last token (-1 for an empty candidate).
    """
    T = max(1, max((sum(len(c) for c in cands) for cands in branches), default=1))
    B = len(branches)
    tokens = torch.zeros(B, T, dtype=torch.long)
    parents = torch.full((B, T), -1, dtype=torch.long)
    live = torch.zeros(B, T, dtype=torch.bool)
    ends = []
    for b, cands in enumerate(branches):
        t, row_ends = 0, []
        for c in cands:
            for j, tok in enumerate(c):
                tokens[b, t] = int(tok)
                parents[b, t] = t - 1 if j > 0 else -1
                live[b, t] = True
                t += 1
            row_ends.append(t - 1 if len(c) else -1)
        ends.append(row_ends)
    return tokens.to(device), parents.to(device), live.to(device), ends
