"""Argument types of the ``fastalign`` and ``python -m fastalign.serve`` commands: a bad value is argparse's one
error line naming the flag. No torch here: the ``fastalign`` command's ``--help`` stays instant."""

from __future__ import annotations

import argparse
import math


def _argument(text: str, parse, valid, expected: str):
    """``parse(text)`` when it parses and is ``valid``, else argparse's error ``expected ..., got ...``."""
    try:
        value = parse(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not valid(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (a count or a size)."""
    return _argument(text, int, lambda v: v >= 1, "a positive integer")


def count(text: str) -> int:
    """An integer >= 0 (how many to show)."""
    return _argument(text, int, lambda v: v >= 0, "an integer >= 0")


def positive_float(text: str) -> float:
    """A finite number > 0 (seconds)."""
    return _argument(text, float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")


def port_number(text: str) -> int:
    """A TCP port, 0 (any free port) to 65535."""
    return _argument(text, int, lambda v: 0 <= v <= 65535, "a port number from 0 to 65535")


class Parser(argparse.ArgumentParser):
    """argparse's parser with its errors on one line (argparse prints the whole usage block first)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")
