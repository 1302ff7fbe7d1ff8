"""One attempt: the command in its own session, its output followed, the tree ended on OOM.

The command runs under a small shim (`supervisor._wrap`) that reads the command's output,
redacts it, writes the attempt's capped log files and forwards every byte to the runner through
a pipe; then it writes the command's exit status to a file. So an attempt survives the
supervisor being killed, and `resume` can adopt it (following the log files instead) and still
learn how it ended. The verdict is built only after the streams are drained (the pipes close
when the shim exits). Output that moves counts as progress for the stall watchdog (a tqdm bar
redraws with `\\r` and never ends a line; a redraw whose counter did not move is silence).
What counts as too long a silence is learnt from the trainer's own cadence
(`trainer_output.Watchdog`); a silence past it is a hang only when the evidence of work
(files under the output folder, CPU, I/O, GPU, the sampled stacks) says so (`liveness`).

Under a launcher that does not end the peers of a failed task itself (`srun` with Slurm's
default KillOnBadExit=0), a task that exited with an error ends the attempt's tree after a
short grace, so its peers do not wait out a rendezvous or collective timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
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

from supervisor import _wrap, echo, gpu, launchers, liveness, rescue
from supervisor.classify import Outcome, is_oom_line
from supervisor.files import open_regular, read_regular
from supervisor.gpu import GpuProbe, Sampler, wait_for_release
from supervisor.secrets import Redactor
from supervisor.text import plural
from supervisor.trainer_output import Tracker, Watchdog

log = structlog.get_logger(__name__)

TAIL_LINES = 200
MARKER_ENV = "OOM_SUPERVISOR_ATTEMPT"
"""Set in every attempt's environment: finds its processes even after they left the tree."""
STATUS_FILE = "exit_status.json"
_POLL_S = 0.05
_REMEMBER_S = 0.5
_CHUNK = 65536
_MAX_LINE = 65536
"""A line longer than this (no newline in 64 KiB) is judged in pieces; memory stays bounded."""
_OOM_HINTS = (b"memory", b"alloc", b"cumem")
_OVERLAP = 4096
"""Bytes the pieces of a never-ending line share, more than any OOM message is long."""
"""Words every OOM rule's text contains (lower case): chunks without them skip the rules."""
ECHO_LINES_PER_S = 2000
ECHO_BURST_LINES = 20000
"""The console echo's rate: output beyond it is counted and said, never silently lost."""
DRAIN_S = 60.0
"""How long the followers may take to read what is left after the attempt ended."""
LOG_CAP_ENV = "OOM_SUPERVISOR_LOG_CAP_MIB"
"""Where the log cap can be set (MiB per stream, 0 keeps everything)."""
WRAPPER_DIED = "the attempt's wrapper died without writing its exit status"
FAILED_TASK_GRACE_S = 5.0
"""After a launcher says a task exited with an error, how long its peers get to end alone."""
OOM_EXIT_GRACE_S = 30.0
"""After an OOM line, how long the command may take to exit by itself (its exit status then
decides: 0 is a program that caught its OOM and recovered) before its whole tree is ended (a
peer rank stuck in a collective would otherwise hold the night)."""
_ACTIVITY_S = 2.0
"""How often the output folder is looked at for a checkpoint being written."""


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
    """Longest silence allowed (no output byte); past it the tree is ended, verdict `hang`.
    Used when `watchdog` is None (a fixed limit)."""
    watchdog: Watchdog | None = None
    """The silence that counts as a hang, learnt from the run's cadence (wins over stall_s)."""
    activity_dir: Path | None = None
    """The trainer's output folder: files written anywhere under it are evidence of work."""
    evidence: liveness.Settings = field(default_factory=liveness.Settings)
    """How a silence past the limit is judged: by evidence of work (liveness.py), or not."""
    marker: str = ""
    on_spawn: Callable[[Spawned], None] | None = None
    redactor: Redactor = field(default_factory=Redactor)
    gpu: GpuProbe | None = None
    """Where GPU memory is sampled during the attempt and watched for release after it."""
    release_wait_s: float = 60.0
    timed_steps: int | None = None
    """End the attempt politely once the trainer has shown this many timed steps (a speed
    comparison: its step time is what was wanted, not its end)."""
    log_cap_bytes: int = field(default_factory=lambda: log_cap_bytes(os.environ))
    """Most bytes kept per log file (its first and last half); 0 keeps everything."""
    rescue_stop_file: Path | None = None
    """Created on a polite stop to ask the trainer's injected rescue hook to save at its next
    step end and stop (rescue.py); None: a polite stop is the SIGTERM of the tree's end."""
    rescue_save_s: float | None = None
    """How long a save took in this run (None: none measured yet)."""
    rescue_unmeasured_s: float = rescue.UNMEASURED_GRACE_S
    """The wait for that save while none was measured."""
    rescue_jit: bool = False
    """The command turned on transformers' just-in-time checkpointing: on a polite stop its
    SIGTERM is given the time of JIT's own wait, a save and a step before the SIGKILL."""


