"""Dialects: read Knobs out of a command and render a command from Knobs, one per command family."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from supervisor.command import Command, CommandError
from supervisor.knobs import Knobs


class Dialect(Protocol):
    """Reads and writes the memory knobs of one family of training commands."""

    name: str

    def read(self, command: Command) -> Knobs:
        """Knobs the command runs with: its own values, else the program's documented defaults."""
        ...

    def render(self, command: Command, knobs: Knobs, workdir: Path) -> Command:
        """The same command rewritten to run with `knobs` (config copies go under `workdir`)."""
        ...


def detect(command: Command) -> Dialect:  # noqa: ARG001 - one dialect so far
    """Pick the dialect for a command (only the argv-flags dialect exists so far)."""
    from supervisor.dialects.argv import ArgvDialect  # noqa: PLC0415 - avoids an import cycle

    return ArgvDialect()


__all__ = ["CommandError", "Dialect", "detect"]
