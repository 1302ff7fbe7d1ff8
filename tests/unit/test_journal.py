"""The journal on disk: fsynced per event, one writer per folder, a torn tail kept aside."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.events import RunResumed
from supervisor.journal import (
    Journal,
    JournalWriteError,
    RunFolderBusyError,
    holder,
    parse_line,
    read,
)


def _resumed(n: int) -> RunResumed:
    return RunResumed(attempts_done=n)


def test_each_event_is_on_disk_before_write_returns(tmp_path: Path) -> None:
    """A second reader sees every event written so far, without close()."""
    journal = Journal(tmp_path, clock=lambda: 1.5)
    journal.write(_resumed(1))
    journal.write(_resumed(2))
    records = [json.loads(line) for line in (tmp_path / "journal.jsonl").read_text().splitlines()]
    assert [(r["v"], r["ts"], r["event"], r["attempts_done"]) for r in records] == [
        (1, 1.5, "run.resumed", 1), (1, 1.5, "run.resumed", 2)]
    journal.close()


def test_a_second_writer_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    """Two supervisors on one run folder would interleave their journals: the second is refused."""
    with Journal(tmp_path):
        assert holder(tmp_path) == f"pid {os.getpid()}"
        # flock is per open file description: another process sees the lock as we do.
        probe = subprocess.run(  # noqa: S603 - our own interpreter
            [sys.executable, "-c", ("import sys; from pathlib import Path; "
                                    "from supervisor.journal import Journal; "
                                    "Journal(Path(sys.argv[1]))"), str(tmp_path)],
            capture_output=True, text=True, check=False)
        assert probe.returncode != 0
        assert f"in use by pid {os.getpid()}" in probe.stderr
        with pytest.raises(RunFolderBusyError, match=f"in use by pid {os.getpid()}"):
            Journal(tmp_path)
    assert holder(tmp_path) is None
    Journal(tmp_path).close()  # free again once the first closed


@pytest.mark.parametrize("torn", [b'{"v": 1, "event": "attempt.sta', b"\x00\x00\x00\n",
                                  b'{"v": 1, "ev\n'])
def test_a_torn_last_line_is_kept_aside_and_never_appended_to(tmp_path: Path, torn: bytes) -> None:
    """Power loss mid-write: the half line goes to journal.torn-1.txt; the next event is whole."""
    with Journal(tmp_path) as journal:
        journal.write(_resumed(1))
    path = tmp_path / "journal.jsonl"
    whole = path.read_bytes()
    path.write_bytes(whole + torn)
    assert read(path).torn_line is not None
    with Journal(tmp_path) as journal:
        assert journal.torn_kept == tmp_path / "journal.torn-1.txt"
        journal.write(_resumed(2))
    assert (tmp_path / "journal.torn-1.txt").read_bytes() == torn
    got = read(path)
    assert got.torn_line is None
    assert [r["attempts_done"] for r in got.records] == [1, 2]


def test_lines_that_are_not_the_supervisors_are_skipped_and_counted(tmp_path: Path) -> None:
    """A trainer that writes into the journal (text, its own JSON, a list) costs the run
    nothing: its lines are skipped and counted, every event of ours is read."""
    with Journal(tmp_path) as journal:
        journal.write(_resumed(1))
    path = tmp_path / "journal.jsonl"
    with path.open("a", encoding="utf-8") as handle:
        handle.write('not json\n{"loss": 1.25, "step": 3}\n[1, 2]\n{"v": 1}\n')
    with Journal(tmp_path) as journal:
        journal.write(_resumed(2))
    got = read(path)
    assert got.foreign == 4
    assert [r["attempts_done"] for r in got.records] == [1, 2]


def test_a_line_the_trainer_left_unended_does_not_swallow_the_next_event(
        tmp_path: Path) -> None:
    """A trainer's write without a newline mid-run: our next event starts a line of its own."""
    with Journal(tmp_path) as journal:
        journal.write(_resumed(1))
        with (tmp_path / "journal.jsonl").open("a", encoding="utf-8") as handle:
            handle.write("step 3 loss 1.25")
        journal.write(_resumed(2))
    got = read(tmp_path / "journal.jsonl")
    assert [r["attempts_done"] for r in got.records] == [1, 2]
    assert got.foreign == 1


@pytest.mark.parametrize("line", [
    '{"v": 1, "ts": 1e999, "event": "x", "n": NaN}',
    '{"v": 1, "ts": 1.0, "event": "x", "n": ' + "9" * 400 + "}",
    '{"v": 1, "ts": 1.0, "event": "x", "n": Infinity}',
])
def test_numbers_no_event_holds_are_read_as_nothing(line: str) -> None:
    """NaN, Infinity, 1e999 and a 400-digit number in a journal line are None, never carried."""
    record = parse_line(line.encode())
    assert record is not None
    assert all(v is None or isinstance(v, str) or v in (1, 1.0) for v in record.values())


def test_a_failed_write_leaves_no_half_line(tmp_path: Path) -> None:
    """Disk full: the write fails with one line saying what to do, and nothing torn remains."""
    journal = Journal(tmp_path)
    journal.write(_resumed(1))
    size = (tmp_path / "journal.jsonl").stat().st_size
    os.close(journal._fd)  # noqa: SLF001 - the write must fail at the OS, as on a full disk
    journal._fd = os.open("/dev/full", os.O_WRONLY)  # noqa: SLF001 - ENOSPC on every write
    with pytest.raises(JournalWriteError, match="resume"):
        journal.write(_resumed(2))
    journal.close()
    assert (tmp_path / "journal.jsonl").stat().st_size == size
