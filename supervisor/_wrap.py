"""Attempt shim: run the command, write its (redacted, capped) logs, then its exit status.

The supervisor spawns `python -m supervisor._wrap STATUS -- ARGV...` rather than ARGV itself, so
that an attempt outlives a supervisor killed with -9 and a resumed supervisor can still learn
how it ended (a process that is not our child gives us no exit status).

The shim is the only writer of the attempt's `stdout.log` and `stderr.log`. It reads the
command's two pipes, redacts each line (known secret values, secret shapes, PEM blocks), writes
it to the log and forwards it on its own stdout/stderr, which the supervisor reads. So the logs
never hold a secret even when no supervisor survives, and the supervisor sees every byte in
order and knows the stream is drained when the pipe closes. If the supervisor is gone, the
forwarding stops (EPIPE) and the logs carry on.

Logs are capped (`cap_bytes`, default 64 MiB per stream): the first half is kept as written;
past it the newest bytes go to two alternating tail segments (`stdout.log.tail0/1`), and when
the command ends the log gets a one-line note of how much was dropped and then the tail. A log
only ever grows, so a follower that reads the file (a resumed supervisor) never reads a byte
twice. Stays import-light.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import IO

from supervisor.files import open_new, open_regular
from supervisor.secrets import LineScrubber, Redactor

CONFIG_ENV = "OOM_SUPERVISOR_WRAP"
"""JSON for the shim only (removed before the command starts): cap_bytes, redact."""
DEFAULT_CAP_BYTES = 64 * 1024 * 1024
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
_CHUNK = 65536
_MAX_LINE = 65536  # a longer line is redacted and written in pieces of this size
_IDLE_FLUSH_S = 0.2  # a partial line (a tqdm frame, a prompt) is passed on after this long
_DRAIN_IDLE_S = 1.0  # after the command ends: stop once its pipes are quiet this long...
_DRAIN_MAX_S = 30.0  # ...or after this long (a daemon that kept the pipe open and writes)


class _CappedLog:
    """An append-only log file holding the head and the tail of a stream of at most cap bytes."""

    def __init__(self, path: Path, cap_bytes: int) -> None:
        self.path = path
        self.cap = cap_bytes
        self.head_limit = cap_bytes // 2 if cap_bytes > 0 else -1
        self.segment_limit = max(1, (cap_bytes - max(self.head_limit, 0)) // 2)
        self.written = 0  # bytes of the stream (all of it, kept or not)
        self.head = 0
        self.dropped = 0
        self.lost = 0  # bytes that could not be written (disk full)
        self.segments = [path.with_name(path.name + f".tail{i}") for i in (0, 1)]
        self.sizes = [0, 0]
        self.current = 0
        self.file = self._open(path, "ab")
        self.tail: IO[bytes] | None = None

    @staticmethod
    def _open(path: Path, _mode: str) -> IO[bytes]:
        # Always a new file (O_EXCL | O_NOFOLLOW): an old log of a reused run folder is not
        # continued, and a link planted in the attempt folder is refused, never written through.
        return os.fdopen(open_new(path), "wb")

    def write(self, data: bytes) -> None:
        """Keep `data` in the head while it has room, the rest in the tail segments."""
        self.written += len(data)
        if self.head_limit < 0:
            self._put(self.file, data)
            return
        if self.head < self.head_limit:
            take = data[:self.head_limit - self.head]
            self.head += len(take)
            self._put(self.file, take)
            data = data[len(take):]
        while data:
            room = self.segment_limit - self.sizes[self.current]
            if room <= 0 or self.tail is None:
                self._rotate() if room <= 0 else self._start_tail()
                continue
            piece, data = data[:room], data[room:]
            self.sizes[self.current] += len(piece)
            self._put(self.tail, piece)

    def _start_tail(self) -> None:
        self.tail = self._open(self.segments[self.current], "wb")

    def _rotate(self) -> None:
        if self.tail is not None:
            self.tail.close()
        self.current = 1 - self.current
        self.dropped += self.sizes[self.current]
        self.sizes[self.current] = 0
        self.tail = self._open(self.segments[self.current], "wb")  # truncates the older one

    def _put(self, handle: IO[bytes], data: bytes) -> None:
        try:
            handle.write(data)
            handle.flush()
        except OSError:  # disk full: keep relaying, count what the log lost
            self.lost += len(data)

    def close(self) -> None:
        """Append the drop note and the tail segments to the log; remove the segments."""
        if self.tail is not None:
            self.tail.close()
            older = self.segments[1 - self.current]
            parts = [p for p in (older, self.segments[self.current]) if p.exists()]
            if self.dropped:
                note = (f"\n[oom-supervisor: {self.dropped} bytes of this log were dropped here "
                        f"to keep it under {self.cap} bytes (the first and the last part are "
                        "kept)]\n")
                self._put(self.file, note.encode())
            for part in parts:
                with contextlib.suppress(OSError), os.fdopen(
                        open_regular(part, os.O_RDONLY), "rb") as source:
                    while chunk := source.read(1 << 20):
                        self._put(self.file, chunk)
            for part in self.segments:
                with contextlib.suppress(OSError):
                    part.unlink()
        with contextlib.suppress(OSError):
            self.file.close()


class _Stream:
    """One of the command's output streams: split, redact, log, forward."""

    def __init__(self, log: _CappedLog, forward_fd: int, scrubber: LineScrubber) -> None:
        self.log = log
        self.forward_fd: int | None = forward_fd
        self.scrubber = scrubber
        self.partial = b""

    def feed(self, data: bytes) -> None:
        """Pass on every whole line (\\n or \\r ends one: a tqdm frame is a line too)."""
        buffer = self.partial + data
        cut = max(buffer.rfind(b"\n"), buffer.rfind(b"\r")) + 1
        whole, self.partial = buffer[:cut], buffer[cut:]
        if whole:
            self._emit(self.scrubber.lines(whole))
        while len(self.partial) > _MAX_LINE:
            piece, self.partial = self.partial[:_MAX_LINE], self.partial[_MAX_LINE:]
            self._emit(self.scrubber.line(piece))

    def flush(self) -> None:
        """Pass on a partial line that waited long enough."""
        if self.partial:
            piece, self.partial = self.partial, b""
            self._emit(self.scrubber.line(piece))

    def _emit(self, data: bytes) -> None:
        if not data:
            return
        self.log.write(data)
        if self.forward_fd is None:
            return
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.forward_fd, view):]
        except OSError:  # the supervisor is gone (EPIPE): the logs carry on alone
            self.forward_fd = None


