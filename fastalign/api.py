"""Layer 5: ``fastalign.decode`` and ``fastalign.Engine``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .methods import get_method
from .methods.base import Context, Randomness
from .models import CausalLM, InputError, RewardModel
from .remote import RemoteLM

MODEL_ROLES = ("target", "draft", "ref", "reward")


@dataclass
class DecodeOutput:
    sequences: list[list[int]]  # generated token ids per prompt (prompt excluded, EOS kept)
    texts: list[str] | None  # decoded sequences when a tokenizer is known
    stats: dict  # calls and tokens per model, generated tokens, wall time, method counters
    extra: dict = field(default_factory=dict)  # method-specific outputs (e.g. qalign's state_path)


def _load_causal_lm(spec, trust_remote_code: bool, device, dtype):
    if isinstance(spec, (CausalLM, RemoteLM)):
        return spec
    if isinstance(spec, str):
        from transformers import AutoModelForCausalLM

        spec = AutoModelForCausalLM.from_pretrained(spec, trust_remote_code=trust_remote_code, dtype=dtype)
    if device is not None:
        spec = spec.to(device)
    return CausalLM(spec)


def _load_tokenizer(spec, trust_remote_code: bool):
    if spec is None or not isinstance(spec, str):
        return spec
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec, trust_remote_code=trust_remote_code)


def _load_reward(spec, tokenizer, policy_tokenizer, trust_remote_code: bool, device, dtype):
    if isinstance(spec, RewardModel):
        return spec
    if isinstance(spec, str):
        from transformers import AutoModelForSequenceClassification

        if tokenizer is None:
            tokenizer = _load_tokenizer(spec, trust_remote_code)
        spec = AutoModelForSequenceClassification.from_pretrained(
            spec, trust_remote_code=trust_remote_code, dtype=dtype
        )
    if isinstance(spec, torch.nn.Module):
        if device is not None:
            spec = spec.to(device)
    elif not callable(spec):
        raise InputError("reward must be a model, a name/path, or a callable reward(prompts, responses)")
    return RewardModel(spec, tokenizer=tokenizer, policy_tokenizer=policy_tokenizer)


class Engine:
    """Holds loaded models for repeated ``decode`` calls.

    Models may be HF model objects or names/paths (loaded with ``trust_remote_code=False`` unless asked).
    ``reward`` may also be a callable ``reward(prompts, responses) -> [N]`` over token-id lists.
    ``reward_tokenizer`` is the reward model's own tokenizer, when it differs from the policy's.
    """

    def __init__(self, target=None, draft=None, ref=None, reward=None, tokenizer=None,
                 reward_tokenizer=None, trust_remote_code: bool = False, device=None, dtype=None):
        load = dict(trust_remote_code=trust_remote_code, device=device, dtype=dtype)
        if tokenizer is None and isinstance(target, str):
            tokenizer = target
        self.tokenizer = _load_tokenizer(tokenizer, trust_remote_code)
        self.target = _load_causal_lm(target, **load) if target is not None else None
        self.draft = _load_causal_lm(draft, **load) if draft is not None else None
        self.ref = _load_causal_lm(ref, **load) if ref is not None else None
        self.reward = (
            _load_reward(reward, _load_tokenizer(reward_tokenizer, trust_remote_code), self.tokenizer, **load)
            if reward is not None else None
        )
        for role in ("draft", "ref"):
            lm = getattr(self, role)
            if lm is not None and self.target is not None and lm.vocab_size != self.target.vocab_size:
                raise InputError(
                    f"vocabularies differ: the {role} has {lm.vocab_size} tokens, the target {self.target.vocab_size}"
                )

    def encode(self, prompts) -> list[list[int]]:
        """Prompts as token-id lists: strings through the tokenizer, id lists as they are."""
        if isinstance(prompts, str):
            raise InputError("prompts must be a list of strings or of token-id lists, not a single string")
        prompts = list(prompts)
        if prompts and all(isinstance(p, str) for p in prompts):
            if self.tokenizer is None:
                raise InputError("text prompts need a tokenizer (pass tokenizer=...) or pass token ids")
            return [self.tokenizer(p)["input_ids"] for p in prompts]
        return [p.tolist() if torch.is_tensor(p) else list(p) for p in prompts]

    def decode(self, prompts, method: str = "sample", max_new_tokens: int = 128, temperature: float | None = None,
               top_k: int | None = None, top_p: float | None = None, seed: int | list[int] | None = None,
               **options) -> DecodeOutput:
        """Decode ``prompts`` with ``method``; see ``fastalign.decode``."""
        module, run = get_method(method)
        for role in module.REQUIRES:
            if getattr(self, role) is None:
                raise InputError(f"method {method!r} needs a {role} model (pass {role}=...)")
        if isinstance(self.target, RemoteLM) and not getattr(module, "REMOTE_TARGET", False):
            raise InputError(f"method {method!r} needs a local target; a RemoteLM target works with qalign")
        if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        defaults = getattr(module, "DEFAULTS", {})
        if temperature is None:
            temperature = defaults.get("temperature", 1.0)
            top_k = defaults.get("top_k") if top_k is None else top_k
        if temperature <= 0:
            raise InputError(f"temperature must be > 0, got {temperature} (use top_k=1 for greedy)")
        prompt_ids = self.encode(prompts)
        if not prompt_ids:
            raise InputError("no prompts given")
        for i, p in enumerate(prompt_ids):
            if len(p) == 0:
                raise InputError(f"prompt {i} is empty")

        models = {role: getattr(self, role) for role in MODEL_ROLES if getattr(self, role) is not None}
        before = {role: (m.counters.calls, m.counters.tokens) for role, m in models.items()}
        try:
            rng = Randomness(seed, len(prompt_ids))
        except ValueError as e:
            raise InputError(str(e)) from None
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


def decode(prompts, method: str = "sample", target=None, draft=None, ref=None, reward=None, tokenizer=None,
           max_new_tokens: int = 128, temperature: float | None = None, top_k: int | None = None,
           top_p: float | None = None, seed: int | list[int] | None = None, **options) -> DecodeOutput:
    """Decode ``prompts`` (list of strings, or of token-id lists) with a test-time alignment ``method``.

    ``seed``: one int per prompt (a list), or an int (prompt ``i`` then gets a seed derived from it and ``i``),
    or None (fresh entropy). A prompt's output depends only on its own seed, prompt and models, never on its
    row or on the other prompts of the batch (DESIGN 1.4).

    ``temperature=None`` takes the method's documented sampling defaults (temperature 1.0 unless its paper
    says otherwise, and the paper's top-k where it has one); an explicit ``temperature`` uses exactly the
    given ``temperature`` / ``top_k`` / ``top_p``.
    Method options (``n``, ``num_draft_tokens``, ``tree``, ``beta``, ...) are passed as keywords. Model
    loading options (``trust_remote_code``, ``device``, ``dtype``, ``reward_tokenizer``) go to ``Engine``.
    """
    engine_keys = ("trust_remote_code", "device", "dtype", "reward_tokenizer")
    engine_options = {k: options.pop(k) for k in engine_keys if k in options}
    engine = Engine(target=target, draft=draft, ref=ref, reward=reward, tokenizer=tokenizer, **engine_options)
    return engine.decode(prompts, method=method, max_new_tokens=max_new_tokens, temperature=temperature,
                         top_k=top_k, top_p=top_p, seed=seed, **options)
