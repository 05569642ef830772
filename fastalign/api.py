"""Layer 5: ``fastalign.decode`` and ``fastalign.Engine``."""

from __future__ import annotations

import os
import threading
import time
import warnings
from dataclasses import dataclass, field

import torch

from . import chat as chat_prompts
from . import loading, rewards
from . import validation as check
from .methods import get_method, remote_target_methods
from .methods.base import Context, Randomness
from .models import CausalLM, InputError, RewardModel
from .remote import RemoteLM
from .static_cache import StaticCachedModel, StaticCausalLM, StaticOptions
from .validation import NonFiniteReward

MODEL_ROLES = ("target", "draft", "ref", "reward")


@dataclass
class DecodeOutput:
    sequences: list[list[int]]  # generated token ids per prompt (prompt excluded, EOS kept)
    texts: list[str] | None  # decoded sequences when a tokenizer is known
    stats: dict  # calls and tokens per model, generated tokens, wall time, method counters
    extra: dict = field(default_factory=dict)  # method-specific outputs (e.g. qalign's state_path)


def _placed(module: torch.nn.Module, device, dtype) -> torch.nn.Module:
    """``module`` moved to ``device`` and cast to ``dtype`` where given (in place, as ``nn.Module.to`` does)."""
    if isinstance(dtype, torch.dtype):  # "auto" or None: keep the dtype the model has
        module = module.to(dtype=dtype)
    if device is not None:
        module = module.to(device)
    return module


def _load_causal_lm(spec, trust_remote_code: bool, device, dtype, static: StaticOptions | None = None,
                    role: str = "model"):
    """A ``CausalLM`` (a ``StaticCausalLM`` given ``static``) from an HF name, a local folder, a ``.gguf`` file,
    an HF model or a ``CausalLM``; ``device`` and ``dtype`` apply to all of them (a remote model stays as it is).
    ``role`` names the model in errors."""
    if isinstance(spec, RemoteLM):
        return spec
    if isinstance(spec, CausalLM):
        same_kind = isinstance(spec, StaticCausalLM) == (static is not None)
        if same_kind and (device is None or torch.device(device) == spec.device) and \
                (not isinstance(dtype, torch.dtype) or dtype == spec.dtype):
            return spec
        spec = spec.model  # another layout, device or dtype: rewrap its model
    if isinstance(spec, (str, os.PathLike)):
        spec = loading.load_causal_lm(spec, trust_remote_code=trust_remote_code, dtype=dtype, role=role)
    spec = _placed(spec, device, dtype)
    return StaticCausalLM(spec, static) if static is not None else CausalLM(spec)


def _load_tokenizer(spec, trust_remote_code: bool, role: str = "tokenizer"):
    return loading.load_tokenizer(spec, trust_remote_code=trust_remote_code, role=role)


