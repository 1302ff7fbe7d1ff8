"""Dialects: read Knobs out of a command and render a command from Knobs, one per command family.

A dialect is mostly a table (knob -> flag or config key, and a value codec) plus the minimum
code; adding one means adding a module and a line to `_REGISTRY`, never touching the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from supervisor.command import Command, CommandError
from supervisor.knobs import Knobs, Reading


class Dialect(Protocol):
    """Reads and writes the memory knobs of one family of training commands."""

    name: str

    def claims(self, command: Command) -> bool:
        """True if this dialect recognises the command (used when none is forced)."""
        ...

    def read(self, command: Command) -> Knobs:
        """Knobs the command runs with: its own values, else the program's documented defaults."""
        ...

    def read_sourced(self, command: Command) -> Reading:
        """The knobs, where each value came from, and which knobs the program lets a rung set."""
        ...

    def accepts(self, command: Command, knob: str) -> bool:
        """True when the program takes a flag or key for `knob` (read_sourced().can_set)."""
        ...

    def render(self, command: Command, knobs: Knobs, workdir: Path) -> Command:
        """The same command rewritten to run with `knobs` (config copies go under `workdir`)."""
        ...

    def describe(self, command: Command) -> str:
        """Which program family the command was read as, for the journal and report."""
        ...

    def finalize(self, command: Command, knobs: Knobs, run_dir: Path) -> tuple[Path, ...]:
        """Write the working config in the command's own format (e.g. final.yaml); may be none."""
        ...


def _argv() -> Dialect:
    from supervisor.dialects.argv import ArgvDialect  # noqa: PLC0415 - avoids an import cycle

    return ArgvDialect()


def _llamafactory() -> Dialect:
    from supervisor.dialects.llamafactory import LlamaFactoryDialect  # noqa: PLC0415

    return LlamaFactoryDialect()


def _axolotl() -> Dialect:
    from supervisor.dialects.axolotl import AxolotlDialect  # noqa: PLC0415

    return AxolotlDialect()


def _trl() -> Dialect:
    from supervisor.dialects.argv import TrlDialect  # noqa: PLC0415

    return TrlDialect()


def _hf_args() -> Dialect:
    from supervisor.dialects.hfargs import HfArgsFileDialect  # noqa: PLC0415

    return HfArgsFileDialect()


# Most specific first: the argv-flags dialect claims any command that names a known flag.
# A user's own knob map (--knobs FILE) is not here: supervisor.dialects.knobmap.load builds it.
_REGISTRY: dict[str, Callable[[], Dialect]] = {
    "llamafactory": _llamafactory,
    "axolotl": _axolotl,
    "hf-args": _hf_args,
    "trl": _trl,
    "argv": _argv,
}


def prefetch(command: Command) -> None:
    """Start, in the background, what reading `command` will ask its Python (which modules it
    imports), so that it runs beside the --help probe instead of after it."""
    from supervisor.dialects._read import prefetch_refusals  # noqa: PLC0415 - an import cycle

    prefetch_refusals(command)


def names() -> tuple[str, ...]:
    """Every dialect `--dialect` accepts."""
    return tuple(_REGISTRY)


def detect(command: Command, *, forced: str | None = None) -> Dialect:
    """The dialect named by `forced`, else the first that claims the command."""
    if forced is not None:
        if forced not in _REGISTRY:
            msg = f"no dialect named {forced!r}; valid: {', '.join(_REGISTRY)}"
            raise CommandError(msg)
        return _REGISTRY[forced]()
    for factory in _REGISTRY.values():
        dialect = factory()
        if dialect.claims(command):
            return dialect
    return _argv()


__all__ = ["CommandError", "Dialect", "detect", "names", "prefetch"]
