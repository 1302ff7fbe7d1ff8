"""The journal on disk: append-only JSONL, fsynced per event, one writer per run folder.

A run folder is locked (`flock` on `<run>/.lock`) by the supervisor that writes it, so a
second `run` with the same id, or `resume` while the first supervisor lives, is refused with
the holder's pid instead of interleaving two journals. A torn last line (power loss, disk
full, a kill in mid-write) is recognised on open, kept aside in the folder and cut off, so that
the next event never lands on half a line.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from supervisor import bounds
from supervisor.events import Event, JournalError, RunState, replay
from supervisor.files import NotRegularFileError, open_new, open_regular, write_failed
from supervisor.rundir import check_run_folder

E = TypeVar("E", bound=Event)

JOURNAL = "journal.jsonl"
LOCK = ".lock"


class RunFolderBusyError(RuntimeError):
    """Another supervisor holds the run folder; the message names its pid."""


class JournalWriteError(OSError):
    """An event could not be made durable (disk full, folder gone); the message says what to do."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Read:
    """A journal's whole records, and its torn last line if it has one (not repaired)."""

    records: tuple[dict[str, Any], ...]
    torn_line: str | None = None
    foreign: int = 0
    """Lines that are not the supervisor's (a trainer writing into the journal, garbage):
    skipped, counted."""


def read(path: Path) -> Read:
    """Every whole record of a journal; a torn last line is returned apart, never parsed."""
    try:
        fd = open_regular(path, os.O_RDONLY)
        with os.fdopen(fd, "rb") as handle:
            data = handle.read()
    except NotRegularFileError as exc:
        raise JournalError(str(exc)) from None
    except OSError as exc:
        msg = f"cannot read {path} ({exc.strerror or exc}); give the folder of a run"
        raise JournalError(msg) from None
    whole, torn = _split_torn(data)
    records: list[dict[str, Any]] = []
    foreign = 0
    for raw in whole.splitlines():
        if not raw.strip():
            continue
        record = parse_line(raw)
        if record is None:
            foreign += 1  # not the supervisor's: skipped and counted, never a refusal
            continue
        records.append(record)
    return Read(records=tuple(records),
                torn_line=torn.decode("utf-8", errors="replace") if torn else None,
                foreign=foreign)


_MAX_RECORD = 16 * 1024 * 1024


def parse_line(raw: bytes) -> dict[str, Any] | None:
    """One journal line as the supervisor wrote it (a JSON object with `v`, `ts` and `event`),
    or None for a line that is not the supervisor's (text, a trainer's JSON, garbage).

    Numbers are read at the edge: NaN and Infinity are None, a float that overflows (`1e999`)
    is None, an integer of more than 30 digits is None; nothing downstream meets them.
    """
    if len(raw) > _MAX_RECORD:
        return None
    try:
        record = json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float,
                            parse_int=_bounded_int)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(record, dict) or not {"v", "ts", "event"} <= record.keys():
        return None
    return record


def _no_constant(_name: str) -> None:
    return None


def _finite_float(text: str) -> float | None:
    return bounds.finite(text, low=-_MAX_RECORD_FLOAT, high=_MAX_RECORD_FLOAT)


_MAX_RECORD_FLOAT = 1e18  # times, sizes, durations: far below; -1e308 is nothing of ours


_MAX_RECORD_DIGITS = 30  # nanosecond times have 19; a 400-digit number is no field of ours


def _bounded_int(text: str) -> int | None:
    return None if len(text) > _MAX_RECORD_DIGITS else int(text)


def load(run_dir: Path) -> tuple[RunState, str | None]:
    """Replay a run folder's journal: its state and its torn last line (if any)."""
    path = run_dir / JOURNAL
    if not path.exists():
        msg = f"{path} does not exist; give the folder of a run (runs/<run-id>)"
        raise JournalError(msg)
    got = read(path)  # a FIFO or a directory: refused by name, never opened for reading
    state = replay(got.records)
    if got.foreign:
        state = replace(state, foreign_lines=got.foreign)
    return state, got.torn_line


def _split_torn(data: bytes) -> tuple[bytes, bytes]:
    """(whole lines, torn tail): the tail is a last line without its newline, or one that does
    not parse (a crash can leave zeros or half a record behind a newline that made it)."""
    if not data:
        return b"", b""
    if not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        return data[:cut], data[cut:]
    body = data[:-1]
    cut = body.rfind(b"\n") + 1
    last = body[cut:]
    try:
        json.loads(last)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return data[:cut], data[cut:]
    return data, b""


