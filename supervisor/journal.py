"""Append-only JSONL journal, flushed and fsynced per event; replay for `report` and `resume`."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any


@dataclass(frozen=True, slots=True, kw_only=True)
class Replay:
    """Events read back from a journal, and whether its last line was torn."""

    events: tuple[dict[str, Any], ...]
    torn_line: str | None = None


class Journal:
    """The record of a run: one JSON object per line, on disk before the call returns."""

    def __init__(self, path: Path, *, clock: Any = time.time) -> None:  # noqa: ANN401
        self.path = path
        self._clock = clock
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = path.open("a", encoding="utf-8")

    def write(self, event: str, **fields: Any) -> dict[str, Any]:  # noqa: ANN401
        """Append one event and fsync it, so a killed supervisor loses nothing it wrote."""
        record = {"ts": round(self._clock(), 3), "event": event, **fields}
        self._file.write(json.dumps(record, default=str, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        return record

    def close(self) -> None:
        """Close the file; later writes fail."""
        self._file.close()

    def __enter__(self) -> Journal:  # noqa: PYI034 - final class, no subclasses
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def replay(path: Path) -> Replay:
    """Read every whole event; a torn last line (the supervisor died mid-write) is set aside."""
    events: list[dict[str, Any]] = []
    torn: str | None = None
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                torn = line
                continue
            msg = f"{path}:{number}: not a JSON event; the journal is damaged beyond its last line"
            raise ValueError(msg) from None
        if isinstance(record, dict):
            events.append(record)
    return Replay(events=tuple(events), torn_line=torn)