def log_cap_bytes(env: Mapping[str, str]) -> int:
    """The log cap per stream: OOM_SUPERVISOR_LOG_CAP_MIB (0: keep all), else 64 MiB."""
    raw = env.get(LOG_CAP_ENV, "").strip()
    if raw.isdigit() and len(raw) < 9:  # noqa: PLR2004 - up to ~95 TiB, never a huge int
        return int(raw) * 1024 * 1024
    return _wrap.DEFAULT_CAP_BYTES


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
    if spec.rescue_stop_file is not None:
        spec.rescue_stop_file.unlink(missing_ok=True)
    env = dict(spec.env)
    env[MARKER_ENV] = spec.marker or str(spec.log_dir)
    env.setdefault("PYTHONUNBUFFERED", "1")  # lines reach the logs (and the OOM watch) at once
    # For the shim only (it removes it before the command starts): how to cap and redact.
    env[_wrap.CONFIG_ENV] = json.dumps({"cap_bytes": spec.log_cap_bytes,
                                        "redact": json.loads(spec.redactor.to_json())})
    kills_before = kernel_oom_kills()
    started = time.monotonic()
    proc = subprocess.Popen(  # noqa: S603 - running the user's own command is the point
        [sys.executable, "-m", "supervisor._wrap", str(status), "--", *spec.argv],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env,
        cwd=spec.cwd, start_new_session=True,
    )
    spawned = Spawned(pid=proc.pid, create_time=_create_time(proc.pid))
    if spec.on_spawn is not None:
        spec.on_spawn(spawned)
    sources = (proc.stdout, proc.stderr)

    def follow(sink: _Sink) -> list[threading.Thread]:
        return [threading.Thread(target=_follow_pipe, daemon=True, args=(source, sink, stream))
                for stream, source in enumerate(sources) if source is not None]

    try:
        return _watch(spec, spawned, proc.poll, lambda: False, follow, started=started,
                      kills_before=kills_before, is_oom=is_oom, marker=env[MARKER_ENV])
    finally:
        for source in sources:
            if source is not None:
                source.close()


def adopt(spec: AttemptSpec, spawned: Spawned, *,
          is_oom: Callable[[str], bool] = is_oom_line) -> Outcome:
    """Take over an attempt a previous supervisor started: follow it to its end, read its status.

    The attempt's wrapper is identified by pid and start time. When it is gone and left no
    exit status (a reboot, `kill -9` of its group), the attempt is reported as died rather than
    waited on; a stop request (SIGTERM, SIGINT) ends the wait too.
    """
    proc: psutil.Process | None
    try:
        proc = psutil.Process(spawned.pid)
        if abs(proc.create_time() - spawned.create_time) >= 1.0:
            proc = None  # the pid was reused by someone else
    except psutil.Error:
        proc = None
    status = spec.log_dir / STATUS_FILE

    def poll() -> int | None:
        if proc is not None and _is_running(proc):
            return None
        return _status_code(status)

    def gone() -> bool:
        return (proc is None or not _is_running(proc)) and _status_code(status) is None

    def follow(sink: _Sink) -> list[threading.Thread]:
        return [threading.Thread(target=_follow_file, daemon=True,
                                 args=(spec.log_dir / f"{name}.log", sink, stream))
                for stream, name in enumerate(("stdout", "stderr"))]

    return _watch(spec, spawned, poll, gone, follow, started=time.monotonic(),
                  kills_before=kernel_oom_kills(), is_oom=is_oom,
                  marker=spec.marker or str(spec.log_dir), adopted=True)


def end_orphan(spec: AttemptSpec, spawned: Spawned) -> None:
    """End what is left of an attempt a previous supervisor started (by pid and marker)."""
    tree = _Tree(spawned.pid, spec.marker or str(spec.log_dir), env=spec.env)
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(spawned.pid)
        if abs(proc.create_time() - spawned.create_time) < 1.0:
            tree.remember()
    # A second SIGTERM/SIGINT during resume cuts the grace short.
    tree.end(grace_s=0.0 if spec.stop.graceful.is_set() else spec.grace_s,
             hurry=spec.stop.immediate)


