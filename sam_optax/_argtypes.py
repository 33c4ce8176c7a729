"""argparse value types shared by the ``sam-optax`` subcommands."""

from __future__ import annotations

import argparse
import math


def _int_in(text: str, low: int, high: float, allowed: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}") from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"must be {allowed}, got {text}")
    return value


def positive_int(text: str) -> int:
    return _int_in(text, 1, math.inf, "an integer >= 1")


def nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}") from None
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def seed(text: str) -> int:
    return _int_in(text, 0, 2**32 - 1, "an integer in [0, 2**32 - 1]")


def fraction(text: str) -> float:
    value = nonneg_float(text)
    if value >= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value
