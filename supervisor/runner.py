"""One attempt: the command in its own session, output teed line by line, the tree ended on OOM.

The command runs under a small shim (`supervisor._wrap`) that writes its exit status to a file,
and writes its output straight into the attempt's log files, which the runner follows. So an
attempt survives the supervisor being killed, and `resume` can adopt it and still learn how it
ended.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

import psutil
import structlog

from supervisor.classify import Outcome, is_oom_line
from supervisor.gpu import GpuProbe, Sampler, wait_for_release
from supervisor.secrets import Redactor

log = structlog.get_logger(__name__)

TAIL_LINES = 200
MARKER_ENV = "OOM_SUPERVISOR_ATTEMPT"
"""Set in every attempt's environment: finds its processes even after they left the tree."""
STATUS_FILE = "exit_status.json"
_POLL_S = 0.05
_REMEMBER_S = 0.5


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
class Spawned:
    """An attempt's leader process, identified across pid reuse by its start time."""

    pid: int
    create_time: float


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
    timeout_s: float | None = None
    """Wall-clock limit of the attempt; past it the tree is ended and the verdict is `hang`."""
    stall_s: float | None = None
    """Longest silence allowed (no output line); past it the tree is ended, verdict `hang`."""
    marker: str = ""
    on_spawn: Callable[[Spawned], None] | None = None
    redactor: Redactor = field(default_factory=Redactor)
    gpu: GpuProbe | None = None
    """Where GPU memory is sampled during the attempt and watched for release after it."""
    release_wait_s: float = 60.0


class RunAttempt(Protocol):
    """Runs one attempt and reports what happened (the real one spawns; tests script it)."""

    def __call__(self, spec: AttemptSpec) -> Outcome:
        """Run the attempt to its end."""
        ...


def run(spec: AttemptSpec, *, is_oom: Callable[[str], bool] = is_oom_line) -> Outcome:
    """Spawn the command in a new session, tee its output, end its whole tree on the first OOM."""
    spec.log_dir.mkdir(parents=True, exist_ok=True)
    status = spec.log_dir / STATUS_FILE
    status.unlink(missing_ok=True)
    env = dict(spec.env)
    env[MARKER_ENV] = spec.marker or str(spec.log_dir)
    env.setdefault("PYTHONUNBUFFERED", "1")  # lines reach the logs (and the OOM watch) at once
    kills_before = kernel_oom_kills()
    started = time.monotonic()
    with (spec.log_dir / "stdout.log").open("ab") as out, \
            (spec.log_dir / "stderr.log").open("ab") as err:
        proc = subprocess.Popen(  # noqa: S603 - running the user's own command is the point
            [sys.executable, "-m", "supervisor._wrap", str(status), "--", *spec.argv],
            stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env, cwd=spec.cwd,
            start_new_session=True,
        )
    spawned = Spawned(pid=proc.pid, create_time=_create_time(proc.pid))
    if spec.on_spawn is not None:
        spec.on_spawn(spawned)
    return _watch(spec, spawned, proc.poll, started=started, kills_before=kills_before,
                  is_oom=is_oom, marker=env[MARKER_ENV])


def adopt(spec: AttemptSpec, spawned: Spawned, *,
          is_oom: Callable[[str], bool] = is_oom_line) -> Outcome:
    """Take over an attempt a previous supervisor started: follow it to its end, read its status."""
    try:
        proc = psutil.Process(spawned.pid)
        alive = abs(proc.create_time() - spawned.create_time) < 1.0 and _is_running(proc)
    except psutil.Error:
        alive = False

    def poll() -> int | None:
        if alive and _is_running(proc):
            return None
        return _status_code(spec.log_dir / STATUS_FILE)

    return _watch(spec, spawned, poll, started=time.monotonic(), kills_before=kernel_oom_kills(),
                  is_oom=is_oom, marker=spec.marker or str(spec.log_dir), adopted=True)


def end_orphan(spec: AttemptSpec, spawned: Spawned) -> None:
    """End what is left of an attempt a previous supervisor started (by pid and marker)."""
    tree = _Tree(spawned.pid, spec.marker or str(spec.log_dir))
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(spawned.pid)
        if abs(proc.create_time() - spawned.create_time) < 1.0:
            tree.remember()
    tree.end(grace_s=spec.grace_s, hurry=spec.stop.immediate)