class _Sink:
    """What the followers feed: the tail, the first OOM line, progress, the console echo."""

    def __init__(self, spec: AttemptSpec, is_oom: Callable[[str], bool]) -> None:
        self.is_oom = is_oom
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.oom_line: str | None = None
        self.oom_seen = threading.Event()
        self.last_output = time.monotonic()
        self.lock = threading.Lock()
        self.partial = [b"", b""]
        self.echo = spec.echo
        self.consoles = (_console(sys.stdout), _console(sys.stderr))
        self.budget = float(ECHO_BURST_LINES)
        self.refilled = time.monotonic()
        self.not_echoed = 0
        self.bytes_read = 0
        self.abandon = False
        self.ended = False
        """Set when the attempt is over: a follower of a file stops at its end."""
        self.tracker = Tracker()
        self.failed_task: str | None = None
        """srun's line for a task that exited with an error while its step goes on."""
        self.failed_at: float | None = None
        self.task_end: launchers.TaskEnd | None = None
        self.before_end: tuple[str, ...] = ()
        """The output's last lines up to srun's line saying a task ended (its words)."""
        self.rescue_armed = False
        """The trainer's injected rescue hook said it is in place (rescue.py)."""

    def feed(self, stream: int, chunk: bytes, *, timed: bool = True) -> None:
        """Bytes of one stream, in order: any byte is output (a tqdm redraw included).

        `timed=False`: bytes written before this supervisor followed them (a log file's backlog
        after `resume`): they say how far the trainer got, not that it is alive now.
        """
        now = time.monotonic()
        # A redrawn progress frame whose counter did not move is not progress (a stuck loop
        # behind a live display): it does not reset the silence.
        if self.tracker.feed(chunk, timed=timed) and timed:
            self.last_output = now
        if not self.rescue_armed and rescue.is_armed_line(chunk):
            self.rescue_armed = True
        self.bytes_read += len(chunk)
        if self.echo and timed:
            self._echo(stream, chunk, now)
        lines = (self.partial[stream] + chunk).split(b"\n")
        rest = lines.pop()
        if len(rest) > _MAX_LINE:  # a line that never ends: judge it in pieces, keep its tail
            lines.append(rest[:_MAX_LINE])
            # The pieces overlap: an OOM message cut at a piece's end is whole in the next one.
            rest = rest[_MAX_LINE - _OVERLAP:][-_MAX_LINE:]
        self.partial[stream] = rest
        self._take(lines)

    def finish(self) -> None:
        """The streams are drained: judge their partial last lines, report what was not echoed."""
        for stream in (0, 1):
            if self.partial[stream]:
                self._take([self.partial[stream]])
                self.partial[stream] = b""
        self._note_dropped()

    def _take(self, lines: list[bytes]) -> None:
        if not lines:
            return
        text = b"\n".join(lines)
        if self.failed_task is None and b"srun: error" in text:
            self._ended_task(lines)
        # Every OOM rule's text names memory or an allocation: skip the per-line rules on
        # chunks without those words (a flood of 500 MB is mostly training chatter).
        if not self.oom_seen.is_set() and any(hint in text.lower() for hint in _OOM_HINTS):
            for raw in lines:
                line = _oom_frame(raw, self.is_oom)
                if line is not None:
                    self.oom_line = line
                    self.oom_seen.set()
                    break
        with self.lock:
            self.tail.extend(_frame(raw) for raw in lines[-TAIL_LINES:])

    def _ended_task(self, lines: list[bytes]) -> None:
        """srun's first line saying a task ended: note it, and the output up to it."""
        for i, raw in enumerate(lines):
            if b"srun: error" not in raw:
                continue
            line = _frame(raw)
            end = launchers.task_end(line)
            if end is not None:
                with self.lock:
                    self.before_end = (*self.tail, *(_frame(r) for r in lines[:i]))
                self.task_end = end
                self.failed_task = end.line
                self.failed_at = time.monotonic()
                return

    def own_words(self, spec: AttemptSpec) -> tuple[tuple[str, ...], str | None]:
        """The ended task's own last lines and where they came from (nothing ended: empty)."""
        end = self.task_end
        if end is None:
            return (), None
        with self.lock:
            later = tuple(self.tail)
        lines, source = launchers.own_lines(end, self.before_end, _task_files(spec, end), later)
        return tuple(spec.redactor.text(line) for line in lines), source

    def _echo(self, stream: int, chunk: bytes, now: float) -> None:
        # A console can be slower than a flood: beyond the rate, chunks are counted, not shown.
        self.budget = min(float(ECHO_BURST_LINES),
                          self.budget + (now - self.refilled) * ECHO_LINES_PER_S)
        self.refilled = now
        lines = chunk.count(b"\n") or 1
        if self.budget < lines:
            self.not_echoed += lines
            return
        self.budget -= lines
        self._note_dropped()
        # Queued, never written here: a console that stops reading must not block the follower
        # (and through the shim's pipe, the trainer). What does not fit is dropped and counted.
        self.consoles[stream].put(chunk)

    def _note_dropped(self) -> None:
        if self.not_echoed:
            note = (f"[oom-supervisor: {plural(self.not_echoed, 'line')} of output not echoed "
                    f"(faster than {ECHO_LINES_PER_S} lines/s); the attempt's logs have them]\n")
            self.not_echoed = 0
            self.consoles[1].put(note.encode())
        if self.abandon:  # the attempt is over: let a console that reads show its end (bounded)
            echo.flush_all()


def _oom_frame(raw: bytes, is_oom: Callable[[str], bool]) -> str | None:
    """The first frame of a line that is an OOM line: a progress bar redrawn after the OOM
    message on the same line (`\\r`, no newline) must not hide it."""
    for frame in raw.split(b"\r"):
        if any(hint in frame.lower() for hint in _OOM_HINTS):
            line = frame.decode("utf-8", errors="replace").rstrip("\r\n")
            if is_oom(line):
                return line
            # An exception's line written after other text with no newline between (a progress
            # bar, 200 MB of output): `...it/s]torch.OutOfMemoryError: ...` ends the line.
            found = _ERROR_AT_END.search(line)
            if found and is_oom(line[found.start(1):]):
                return line[found.start(1):]
    return None


_ERROR_AT_END = re.compile(r"(?:^|[^\w.])((?:torch\.(?:cuda\.)?)?OutOfMemoryError: [^\r\n]*)$")


def _frame(raw: bytes) -> str:
    # tqdm redraws with \r: the last frame is the line a person would see.
    return raw.decode("utf-8", errors="replace").rstrip("\r\n").rsplit("\r", 1)[-1]