def main(argv: list[str]) -> int:
    """Run argv after `--`, forward signals to it, record its exit status, exit the same way."""
    if len(argv) < 3 or argv[1] != "--":  # noqa: PLR2004 - STATUS -- ARGV
        _say("usage: python -m supervisor._wrap STATUS_FILE -- COMMAND...")
        return 2
    status = Path(argv[0])
    command = argv[2:]
    config = _config()
    redactor = Redactor.from_json(json.dumps(config.get("redact", [])))
    cap = config.get("cap_bytes", DEFAULT_CAP_BYTES)
    cap = cap if isinstance(cap, int) and not isinstance(cap, bool) else DEFAULT_CAP_BYTES
    logs: list[_CappedLog] = []
    try:
        for name in ("stdout", "stderr"):
            logs.append(_CappedLog(status.with_name(f"{name}.log"), cap))  # noqa: PERF401 - closed on failure
    except OSError as exc:  # a link or a FIFO where a log belongs: the command is not started
        for log in logs:
            log.close()
        _say(f"oom-supervisor: error: {exc}")
        return 126
    streams = [_Stream(log, fd, LineScrubber(redactor)) for log, fd in zip(logs, (1, 2),
                                                                         strict=True)]
    try:
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL,  # noqa: S603 - the command
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as exc:
        streams[1].feed(f"oom-supervisor: cannot start {command[0]!r}: "
                        f"{exc.strerror or exc}\n".encode())
        for log in logs:
            log.close()
        _record(status, 127, None, logs)
        return 127

    def forward(signum: int, _frame: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    for signum in _FORWARDED:
        signal.signal(signum, forward)
    pipes = (child.stdout, child.stderr)
    _relay(child, {pipe.fileno(): stream for pipe, stream in zip(pipes, streams, strict=True)
                   if pipe is not None})
    code = child.wait()
    for log in logs:
        log.close()
    _record(status, code, child.pid, logs)
    if code < 0:  # die of the same signal, so our parent sees what the command saw
        with contextlib.suppress(OSError, ValueError):
            if -code not in (signal.SIGKILL, signal.SIGSTOP):
                signal.signal(-code, signal.SIG_DFL)
            os.kill(os.getpid(), -code)
            time.sleep(1.0)  # the signal is delivered before this ends
        return 128 - code
    return code


def _relay(child: subprocess.Popen[bytes], streams: dict[int, _Stream]) -> None:
    """Copy the command's output until its pipes close (bounded once the command has ended)."""
    selector = selectors.DefaultSelector()
    for fd in streams:
        selector.register(fd, selectors.EVENT_READ)
    ended_at: float | None = None
    quiet_since = time.monotonic()
    while selector.get_map():
        ready = selector.select(timeout=_IDLE_FLUSH_S)
        now = time.monotonic()
        if not ready:
            for stream in streams.values():
                stream.flush()
        for key, _ in ready:
            fd = int(key.fd)
            try:
                data = os.read(fd, _CHUNK)
            except OSError:
                data = b""
            if data:
                streams[fd].feed(data)
                quiet_since = now
            else:
                selector.unregister(fd)
        if ended_at is None and child.poll() is not None:
            ended_at = now
        if ended_at is not None and (now - quiet_since > _DRAIN_IDLE_S
                                     or now - ended_at > _DRAIN_MAX_S):
            break  # a daemon of the command holds the pipe: the attempt itself is over
    for stream in streams.values():
        stream.flush()
    selector.close()


def _config() -> dict[str, object]:
    raw = os.environ.pop(CONFIG_ENV, "")
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _say(text: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        print(text, file=sys.stderr)  # noqa: T201


def _record(status: Path, code: int, pid: int | None, logs: list[_CappedLog]) -> None:
    name = None
    if code < 0:
        with contextlib.suppress(ValueError):
            name = signal.Signals(-code).name
    record = {"exit_code": code, "signal": name, "pid": pid, "ended": time.time(),
              "log_bytes": [log.written for log in logs],
              "dropped_bytes": [log.dropped for log in logs],
              "lost_bytes": [log.lost for log in logs]}
    tmp = status.with_name(status.name + ".tmp")
    try:
        fd = open_new(tmp)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        tmp.replace(status)
    except OSError:  # a full disk: the runner reads our own exit code instead; no half file
        with contextlib.suppress(OSError):
            tmp.unlink()


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:  # a Ctrl-C that reached the shim before its handlers: be quiet
        sys.exit(130)
