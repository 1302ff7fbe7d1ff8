"""The journal: one JSON event per line, on disk at once; a torn last line is tolerated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from supervisor.journal import Journal, replay


def test_each_event_is_on_disk_before_write_returns(tmp_path: Path) -> None:
    """A second reader sees every event written so far, without close()."""
    path = tmp_path / "journal.jsonl"
    journal = Journal(path, clock=lambda: 1.5)
    journal.write("run.started", run_id="r")
    journal.write("attempt.started", attempt=1)
    assert [json.loads(line)["event"] for line in path.read_text().splitlines()] == [
        "run.started", "attempt.started"]
    journal.close()


def test_torn_last_line_is_set_aside(tmp_path: Path) -> None:
    """A supervisor killed mid-write leaves half a line; replay keeps the whole ones."""
    path = tmp_path / "journal.jsonl"
    with Journal(path) as journal:
        journal.write("run.started", run_id="r")
    with path.open("a", encoding="utf-8") as f:
        f.write('{"event": "attempt.sta')
    replayed = replay(path)
    assert [e["event"] for e in replayed.events] == ["run.started"]
    assert replayed.torn_line == '{"event": "attempt.sta'


def test_damage_before_the_last_line_is_an_error(tmp_path: Path) -> None:
    """Garbage in the middle is not a torn write: say where it is."""
    path = tmp_path / "journal.jsonl"
    path.write_text('{"event": "a"}\nnot json\n{"event": "b"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"journal.jsonl:2: not a JSON event"):
        replay(path)


def test_appending_keeps_earlier_events(tmp_path: Path) -> None:
    """Reopening a journal appends; nothing written before is lost."""
    path = tmp_path / "journal.jsonl"
    for name in ("one", "two"):
        with Journal(path) as journal:
            journal.write(name)
    assert [e["event"] for e in replay(path).events] == ["one", "two"]