def _watch(spec: AttemptSpec, spawned: Spawned, poll: Callable[[], int | None],  # noqa: PLR0913
           gone: Callable[[], bool], follow: Callable[[_Sink], list[threading.Thread]], *,
           started: float, kills_before: int, is_oom: Callable[[str], bool], marker: str,
           adopted: bool = False) -> Outcome:
    sink = _Sink(spec, is_oom)
    followers = follow(sink)
    for follower in followers:
        follower.start()
    killed = interrupted = died = timed = finished = False
    hung: str | None = None
    failed: str | None = None
    ended_task = False
    kill_s: float | None = None
    tree = _Tree(spawned.pid, marker, env=spec.env)
    # dict.copy() is atomic under the GIL; the poll loop below adds pids while this samples.
    sampler = Sampler(spec.gpu, pids=lambda: tree.known.copy().keys()) if spec.gpu else None
    if sampler is not None:
        sampler.start()
    code = poll()
    ended_at: float | None = None
    if code is not None and adopted:
        # It ended while no supervisor watched: its status file says when.
        with contextlib.suppress(OSError):
            ended_at = (spec.log_dir / STATUS_FILE).stat().st_mtime
    if adopted:
        # Silence is counted from the last output the attempt wrote, not from the adoption.
        age = _log_age_s(spec.log_dir)
        if age != float("inf"):
            sink.last_output = time.monotonic() - age
            sink.tracker.last_output = time.time() - age
    watchdog = spec.watchdog or (Watchdog(fixed_s=spec.stall_s, startup_s=None)
                                 if spec.stall_s else None)
    limit: tuple[float, str] | None = None
    oom_at: float | None = None
    oom_step: int | None = None
    recovered = False
    evidence = _Evidence(spec, tree) if spec.evidence.enabled else None
    reading: liveness.Reading | None = None
    remembered = looked = 0.0
    host_peak = 0.0
    cap: tuple[float, str] | None = None
    while code is None:
        now = time.monotonic()
        if now - remembered > _REMEMBER_S:  # a /proc scan: not on every 50 ms tick
            tree.remember()
            cap = cap or tree.host_cap()
            rss = tree.rss_mib()
            host_peak = max(host_peak, rss) if rss is not None and host_peak >= 0 else -1.0
            remembered = now
            if adopted:  # the logs' tail segments grow while the log itself waits
                sink.last_output = max(sink.last_output, now - _log_age_s(spec.log_dir))
        if gone():
            died = True
            ended_at = time.time() - min(_log_age_s(spec.log_dir), time.monotonic() - started)
            break
        limit = (watchdog.limit(sink.tracker, evidence=evidence is not None)
                 if watchdog is not None else None)
        if evidence is not None and limit is not None and now - looked > evidence.every_s:
            looked = now
            # Only during a silence: while output moves, the evidence costs nothing.
            if now - sink.last_output > evidence.every_s:
                reading = evidence.sample(now, sink.last_output, limit[0],
                                          step=sink.tracker.step)
            else:
                evidence.quiet()
                reading = None
        if sink.oom_seen.is_set() and oom_at is None:
            oom_at, oom_step = now, sink.tracker.step
            log.info("oom.detected", line=spec.redactor.text(sink.oom_line or "")[:300],
                     pid=spawned.pid)
        if oom_at is not None and not killed and not recovered and oom_step is not None \
                and sink.tracker.step is not None and sink.tracker.step > oom_step:
            recovered = True  # it caught its OOM and trains on: its exit status will tell
        if (oom_at is not None and not killed and not recovered
                and now - oom_at >= OOM_EXIT_GRACE_S):
            seen_at = time.monotonic()
            # Neither gone nor training on: a stuck peer rank must not hold the night.
            tree.end(grace_s=spec.grace_s, hurry=spec.stop.immediate)
            kill_s = round(time.monotonic() - seen_at, 3)
            killed = True
        elif (spec.stop.graceful.is_set() and not interrupted) or spec.stop.immediate.is_set():
            interrupted = True
            _save_first(spec, sink, poll, started=started)
            tree.end(grace_s=_polite_grace_s(spec, sink, started), hurry=spec.stop.immediate)
        elif (spec.timed_steps and not timed and not interrupted and not sink.tracker.ended
              and sink.tracker.timed_span >= spec.timed_steps):
            timed = True
            log.info("speed.timed", steps=sink.tracker.timed_span, pid=spawned.pid)
            _save_first(spec, sink, poll, started=started)
            tree.end(grace_s=_polite_grace_s(spec, sink, started), hurry=spec.stop.immediate)
        elif hung is None and spec.timeout_s is not None and now - started > spec.timeout_s:
            hung = f"ran past its time limit of {spec.timeout_s:g} s"
            tree.end(grace_s=spec.grace_s, hurry=spec.stop.immediate)
        elif (hung is None and limit is not None and now - sink.last_output > limit[0]
              and (evidence is None or (reading is not None and reading.is_hung))):
            hung = (f"printed nothing for {now - sink.last_output:.0f} s (stalled; the limit "
                    f"was {limit[1]})")
            if watchdog is not None and watchdog.fixed_s:
                hung = f"printed nothing for {watchdog.fixed_s:g} s (stalled)"
            if reading is not None:
                hung += f"; {reading.hang_reason()}"
                log.info("liveness.hung", pid=spawned.pid, evidence=reading.hang_reason(),
                         stuck_in=reading.stuck_in)
            # Hung after its final metrics, not in a save: the training itself is done
            # (set here only: `finished` implies `hung`).
            finished = sink.tracker.finished and (reading is None or reading.phase != "saving")
            tree.end(grace_s=spec.grace_s, hurry=spec.stop.immediate)
        elif (failed is None and sink.failed_at is not None
              and now - sink.failed_at > FAILED_TASK_GRACE_S):
            # srun keeps the step alive when one task fails (KillOnBadExit=0): its peers
            # would wait in the rendezvous or a collective until their own timeout.
            failed = sink.failed_task
            ended_task = True
            log.info("task.failed", line=failed, pid=spawned.pid)
            tree.end(grace_s=spec.grace_s, hurry=spec.stop.immediate)
        if oom_at is None:
            sink.oom_seen.wait(_POLL_S)
        else:  # the OOM is seen: let it exit by itself (or go on training) for a moment
            spec.stop.immediate.wait(_POLL_S)
        code = poll()
    if ended_at is None:
        ended_at = time.time()
    # Stragglers: workers in sessions of their own outlive the leader.
    tree.end(grace_s=spec.grace_s, hurry=spec.stop.immediate)
    gpu_peak_mib: float | None = None
    release: dict[str, object] | None = None
    if sampler is not None and spec.gpu is not None:
        gpu_peak_mib = float(sampler.stop().peak_mib)
        # The next attempt needs the memory back: wait for the driver to release it.
        released = wait_for_release(spec.gpu, list(tree.known), timeout_s=spec.release_wait_s)
        release = {**released.to_dict(), "describe": released.describe()}
    _drain(followers, sink)
    # The shim recorded how the command itself ended (the shim's own status is one step removed).
    status_code = _status_code(spec.log_dir / STATUS_FILE)
    if status_code is not None:
        code = status_code
    with sink.lock:
        lines = tuple(spec.redactor.text(line) for line in (*sink.tail, *_error_files(sink.tail)))
    if died:
        lines = (*lines, WRAPPER_DIED)
    if (failed is None and sink.failed_task is not None and not killed and hung is None
            and not interrupted and not timed):
        failed = sink.failed_task  # the step ended by itself within the grace (KillOnBadExit)
    task_lines, task_source = sink.own_words(spec) if failed is not None else ((), None)
    oom_line = spec.redactor.text(sink.oom_line) if sink.oom_line else None
    return Outcome(
        exit_code=None if died else code,
        duration_s=round(time.monotonic() - started, 3),
        tail=lines,
        oom_line=oom_line,
        killed_by_supervisor=killed or hung is not None or ended_task,
        interrupted=interrupted,
        hung=hung,
        finished_training=finished,
        kill_s=kill_s,
        gpu_peak_mib=gpu_peak_mib,
        release=release,
        kernel_oom_kills=max(0, kernel_oom_kills() - kills_before),
        adopted=adopted,
        wrapper_died=died,
        escaped=tuple(spec.redactor.text(e) for e in tree.escaped()),
        ended_at=round(ended_at, 3),
        progress=sink.tracker.summary(),
        watchdog=limit[1] if limit is not None else None,
        failed_task=failed,
        task_lines=task_lines,
        task_source=task_source,
        timed=timed and not killed,
        host_peak_mib=round(host_peak, 1) if host_peak > 0 else None,  # (-1: unknown, srun)
        host_cap_mib=cap[0] if cap else None, host_cap_source=cap[1] if cap else None,
    )


