"""Layer 5: ``fastalign.decode`` and ``fastalign.Engine``."""

from __future__ import annotations

import copy
import os
import threading
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from . import validation as check
from .errors import InputError, NonFiniteReward
from .methods import MODEL_ROLES, get_method, remote_target_methods
from .methods.base import Context, Randomness
from .models import chat as chat_prompts
from .models.builder import ModelBuilder
from .models.causal_lm import CausalLM
from .models.remote import RemoteLM
from .models.reward import RewardModel

@dataclass
class DecodeOutput:
    sequences: list[list[int]]  # generated token ids per prompt (prompt excluded, EOS kept)
    texts: list[str] | None  # decoded sequences when a tokenizer is known
    stats: dict  # calls and tokens per model, generated tokens, wall time, method counters
    extra: dict = field(default_factory=dict)  # method-specific outputs (e.g. qalign's state_path)


def warn_unknown_tokens(tokenizer, texts: list[str], ids: list[list[int]], share: float = 0.5) -> None:
    """Warn when a tokenizer turns a prompt mostly (more than ``share`` of its tokens, special tokens aside)
    into its unknown token, e.g. English under the toy world's word-level tokenizer: the model would see
    almost nothing of the prompt. One warning per call, naming the first such prompt."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return
    special = set(getattr(tokenizer, "all_special_ids", None) or []) - {unk}
    bad = []
    for i, row in enumerate(ids):
        words = [t for t in row if t not in special]
        unknown = sum(t == unk for t in words)
        if words and unknown > share * len(words):
            bad.append((i, unknown, len(words)))
    if bad:
        i, unknown, total = bad[0]
        warnings.warn(f"{len(bad)} of {len(ids)} prompts are mostly unknown tokens for this tokenizer; prompt {i} "
                      f"({texts[i][:60]!r}) is {unknown} unknown token(s) out of {total}: the model sees almost "
                      "nothing of it", stacklevel=3)


class Engine:
    """Holds loaded models for repeated ``decode`` calls.

    Models may be HF model objects, names or local folders, or ``.gguf`` files (dequantised on loading; the
    tokenizer then comes from the same file), loaded with ``trust_remote_code=False`` unless asked.
    ``device`` and ``dtype`` apply to every local model, objects included (moved and cast in place).
    ``reward`` may also be a callable ``reward(prompts, responses) -> [N]`` over token-id lists, or a text
    reward by name: ``"vader"`` or ``"module:function"`` (``fastalign.models.text_rewards``).
    ``reward_tokenizer`` is the reward model's own tokenizer, when it differs from the policy's.
    ``step_reward`` is the reward of partial responses for the step-level methods (``smc``'s twist, ``beam``'s
    step scores): a process reward model (``*ForTokenClassification``, 2 labels: P(good) at a step's last
    token), a reward model, or a callable, given like ``reward`` (its tokenizer is its own when it is a path,
    else the policy's). Without one, those methods read ``reward`` on partial responses; with both, one engine
    serves the outcome methods (``bon``, ...) and the step-level ones. ``smc``'s twist and its final tilt are
    then both the step reward (its target is ``p exp(step_reward / beta)``, as in particle filtering with a
    PRM): the ``reward`` beside it is not read by ``smc``.
    ``chat=True`` renders plain string prompts with the tokenizer's chat template (conversations, lists of
    ``{"role", "content"}`` messages, always are). When the tokenizer has a chat template, its end-of-turn
    token ends a response like EOS (``fastalign.models.chat``).

    ``compile=True`` runs the models on the compiled path (``fastalign.models.slots``; ``ModelBuilder`` decides
    it for every model): a preallocated static
    KV cache and fixed-shape steps compiled with ``torch.compile`` once per shape bucket (the first calls of
    each shape pay the compilation, tens of seconds on a CPU); outputs are those of the eager path (the
    default and the reference): the same laws, and the same tokens in fp32 (equal up to float rounding in
    bf16 / fp16). On a CUDA device the compiled steps also replay as CUDA graphs (``FASTALIGN_CUDA_GRAPHS=0``
    turns them off; docs/benchmarks.md, "CUDA graphs"). ``static_cache=True`` without ``compile`` runs the
    static cache uncompiled (for tests and debugging). CPU threads are the caller's setting
    (``torch.set_num_threads``); see docs/benchmarks.md ("CPU threads") for the measured defaults of the CLI and
    benchmarks.

    One engine may be shared by several threads: its models hold per-call state (KV caches), so ``decode``
    calls are serialised by a lock (each call runs alone and gets exactly the tokens it would get alone);
    for parallel decoding use one engine per thread.
    """

    def __init__(self, target=None, draft=None, ref=None, reward=None, tokenizer=None,
                 reward_tokenizer=None, step_reward=None, trust_remote_code: bool = False, device=None, dtype=None,
                 chat: bool = False, compile: bool = False, static_cache: bool | None = None):
        for name, flag in (("trust_remote_code", trust_remote_code), ("chat", chat), ("compile", compile)):
            check.check_bool(name, flag)
        check.check_bool("static_cache", static_cache, optional=True)
        for role, spec in (("target", target), ("draft", draft), ("ref", ref)):
            check.check_model(role, spec, accepted=(CausalLM, RemoteLM))
        check.check_not_tokenizer("reward", reward)
        check.check_not_tokenizer("step_reward", step_reward)
        build = self.builder = ModelBuilder.from_settings(check.check_device(device), check.check_dtype(dtype),
                                                          compile, static_cache, trust_remote_code)
        self._lock = threading.Lock()
        self.chat = chat
        tokenizer_role = "tokenizer"
        if tokenizer is None and isinstance(target, (str, os.PathLike)):
            tokenizer, tokenizer_role = target, "target"
        with check.loading(tokenizer_role, tokenizer):
            self.tokenizer = build.tokenizer(tokenizer, role=tokenizer_role)
        for role, spec in (("target", target), ("draft", draft), ("ref", ref)):
            with check.loading(role, spec):
                setattr(self, role, build.causal_lm(spec, role=role) if spec is not None else None)
        if reward is None and reward_tokenizer is not None:  # (the step reward never re-tokenises through it)
            raise InputError("reward_tokenizer=... is the reward model's tokenizer, but no reward= is given")
        if reward is not None:
            with check.loading("reward tokenizer", reward_tokenizer):
                reward_tokenizer = build.tokenizer(reward_tokenizer, role="reward tokenizer")
        with check.loading("reward", reward):
            self.reward = build.reward(reward, reward_tokenizer, self.tokenizer) if reward is not None else None
        if reward_tokenizer is not None:  # each case below ignored it: the reward read the policy's ids as its own
            if not self.reward.is_model or isinstance(reward, RewardModel):
                raise InputError("reward_tokenizer=... is for a reward model given as a model or a path; a callable "
                                 "or text reward never reads it, and a RewardModel carries its own tokenizers")
            if self.tokenizer is None:
                raise InputError("reward_tokenizer=... re-tokenises the policy's text for the reward, which needs the "
                                 "policy's tokenizer: pass tokenizer=... (the target's)")
        with check.loading("step_reward", step_reward):
            self.step_reward = build.reward(step_reward, None, self.tokenizer) if step_reward is not None else None
        for role in ("draft", "ref"):
            lm = getattr(self, role)
            if (isinstance(lm, CausalLM) and isinstance(self.target, CausalLM)
                    and lm.vocab_size != self.target.vocab_size):
                raise InputError(
                    f"vocabularies differ: the {role} has {lm.vocab_size} tokens, the target {self.target.vocab_size}"
                )
        for role in ("reward", "step_reward"):
            scorer = getattr(self, role)
            if scorer is not None and scorer.cached and isinstance(self.target, CausalLM):
                embedded = scorer.lm.model.get_input_embeddings().num_embeddings
                if embedded < self.target.vocab_size:  # the target's ids would index past the reward's embedding
                    hint = "pass reward_tokenizer=... to re-tokenise" if role == "reward" else \
                        "give the path of a model with its own tokenizer to re-tokenise"
                    raise InputError(f"vocabularies differ: the {role} model embeds {embedded} token ids, the "
                                     f"target emits up to {self.target.vocab_size}; {hint}")
        earlier = [self.target]
        for role in ("draft", "ref"):  # one CausalLM in two roles would share one cache: each role gets its own
            lm = getattr(self, role)
            if isinstance(lm, CausalLM) and any(lm is m for m in earlier):
                shared, lm = lm, CausalLM(lm.model, build.new_store())
                lm.add_stop_tokens(shared.eos_token_ids)
                setattr(self, role, lm)
            earlier.append(lm)
        end_of_turn = set(chat_prompts.end_of_turn_ids(self.tokenizer))
        for role in ("target", "draft", "ref"):  # (each role's model is its own now)
            lm = getattr(self, role)
            if isinstance(lm, (CausalLM, RemoteLM)) and not end_of_turn <= lm.eos_token_ids:
                lm = copy.copy(lm)  # a model the caller passed (a RemoteLM, a CausalLM) keeps its own stop tokens
                lm.add_stop_tokens(end_of_turn)
                setattr(self, role, lm)

    def encode(self, prompts, chat: bool | None = None) -> list[list[int]]:
        """Prompts as token-id lists, checked against the target's vocabulary: conversations (lists of
        ``{"role", "content"}`` messages) through the chat template, strings through the chat template
        (``chat``, default: the engine's) or the tokenizer, id lists as they are."""
        chat = self.chat if check.check_bool("chat", chat, optional=True) is None else chat
        vocab_size = getattr(self.target, "vocab_size", None)
        if (isinstance(prompts, Iterable)  # a generator or an array of prompts: the list it holds (chat included)
                and not isinstance(prompts, (list, tuple, str, bytes, dict, set, frozenset, torch.Tensor))
                and getattr(prompts, "ndim", 1) != 0):  # (a 0-d array is one value: check_prompts names it)
            prompts = list(prompts)
        if isinstance(prompts, (list, tuple)) and prompts and (
                any(chat_prompts.is_conversation(p) for p in prompts)
                or (chat and all(isinstance(p, str) for p in prompts))):
            return check.check_prompts(chat_prompts.render(self.tokenizer, list(prompts)), None, vocab_size)
        ids = check.check_prompts(prompts, self.tokenizer, vocab_size)
        if self.tokenizer is not None and isinstance(prompts, (list, tuple)) and all(isinstance(p, str) for p in prompts):
            warn_unknown_tokens(self.tokenizer, list(prompts), ids)
        return ids

    def decode(self, prompts, method: str = "sample", max_new_tokens: int = 128, temperature: float | None = None,
               top_k: int | None = None, top_p: float | None = None, seed: int | list[int] | None = None,
               chat: bool | None = None, **options) -> DecodeOutput:
        """Decode ``prompts`` with ``method``; see ``fastalign.decode``. Thread-safe (calls are serialised)."""
        with self._lock:
            try:
                return self._decode(prompts, method, max_new_tokens, temperature, top_k, top_p, seed, chat, options)
            except NonFiniteReward as e:  # name the prompt by its index in this call
                index = next((i for i, p in enumerate(self._prompt_ids) if p == e.prompt), None)
                if index is None:
                    raise
                raise InputError(f"prompt {index}: {e}") from None

    def models(self) -> dict:
        """This engine's models by role (``MODEL_ROLES``), None where a role is not given."""
        return {role: getattr(self, role) for role in MODEL_ROLES}

    def context(self, max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None, seed,
                num_prompts: int = 1, method: str = "sample") -> Context:
        """The context a decode of ``num_prompts`` prompts with ``method`` runs in: this engine's models of the
        roles the method uses (``Method.models_for``), the sampling settings and the prompts' randomness
        (``seed``: checked, see ``decode``). ``decode`` builds its own here, and so does the server for each
        prompt it samples."""
        models = get_method(method).models_for(self.models())
        return Context(models.get("target"), models.get("draft"), models.get("ref"), models.get("reward"),
                       self.tokenizer, max_new_tokens, float(temperature), top_k, top_p,
                       Randomness(seed, num_prompts), step_reward=models.get("step_reward"))

    def _decode(self, prompts, method, max_new_tokens, temperature, top_k, top_p, seed, chat,
                options) -> DecodeOutput:
        self._prompt_ids = []
        spec = get_method(method)
        options = check.check_method_options(method, spec.run, options)
        used = spec.models_for(self.models())  # names a missing model
        if isinstance(self.target, RemoteLM) and not spec.remote_target:
            raise InputError(f"method {method!r} needs per-token logits, so a local target (a model or a path); "
                             f"a RemoteLM target works with {', '.join(remote_target_methods())}")
        for role in ("draft", "ref"):
            if isinstance(getattr(self, role), RemoteLM):
                raise InputError(f"the {role} must be a local model (a model or a path), not a RemoteLM")
        max_new_tokens = check.check_int("max_new_tokens", max_new_tokens, minimum=1)
        temperature, top_k, top_p = spec.sampling_settings(temperature, top_k, top_p)
        check.check_sampling(temperature, top_k, top_p)
        prompt_ids = self._prompt_ids = self.encode(prompts, chat=chat)
        ctx = self.context(max_new_tokens, temperature, top_k, top_p, seed, len(prompt_ids), method)  # checks the seed
        models = {}  # the engine's models by the role each was given as (a model given in two roles: the first)
        for role, m in self.models().items():
            if m is not None and all(m is not other for other in models.values()):
                models[role] = m
        # a reward standing in as the step reward is named "reward"; a re-tokenising reward counts other tokens,
        # and a PRM's step tags are checked where they are written
        check.check_context_lengths({role: m for role, m in models.items() if any(m is u for u in used.values())
                                     and not getattr(m, "retokenize", False)}, prompt_ids, max_new_tokens)
        before = {role: (m.counters.calls, m.counters.tokens) for role, m in models.items()}
        start = time.perf_counter()
        result = spec.run(ctx, prompt_ids, **options)
        wall = time.perf_counter() - start

        stats = {}
        for role in MODEL_ROLES:
            m = models.get(role)
            calls, tokens = (m.counters.calls - before[role][0], m.counters.tokens - before[role][1]) if m else (0, 0)
            stats[f"{role}_calls"], stats[f"{role}_tokens"] = calls, tokens
        stats["generated_tokens"] = sum(len(s) for s in result.sequences)
        stats["wall_time_s"] = wall
        stats.update(ctx.stats)
        texts = None
        if self.tokenizer is not None:
            texts = self.tokenizer.batch_decode(result.sequences, skip_special_tokens=True)
        return DecodeOutput(result.sequences, texts, stats, result.extra)


def decode(prompts, method: str = "sample", target=None, draft=None, ref=None, reward=None, tokenizer=None,
           max_new_tokens: int = 128, temperature: float | None = None, top_k: int | None = None,
           top_p: float | None = None, seed: int | list[int] | None = None, chat: bool = False, step_reward=None,
           **options) -> DecodeOutput:
    """Decode ``prompts`` (list of strings, of chat conversations or of token-id lists) with a test-time
    alignment ``method``. Conversations (lists of ``{"role", "content"}`` messages), and strings with
    ``chat=True``, are rendered with the tokenizer's chat template and its generation prompt; a response then
    ends at the template's end-of-turn token as at EOS. Models may be ``.gguf`` files (see ``Engine``).

    ``seed``: one int per prompt (a list), or an int (prompt ``i`` then gets a seed derived from it and ``i``),
    or None (fresh entropy). A prompt's output depends only on its own seed, prompt and models, never on its
    row or on the other prompts of the batch (docs/design.md 1.4).

    ``temperature=None`` takes the method's documented sampling defaults (temperature 1.0 unless its paper
    says otherwise, and the paper's top-k where it has one); an explicit ``temperature`` uses exactly the
    given ``temperature`` / ``top_k`` / ``top_p``.
    ``step_reward``: the reward of partial responses for ``smc`` and ``beam`` (see ``Engine``; without it they
    read ``reward``). Method options (``n``, ``num_draft_tokens``, ``tree``, ``beta``, ...) are passed as
    keywords. Model loading options (``trust_remote_code``, ``device``, ``dtype``, ``reward_tokenizer``, ``compile``,
    ``static_cache``) go to ``Engine``.
    """
    engine_keys = ("trust_remote_code", "device", "dtype", "reward_tokenizer", "compile", "static_cache")
    engine_options = {k: options.pop(k) for k in engine_keys if k in options}
    engine = Engine(target=target, draft=draft, ref=ref, reward=reward, tokenizer=tokenizer, step_reward=step_reward,
                    **engine_options)
    return engine.decode(prompts, method=method, max_new_tokens=max_new_tokens, temperature=temperature,
                         top_k=top_k, top_p=top_p, seed=seed, chat=chat, **options)
