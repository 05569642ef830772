"""Layer 3: the one place that turns model specs into models.

``ModelBuilder`` takes what a caller names (an HF name or folder, a ``.gguf`` file, an HF model object, a
``CausalLM`` or ``RewardModel`` already built, a reward callable or a text reward's name) and the engine's
settings (device, dtype, compile), and decides everything else: where the weights go, in which dtype, which KV
store the caches use (the ragged store, or the slot store with or without ``torch.compile``). Nothing else in
the library chooses a store or compiles; how the chosen steps compile on a model's device (torch.compile's mode,
CUDA graphs on a GPU) is ``fastalign.models.slots.step_compilation``, from the options decided here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..errors import InputError
from . import loading, text_rewards
from .causal_lm import CausalLM
from .ragged import RaggedStore
from .remote import RemoteLM
from .reward import RewardModel
from .slots import SlotStore, StaticOptions


@dataclass(frozen=True)
class ModelBuilder:
    """Builds the models of one engine.

    ``device`` / ``dtype`` (checked by the caller; ``dtype`` a torch dtype, ``"auto"`` or None) apply to every
    local model, objects included (moved and cast in place, as ``nn.Module.to`` does). ``static``: None for
    the ragged store (eager), else the slot store's options (``compile`` in them).
    """

    device: torch.device | str | None = None
    dtype: torch.dtype | str | None = None
    static: StaticOptions | None = None
    trust_remote_code: bool = False

    @classmethod
    def from_settings(cls, device=None, dtype=None, compile: bool = False, static_cache: bool | None = None,
                      trust_remote_code: bool = False) -> "ModelBuilder":
        """``compile=True`` runs on the slot store with compiled steps; ``static_cache=True`` alone runs the slot
        store uncompiled (tests, debugging); neither: the ragged store."""
        static = compile if static_cache is None else static_cache
        if compile and not static:
            raise InputError("compile=True runs on the static cache; it cannot be combined with static_cache=False")
        return cls(device, dtype, StaticOptions(compile=compile) if static else None, trust_remote_code)

    def new_store(self):
        """A fresh KV store of the engine's kind."""
        return SlotStore(self.static) if self.static is not None else RaggedStore()

    def _is_ours(self, store) -> bool:
        return isinstance(store, SlotStore) == (self.static is not None) and (
            self.static is None or store.options == self.static)

    def _placed(self, module: torch.nn.Module) -> torch.nn.Module:
        if isinstance(self.dtype, torch.dtype):  # "auto" or None: keep the dtype the model has
            module = module.to(dtype=self.dtype)
        if self.device is not None:
            module = module.to(self.device)
        return module

    def _keeps(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether a model already on ``device`` in ``dtype`` stays where it is."""
        return (self.device is None or torch.device(self.device) == device) and \
            (not isinstance(self.dtype, torch.dtype) or self.dtype == dtype)

    def tokenizer(self, spec, role: str = "tokenizer"):
        """``spec``'s tokenizer (None stays None); ``role`` names it in errors."""
        return loading.load_tokenizer(spec, trust_remote_code=self.trust_remote_code, role=role)

    def causal_lm(self, spec, role: str = "model") -> CausalLM | RemoteLM:
        """A ``CausalLM`` from an HF name, a local folder, a ``.gguf`` file, an HF model or a ``CausalLM`` (rewrapped
        when its store, device or dtype is not the engine's); a ``RemoteLM`` stays as it is. ``role`` names the
        model in errors."""
        if isinstance(spec, RemoteLM):
            return spec
        if isinstance(spec, CausalLM):
            if self._is_ours(spec.store) and self._keeps(spec.device, spec.dtype):
                return spec
            spec = spec.model
        if isinstance(spec, (str, os.PathLike)):
            spec = loading.load_causal_lm(spec, trust_remote_code=self.trust_remote_code, dtype=self.dtype, role=role)
        return CausalLM(self._placed(spec), self.new_store())

    def reward(self, spec, tokenizer=None, policy_tokenizer=None) -> RewardModel:
        """A ``RewardModel`` from a reward model (name, path or object; a saved ``*ForTokenClassification`` model
        loads as a process reward model), a ``RewardModel``, a token-id callable, or
        a text reward named by a string: a built-in name (``"vader"``) or ``"module:function"``
        (``fastalign.models.text_rewards``). ``tokenizer``: the reward model's own, when it differs from the
        policy's (``policy_tokenizer``)."""
        if isinstance(spec, RewardModel):
            if not spec.is_model or (self._is_ours(spec.lm.store) and self._keeps(spec.lm.device, spec.lm.dtype)):
                return spec
            return RewardModel(self._placed(spec.lm.model), spec.tokenizer, spec.policy_tokenizer, self.new_store,
                               step_tag=spec.step_tag)
        if isinstance(spec, str):
            fn = text_rewards.text_reward_function(spec)
            if fn is not None:
                return RewardModel(text_rewards.TextReward(fn, policy_tokenizer, name=spec))
        if isinstance(spec, (str, os.PathLike)):
            if tokenizer is None and not loading.is_gguf(spec):
                tokenizer = self.tokenizer(spec)
            spec = loading.load_reward_model(spec, trust_remote_code=self.trust_remote_code, dtype=self.dtype)
        if isinstance(spec, torch.nn.Module):
            spec = self._placed(spec)
        elif not callable(spec):
            raise InputError("reward must be a model, a name/path, a built-in reward name "
                             f"({', '.join(text_rewards.TEXT_REWARDS)}), 'module:function', or a callable "
                             "reward(prompts, responses)")
        return RewardModel(spec, tokenizer=tokenizer, policy_tokenizer=policy_tokenizer, new_store=self.new_store)
