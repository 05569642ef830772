"""Built-in rewards and rewards written over texts.

``reward="vader"`` (``--reward vader``, ``--gold vader``) is the VADER compound sentiment score of the
response text, in ``[-1, 1]`` (Hutto and Gilbert, 2014: a lexicon and rules, no model to download; the
``vaderSentiment`` package). It reads only the response: the prompt asks for a review or a story, the reward
says how positive the answer is.

A text reward is a function ``fn(prompts: list[str], completions: list[str]) -> N floats`` (what ``--gold
module:function`` takes); ``TextReward(fn, tokenizer)`` makes it a token-id reward callable
``reward(prompts, responses)`` for ``fastalign.decode`` by decoding the ids with the policy's tokenizer
(special tokens skipped, so a chat prompt reads as its conversation text).
"""

from __future__ import annotations

import functools
import importlib
import re

import torch

from ..errors import InputError


@functools.lru_cache(maxsize=1)
def vader_analyzer():
    """VADER's sentiment analyser (made once), or an ``InputError`` with the install hint."""
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise InputError("the 'vader' reward needs the vaderSentiment package (pip install vaderSentiment)") from None
    return SentimentIntensityAnalyzer()


def vader(prompts: list[str], completions: list[str]) -> list[float]:
    """VADER compound score of each completion, in ``[-1, 1]`` (the prompts are not read)."""
    analyzer = vader_analyzer()
    return [float(analyzer.polarity_scores(text)["compound"]) for text in completions]


# built-in text rewards by name (``reward="NAME"``, ``--reward NAME``, ``--gold NAME``)
TEXT_REWARDS = {"vader": vader}


class TextReward:
    """A text reward ``fn(prompts, completions)`` as a token-id reward ``reward(prompts, responses) -> [N]``."""

    def __init__(self, fn, tokenizer, name: str = "reward"):
        if tokenizer is None:
            raise InputError(f"the {name!r} reward reads texts, so it needs the policy's tokenizer (tokenizer=...)")
        self.fn, self.tokenizer, self.name = fn, tokenizer, name

    def __call__(self, prompts: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
        prompt_texts = self.tokenizer.batch_decode([list(p) for p in prompts], skip_special_tokens=True)
        completions = self.tokenizer.batch_decode([list(r) for r in responses], skip_special_tokens=True)
        scores = torch.as_tensor(self.fn(prompt_texts, completions), dtype=torch.float32).flatten()
        if scores.numel() != len(responses):
            raise InputError(f"the {self.name!r} reward returned {scores.numel()} scores for {len(responses)} responses")
        return scores


def text_reward_function(spec: str):
    """The text reward a string names: a built-in name (``"vader"``) or ``"module:function"``; None otherwise
    (then the string names a reward model)."""
    if spec in TEXT_REWARDS:
        return TEXT_REWARDS[spec]
    module, _, function = spec.partition(":")
    if not (function and re.fullmatch(r"[A-Za-z_][\w.]*", module) and re.fullmatch(r"[A-Za-z_]\w*", function)):
        return None
    try:
        return getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as e:
        raise InputError(f"cannot load the reward function {spec!r}: {e}") from None