def _save_first(spec: AttemptSpec, sink: _Sink, poll: Callable[[], int | None], *,
                started: float) -> None:
    """A polite stop: ask the trainer's rescue hook to save at its next step end, and wait.

    The wait is the time a save took in this run plus one step (rescue.stop_grace_s), not the
    tree end's few seconds; it ends as soon as the trainer exits, and a second Ctrl-C cuts it.
    Without the hook in place (not a Hugging Face Trainer, several ranks, still loading) the
    stop is the tree end's, as before.
    """
    if (spec.rescue_stop_file is None or not sink.rescue_armed or sink.tracker.ended
            or spec.stop.immediate.is_set()):
        return
    grace_s = _save_grace_s(spec, sink, started)
    try:
        spec.rescue_stop_file.touch()
    except OSError as exc:
        log.warning("rescue.not_requested", error=str(exc))
        return
    log.info("rescue.requested", grace_s=round(grace_s, 1))
    deadline = time.monotonic() + grace_s
    while poll() is None and time.monotonic() < deadline and not spec.stop.immediate.is_set():
        time.sleep(_POLL_S)


def _save_grace_s(spec: AttemptSpec, sink: _Sink, started: float) -> float:
    """A save of this run (journaled ones, and this attempt's own) plus one step."""
    summary = sink.tracker.summary() or {}
    began = time.time() - (time.monotonic() - started)
    saves = [s for s in (spec.rescue_save_s,
                         rescue.recent_save_seconds(spec.activity_dir, began)) if s is not None]
    return rescue.stop_grace_s(max(saves) if saves else None,
                               rescue.step_seconds(summary.get("samples")),
                               unmeasured_s=spec.rescue_unmeasured_s)


def _polite_grace_s(spec: AttemptSpec, sink: _Sink, started: float) -> float:
    """The SIGTERM's grace on a polite stop: JIT's wait, a save and a step for a trainer that
    checkpoints on SIGTERM itself; the usual few seconds otherwise."""
    if not spec.rescue_jit or spec.stop.immediate.is_set():
        return spec.grace_s
    return max(spec.grace_s, rescue.JIT_WAIT_S + _save_grace_s(spec, sink, started))


