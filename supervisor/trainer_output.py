"""What an attempt's own output says about it: its measured peak and how far it trained.

Two sources, both read from the tail of the output: the bundled reference trainer's result
line (`reference-trainer.result {...}`), and the line the injected `--device-memory` code
prints at exit for ANY Python trainer (`oom-supervisor.peak {...}`, see device_memory.py).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supervisor import device_memory

_RESULT_PREFIX = "reference-trainer.result "


@dataclass(frozen=True, slots=True, kw_only=True)
class Measured:
    """What the attempt's output reported of itself (None where it said nothing)."""

    peak_mib: float | None = None
    peak_source: str | None = None
    """`reference trainer` or `injected (cpu|cuda)`."""
    steps: int | None = None
    resumed_from_step: int | None = None
    announced: bool = False
    """The injected --device-memory code said it was active in this attempt."""


def _result(tail: Sequence[str]) -> dict[str, Any] | None:
    """The reference trainer's result line, when the attempt printed one."""
    for line in reversed(tail):
        if line.startswith(_RESULT_PREFIX):
            try:
                value = json.loads(line[len(_RESULT_PREFIX):])
            except ValueError:
                return None
            return value if isinstance(value, dict) else None
    return None


_HEAD_BYTES = 256 * 1024


def _head(log_dir: Path | None) -> list[str]:
    """The first lines of the attempt's logs: the injected code announces itself there, long
    before a long run's tail."""
    if log_dir is None:
        return []
    lines: list[str] = []
    for name in ("stderr.log", "stdout.log"):
        with contextlib.suppress(OSError), (log_dir / name).open("rb") as handle:
            lines += handle.read(_HEAD_BYTES).decode("utf-8", errors="replace").splitlines()
    return lines


def measure(tail: Sequence[str], log_dir: Path | None = None) -> Measured:
    """Read the attempt's own reports out of its output tail (and the head of its logs)."""
    result = _result(tail) or {}
    injected = device_memory.read_inject_lines([*_head(log_dir), *tail])
    peak: float | None = None
    source: str | None = None
    value = result.get("peak_live_mib")
    if isinstance(value, int | float) and not isinstance(value, bool):
        peak, source = float(value), "reference trainer"
    elif injected.peak_mib is not None:
        peak, source = float(injected.peak_mib), f"injected ({injected.device or 'cpu'})"
    steps = result.get("steps")
    resumed = result.get("resumed_from_step")
    return Measured(
        peak_mib=peak, peak_source=source,
        steps=int(steps) if isinstance(steps, int) else None,
        resumed_from_step=int(resumed) if isinstance(resumed, int) else None,
        announced=injected.announced,
    )
