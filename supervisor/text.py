"""Text the supervisor shows or writes that it did not write itself: made safe to print.

Two edges: what a trainer printed (its OOM line, its last lines) is stripped of terminal
control sequences before it reaches report.md, the summary, the console or `status`, so that
`cat report.md` cannot retitle or clear a terminal; and a value quoted in an error message is
bounded, so that a billion-laughs YAML alias (a few lines that expand to 10^9 items) is quoted
in a hundred characters instead of hanging the run while its `repr` is built.
"""

from __future__ import annotations

import re
import reprlib

_CONTROL = re.compile(
    r"\x1b\][^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"  # OSC (title, hyperlink) to BEL or ST
    r"|\x1b[P^_X][^\x1b\x9c]*(?:\x1b\\|\x9c)?"  # DCS / PM / APC / SOS strings
    r"|\x1b\[[0-?]*[ -/]*[@-~]?"  # CSI: colours, cursor moves, clear screen
    r"|\x1b[ -/]*[0-~]?"  # the other escapes (charset, ESC c reset)
    r"|\x9b[0-?]*[ -/]*[@-~]?"  # 8-bit CSI
    r"|[\x9d\x90\x98\x9e\x9f][^\x07\x9c]*(?:\x07|\x9c)?"  # 8-bit OSC / DCS / SOS / PM / APC
    r"|[\x00-\x08\x0b-\x1f\x7f-\x9f]",  # any other C0/C1 control (tab and newline kept)
)
_NOT_CONTROL = re.compile(r"[^\x00-\x08\x0b-\x1f\x7f-\x9f]*")


def printable(text: str) -> str:
    """`text` without terminal control sequences (CSI, OSC, other escapes, C0/C1 controls).

    Tabs and newlines are kept; a carriage return is dropped (it would hide what precedes it).
    """
    if _NOT_CONTROL.fullmatch(text):
        return text  # the common case: one C-speed scan
    return _CONTROL.sub("", text)


class _Bounded(reprlib.Repr):
    """reprlib by kind, not by exact type: a YAML loader's list/dict/str subclasses
    (ruamel's CommentedSeq) would otherwise get their own, unbounded, `__repr__`."""

    def repr1(self, x: object, level: int) -> str:
        if isinstance(x, bool) or x is None:
            return repr(x)
        if isinstance(x, str):
            return self.repr_str(str(x), level)
        if isinstance(x, int):
            return self.repr_int(int(x), level)
        if isinstance(x, float):
            return repr(float(x))
        if isinstance(x, list):
            return self.repr_list(x, level)
        if isinstance(x, tuple):
            return self.repr_tuple(x, level)
        if isinstance(x, dict):
            return self.repr_dict(x, level)
        if isinstance(x, set | frozenset):
            return self.repr_set(set(x), level)
        return f"<{type(x).__name__}>"  # any other object: its own repr may be anything


_REPR = _Bounded()
_REPR.maxlevel = 3
_REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxdict = 6
_REPR.maxfrozenset = 6
_REPR.maxstring = 80
_REPR.maxother = 80
_REPR.maxlong = 40

BOUND_CHARS = 120
"""Longest quoted value in a message (what reprlib builds is cut to this)."""


def bounded(value: object, limit: int = BOUND_CHARS) -> str:
    """A short, printable repr of `value`, built in bounded time whatever its size or nesting."""
    try:
        text = _REPR.repr(value)
    except Exception:  # noqa: BLE001 - a value whose repr fails is still named
        text = f"<{type(value).__name__}>"
    text = printable(text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def plural(count: object, word: str, many: str | None = None) -> str:
    """`1 attempt`, `15 attempts` (`many` where the plural is not word + s)."""
    try:
        number = int(str(count))
    except ValueError:
        return f"{count} {many or word + 's'}"
    return f"{number} {word if number == 1 else many or word + 's'}"