class _Evidence:
    """Samples what an attempt does while it is silent, for liveness.Judge: files under the
    output folder, the tree's CPU and storage I/O, GPU activity, the sampled stacks."""

    def __init__(self, spec: AttemptSpec, tree: _Tree) -> None:
        self.settings = spec.evidence
        self.every_s = spec.evidence.sample_s
        self.judge = liveness.Judge(cpu_busy=spec.evidence.cpu_busy)
        self.folder = spec.activity_dir
        self.stacks_dir = spec.log_dir / liveness.STACKS_DIR
        self.status = spec.log_dir / liveness.STATUS_FILE
        self.skip = spec.log_dir.resolve()
        self.tree = tree
        self.gpu = spec.gpu
        self.cpu: dict[int, float] = {}
        self.io: dict[int, int] = {}
        self.gpu_held: dict[int, int] = {}
        self.files: tuple[int, int, float] | None = None
        self.silent = False
        self.said: str | None = None
        self.said_at = 0.0
        self.shift = time.time() - time.monotonic()
        self.record = spec.log_dir / liveness.SAMPLES_FILE
        self.recorded = 0

    def quiet(self) -> None:
        """Output moves: the next silence starts from nothing."""
        if self.silent:
            self.silent = False
            self.judge.reset()
            self.cpu.clear()
            self.io.clear()
            self.gpu_held.clear()
            self.files = None
            self.said = None
            self._write({"state": str(liveness.State.ALIVE), "at": time.time()})

    def sample(self, now: float, progress_at: float, limit_s: float, *,
               step: int | None = None) -> liveness.Reading:
        """One sample now (monotonic clock), judged."""
        self.silent = True
        pids = [pid for pid in self.tree.known if pid != self.tree.pid]  # not the shim
        cpu_s, io_bytes = self._counters(pids)
        files_changed, where = self._files()
        gpu_busy, self.gpu_held = gpu.activity(self.gpu, pids, self.gpu_held)
        sample = liveness.Sample(at=now, progress_at=progress_at, step=step, cpu_s=cpu_s,
                                 io_bytes=io_bytes, files_changed=files_changed,
                                 files_where=where, gpu_busy=gpu_busy,
                                 stacks=self._stacks(set(pids)))
        reading = self.judge.observe(sample, limit_s)
        if self.recorded < _RECORD_SAMPLES:
            # What the judgment rested on, kept in the attempt folder (tests/data replays it).
            self.recorded += 1
            with contextlib.suppress(OSError), self.record.open("a", encoding="utf-8") as out:
                out.write(json.dumps({"limit_s": round(limit_s, 2), "state": str(reading.state),
                                      **sample.to_record()}) + "\n")
        sentence = reading.sentence()
        wall = time.time()
        if reading.state is liveness.State.WORKING and (
                self.said is None or wall - self.said_at > 60.0):  # noqa: PLR2004
            # Past the limit but working: said once a minute (a hang is said by its verdict).
            log.info("attempt.silent", sentence=sentence, judged=str(reading.state))
            self.said, self.said_at = sentence, wall
        self._write({"state": str(reading.state), "at": wall, "sentence": sentence,
                     "silent_s": round(reading.silent_s, 1), "stuck_in": reading.stuck_in})
        return reading

    def _counters(self, pids: list[int]) -> tuple[float | None, int | None]:
        """CPU seconds and storage bytes the processes used since the last sample."""
        cpu_total = 0.0
        io_total = 0
        cpu_seen = io_seen = False
        first = not self.cpu
        for pid in pids:
            proc = self.tree.known.get(pid)
            if proc is None:
                continue
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                used = float(times.user + times.system)
                cpu_total += max(0.0, used - self.cpu.get(pid, 0.0 if not first else used))
                self.cpu[pid] = used
                cpu_seen = True
            with contextlib.suppress(psutil.Error, AttributeError, NotImplementedError):
                counters = proc.io_counters()
                moved = int(counters.read_bytes + counters.write_bytes)
                io_total += max(0, moved - self.io.get(pid, 0 if not first else moved))
                self.io[pid] = moved
                io_seen = True
        return (cpu_total if cpu_seen else None), (io_total if io_seen else None)

    def _files(self) -> tuple[bool | None, str | None]:
        if self.folder is None or not self.folder.is_dir():
            return None, None
        walked = _walk(self.folder, skip=self.skip)
        before, self.files = self.files, walked[:3]
        changed = before is not None and walked[:3] != before
        where = walked[3] if changed else None
        return changed, where

    def _stacks(self, pids: set[int]) -> tuple[liveness.Stack, ...]:
        if not self.settings.stacks:
            return ()
        shift = self.shift  # the sampler writes wall times; the judge reads monotonic ones
        found = []
        with contextlib.suppress(OSError):
            for entry in sorted(os.scandir(self.stacks_dir), key=lambda e: e.name)[:_MAX_STACKS]:
                pid = entry.name.removesuffix(".json")
                if not pid.isdigit() or int(pid) not in pids:
                    continue
                with contextlib.suppress(OSError, ValueError):
                    data = json.loads(Path(entry.path).read_text(encoding="utf-8"))
                    stack = liveness.Stack.from_record(data) if isinstance(data, dict) else None
                    if stack is not None:
                        found.append(liveness.Stack(pid=stack.pid, frames=stack.frames,
                                                    moved_at=stack.moved_at - shift,
                                                    sampled_at=stack.sampled_at - shift))
        return tuple(found)

    def _write(self, record: dict[str, object]) -> None:
        with contextlib.suppress(OSError):
            temporary = self.status.with_name(self.status.name + ".tmp")
            temporary.write_text(json.dumps(record), encoding="utf-8")
            temporary.replace(self.status)


_MAX_STACKS = 256
_RECORD_SAMPLES = 3000
"""Samples kept per attempt (about 100 min of silence at one sample every 2 s)."""
_WALK_ENTRIES = 20_000
_WALK_DEPTH = 6


def _walk(folder: Path, *, skip: Path | None = None,
          max_entries: int = _WALK_ENTRIES) -> tuple[int, int, float, str | None]:
    """A bounded walk of a folder: (entries, bytes, newest mtime, where the newest is).

    Recursive (a DeepSpeed save writes into `checkpoint-N/global_stepN/`), breadth first, at
    most `max_entries` entries and _WALK_DEPTH levels, symlinks not followed: cheap enough to
    run every few seconds during a silence.
    """
    count = size = 0
    newest, where = 0.0, None
    queue: deque[tuple[str, int]] = deque([(str(folder), 0)])
    while queue and count < max_entries:
        path, depth = queue.popleft()
        try:
            with os.scandir(path) as entries:
                for entry in entries:
                    count += 1
                    if count >= max_entries:
                        break
                    try:
                        info = entry.stat(follow_symlinks=False)
                        if entry.is_dir(follow_symlinks=False):
                            if depth < _WALK_DEPTH and (skip is None or entry.path != str(skip)):
                                queue.append((entry.path, depth + 1))
                            continue
                    except OSError:
                        continue
                    size += info.st_size
                    if info.st_mtime > newest:
                        newest, where = info.st_mtime, path
        except OSError:
            continue
    shown = None
    if where is not None:
        with contextlib.suppress(ValueError):
            shown = str(Path(where).relative_to(folder)) if where != str(folder) else "."
    return count, size, newest, shown