def _watch(spec: AttemptSpec, spawned: Spawned, poll: Callable[[], int | None], *,  # noqa: PLR0913
           started: float, kills_before: int, is_oom: Callable[[str], bool], marker: str,
           adopted: bool = False) -> Outcome:
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    oom_seen = threading.Event()
    oom_line: list[str] = []
    last_output = [time.monotonic()]
    lock = threading.Lock()
    done = threading.Event()

    def on_line(line: str) -> None:
        with lock:
            tail.append(line)
            last_output[0] = time.monotonic()
        if not oom_seen.is_set() and is_oom(line):
            oom_line.append(line)
            oom_seen.set()

    followers = [
        threading.Thread(target=_follow, daemon=True, args=(
            spec.log_dir / f"{name}.log", console, on_line, done, spec.echo, spec.redactor))
        for name, console in (("stdout", _console(sys.stdout)), ("stderr", _console(sys.stderr)))
    ]
    for follower in followers:
        follower.start()

    killed = interrupted = False
    hung: str | None = None
    kill_s: float | None = None
    tree = _Tree(spawned.pid, marker)
    # dict.copy() is atomic under the GIL; the poll loop below adds pids while this samples.
    sampler = Sampler(spec.gpu, pids=lambda: tree.known.copy().keys()) if spec.gpu else None
    if sampler is not None:
        sampler.start()
    code = poll()
    remembered = 0.0
    while code is None:
        now = time.monotonic()
        if now - remembered > _REMEMBER_S:  # a /proc scan: not on every 50 ms tick
            tree.remember()
            remembered = now
        if oom_seen.is_set() and not killed:
            seen_at = time.monotonic()
            log.info("oom.detected", line=spec.redactor.text(oom_line[0])[:300], pid=spawned.pid)
            # A stuck peer rank must not hold the night: end the whole tree now.
            tree.end(grace_s=spec.grace_s, hurry=spec.stop.immediate)
            kill_s = round(time.monotonic() - seen_at, 3)
            killed = True
        elif (spec.stop.graceful.is_set() and not interrupted) or spec.stop.immediate.is_set():
            interrupted = True
            tree.end(grace_s=spec.grace_s, hurry=spec.stop.immediate)
        elif hung is None and spec.timeout_s is not None and now - started > spec.timeout_s:
            hung = f"ran past its time limit of {spec.timeout_s:g} s"
            tree.end(grace_s=spec.grace_s, hurry=spec.stop.immediate)
        elif hung is None and spec.stall_s is not None and now - last_output[0] > spec.stall_s:
            hung = f"printed nothing for {spec.stall_s:g} s (stalled)"
            tree.end(grace_s=spec.grace_s, hurry=spec.stop.immediate)
        oom_seen.wait(_POLL_S)
        code = poll()
    # Stragglers: workers in sessions of their own outlive the leader.
    tree.end(grace_s=spec.grace_s, hurry=spec.stop.immediate)
    gpu_peak_mib: float | None = None
    release: dict[str, object] | None = None
    if sampler is not None and spec.gpu is not None:
        gpu_peak_mib = float(sampler.stop().peak_mib)
        # The next attempt needs the memory back: wait for the driver to release it.
        released = wait_for_release(spec.gpu, list(tree.known), timeout_s=spec.release_wait_s)
        release = {**released.to_dict(), "describe": released.describe()}
    done.set()
    for follower in followers:
        follower.join(timeout=5.0)
    # The shim recorded how the command itself ended (the shim's own status is one step removed).
    status_code = _status_code(spec.log_dir / STATUS_FILE)
    if status_code is not None:
        code = status_code
    _scrub(spec)
    with lock:
        lines = tuple(spec.redactor.text(line) for line in (*tail, *_error_files(tail)))
    return Outcome(
        exit_code=code,
        duration_s=round(time.monotonic() - started, 3),
        tail=lines,
        oom_line=spec.redactor.text(oom_line[0]) if oom_line else None,
        killed_by_supervisor=killed or hung is not None,
        interrupted=interrupted,
        hung=hung,
        kill_s=kill_s,
        gpu_peak_mib=gpu_peak_mib,
        release=release,
        kernel_oom_kills=max(0, kernel_oom_kills() - kills_before),
        adopted=adopted,
    )


def _follow(path: Path, console: IO[bytes], on_line: Callable[[str], None],  # noqa: PLR0913, PLR0917
            done: threading.Event, echo: bool, redactor: Redactor) -> None:  # noqa: FBT001
    """Read a growing log file line by line until `done` is set and the file is drained."""
    partial = b""
    with path.open("rb") as source:
        while True:
            chunk = source.read(65536)
            if not chunk:
                if done.is_set():
                    break
                time.sleep(_POLL_S)
                continue
            lines = (partial + chunk).split(b"\n")
            partial = lines.pop()
            for raw in lines:
                _emit(raw + b"\n", console, on_line, echo, redactor)
    if partial:
        _emit(partial, console, on_line, echo, redactor)


