"""Built-in rewards and rewards written over texts.

``reward="vader"`` (``--reward vader``, ``--gold vader``) is the VADER compound sentiment score of the
response text, in ``[-1, 1]`` (Hutto and Gilbert, 2014: a lexicon and rules, no model to download; the
``vaderSentiment`` package). It reads only the response: the prompt asks for a review or a story, the reward
says how positive the answer is.

A text reward is a function ``fn(prompts: list[str], completions: list[str]) -> N floats`` (what ``--gold
module:function`` takes); ``TextReward(fn, tokenizer)`` makes it a token-id reward callable
``reward(prompts, responses)`` for ``fastalign.decode`` by decoding the ids with the policy's tokenizer
(special tokens skipped, so a chat prompt reads as its conversation text). A text reward that raises,
returns strings or ``None``, or cannot be imported or called with two arguments is an ``InputError`` naming
it (its own exception chained as the cause).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import re
import sys

import torch

from ..errors import InputError
from ..validation import check_rewards


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
        values = call_text_reward(self.fn, f"the reward {self.name!r}", prompt_texts, completions)
        return check_rewards(values, prompts, f"the reward {self.name!r}")


def call_text_reward(fn, what: str, prompts: list[str], completions: list[str]):
    """``fn(prompts, completions)``, where ``fn`` is the caller's code: an exception it raises becomes an
    ``InputError`` naming ``what`` (one line on the command line), with the function's own exception chained
    as its cause."""
    try:
        return fn(prompts, completions)
    except InputError:
        raise
    except Exception as err:
        raise InputError(f"{what} raised {type(err).__name__}: {err}") from err


def _import_module(name: str):
    """``name`` imported from the Python path or else from the current folder, which ``python -m fastalign``
    puts on the path and the ``fastalign`` console script does not: both find ``myrewards.py`` there. Once
    needed, the folder stays on the path (at its end), as under ``python -m``: the module may import its
    neighbours later, when it is called."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        here = os.getcwd()
        if e.name != name.split(".")[0] or "" in sys.path or here in sys.path:
            raise
        sys.path.append(here)
        return importlib.import_module(name)


def text_reward_function(spec: str, role: str = "reward"):
    """The text reward a string names: a built-in name (``"vader"``) or ``"module:function"``; None otherwise
    (then the string names a reward model). A module that fails to import, a missing or non-callable name, or
    a function that cannot be called as ``fn(prompts, completions)`` is an ``InputError`` naming ``role``."""
    if spec in TEXT_REWARDS:
        return TEXT_REWARDS[spec]
    module, _, function = spec.partition(":")
    if not (function and re.fullmatch(r"[A-Za-z_][\w.]*", module) and re.fullmatch(r"[A-Za-z_]\w*", function)):
        return None
    where = f"cannot load the {role} function {spec!r}"
    try:
        fn = getattr(_import_module(module), function)
    except (ImportError, AttributeError) as e:
        raise InputError(f"{where}: {e}") from e
    except Exception as e:  # the module's own code failed while it was imported
        raise InputError(f"{where}: importing {module!r} raised {type(e).__name__}: {e}") from e
    if not callable(fn):
        raise InputError(f"{where}: it is a {type(fn).__name__}, not a function")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some built-ins have no signature to check: the call will tell
        return fn
    try:
        signature.bind([], [])
    except TypeError:
        raise InputError(f"{where}: it must take two arguments (prompts, completions); its signature is "
                         f"{signature}") from None
    return fn