def _task_files(spec: AttemptSpec, end: launchers.TaskEnd) -> dict[int, list[str]]:
    """The last lines of each ended task's own output file (srun `--output`/`--error` naming
    `%t`): the newest file the pattern matches for that task, its last 64 KiB."""
    found: dict[int, list[str]] = {}
    patterns = launchers.per_task_files(spec.argv)
    cwd = Path(spec.cwd or ".")
    for task in end.tasks:
        for pattern in patterns:
            name = launchers.expand(pattern, task=task, job=None, step=None, host=end.host)
            name = re.sub(r"%\d*[a-zA-Z]", "*", name)  # the job's ids: any
            path = Path(name) if Path(name).is_absolute() else cwd / name
            with contextlib.suppress(OSError, ValueError):
                matches = sorted(path.parent.glob(path.name), key=lambda p: p.stat().st_mtime)
                if not matches:
                    continue
                with matches[-1].open("rb") as handle:
                    handle.seek(max(0, matches[-1].stat().st_size - 65536))
                    tail = handle.read().decode("utf-8", errors="replace").splitlines()
                found.setdefault(task, []).extend(line.rsplit("\r", 1)[-1] for line in tail)
    return found


def _drain(followers: list[threading.Thread], sink: _Sink) -> None:
    """Let the followers read to the end of the streams, bounded: they never outlive this."""
    sink.ended = True
    deadline = time.monotonic() + DRAIN_S
    for follower in followers:
        follower.join(timeout=max(0.0, deadline - time.monotonic()))
    sink.abandon = True
    for follower in followers:
        follower.join(timeout=1.0)
    sink.finish()


def _follow_pipe(source: IO[bytes], sink: _Sink, stream: int) -> None:
    """Read the shim's forwarded stream to its end (the pipe closes when the shim exits)."""
    fd = source.fileno()
    while not sink.abandon:
        ready, _, _ = select.select([fd], [], [], _POLL_S * 4)
        if not ready:
            continue
        try:
            chunk = os.read(fd, _CHUNK)
        except OSError:
            return
        if not chunk:
            return
        sink.feed(stream, chunk)


def _follow_file(path: Path, sink: _Sink, stream: int) -> None:
    """Read a log the shim writes (append-only) until its status exists and the file is drained."""
    status = path.with_name(STATUS_FILE)
    try:
        source = os.fdopen(open_regular(path, os.O_RDONLY), "rb")  # never through a link
        backlog = os.fstat(source.fileno()).st_size
    except OSError:
        return
    with source:
        while not sink.abandon:
            chunk = source.read(_CHUNK)
            if chunk:
                # Written while no supervisor watched: how far it got, not when.
                sink.feed(stream, chunk, timed=source.tell() > backlog)
                continue
            if sink.ended or status.exists():  # the shim writes its status after the last byte
                rest = source.read(_CHUNK)
                if not rest:
                    return
                sink.feed(stream, rest)
                continue
            source.seek(0, os.SEEK_CUR)
            time.sleep(_POLL_S)


def _log_age_s(log_dir: Path) -> float:
    """Seconds since any of the attempt's log files (or their tail segments) last grew."""
    newest = 0.0
    for path in log_dir.glob("std*.log*"):
        with contextlib.suppress(OSError):
            newest = max(newest, path.stat().st_mtime)
    return max(0.0, time.time() - newest) if newest else float("inf")


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


