"""Layer 3: reward models, ``RewardModel``: a sequence-classification model over a cached prefix, or a callable."""

from __future__ import annotations

import torch

from ..errors import InputError
from ..validation import check_rewards
from .causal_lm import CachedModel, ModelCounters, left_pad, right_pad
from .ragged import RaggedStore


def is_process_reward_model(model) -> bool:
    """True for an HF token-classification model (``*ForTokenClassification``): a process reward model (PRM)."""
    return isinstance(model, torch.nn.Module) and type(model).__name__.endswith("ForTokenClassification")


def same_vocabulary(tokenizer, other) -> bool:
    """Whether two tokenizers give every token the same id (then token ids pass between them as they are)."""
    return tokenizer.get_vocab() == other.get_vocab()


class RewardModel:
    """A reward: an HF sequence-classification model (read at the last real token), a process reward model, or a
    callable.

    A process reward model (PRM) is a token-classification model with 2 labels (``*ForTokenClassification``, as
    TRL's PRM trainer and Qwen2.5-Math-PRM's head produce: logits ``[B, T, 2]``, label 1 "good"): its score of
    a (partial) response is ``softmax(logits)[1]``, the probability of a good step, read at the response's last
    token. A step-level method (``beam``, ``smc``) scores each step when it ends, so that token is the step's
    separator when steps end at a delimiter (e.g. a newline): a step's score is the PRM's reading at its
    separator, over the cached prefix like any reward model. A PRM trained to read a tag *inserted* after each
    step (Qwen2.5-Math-PRM's ``<extra_0>``) takes ``step_tag`` (its token id): the PRM then sees every scored
    piece (a step appended, a candidate branch, a prefilled prefix, a whole scored response) followed by the tag,
    and reads its score there; the tags stay in its cached prefix, so step ``t`` is read after
    ``prompt, step_1, tag, ..., step_t, tag``, as such a PRM is trained. The policy never sees the tag.
    (Math-Shepherd's PRM, a causal LM read at ``ки`` through the logits of two tokens, is another kind of model
    and is not supported.)

    A callable has the signature ``reward(prompts: list[list[int]], responses: list[list[int]]) -> [N]``.

    ``score`` scores whole (prompt, response) pairs. The cached interface keeps a prefix per row:
    ``prefill(prefixes)`` then ``score_branches(branches)`` scores each row's candidate continuations on top
    of the cached prefix (one forward over a tree of branches, only the new tokens are processed);
    ``keep_branches(choices)`` then extends the prefixes with chosen candidates without recomputing them, and
    ``append(tokens)`` extends them with any tokens. With a callable reward, or when the reward
    model has its own tokenizer (re-tokenisation through text), the same interface scores the full texts.
    ``new_store`` makes the KV stores of a reward model's caches (``fastalign.models.builder`` passes the
    engine's kind; the ragged store by default): one for the cached prefixes, one for ``score``.
    """

    def __init__(self, reward, tokenizer=None, policy_tokenizer=None, new_store=RaggedStore,
                 step_tag: int | None = None):
        self.is_model = isinstance(reward, torch.nn.Module)
        self.counters = ModelCounters()
        self.fn = None if self.is_model else reward
        self.process = False
        self.retokenize = (
            self.is_model and tokenizer is not None and policy_tokenizer is not None
            and not same_vocabulary(tokenizer, policy_tokenizer)
        )
        self.tokenizer, self.policy_tokenizer = tokenizer, policy_tokenizer
        if self.is_model:
            head = getattr(reward, "score", None) or getattr(reward, "classifier", None)
            if head is None:
                raise InputError("reward model has neither a `score` nor a `classifier` head")
            self.head = head
            self.process = is_process_reward_model(reward)
            labels = getattr(reward.config, "num_labels", None)
            if self.process and labels != 2:
                raise InputError("reward: a process reward model (token classification) needs 2 labels (bad, "
                                 f"good), got num_labels={labels}")
            if not self.process and labels != 1:  # its label 0 would be read as the reward (for a sentiment
                raise InputError(  # classifier, the negative class's logit)
                    f"reward: a reward model (sequence classification) has one output, got num_labels={labels}; "
                    "for a classifier, pass a callable reward(prompts, responses) that reads the label you mean")
            self.embedded = reward.get_input_embeddings().num_embeddings
            self.lm = CachedModel(reward, new_store(), backbone=reward.base_model)
            self.scorer = CachedModel(reward, new_store(), backbone=reward.base_model)  # score(): no prefix
            self.scorer.counters = self.counters = self.lm.counters
            self.context_length, self.context_why = self.lm.context_length, self.lm.context_why
        self.step_tag = step_tag
        if step_tag is not None:
            if not (self.is_model and self.process and not self.retokenize):
                raise InputError("step_tag is for a process reward model (token classification) reading the "
                                 "policy's token ids")
            vocab = reward.get_input_embeddings().num_embeddings
            if isinstance(step_tag, bool) or not isinstance(step_tag, int) or not 0 <= step_tag < vocab:
                raise InputError(f"step_tag must be a token id of the process reward model (0 .. {vocab - 1}), "
                                 f"got {step_tag!r}")
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

    def _tagged(self, piece) -> list[int]:
        """A scored piece as the reward model sees it: followed by ``step_tag`` when there is one (and the piece
        is not empty)."""
        piece = list(piece)
        return piece + [self.step_tag] if self.step_tag is not None and piece else piece

    def _check_ids(self, rows) -> None:
        """Every id the reward model is fed (``rows``: token lists, on the host: no device sync) has an embedding.
        The engine compares vocabularies with a local target; a remote target's is unknown, and its ids would
        index past the table (a raw IndexError)."""
        top = max((max(row) for row in rows if len(row)), default=-1)
        if top >= self.embedded:
            raise InputError(f"vocabularies differ: the reward model embeds {self.embedded} token ids, a sequence "
                             f"to score holds id {top}; pass reward_tokenizer=... to re-tokenise")

    def _read(self, hidden: torch.Tensor) -> torch.Tensor:
        """The reward at each position of ``hidden [..., H]``: the head's output, or for a process reward model
        the probability of the "good" label (label 1).  ``[...]`` fp32."""
        if self.process:
            return torch.softmax(self.head(hidden).float(), -1)[..., 1]
        return self.head(hidden)[..., 0].float()

    @torch.no_grad()
    def score(self, prompts: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
        """Reward of each (prompt, response) pair, no cache.  ``[N]`` fp32 on the CPU."""
        if not self.is_model:
            self.counters.calls += 1
            self.counters.tokens += sum(len(p) + len(r) for p, r in zip(prompts, responses))
            return check_rewards(self.fn(prompts, responses), prompts)
        rows = [list(p) + self._tagged(r) for p, r in zip(prompts, responses)]
        if self.retokenize:
            rows = self._texts_to_reward_ids(rows)
        self.scorer.reset()
        self._check_ids(rows)
        tokens, live = left_pad(rows, device=self.scorer.device)
        hidden = self.scorer.write(tokens, None, live).last_hidden_state[:, -1]
        return check_rewards(self._read(hidden), prompts, "the reward model's score")

    # ----------------------------------------------------------- cached use
    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], prefixes: list[list[int]] | None = None) -> torch.Tensor:
        """Cache ``prompt + prefix`` per row; returns the reward of each ``[B]`` (of the prompt alone if empty)."""
        prefixes = prefixes or [[] for _ in prompts]
        self._scored = None
        self.prompts = [list(p) for p in prompts]
        self.prefixes = [list(p) + self._tagged(s) for p, s in zip(prompts, prefixes)]
        self.prompt_lengths = [len(p) for p in prompts]
        if not self.cached:
            self._prefix_score = self.score(self.prompts, [r[len(p):] for p, r in zip(self.prompts, self.prefixes)])
            return self._prefix_score
        self.lm.reset()
        self._check_ids(self.prefixes)
        tokens, live = left_pad(self.prefixes, device=self.lm.device)
        self._prefix_score = check_rewards(self._read(self.lm.write(tokens, None, live).last_hidden_state[:, -1]),
                                           self.prompts, "the reward model's score")
        self.lm.close_block()  # the prefixes: never addressed as a block, so compaction may move them
        return self._prefix_score

    @torch.no_grad()
    def score_branches(self, branches: list[list[list[int]]]) -> list[torch.Tensor]:
        """``branches[b]`` is a list of candidate continuations of row ``b``'s prefix; returns, per row, the
        reward of ``prompt + prefix + candidate`` for each candidate (``[M_b]`` fp32). The prefixes are unchanged
        (the block stays in the cache as dead slots, for ``keep_branches`` to revive one candidate per row).
        """
        self._forget_scored()
        branches = [[self._tagged(c) for c in cands] for cands in branches]
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
        self._check_ids([c for cands in branches for c in cands])
        tokens, parents, live, ends = pack_branches(branches, device=self.lm.device)
        hidden = self.lm.write(tokens, parents, live).last_hidden_state  # [B, T, H]
        self.lm.set_block_live(torch.zeros_like(live))  # dead until keep_branches revives a chosen candidate
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
            self.lm.set_block_live(keep)
            self.lm.tidy()
        return self._prefix_score

    def _forget_scored(self) -> None:
        """Drop the dead block of an unused ``score_branches`` call."""
        if self._scored is not None:
            self._scored = None
            if self.cached:
                self.lm.tidy()

    @torch.no_grad()
    def append(self, segments: list[list[int]]) -> torch.Tensor:
        """Extend each row's prefix by its accepted segment; returns the new prefix rewards ``[B]``."""
        self._forget_scored()
        segments = [self._tagged(s) for s in segments]
        for b, s in enumerate(segments):
            self.prefixes[b] = self.prefixes[b] + list(s)
        if not self.cached:
            self._prefix_score = self.score(
                self.prompts, [r[n:] for r, n in zip(self.prefixes, self.prompt_lengths)]
            )
            return self._prefix_score
        if any(len(s) for s in segments):
            self._check_ids(segments)
            tokens, live = right_pad(segments, device=self.lm.device)
            hidden = self.lm.write(tokens, None, live).last_hidden_state
            last = (live.sum(1) - 1).clamp(min=0)
            new = self._read(hidden[torch.arange(len(segments)), last]).cpu()
            has = torch.tensor([len(s) > 0 for s in segments])
            self._prefix_score = check_rewards(torch.where(has, new, self._prefix_score), self.prompts,
                                               "the reward model's score")
            self.lm.tidy()  # padding slots of the block are dead
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
