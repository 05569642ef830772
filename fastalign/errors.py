"""The errors fastalign raises for bad input (no torch import: the CLI's ``--help`` path uses them)."""

from __future__ import annotations


class InputError(ValueError):
    """Bad input from the caller: the message names the problem."""


class NonFiniteReward(InputError):
    """A reward came back NaN or infinite; ``prompt`` holds the token ids of the prompt it belongs to."""

    def __init__(self, message: str, prompt: list[int] | None = None):
        super().__init__(message)
        self.prompt = prompt