def _emit(raw: bytes, console: IO[bytes], on_line: Callable[[str], None], echo: bool,  # noqa: FBT001
          redactor: Redactor) -> None:
    if echo:
        with contextlib.suppress(OSError, ValueError):
            console.write(redactor.data(raw))
            console.flush()
    # tqdm redraws with \r: the last frame is the line a person would see.
    on_line(raw.decode("utf-8", errors="replace").rstrip("\r\n").rsplit("\r", 1)[-1])


_ERROR_FILE = re.compile(r"error_file\s*:\s*(\S+\.json)")


def _error_files(lines: Iterable[str]) -> list[str]:
    """The messages of torchrun's per-rank error.json files named in its Root Cause block."""
    found: list[str] = []
    for line in lines:
        match = _ERROR_FILE.search(line)
        if not match:
            continue
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
            data = json.loads(Path(match.group(1)).read_text(encoding="utf-8"))
            message = data["message"]
            text = message.get("message") if isinstance(message, dict) else str(message)
            found.extend(f"[{match.group(1)}] {part}" for part in str(text).splitlines()[-5:])
    return found


def _scrub(spec: AttemptSpec) -> None:
    """Replace secret values in the finished attempt's logs."""
    if not spec.redactor.values:
        return
    for name in ("stdout.log", "stderr.log"):
        path = spec.log_dir / name
        with contextlib.suppress(OSError):
            data = path.read_bytes()
            clean = spec.redactor.data(data)
            if clean != data:
                path.write_bytes(clean)


def _status_code(path: Path) -> int | None:
    try:
        code = json.loads(path.read_text(encoding="utf-8"))["exit_code"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return int(code) if isinstance(code, int) else None


def _create_time(pid: int) -> float:
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return 0.0


class _Tree:
    """The attempt's processes: the leader's group, every descendant seen, and the marker."""

    def __init__(self, pid: int, marker: str) -> None:
        self.pid = pid
        self.marker = marker
        self.known: dict[int, psutil.Process] = {}

    def remember(self) -> None:
        # torchrun starts workers in their own sessions, so the process group is not enough;
        # keep every descendant we have seen, and end them all.
        with contextlib.suppress(psutil.Error):
            leader = psutil.Process(self.pid)
            for proc in (leader, *leader.children(recursive=True)):
                self.known.setdefault(proc.pid, proc)

    def _marked(self) -> list[psutil.Process]:
        """Processes whose environment carries this attempt's marker (daemonised escapees)."""
        found = []
        me = os.getpid()
        for proc in psutil.process_iter():
            if proc.pid == me or proc.pid in self.known:
                continue
            with contextlib.suppress(psutil.Error):
                if proc.environ().get(MARKER_ENV) == self.marker:
                    found.append(proc)
        return found

    def end(self, *, grace_s: float, hurry: threading.Event) -> None:
        """SIGTERM the group and every known or marked process; SIGKILL the rest after grace_s."""
        self.remember()
        for proc in self._marked():
            self.known.setdefault(proc.pid, proc)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGTERM)
        still = [p for p in self.known.values() if _is_running(p)]
        for proc in still:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGTERM)
        # Poll rather than psutil.wait_procs: that would reap our own child, and Popen would
        # then report exit status 0. Short slices let a second Ctrl-C cut the grace short.
        deadline = time.monotonic() + grace_s
        while still and time.monotonic() < deadline and not hurry.is_set():
            time.sleep(_POLL_S)
            still = [p for p in still if _is_running(p)]
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        for proc in still:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and any(_is_running(p) for p in still):
            time.sleep(_POLL_S)


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


def kernel_oom_kills() -> int:
    """The kernel OOM killer's count for our cgroup (v2 memory.events or v1 oom_control)."""
    try:
        lines = Path("/proc/self/cgroup").read_text(encoding="utf-8").splitlines()
    except OSError:
        return 0
    candidates: list[Path] = []
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if controllers == "":
            candidates.append(Path("/sys/fs/cgroup", rel.lstrip("/"), "memory.events"))
        elif "memory" in controllers.split(","):
            candidates.append(Path("/sys/fs/cgroup/memory", rel.lstrip("/"),
                                   "memory.oom_control"))
    for path in candidates:
        with contextlib.suppress(OSError):
            for entry in path.read_text(encoding="utf-8").splitlines():
                key, _, value = entry.partition(" ")
                if key == "oom_kill" and value.strip().isdigit():
                    return int(value)
    return 0