def _status_code(path: Path) -> int | None:
    try:
        code = json.loads(read_regular(path, 65536))["exit_code"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return int(code) if isinstance(code, int) else None


def _create_time(pid: int) -> float:
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return 0.0


_UNLIMITED = 1 << 60
"""Limits at or above this are "unlimited" (RLIM_INFINITY, cgroup v1's page-rounded max)."""


def _cgroup_limit(pid: int) -> int | None:
    """The memory limit of `pid`'s cgroup in bytes (None: none, or it cannot be read)."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2's unified hierarchy
            where = Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.max"
        elif "memory" in controllers.split(","):
            where = Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.limit_in_bytes"
        else:
            continue
        try:
            text = where.read_text(encoding="utf-8").strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < _UNLIMITED:
            return int(text)
    return None


class _Tree:
    """The attempt's processes: the leader's group, every descendant seen, and the marker."""

    def __init__(self, pid: int, marker: str, *, env: Mapping[str, str] | None = None) -> None:
        self.pid = pid
        self.marker = marker
        self.known: dict[int, psutil.Process] = {}
        self.outside: dict[int, str] = {}
        """Processes found only by the marker: they had left the tree (pid -> description)."""
        self.slurm = _SlurmSteps(os.environ if env is None else env)

    def remember(self) -> None:
        # torchrun starts workers in their own sessions, so the process group is not enough;
        # keep every descendant we have seen, and end them all.
        with contextlib.suppress(psutil.Error):
            leader = psutil.Process(self.pid)
            for proc in (leader, *leader.children(recursive=True)):
                self.known.setdefault(proc.pid, proc)

    def rss_mib(self) -> float | None:
        """Resident memory of the command's processes now (the shim itself left out), MiB.

        None (unknown) under `srun`: the step's tasks run under slurmstepd, on this node and
        others, not below srun, whose own few MiB would read as the attempt's memory.
        """
        total = 0
        for pid, proc in list(self.known.items()):
            if pid == self.pid:
                continue
            with contextlib.suppress(psutil.Error):
                if proc.name() == "srun":
                    return None
                total += proc.memory_info().rss
        return total / 2**20

    def host_cap(self) -> tuple[float, str] | None:
        """The host memory limit the command's processes run under, MiB, and what it is: the
        smallest RLIMIT_AS soft limit among them (prlimit --as, ulimit -v), else their
        cgroup's memory limit (v2 memory.max, v1 memory.limit_in_bytes); None: unlimited."""
        limits: list[int] = []
        cgroup: int | None = None
        for pid, proc in list(self.known.items()):
            if pid == self.pid:
                continue
            with contextlib.suppress(psutil.Error, AttributeError, OSError):
                soft, _ = proc.rlimit(psutil.RLIMIT_AS)
                if 0 < soft < _UNLIMITED:
                    limits.append(soft)
            if cgroup is None:
                cgroup = _cgroup_limit(pid)
        if limits:
            return round(min(limits) / 2**20, 1), "RLIMIT_AS"
        if cgroup is not None:
            return round(cgroup / 2**20, 1), "cgroup memory.max"
        return None

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
            with contextlib.suppress(psutil.Error):
                command = " ".join(proc.cmdline())[:120]
                self.outside.setdefault(proc.pid, f"pid {proc.pid} ({command})")
        # An srun step's tasks run under slurmstepd, on this node and others: the step is
        # ended through SLURM too, so that no task is left on any node.
        cancelled = self.slurm.cancel(self.known.values())
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
        if cancelled:
            self.slurm.wait_gone(cancelled, timeout_s=grace_s + SLURM_GONE_S)


    def escaped(self) -> tuple[str, ...]:
        """Who had left the attempt's process tree (found by marker and ended), for the report."""
        return tuple(f"{text} had left the attempt's process tree; found by its environment "
                     "marker and ended" for text in self.outside.values())


SLURM_GONE_S = 30.0
"""How long, past the grace period, a cancelled SLURM step may take to leave `squeue`."""
_SLURM_CMD_S = 20.0


class _SlurmSteps:
    """The SLURM job steps an attempt's `srun` started, found from its tasks' environment.

    Every task of a step carries SLURM_JOB_ID and SLURM_STEP_ID (and, srun exporting the whole
    environment, the attempt's marker). A step inside the supervisor's own allocation is
    cancelled as a step (`scancel JOB.STEP`); a job that srun allocated itself (the supervisor
    runs outside any allocation) is cancelled whole. The supervisor's own step is never touched.
    """

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = dict(env)
        self.own_job = os.environ.get("SLURM_JOB_ID") or env.get("SLURM_JOB_ID")
        self.own_step = (os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_STEP_ID"))
        self.cancelled: set[str] = set()

    def cancel(self, procs: Iterable[psutil.Process]) -> list[str]:
        """`scancel` each step (or srun's own job) whose tasks are among `procs`; their ids."""
        targets: list[str] = []
        for proc in procs:
            try:  # is_running() checks the start time too: a reused pid is not ours
                environ = proc.environ() if proc.is_running() else {}
            except psutil.Error:
                continue
            job, step = environ.get("SLURM_JOB_ID"), environ.get("SLURM_STEP_ID")
            if not job or not step or (job, step) == self.own_step:
                continue
            target = f"{job}.{step}" if job == self.own_job else job
            if target not in self.cancelled and target not in targets:
                targets.append(target)
        if not targets:
            return []
        scancel = shutil.which("scancel", path=self.env.get("PATH"))
        if scancel is None:
            log.warning("slurm.cancel_unavailable", steps=targets,
                        hint="scancel is not on the attempt's PATH; only this node's tasks "
                             "were ended")
            return []
        try:
            done = subprocess.run([scancel, "--quiet", *targets], env=self.env,  # noqa: S603
                                  capture_output=True, text=True, timeout=_SLURM_CMD_S,
                                  check=False, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("slurm.cancel_failed", steps=targets, error=str(exc))
            return []
        self.cancelled.update(targets)
        log.info("slurm.step_cancelled", steps=targets, rc=done.returncode,
                 stderr=done.stderr.strip()[-300:] or None)
        return targets

    def wait_gone(self, targets: list[str], *, timeout_s: float) -> None:
        """Wait (bounded) until `squeue` lists none of the cancelled steps or jobs."""
        squeue = shutil.which("squeue", path=self.env.get("PATH"))
        if squeue is None:
            return
        jobs = sorted({t.split(".", 1)[0] for t in targets})
        deadline = time.monotonic() + timeout_s
        left = list(targets)
        while left and time.monotonic() < deadline:
            try:
                listed = subprocess.run(  # noqa: S603
                    [squeue, "--steps", "--noheader", "--format=%i", f"--jobs={','.join(jobs)}"],
                    env=self.env, capture_output=True, text=True, timeout=_SLURM_CMD_S,
                    check=False, stdin=subprocess.DEVNULL)
                steps = set(listed.stdout.split())
                # A whole job is gone once it has no step and is not listed as running.
                left = [t for t in targets if t in steps
                        or ("." not in t and any(s.startswith(f"{t}.") for s in steps))]
            except (OSError, subprocess.TimeoutExpired):
                return
            if left:
                time.sleep(0.5)
        if left:
            log.warning("slurm.step_lingers", steps=left, waited_s=round(timeout_s, 1))


def _is_running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _console(stream: IO[str]) -> echo.Echo:
    # A terminal's writer thread; pytest's capture (bytes in memory) is written at once, and an
    # IDE's text stream with no byte buffer under it gets nothing.
    return echo.console_for(stream)


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
