"""The console echo: best effort, never in the way of the training.

A terminal can stop reading (a paused terminal, `| less` left open, a stuck ssh). The attempt's
output is echoed through a bounded queue that one writer thread per console empties: the
follower that reads the trainer's pipes only ever appends to the queue, so it never blocks, the
trainer never blocks in `write`, and SIGTERM is acted on at once. What does not fit in the
queue is dropped and counted, and the count is said on that console once it reads again; the
attempt's log files in the run folder have every line either way.

The supervisor's own lines (structlog's chain, the live line, the summary) take the same way
(`BestEffortStream`), after the echo on the same queue: a console nobody reads never holds a
verdict, a retry or SIGTERM either; `supervisor.jsonl` in the run folder has every event.

The writer writes the console's file descriptor directly (`os.write`, at most PIPE_BUF bytes at
a time, only when `select` says it can take them), never through `sys.stdout`'s buffer: a
thread stuck there would hold the buffer's lock, and the supervisor's own last lines with it.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import os
import select
import threading
import time
from collections import deque
from typing import IO, Protocol

QUEUE_BYTES = 1024 * 1024
"""Most bytes waiting for a console; beyond it output is dropped (and counted), not queued."""
FLUSH_PATIENCE_S = 0.25
"""A flush gives up once the console has taken nothing for this long."""
FLUSH_MAX_S = 5.0
_PIPE_BUF = 4096
_SELECT_S = 0.2


class Echo(Protocol):
    """Where echoed bytes go: a console writer, or a plain in-memory stream (tests)."""

    def put(self, data: bytes) -> None:
        """Queue `data` to be shown (or drop and count it); never blocks."""


class ConsoleWriter:
    """One console's queue and the thread that writes it out; what overflows is counted."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.queue: deque[bytes] = deque()
        self.queued = 0
        self.dropped_lines = 0
        self.dropped_total = 0
        self.written = 0
        self.cond = threading.Condition()
        self.last_progress = time.monotonic()
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name=f"oom-supervisor-echo-{fd}")
        self.thread.start()

    def put(self, data: bytes) -> None:
        """Queue `data` for the console, or drop it (counted) when the console lags too far."""
        if not data:
            return
        with self.cond:
            if self.queued + len(data) > QUEUE_BYTES:
                lines = data.count(b"\n") or 1
                self.dropped_lines += lines
                self.dropped_total += lines
                return
            if not self.queue:
                self.last_progress = time.monotonic()  # patience counts from here
            self.queue.append(data)
            self.queued += len(data)
            self.cond.notify_all()

    def flush(self, *, patience_s: float = FLUSH_PATIENCE_S, max_s: float = FLUSH_MAX_S) -> bool:
        """Wait (bounded) for the queue to empty; give up when the console stops taking bytes."""
        deadline = time.monotonic() + max_s
        with self.cond:
            while self.queued:
                now = time.monotonic()
                if now > deadline or now - self.last_progress > patience_s:
                    return False
                self.cond.wait(0.05)
        return True

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.queue:
                    self.cond.wait()
                data = self.queue.popleft()
                dropped, self.dropped_lines = self.dropped_lines, 0
            if dropped:
                lines = f"{dropped} line{'' if dropped == 1 else 's'}"
                self._write(f"[oom-supervisor: {lines} of output not echoed (the "
                            "console did not keep up); the attempt's logs and the run's "
                            "supervisor.jsonl have them]\n".encode())
            self._write(data)
            with self.cond:
                self.queued -= len(data)
                self.cond.notify_all()

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                _, ready, _ = select.select([], [self.fd], [], _SELECT_S)
            except (OSError, ValueError):
                return  # the console is closed: nothing more can be shown
            if not ready:
                continue
            try:
                written = os.write(self.fd, view[:_PIPE_BUF])
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                return  # EPIPE, EIO: the console went away; the logs have it all
            view = view[written:]
            self.written += written
            with self.cond:
                self.last_progress = time.monotonic()


class _Buffer:
    """An in-memory stream (pytest's capture): written at once, it cannot block."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream

    def put(self, data: bytes) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.stream.write(data)
            self.stream.flush()


class _Discard:
    def put(self, data: bytes) -> None:  # noqa: ARG002 - nothing to show it on
        return None


_WRITERS: dict[tuple[int, int, int], ConsoleWriter] = {}
"""By descriptor and the file it is open on: after `dup2` (SIGHUP sends output to the run
folder) or a descriptor closed and reused, a new writer serves the new file."""
_LOCK = threading.Lock()


def console_for(stream: IO[str]) -> Echo:
    """The echo for a text stream: its file descriptor's writer thread, else its byte buffer."""
    buffer = getattr(stream, "buffer", None)
    if buffer is None:
        return _Discard()  # an IDE's stream with no bytes under it
    try:
        fd = buffer.fileno()
        found = os.fstat(fd)
    except (OSError, ValueError, AttributeError):
        return _Buffer(buffer)
    key = (fd, found.st_dev, found.st_ino)
    with _LOCK:
        writer = _WRITERS.get(key)
        if writer is None:
            try:  # its own descriptor: the number may be closed and reused, the file stays
                own = os.dup(fd)
            except OSError:
                return _Discard()
            writer = _WRITERS[key] = ConsoleWriter(own)
        return writer


class BestEffortStream(io.TextIOBase):
    """A text stream over a console whose writes never block: each goes, encoded, onto the
    console's bounded queue (`console_for`, looked up at each write, so a descriptor moved by
    `dup2` gets its own writer), and is dropped and counted when the console lags too far.
    `flush` does not wait; `flush_all` (at exit) lets a console that reads take the rest."""

    def __init__(self, real: IO[str]) -> None:
        self.real = real
        self._partial = ""
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        # Whole lines go onto the queue at once: the echo's chunks never land inside one.
        with self._lock:
            head, newline, rest = (self._partial + text).rpartition("\n")
            self._partial = rest
            if newline:
                self._put(head + newline)
        return len(text)

    def flush(self) -> None:
        """Queue what is written so far (a live display's redraw); never waits on a console."""
        with self._lock:
            partial, self._partial = self._partial, ""
            if partial:
                self._put(partial)

    def _put(self, text: str) -> None:
        encoding = getattr(self.real, "encoding", None) or "utf-8"
        console_for(self.real).put(text.encode(encoding, errors="backslashreplace"))

    def isatty(self) -> bool:
        try:
            return bool(self.real.isatty())
        except (OSError, ValueError, AttributeError):
            return False

    def fileno(self) -> int:
        return self.real.fileno()

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        """The console's encoding (rich reads it)."""
        return getattr(self.real, "encoding", None) or "utf-8"


def flush_all(*, patience_s: float = FLUSH_PATIENCE_S, max_s: float = FLUSH_MAX_S) -> None:
    """Let every console take what is queued, bounded (a console that reads nothing: at once)."""
    for writer in list(_WRITERS.values()):
        writer.flush(patience_s=patience_s, max_s=max_s)


atexit.register(flush_all)
