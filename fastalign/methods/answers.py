"""Answer extractors for the voting rules of sampling methods (e.g. ``qalign``'s ``select="majority"``).

An extractor maps a response text to a hashable answer, ``None`` when the text holds none. The built-in
ones follow the QAlign evaluation code (``qalign/utils/math.py``): the last number (GSM8K), the content of
the last ``\\boxed{...}`` (MATH), the last stand-alone option letter A-E (multiple choice); and the number after the last word ``answer``
(the ``arith`` world's ``answer 11``).
"""

from __future__ import annotations

import re
from typing import Callable

from ..errors import InputError

_NUMBER = re.compile(r"[-+]?\d*\.\d+|[-+]?\d+")
# A comma between a digit and exactly three digits groups thousands ("12,000,000"); the lookarounds let
# consecutive groups match (a plain ``(\d),(\d{3})`` would consume the digit the next group needs).
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_OPTION = re.compile(r"\b([A-E])\b")


def last_number(text: str) -> str | None:
    """The last number in ``text`` (thousands separators removed, a trailing ``.0`` kept as written)."""
    numbers = _NUMBER.findall(_THOUSANDS.sub("", text))
    return numbers[-1].lstrip("+") if numbers else None


def boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (nested braces allowed), spaces removed; None if absent."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j].replace(" ", "")
    return None  # unbalanced: the box was cut off


_AFTER_ANSWER = re.compile(r"\banswer\b[\s:=]*(?:is[\s:]*)?([-+]?\d*\.\d+|[-+]?\d+)", re.IGNORECASE)


def after_answer(text: str) -> str | None:
    """The number right after the last word ``answer`` (``"answer 11"``, ``"The answer is 11."``; thousands
    separators removed, a ``+`` sign dropped); None if no ``answer`` is followed by a number (e.g. an unfinished
    response)."""
    found = _AFTER_ANSWER.findall(_THOUSANDS.sub("", text))
    return found[-1].lstrip("+") if found else None


def option_letter(text: str) -> str | None:
    """The last stand-alone capital letter A-E (``"(C)"``, ``"answer: C"``); None if there is none."""
    letters = _OPTION.findall(text)
    return letters[-1] if letters else None


EXTRACTORS: dict[str, Callable[[str], object]] = {
    "last_number": last_number,
    "boxed": boxed,
    "option": option_letter,
    "answer": after_answer,
}


def get_extractor(answer_fn) -> Callable:
    """A callable extractor from a name in ``EXTRACTORS`` or a user callable (returned as is)."""
    if callable(answer_fn):
        return answer_fn
    if answer_fn in EXTRACTORS:
        return EXTRACTORS[answer_fn]
    raise InputError(f"answer_fn must be a callable or one of {sorted(EXTRACTORS)}, got {answer_fn!r}")
