"""Layer 4: one module per method, each a small loop over the model layer and the kernels, and this registry.

The registry holds one ``Method`` record per method: what it needs (required and optional model roles, which of
a world's drafts fills its draft role), its paper's sampling defaults, whether it runs with a remote target, and
where its run function is. Nothing outside ``fastalign.methods`` knows what a method needs: the API, the CLI,
the eval harness, the worlds and the demo read it here.

This module imports no torch (``fastalign --help`` lists the methods): a run function is imported on first use.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from ..errors import InputError

MODEL_ROLES = ("target", "draft", "ref", "reward", "step_reward")
# A role another given model can fill when the decode has none for it: a reward (a model or a callable) scores
# partial responses too, so without a step_reward it is read as the step reward (``smc``'s twist, ``beam``'s
# step scores).
STAND_INS = MappingProxyType({"step_reward": "reward"})


def filled(role: str, models: Mapping[str, object]):
    """The model of ``role`` in ``models`` (role -> model or None), else its stand-in's (``STAND_INS``), else None."""
    model = models.get(role)
    return model if model is not None or role not in STAND_INS else models.get(STAND_INS[role])


@dataclass(frozen=True)
class Method:
    """One decoding method.

    ``entry``: ``"module:function"`` in ``fastalign.methods``; the function is ``run(ctx, prompts, **options) ->
    MethodResult`` and its keyword defaults are the method's option defaults (``option_defaults``).
    ``requires``: roles that must be given (or their stand-in, ``STAND_INS``); ``optional``: roles it uses when
    given (they count towards the context-length check). ``draft_model``: which of a world's drafts fills the
    draft role: ``"draft"`` or ``"aligned_draft"`` (sss: the draft after alignment, its unaligned version being ``ref``); None when it
    drafts nothing. ``sampling``: the paper's sampling settings (``temperature``, ``top_k``), used when a decode
    gives no temperature. ``remote_target``: it needs whole responses only, so its target may be a
    ``fastalign.models.remote.RemoteLM``.
    """

    name: str
    entry: str
    requires: tuple[str, ...]
    optional: tuple[str, ...] = ()
    draft_model: str | None = None
    sampling: Mapping = field(default_factory=lambda: MappingProxyType({}))
    remote_target: bool = False

    @property
    def run(self):
        module, function = self.entry.split(":")
        return getattr(importlib.import_module(f"{__name__}.{module}"), function)

    @property
    def roles(self) -> tuple[str, ...]:
        """Every role the method uses: the required ones, then the optional ones."""
        return self.requires + self.optional

    def models_for(self, models: Mapping[str, object]) -> dict[str, object]:
        """The models a decode of this method gets, by role, from ``models`` (role -> model or None): every role
        it uses that ``models`` fills, itself or through its stand-in (``STAND_INS``). An ``InputError`` names a
        required role that neither fills."""
        chosen = {role: filled(role, models) for role in self.roles}
        for role in self.requires:
            if chosen[role] is None:
                also = f" or {STAND_INS[role]}=..., read on partial responses" if role in STAND_INS else ""
                raise InputError(f"method {self.name!r} needs a {role} model (pass {role}=...{also})")
        return {role: model for role, model in chosen.items() if model is not None}

    def runs_with(self, models: Mapping[str, object]) -> bool:
        """Whether ``models`` (role -> model or None) fill every role the method requires (stand-ins counted)."""
        return all(filled(role, models) is not None for role in self.requires)

    def option_defaults(self) -> dict:
        """The options the method takes, with their defaults (from its run function's signature)."""
        params = list(inspect.signature(self.run).parameters.values())[2:]  # after (ctx, prompts)
        return {p.name: p.default for p in params}

    def options_in_effect(self, options: dict) -> dict:
        """The method's options with their defaults filled in: what a decode call given ``options`` uses."""
        return {**self.option_defaults(), **options}

    def sampling_settings(self, temperature: float | None, top_k: int | None, top_p: float | None):
        """``(temperature, top_k, top_p)`` a decode uses: as given, or with ``temperature=None`` the method's
        ``sampling`` defaults (its paper's temperature, 1.0 otherwise, and its top-k unless one is given)."""
        if temperature is None:
            temperature = self.sampling.get("temperature", 1.0)
            top_k = self.sampling.get("top_k") if top_k is None else top_k
        return temperature, top_k, top_p


def _defaults(**settings) -> Mapping:
    return MappingProxyType(settings)


# The CARDS paper/code samples from top-k 40 of softmax(l / 0.7); rs is its item-level baseline, same settings.
CARDS_SAMPLING = _defaults(temperature=0.7, top_k=40)

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("sample", "sample:run", ("target",), remote_target=True),
    Method("bon", "bon:run", ("target", "reward"), remote_target=True),
    Method("soft_bon", "bon:run_soft", ("target", "reward"), remote_target=True),
    Method("args", "args:run", ("target", "reward")),
    Method("rs", "rs:run", ("target", "reward"), sampling=CARDS_SAMPLING, remote_target=True),
    Method("cards", "cards:run", ("target", "reward"), sampling=CARDS_SAMPLING),
    Method("sd", "speculative:run_sd", ("target", "draft"), draft_model="draft"),
    Method("sss", "speculative:run_sss", ("target", "draft"), optional=("ref",), draft_model="aligned_draft"),
    Method("qalign", "qalign:run", ("target", "reward"), remote_target=True),
    Method("speculative_rejection", "specrej:run", ("target", "reward"), remote_target=True),
    Method("smc", "smc:run", ("target", "step_reward"), remote_target=True),
    Method("beam", "beam:run", ("target", "step_reward"), remote_target=True),
)}


def get_method(name: str) -> Method:
    """The record of method ``name``; a clear error for an unknown name."""
    if name not in METHODS:
        raise InputError(f"unknown method {name!r}; expected one of {sorted(METHODS)}")
    return METHODS[name]


def remote_target_methods() -> list[str]:
    """The methods that take a ``RemoteLM`` target (they need whole responses only)."""
    return [name for name, method in METHODS.items() if method.remote_target]


def world_roles(method: str | None, models) -> dict:
    """The models a decode with ``method`` gets from ``models`` (an object with ``target``, ``draft``,
    ``aligned_draft``, ``ref``, ``reward``, ``step_reward`` attributes, any of them missing or None): the draft
    role is filled by the method's ``draft_model`` (sss: the aligned draft, with the unaligned draft as ``ref``); ``method=None``:
    the plain draft."""
    drafter = get_method(method).draft_model if method is not None else None
    roles = {role: getattr(models, role, None) for role in MODEL_ROLES}
    if drafter is not None and getattr(models, drafter, None) is not None:
        roles["draft"] = getattr(models, drafter)
    return roles
