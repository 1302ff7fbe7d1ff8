"""Numbers read from outside, believed only when finite and bounded.

A trainer's output, a marker line, a kept prediction, a journal line, a policy or a command
line can hold `NaN`, `1e999`, `-1e308` or a 400-digit integer. Python reads each of them
happily (`float("1e999")` is inf, `int("9" * 400)` is exact) and the arithmetic downstream
(`round(inf)`, `float(10**400)`, `x / inf`) then fails far from where the number came in, or
worse, decides something: a NaN prediction is "over the device", a negative one "fits". These
checks sit at the edge, where the number is read: what fails them is ignored (or refused in one
line where a person gave it), never carried on.
"""

from __future__ import annotations

import math

MAX_MIB = float(2 ** 40)
"""1 EiB in MiB: no memory size read from outside is believed at or above it."""
MAX_DIGITS = 15
"""An integer read from text with more digits than this is no step, pid or size of ours."""
MAX_COUNT = 10 ** MAX_DIGITS
"""Counts read from outside (steps, samples) are below this."""
MAX_SECONDS = 1e10
"""Durations read from outside (a trainer's runtime) are below this (~300 years)."""


def finite(value: object, *, low: float = -math.inf, high: float = math.inf) -> float | None:
    """`value` as a float when it is a number (or a short string of one) that is finite and
    within [low, high); None otherwise (NaN, inf, `1e999`, a bool, text, a 400-digit int)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str | bytes):
        return None
    if isinstance(value, str | bytes):
        if len(value) > 64:  # noqa: PLR2004 - no number we read is this long
            return None
        try:
            number = float(value)
        except (ValueError, OverflowError):
            return None
    elif isinstance(value, int):
        if abs(value) >= MAX_COUNT * 1000:
            return None
        number = float(value)
    else:
        number = value
    if not math.isfinite(number) or not low <= number < high:
        return None
    return number


def sane_mib(value: object) -> float | None:
    """A memory size in MiB: finite, positive and below 1 EiB; None otherwise."""
    number = finite(value, low=0.0, high=MAX_MIB)
    return number if number is not None and number > 0 else None


def count(value: object, *, low: int = 0) -> int | None:
    """A whole count (a step, a pid, a total): an int or digits, at most 15 of them, >= low;
    None otherwise (a bool, a float, a 400-digit number, text)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, bytes | str):
        text = value.strip()
        if not text or len(text) > MAX_DIGITS or not text.isdigit() or not text.isascii():
            return None
        value = int(text)
    if not isinstance(value, int) or not low <= value < MAX_COUNT:
        return None
    return value
