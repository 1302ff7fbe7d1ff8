"""One attempt: the command in its own session, output teed line by line, the tree ended on OOM."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

import psutil
import structlog

from supervisor.classify import Outcome, is_oom_line

log = structlog.get_logger(__name__)

TAIL_LINES = 200


class StopRequest:
    """Set by signal handlers: `graceful` ends the attempt's tree politely, `immediate` at once."""

    def __init__(self) -> None:
        self.graceful = threading.Event()
        self.immediate = threading.Event()

    def request(self) -> None:
        """First call asks for a graceful stop, the second for an immediate one."""
        if self.graceful.is_set():
            self.immediate.set()
        self.graceful.set()


@dataclass(frozen=True, slots=True, kw_only=True)
class AttemptSpec:
    """Everything the runner needs for one attempt."""

    argv: tuple[str, ...]
    env: Mapping[str, str]
    log_dir: Path
    cwd: str | None = None
    grace_s: float = 5.0
    echo: bool = True
    stop: StopRequest = field(default_factory=StopRequest)


class RunAttempt(Protocol):
    """Runs one attempt and reports what happened (the real one spawns; tests script it)."""

    def __call__(self, spec: AttemptSpec) -> Outcome:
        """Run the attempt to its end."""
        ...


def run(spec: AttemptSpec, *, is_oom: Callable[[str], bool] = is_oom_line) -> Outcome:
    """Spawn the command in a new session, tee its output, end its whole tree on the first OOM."""
    spec.log_dir.mkdir(parents=True, exist_ok=True)
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    lock = threading.Lock()
    oom_seen = threading.Event()
    oom_line: list[str] = []
    kills_before = _kernel_oom_kills()
    started = time.monotonic()
    try:
        proc = subprocess.Popen(  # noqa: S603 - running the user's own command is the point
            spec.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(spec.env),
            cwd=spec.cwd, start_new_session=True,
        )
    except OSError as exc:
        line = f"cannot start {spec.argv[0]!r}: {exc.strerror or exc}"
        (spec.log_dir / "stderr.log").write_text(line + "\n", encoding="utf-8")
        return Outcome(exit_code=127, duration_s=0.0, tail=(line,))

    def pump(stream: IO[bytes], name: str, console: IO[bytes]) -> None:
        with (spec.log_dir / f"{name}.log").open("wb") as sink:
            for raw in iter(stream.readline, b""):
                sink.write(raw)
                sink.flush()
                if spec.echo:
                    with contextlib.suppress(OSError, ValueError):
                        console.write(raw)
                        console.flush()
                line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                with lock:
                    tail.append(line)
                if not oom_seen.is_set() and is_oom(line):
                    oom_line.append(line)
                    oom_seen.set()

    assert proc.stdout is not None  # noqa: S101 - PIPE above
    assert proc.stderr is not None  # noqa: S101
    readers = [
        threading.Thread(target=pump, args=(proc.stdout, "stdout", _console(sys.stdout)),
                         daemon=True),
        threading.Thread(target=pump, args=(proc.stderr, "stderr", _console(sys.stderr)),
                         daemon=True),
    ]
    for reader in readers:
        reader.start()

    killed = interrupted = False
    tree = _Tree(proc.pid)
    while proc.poll() is None:
        tree.remember()
        if oom_seen.is_set() and not killed:
            log.info("oom.detected", line=oom_line[0][:300], pid=proc.pid)
            # A stuck peer rank must not hold the night: end the whole tree now.
            tree.end(grace_s=spec.grace_s, hurry=spec.stop.immediate)
            killed = True
        elif spec.stop.immediate.is_set() or (spec.stop.graceful.is_set() and not interrupted):
            interrupted = True
            tree.end(grace_s=spec.grace_s, hurry=spec.stop.immediate)
        oom_seen.wait(0.05)
    # Stragglers: workers in sessions of their own outlive the leader.
    tree.end(grace_s=spec.grace_s, hurry=spec.stop.immediate)
    for reader in readers:
        reader.join(timeout=5.0)
    for stream in (proc.stdout, proc.stderr):
        with contextlib.suppress(OSError):
            stream.close()
    with lock:
        lines = tuple(tail)
    return Outcome(
        exit_code=proc.returncode,
        duration_s=round(time.monotonic() - started, 3),
        tail=lines,
        oom_line=oom_line[0] if oom_line else None,
        killed_by_supervisor=killed,
        interrupted=interrupted,
        kernel_oom_kills=max(0, _kernel_oom_kills() - kills_before),
    )


class _Tree:
    """The attempt's processes: the leader's group plus every descendant ever seen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.known: dict[int, psutil.Process] = {}

    def remember(self) -> None:
        # torchrun starts workers in their own sessions, so the process group is not enough;
        # keep every descendant we have seen, and end them all.
        with contextlib.suppress(psutil.Error):
            leader = psutil.Process(self.pid)
            for proc in (leader, *leader.children(recursive=True)):
                self.known.setdefault(proc.pid, proc)

    def end(self, *, grace_s: float, hurry: threading.Event) -> None:
        """SIGTERM the group and every known descendant, SIGKILL what is left after grace_s."""
        self.remember()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGTERM)
        still = [p for p in self.known.values() if _is_running(p)]
        for proc in still:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        # Wait in short slices so a second Ctrl-C (hurry) cuts the grace period short.
        while still and time.monotonic() < deadline and not hurry.is_set():
            _, still = psutil.wait_procs(still, timeout=0.1)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        for proc in still:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs([p for p in self.known.values() if _is_running(p)], timeout=2.0)


def _is_running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class _Discard:
    def write(self, data: bytes) -> int:
        return len(data)

    def flush(self) -> None:
        return None


def _console(stream: IO[str]) -> IO[bytes]:
    # pytest's capture and some IDEs give a text stream with no byte buffer under it.
    buffer = getattr(stream, "buffer", None)
    return buffer if buffer is not None else _Discard()  # type: ignore[return-value]


def _kernel_oom_kills() -> int:
    """The kernel OOM killer's count for our cgroup (cgroup v2 memory.events), 0 if unreadable."""
    try:
        cgroup = Path("/proc/self/cgroup").read_text(encoding="utf-8").splitlines()
        rel = next(line.split("::", 1)[1] for line in cgroup if line.startswith("0::"))
        events = Path("/sys/fs/cgroup", rel.lstrip("/"), "memory.events").read_text(
            encoding="utf-8")
    except (OSError, StopIteration, IndexError):
        return 0
    for line in events.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill" and value.strip().isdigit():
            return int(value)
    return 0