def holder(run_dir: Path) -> str | None:
    """Who holds the run folder's lock (`pid N`), or None when nobody does."""
    path = run_dir / LOCK
    try:
        fd = open_regular(path, os.O_RDONLY)  # a FIFO .lock must not hang `status`
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 200, 0).decode("utf-8", errors="replace").split()
            return f"pid {text[0]}" if text else "another process"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class Journal:
    """The record of a run: one JSON object per line, on disk before `write` returns."""

    def __init__(self, run_dir: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.run_dir = run_dir
        self.path = run_dir / JOURNAL
        self._clock = clock
        self._write_lock = threading.Lock()
        self.torn_kept: Path | None = None
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            check_run_folder(run_dir)  # this user's, and no link where a run file belongs
            self._lock = open_regular(run_dir / LOCK, os.O_RDWR | os.O_CREAT)
        except NotRegularFileError as exc:
            raise JournalError(str(exc)) from None
        except OSError as exc:
            msg = f"cannot create the run folder {run_dir} ({exc.strerror or exc})"
            raise JournalWriteError(msg) from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(self._lock, 200, 0).decode("utf-8", errors="replace").split()
            os.close(self._lock)
            who = f"pid {text[0]}" if text else "another process"
            msg = (f"run folder {run_dir} is in use by {who} (an oom-supervisor run or resume); "
                   "wait for it to end, or choose another --run-id")
            raise RunFolderBusyError(msg) from None
        try:
            os.ftruncate(self._lock, 0)
            os.pwrite(self._lock, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            self._release()
            whole = self.path.is_file() and self.path.stat().st_size > 0
            raise write_failed(run_dir / LOCK, exc, run_dir=run_dir if whole else None) from None
        try:
            self._repair()
            self._fd = open_regular(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
        except NotRegularFileError as exc:
            self._release()
            raise JournalError(str(exc)) from None
        except OSError as exc:
            self._release()
            msg = f"cannot open {self.path} ({exc.strerror or exc})"
            raise JournalWriteError(msg) from None

    def _repair(self) -> None:
        """Keep a torn last line aside (journal.torn-N.txt) and cut it off the journal."""
        try:
            fd = open_regular(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return
        with os.fdopen(fd, "rb") as handle:
            data = handle.read()
        whole, torn = _split_torn(data)
        if not torn:
            return
        number = 1
        while (self.run_dir / f"journal.torn-{number}.txt").exists():
            number += 1
        kept = self.run_dir / f"journal.torn-{number}.txt"
        out = open_new(kept)
        try:
            os.write(out, torn)
        finally:
            os.close(out)
        fd = open_regular(self.path, os.O_WRONLY)
        try:
            os.ftruncate(fd, len(whole))
            os.fsync(fd)
        finally:
            os.close(fd)
        self.torn_kept = kept

    def write(self, event: E) -> E:
        """Append one event (stamped now) and fsync it; a failed write leaves no torn line."""
        with self._write_lock:  # the loop and the signals' thread (loop.Signals) both write
            return self._write(event)

    def _write(self, event: E) -> E:
        stamped = replace(event, ts=round(self._clock(), 3))
        line = (json.dumps(stamped.to_record(), default=str, ensure_ascii=False) + "\n").encode()
        size = os.fstat(self._fd).st_size
        if size and os.pread(self._fd, 1, size - 1) != b"\n":
            # Someone else (a trainer) wrote into the journal without ending its line: ours
            # starts on a line of its own, or replay would lose it with theirs.
            line = b"\n" + line
        try:
            written = os.write(self._fd, line)
            if written != len(line):
                raise OSError(28, "short write")  # noqa: TRY301 - handled just below
            os.fsync(self._fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, size)  # never leave half an event behind
            # The same words as every other failed write (files.write_failed); the attempt is
            # left running for `resume` to adopt.
            said = str(write_failed(self.path, exc, run_dir=self.run_dir,
                                    then=f"then `oom-supervisor resume {self.run_dir}` "
                                         "(the running attempt was left running for it)"))
            raise JournalWriteError(said) from None
        return stamped

    def close(self) -> None:
        """Close the file and release the run folder."""
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._release()

    def _release(self) -> None:
        with contextlib.suppress(OSError):
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            os.close(self._lock)

    def __enter__(self) -> Journal:  # noqa: PYI034 - final class, no subclasses
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


@contextlib.contextmanager
def locked(run_dir: Path) -> Iterator[Journal]:
    """A Journal held for the block."""
    journal = Journal(run_dir)
    try:
        yield journal
    finally:
        journal.close()