def _load_reward(spec, tokenizer, policy_tokenizer, trust_remote_code: bool, device, dtype,
                 static: StaticOptions | None = None):
    """A ``RewardModel`` from a reward model (name, path or object), a token-id callable, or a text reward named
    by a string: a built-in name (``"vader"``) or ``"module:function"`` (see ``fastalign.rewards``); ``static``
    keeps a reward model's cached prefixes in a static cache."""
    if isinstance(spec, RewardModel):
        same_kind = not spec.is_model or isinstance(spec.lm, StaticCachedModel) == (static is not None)
        if not spec.is_model or (same_kind and device is None and not isinstance(dtype, torch.dtype)):
            return spec
        return RewardModel(_placed(spec.lm.model, device, dtype), spec.tokenizer, spec.policy_tokenizer, static=static)
    if isinstance(spec, str):
        fn = rewards.text_reward_function(spec)
        if fn is not None:
            return RewardModel(rewards.TextReward(fn, policy_tokenizer, name=spec))
    if isinstance(spec, (str, os.PathLike)):
        from transformers import AutoModelForSequenceClassification

        if tokenizer is None:
            tokenizer = _load_tokenizer(spec, trust_remote_code)
        spec = AutoModelForSequenceClassification.from_pretrained(
            spec, trust_remote_code=trust_remote_code, dtype=dtype
        )
    if isinstance(spec, torch.nn.Module):
        spec = _placed(spec, device, dtype)
    elif not callable(spec):
        raise InputError("reward must be a model, a name/path, a built-in reward name "
                         f"({', '.join(rewards.TEXT_REWARDS)}), 'module:function', or a callable "
                         "reward(prompts, responses)")
    return RewardModel(spec, tokenizer=tokenizer, policy_tokenizer=policy_tokenizer, static=static)


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
    reward by name: ``"vader"`` or ``"module:function"`` (``fastalign.rewards``).
    ``reward_tokenizer`` is the reward model's own tokenizer, when it differs from the policy's.
    ``chat=True`` renders plain string prompts with the tokenizer's chat template (conversations, lists of
    ``{"role", "content"}`` messages, always are). When the tokenizer has a chat template, its end-of-turn
    token ends a response like EOS (``fastalign.chat``).

    ``compile=True`` runs the models on the compiled path (``fastalign.static_cache``): a preallocated static
    KV cache and fixed-shape steps compiled with ``torch.compile`` once per shape bucket (the first calls of
    each shape pay the compilation, tens of seconds on a CPU); outputs are those of the eager path (the
    default and the reference): the same laws, and the same tokens in fp32 (equal up to float rounding in
    bf16 / fp16). ``static_cache=True`` without ``compile`` runs the static cache uncompiled
    (for tests and debugging). CPU threads are the caller's setting (``torch.set_num_threads``); see the
    README ("CPU threads") for the measured defaults of the CLI and benchmarks.

    One engine may be shared by several threads: its models hold per-call state (KV caches), so ``decode``
    calls are serialised by a lock (each call runs alone and gets exactly the tokens it would get alone);
    for parallel decoding use one engine per thread.
    """

    def __init__(self, target=None, draft=None, ref=None, reward=None, tokenizer=None,
                 reward_tokenizer=None, trust_remote_code: bool = False, device=None, dtype=None,
                 chat: bool = False, compile: bool = False, static_cache: bool | None = None):
        for name, flag in (("trust_remote_code", trust_remote_code), ("chat", chat), ("compile", compile)):
            check.check_bool(name, flag)
        check.check_bool("static_cache", static_cache, optional=True)
        for role, spec in (("target", target), ("draft", draft), ("ref", ref)):
            check.check_model(role, spec, accepted=(CausalLM, RemoteLM))
        check.check_not_tokenizer("reward", reward)
        static = compile if static_cache is None else static_cache
        if compile and not static:
            raise InputError("compile=True runs on the static cache; it cannot be combined with static_cache=False")
        self.static = StaticOptions(compile=compile) if static else None
        load = dict(trust_remote_code=trust_remote_code, device=check.check_device(device),
                    dtype=check.check_dtype(dtype), static=self.static)
        self._lock = threading.Lock()
        self.chat = chat
        tokenizer_role = "tokenizer"
        if tokenizer is None and isinstance(target, (str, os.PathLike)):
            tokenizer, tokenizer_role = target, "target"
        with check.loading(tokenizer_role, tokenizer):
            self.tokenizer = _load_tokenizer(tokenizer, trust_remote_code, role=tokenizer_role)
        for role, spec in (("target", target), ("draft", draft), ("ref", ref)):
            with check.loading(role, spec):
                setattr(self, role, _load_causal_lm(spec, **load, role=role) if spec is not None else None)
        with check.loading("reward", reward):
            self.reward = (
                _load_reward(reward, _load_tokenizer(reward_tokenizer, trust_remote_code), self.tokenizer, **load)
                if reward is not None else None
            )
        for role in ("draft", "ref"):
            lm = getattr(self, role)
            if (isinstance(lm, CausalLM) and isinstance(self.target, CausalLM)
                    and lm.vocab_size != self.target.vocab_size):
                raise InputError(
                    f"vocabularies differ: the {role} has {lm.vocab_size} tokens, the target {self.target.vocab_size}"
                )
        if self.reward is not None and self.reward.cached and isinstance(self.target, CausalLM):
            embedded = self.reward.lm.model.get_input_embeddings().num_embeddings
            if embedded < self.target.vocab_size:  # the target's ids would index past the reward's embedding
                raise InputError(f"vocabularies differ: the reward model embeds {embedded} token ids, the target "
                                 f"emits up to {self.target.vocab_size}; pass reward_tokenizer=... to re-tokenise")
        end_of_turn = chat_prompts.end_of_turn_ids(self.tokenizer)
        for lm in (self.target, self.draft, self.ref):
            if isinstance(lm, CausalLM) and end_of_turn:
                lm.add_stop_tokens(end_of_turn)

    def encode(self, prompts, chat: bool | None = None) -> list[list[int]]:
        """Prompts as token-id lists, checked against the target's vocabulary: conversations (lists of
        ``{"role", "content"}`` messages) through the chat template, strings through the chat template
        (``chat``, default: the engine's) or the tokenizer, id lists as they are."""
        chat = self.chat if check.check_bool("chat", chat, optional=True) is None else chat
        vocab_size = getattr(self.target, "vocab_size", None)
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

    def _decode(self, prompts, method, max_new_tokens, temperature, top_k, top_p, seed, chat,
                options) -> DecodeOutput:
        self._prompt_ids = []
        module, run = get_method(method)
        check.check_method_options(method, run, options)
        for role in module.REQUIRES:
            if getattr(self, role) is None:
                raise InputError(f"method {method!r} needs a {role} model (pass {role}=...)")
        if isinstance(self.target, RemoteLM) and not getattr(module, "REMOTE_TARGET", False):
            raise InputError(f"method {method!r} needs per-token logits, so a local target (a model or a path); "
                             f"a RemoteLM target works with {', '.join(remote_target_methods())}")
        for role in ("draft", "ref"):
            if isinstance(getattr(self, role), RemoteLM):
                raise InputError(f"the {role} must be a local model (a model or a path), not a RemoteLM")
        check.check_int("max_new_tokens", max_new_tokens, minimum=1)
        temperature, top_k, top_p = sampling_settings(module, temperature, top_k, top_p)
        check.check_sampling(temperature, top_k, top_p)
        prompt_ids = self._prompt_ids = self.encode(prompts, chat=chat)
        check.check_seed(seed, len(prompt_ids))
        models = {role: getattr(self, role) for role in MODEL_ROLES if getattr(self, role) is not None}
        used = {role: m for role, m in models.items() if (role in module.REQUIRES or role == "ref" and method == "sss")
                and not getattr(m, "retokenize", False)}  # a re-tokenising reward counts other tokens
        check.check_context_lengths(used, prompt_ids, max_new_tokens)
        before = {role: (m.counters.calls, m.counters.tokens) for role, m in models.items()}
        rng = Randomness(seed, len(prompt_ids))  # the seed is checked above (check_seed)
        ctx = Context(self.target, self.draft, self.ref, self.reward, self.tokenizer, max_new_tokens,
                      float(temperature), top_k, top_p, rng)
        start = time.perf_counter()
        result = run(ctx, prompt_ids, **options)
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


def sampling_settings(module, temperature: float | None, top_k: int | None, top_p: float | None):
    """``(temperature, top_k, top_p)`` a decode uses: as given, or with ``temperature=None`` the method
    module's ``DEFAULTS`` (its paper's temperature, 1.0 otherwise, and its top-k unless one is given)."""
    if temperature is None:
        defaults = getattr(module, "DEFAULTS", {})
        temperature = defaults.get("temperature", 1.0)
        top_k = defaults.get("top_k") if top_k is None else top_k
    return temperature, top_k, top_p


def decode(prompts, method: str = "sample", target=None, draft=None, ref=None, reward=None, tokenizer=None,
           max_new_tokens: int = 128, temperature: float | None = None, top_k: int | None = None,
           top_p: float | None = None, seed: int | list[int] | None = None, chat: bool = False,
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
    Method options (``n``, ``num_draft_tokens``, ``tree``, ``beta``, ...) are passed as keywords. Model
    loading options (``trust_remote_code``, ``device``, ``dtype``, ``reward_tokenizer``, ``compile``,
    ``static_cache``) go to ``Engine``.
    """
    engine_keys = ("trust_remote_code", "device", "dtype", "reward_tokenizer", "compile", "static_cache")
    engine_options = {k: options.pop(k) for k in engine_keys if k in options}
    engine = Engine(target=target, draft=draft, ref=ref, reward=reward, tokenizer=tokenizer, **engine_options)
    return engine.decode(prompts, method=method, max_new_tokens=max_new_tokens, temperature=temperature,
                         top_k=top_k, top_p=top_p, seed=seed, chat=chat, **options)
