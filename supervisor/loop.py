"""The supervisor loop: run, classify, record, then step down the ladder or return.

`drive` reads like torchelastic's `_invoke_run`: run an attempt, classify its outcome, journal
it, then let the pure `decide` say what comes next (finish, or one rung down). `supervise`
starts a run from a fresh `RunConfig`; `resume` replays a journal into the same state and calls
the same `drive`, so a resumed run cannot behave differently from one never interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

import psutil
import structlog
from tenacity import RetryCallState, wait_exponential

from supervisor import (
    bounds,
    checkpoints,
    liveness,
    plot,
    program,
    progress,
    report,
    rescue,
    runner,
    speed,
    trainer_output,
)
from supervisor._compat import Self, StrEnum
from supervisor.classify import Outcome, Verdict, VerdictKind, classify
from supervisor.command import Command, CommandError, environment
from supervisor.device_memory import device_memory_argv
from supervisor.dialects import Dialect
from supervisor.dialects.readback import render_checked
from supervisor.estimate import Prediction, oom_lower_bound_mib
from supervisor.events import (
    AttemptFinished,
    AttemptRecord,
    AttemptSpawned,
    AttemptStarted,
    CheckpointPassedOver,
    CheckpointRescued,
    CheckpointResumed,
    CheckpointSkipped,
    EstimateChecking,
    EstimateDistrusted,
    Event,
    FinalWritten,
    GpuHeld,
    LadderExhausted,
    LadderStepped,
    ProbeLeftoversEnded,
    RescueFailed,
    RetryScheduled,
    RunConfig,
    RunFinished,
    RungSkipped,
    RunResumed,
    RunStarted,
    RunState,
    SignalReceived,
    SpeedSkipped,
    TerminalLost,
    WatchdogExtended,
    numbers_of,
    replay,
    replay_events,
)
from supervisor.files import make_dir, touch, write_file
from supervisor.gpu import GpuProbe
from supervisor.journal import Journal, read
from supervisor.knobs import Knobs
from supervisor.plan import START, Skip, next_listening, next_runnable
from supervisor.policy import GiveUp, Ladder, Step, next_step
from supervisor.runconfig import build_config
from supervisor.secrets import Redactor
from supervisor.trainer_output import Watchdog, step_of

log = structlog.get_logger(__name__)
E = TypeVar("E", bound=Event)


class ExitCode(IntEnum):
    """The supervisor's exit status: one code for each way a run can end."""

    FITTED = 0
    USAGE = 2
    EXHAUSTED = 3
    FATAL = 4
    TRANSIENT = 5
    INTERRUPTED = 130


class RunStatus(StrEnum):
    """Where a run stands; every run ends in exactly one of the states after RUNNING.

    `running`: attempts are being made (also what a journal without `run.finished` shows).
    `fitted`: an attempt exited 0; its config is the working one and is written out.
    `exhausted`: every rung is spent (or the attempt budget is) and the last config still OOMs.
    `fatal`: an attempt failed for a reason other than memory (or GPU memory stayed held and
    the policy says stop): the run stops at once rather than burn the night.
    `transient` / `hang`: a transient failure or a hang outlasted its bounded retries.
    `interrupted`: the supervisor was told to stop (SIGINT/SIGTERM); the attempt was ended.
    """

    RUNNING = "running"
    FITTED = "fitted"
    EXHAUSTED = "exhausted"
    FATAL = "fatal"
    TRANSIENT = "transient"
    HANG = "hang"
    INTERRUPTED = "interrupted"


STATUS_EXIT: Mapping[RunStatus, ExitCode] = {
    RunStatus.FITTED: ExitCode.FITTED, RunStatus.EXHAUSTED: ExitCode.EXHAUSTED,
    RunStatus.FATAL: ExitCode.FATAL, RunStatus.TRANSIENT: ExitCode.TRANSIENT,
    RunStatus.HANG: ExitCode.TRANSIENT, RunStatus.INTERRUPTED: ExitCode.INTERRUPTED,
}
_RETRIED = progress.RETRIED
_BACKOFF = wait_exponential(multiplier=2, min=1, max=60)
"""tenacity's exponential backoff, applied to a failure streak's retry number."""


class Predictor(Protocol):
    """Predicted peak memory of a config (estimate.Estimator), calibrated by measurements."""

    def predict(self, knobs: Knobs) -> Prediction | None:
        """The prediction, or None when none can be made (then nothing is skipped)."""
        ...

    def calibrate(self, knobs: Knobs, measured_mib: float, *, lower_bound: bool = False,
                  ) -> float:
        """Learn from a measured peak (or an OOM's lower bound); return the ratio in force."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Memory:
    """What the loop knows of memory: a predictor and the device's size, and a GPU probe."""

    predictor: Predictor | None = None
    device_mib: float | None = None
    margin: float = 0.0
    """The policy's `[estimate] margin`, the one `plan` recommends by (0 by default: only
    configs predicted over the device outright are skipped; docs/memory.md says why)."""
    gpu: GpuProbe | None = None
    predicted_s: float | None = None
    """Seconds the predictions took before the run (the run's wall time counts them)."""
    count: Callable[[Knobs], Prediction | None] | None = None
    """The analytic count from the model's shape, for the walk without predictions: an OOM's
    own figures pass over configs counted clearly above what it showed the device holds
    (plan.next_listening). None: the model's shape is unknown; every config runs."""

    @property
    def can_skip(self) -> bool:
        """Skipping on predictions needs both a predictor and a device size."""
        return self.predictor is not None and self.device_mib is not None


class ResumeError(ValueError):
    """A run folder cannot be resumed; the message says why and what to do."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RunResult:
    """How a supervised run ended, where its record is, and the config that works (if any)."""

    status: str
    exit_code: ExitCode
    run_dir: Path
    final_knobs: Knobs | None
    attempts: int
    report: dict[str, Any] = field(default_factory=dict)


class Signals:
    """What the CLI's signal handlers tell the loop: a lost terminal, a stop request.

    A signal handler runs in the main thread wherever it was interrupted, possibly inside the
    journal's write or the log's lock: taking either again there would hang the supervisor
    for good (a SIGTERM that arrived while an event was being logged once did). So a handler
    only hands its work over (`from_handler`: a `queue.SimpleQueue` put, safe in a handler)
    and a thread of this object's own does it: sets the stop, journals, logs.
    """

    def __init__(self) -> None:
        self._listener: Callable[[Event], object] | None = None
        self._lock = threading.Lock()
        self.missed: list[Event] = []
        self._inbox: queue.SimpleQueue[Callable[[], object]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._deliver, name="signals", daemon=True)
        self._thread.start()

    def from_handler(self, work: Callable[[], object]) -> None:
        """Called in a signal handler: `work` runs on this object's thread, never in here (the
        put is all a handler does: no lock, no Event)."""
        self._inbox.put(work)

    def _deliver(self) -> None:
        while True:
            work = self._inbox.get()
            # A journal that cannot be written: the main thread meets the same failure at its
            # next write and says it.
            with contextlib.suppress(Exception):
                work()

    def listen(self, listener: Callable[[Event], object] | None) -> None:
        """Journal what arrives from now on (and what arrived before a journal was open)."""
        with self._lock:
            self._listener = listener
            if listener is not None:
                while self.missed:
                    listener(self.missed.pop(0))

    def tell(self, event: Event) -> None:
        """Journal the event now, or as soon as a journal is open (never from a handler)."""
        with self._lock:
            if self._listener is None:
                self.missed.append(event)
            else:
                self._listener(event)

    def hangup(self, output_to: str) -> None:
        """SIGHUP: the terminal is gone and output now goes to `output_to`."""
        self.tell(TerminalLost(output_to=output_to))

    def stopping(self, signal_name: str, how: str) -> None:
        """SIGINT/SIGTERM arrived."""
        self.tell(SignalReceived(signal=signal_name, how=how))


# --- the pure decision -----------------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class Finish:
    """End the run with this status."""

    status: RunStatus
    reason: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class StepDown:
    """Ask the policy for the next config (one rung down) and run it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Compare:
    """The fitting config was timed: time its same-quality rival, then train on the faster."""


Decision = Finish | StepDown | Compare


@dataclass(frozen=True, slots=True, kw_only=True)
class View:
    """What `decide` needs to know of the run besides the verdict."""

    attempts_done: int
    budget: int
    held: str | None = None
    stop_on_held: bool = False
    stopping: bool = False
    retries: int = 0
    refusal: str | None = None
    """Why the last failure was not retried (its streak's budget), if it was not."""


_WALKED = (VerdictKind.OOM, VerdictKind.NO_DATA)
"""Verdicts that step down the ladder: memory ran out, or the rung left no rows (that rung is
spent, and the policy walks on from the last config that had data)."""


def decide(view: View, verdict: Verdict) -> Decision:
    """What follows an attempt's verdict (after its transient retries are spent)."""
    if view.held and view.stop_on_held and verdict.kind is not VerdictKind.FITS:
        return Finish(status=RunStatus.FATAL, reason=(
            f"GPU memory was not released after attempt {view.attempts_done} ({view.held}); "
            "the policy says stop ([gpu] on_held_memory)"))
    if verdict.kind is VerdictKind.FITS:
        return Finish(status=RunStatus.FITTED)
    if verdict.kind is VerdictKind.TIMED:
        if view.stopping:
            return Finish(status=RunStatus.INTERRUPTED,
                          reason="stopped by signal during a speed comparison")
        return Compare()
    if (verdict.kind in _RETRIED or verdict.kind is VerdictKind.CHECKPOINT_UNUSABLE
            ) and view.stopping:
        return Finish(status=RunStatus.INTERRUPTED,
                      reason="stopped by signal before the retry")
    if verdict.kind not in _WALKED:
        reason = verdict.evidence
        if verdict.kind in _RETRIED:
            why = view.refusal or f"still failing after {view.retries} retries on the same config"
            reason = f"{why}: {reason}"
        status = (RunStatus.TRANSIENT if verdict.kind is VerdictKind.LOST
                  else RunStatus.FATAL if verdict.kind is VerdictKind.CHECKPOINT_UNUSABLE
                  else RunStatus(str(verdict.kind)))
        return Finish(status=status, reason=reason)
    if view.attempts_done >= view.budget:
        what = ("runs out of memory" if verdict.kind is VerdictKind.OOM
                else "leaves the trainer no data")
        return Finish(status=RunStatus.EXHAUSTED, reason=(
            f"the attempt budget of {view.budget} is spent and the last config still {what}; "
            "raise --max-attempts or start smaller"))
    if view.stopping:
        return Finish(status=RunStatus.INTERRUPTED,
                      reason="stopped by signal before the next attempt")
    return StepDown()


# --- the run in progress ---------------------------------------------------------------------

@dataclass(slots=True, kw_only=True)
class _Live:
    """What one supervised run has at hand: its config, the edges, and its events so far."""

    config: RunConfig
    command: Command
    """The command with its secrets (never journaled as is)."""
    dialect: Dialect
    ladder: Ladder
    run_dir: Path
    journal: Journal
    env: dict[str, str]
    redactor: Redactor
    run_attempt: runner.RunAttempt
    judge: Callable[[Outcome], Verdict]
    sleep: Callable[[float], object]
    stop: runner.StopRequest
    echo: bool
    memory: Memory
    events: list[Event]
    log: Any
    refusal: str | None = None
    """Why the last retried failure was not retried again (progress.retry_refusal)."""
    out_lock: checkpoints.OutputLock | None = None
    """The output folder's lock, held for the run's lifetime (checkpoints.OutputLock)."""
    draw_later: Callable[[Path], object] | None = None
    """Draws the pictures from report.json after the run (None: drawn before returning)."""

    def state(self) -> RunState:
        """The run as its journal tells it so far (the same replay resume uses)."""
        return replay_events(self.events)

    def view(self, state: RunState) -> View:
        return View(attempts_done=state.done, budget=self.config.max_attempts, held=state.held,
                    stop_on_held=self.ladder.on_held_memory == "stop",
                    stopping=self.stop.graceful.is_set(),
                    retries=self.ladder.transient_retries, refusal=self.refusal)


_QUIET_FIELDS = frozenset({"knobs", "argv", "config", "changed", "checkpoints_before",
                           "gpu_release", "fresh_argv", "continue_argv", "numbers"})


def _emit(live: _Live, event: E) -> E:
    """Write one event to the journal and to the log, together."""
    stamped = live.journal.write(event)
    live.events.append(stamped)
    fields = {k: v for k, v in stamped.to_record().items()
              if k not in ("v", "ts", "event") and k not in _QUIET_FIELDS
              and v not in (None, [], {}, (), False)}
    level = ("error" if stamped.KIND == "ladder.exhausted" else
             "warning" if stamped.KIND in ("gpu.held", "transient.retrying", "terminal.lost",
                                           "signal.received", "estimate.distrusted",
                                           "estimate.checking", "checkpoint.rescue_failed")
             else "info")
    getattr(live.log, level)(stamped.KIND, **fields)
    return stamped


HEARTBEAT = "heartbeat"
"""Touched every few seconds by a living supervisor: `resume` reads when it was last alive."""
_HEARTBEAT_S = 5.0


class _Heartbeat:
    """A daemon thread that touches `<run>/heartbeat` while the supervisor lives."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / HEARTBEAT
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True, name="heartbeat")

    def start(self) -> Self:
        """Beat from now on."""
        self.thread.start()
        return self

    def end(self) -> None:
        """The supervisor is leaving (its last beat stays as it was)."""
        self.stop.set()

    def _beat(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(OSError):  # a full disk must not end the run from here
                touch(self.path)  # never through a link planted in the run folder
            self.stop.wait(_HEARTBEAT_S)


def last_alive(run_dir: Path) -> float | None:
    """When the run's last supervisor was last seen alive (None: never recorded)."""
    try:
        return (run_dir / HEARTBEAT).lstat().st_mtime
    except OSError:
        return None


def process_start_time() -> float | None:
    """When this process started (the supervisor's clock starts there), None if unknown."""
    try:
        return float(psutil.Process().create_time())
    except psutil.Error:
        return None


def new_run_id() -> str:
    """A sortable, unique run id: UTC time plus a random suffix."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(2)


def supervise(  # noqa: PLR0913 - the edges are injected, as in tenacity and pypa/build
    command: Command,
    *,
    dialect: Dialect,
    ladder: Ladder,
    run_dir: Path,
    run_attempt: runner.RunAttempt = runner.run,
    judge: Callable[[Outcome], Verdict] = classify,
    sleep: Callable[[float], object] = time.sleep,
    max_attempts: int | None = None,
    stop: runner.StopRequest | None = None,
    echo: bool = True,
    env: Mapping[str, str] | None = None,
    memory: Memory | None = None,
    device_source: str | None = None,
    inject_device_memory: bool = False,
    signals: Signals | None = None,
    start: Knobs | None = None,
    sources: Mapping[str, str] | None = None,
    fits_key: str | None = None,
    remembered: Knobs | None = None,
    remembered_from: str | None = None,
    fits_db: str | None = None,
    share_output_dir: bool = False,
    process_started_at: float | None = None,
    draw_later: Callable[[Path], object] | None = None,
    remembered_ignored: str | None = None,
) -> RunResult:
    """Run the command, walk the ladder on each OOM, end with a report and the working config.

    `draw_later`: the pictures are drawn by it from report.json once the run has ended (the
    CLI's plot.draw_later: a child its exit code does not wait for); None draws them here.
    """
    base_env = dict(env) if env is not None else environment(command)
    memory = memory or Memory()
    reading = dialect.read_sourced(command)
    first_knobs = start if start is not None else reading.knobs
    config = build_config(command, run_id=run_dir.name, dialect=dialect, ladder=ladder,
                          start=first_knobs, max_attempts=max_attempts, memory=memory,
                          env=base_env, device_source=device_source,
                          inject_device_memory=inject_device_memory,
                          sources=sources or {k: str(v) for k, v in reading.sources.items()},
                          reading=reading,
                          fits_key=fits_key, remembered=remembered,
                          remembered_from=remembered_from, fits_db=fits_db,
                          remembered_ignored=remembered_ignored)
    config = dataclasses.replace(config, share_output_dir=share_output_dir,
                                 process_started_at=process_started_at)
    out_lock = checkpoints.OutputLock(run_dir=run_dir, share=share_output_dir)
    # Before the run folder exists: a refused run leaves nothing behind.
    out_lock.take(checkpoints.folder(config.walk_start.output_dir, command.cwd))
    with out_lock, Journal(run_dir) as journal:
        if (run_dir / "journal.jsonl").stat().st_size:
            msg = f"{run_dir} already holds a run; choose another --run-id or --runs-dir"
            raise CommandError(msg)
        live = _Live(config=config, command=command, dialect=dialect, ladder=ladder,
                     run_dir=run_dir, journal=journal, env=base_env,
                     redactor=Redactor.for_run(command.argv, base_env, cwd=command.cwd),
                     run_attempt=run_attempt,
                     judge=judge, sleep=sleep, stop=stop or runner.StopRequest(), echo=echo,
                     memory=memory, events=[], log=log.bind(run_id=run_dir.name),
                     out_lock=out_lock,
                     draw_later=draw_later)
        _emit(live, RunStarted(config=config))
        _end_dead_probes(live)
        if signals is not None:
            signals.listen(lambda e: _emit(live, e))
        beat = _Heartbeat(run_dir).start()
        try:
            return _drive(live, first=_first(live))
        finally:
            beat.end()
            if signals is not None:
                signals.listen(None)


def _end_dead_probes(live: _Live) -> None:
    """A `--help` probe whose supervisor was killed would hold its memory for good: end it."""
    ended = program.end_dead_probes()
    if ended:
        _emit(live, ProbeLeftoversEnded(pids=ended))


def resume(  # noqa: PLR0913
    run_dir: Path,
    *,
    rebuild: Callable[[RunConfig], Rebuilt],
    orphan: str = "adopt",
    run_attempt: runner.RunAttempt = runner.run,
    adopt: Callable[[runner.AttemptSpec, runner.Spawned], Outcome] = runner.adopt,
    end_orphan: Callable[[runner.AttemptSpec, runner.Spawned], None] = runner.end_orphan,
    judge: Callable[[Outcome], Verdict] = classify,
    sleep: Callable[[float], object] = time.sleep,
    stop: runner.StopRequest | None = None,
    echo: bool = True,
    signals: Signals | None = None,
) -> RunResult:
    """Carry on a run whose supervisor died: replay its journal, settle its attempt, drive on."""
    path = run_dir / "journal.jsonl"
    if not path.is_file():
        msg = f"{path} does not exist; give the folder of a run (runs/<run-id>)"
        raise ResumeError(msg)
    with Journal(run_dir) as journal:
        state = replay(read(path).records)
        if state.finished is not None and state.finished.status != RunStatus.INTERRUPTED:
            msg = (f"run {run_dir.name} already finished ({state.finished.status}); nothing to "
                   f"resume. Read {run_dir / 'report.md'} or start a new run")
            raise ResumeError(msg)
        rebuilt = rebuild(state.config)
        live = _Live(config=state.config, command=rebuilt.command, dialect=rebuilt.dialect,
                     ladder=rebuilt.ladder, run_dir=run_dir, journal=journal, env=rebuilt.env,
                     redactor=Redactor.for_run(rebuilt.command.argv, rebuilt.env,
                                                 cwd=rebuilt.command.cwd),
                     run_attempt=run_attempt, judge=judge, sleep=sleep,
                     stop=stop or runner.StopRequest(), echo=echo, memory=rebuilt.memory,
                     events=list(state.events), log=log.bind(run_id=run_dir.name),
                     out_lock=checkpoints.OutputLock(run_dir=run_dir,
                                                     share=state.config.share_output_dir))
        # The same run takes its output folder again (its dead supervisor's lock went with it).
        _take_output(live, state.attempts[-1].knobs if state.attempts else state.config.start)
        pending = state.pending
        _emit(live, RunResumed(attempts_done=state.done,
                               pending=pending.number if pending else None, orphan=orphan,
                               torn_kept=journal.torn_kept.name if journal.torn_kept else None,
                               pid=os.getpid(), last_alive=last_alive(run_dir)))
        _end_dead_probes(live)
        if signals is not None:
            signals.listen(lambda e: _emit(live, e))
        beat = _Heartbeat(run_dir).start()
        try:
            first: tuple[Knobs, str | None] | None = None
            if pending is not None:
                verdict = _settle_orphan(live, pending, orphan, adopt, end_orphan)
                if verdict.kind is VerdictKind.INTERRUPTED:
                    first = (pending.knobs, pending.started.rung)  # ended by us: run it again
            elif state.history and state.history[-1].verdict.kind is VerdictKind.INTERRUPTED:
                last = state.history[-1]  # stopped by a signal (SIGTERM, a requeue): again
                first = (last.knobs, last.rung)
            elif not state.history:
                first = _first(live)
            return _drive(live, first=first)
        finally:
            beat.end()
            if live.out_lock is not None:
                live.out_lock.release()
            if signals is not None:
                signals.listen(None)


@dataclass(frozen=True, slots=True, kw_only=True)
class Rebuilt:
    """The edges of a run rebuilt from its journaled config (by the CLI, for resume)."""

    command: Command
    dialect: Dialect
    ladder: Ladder
    env: dict[str, str]
    memory: Memory


def _drive(live: _Live, *, first: tuple[Knobs, str | None] | None) -> RunResult:
    """The loop proper. `first` is a config to run before looking at the history."""
    state = live.state()
    if first is not None:
        if live.stop.graceful.is_set():
            return _finish(live, Finish(status=RunStatus.INTERRUPTED,
                                        reason="stopped by signal before the first attempt"))
        knobs, rung = first
        if state.attempts:
            # A run resumed after an interruption (SIGTERM, a requeue): from the newest
            # checkpoint, not from the one the cut-off attempt started at.
            knobs = _from_newest(live, knobs)
        verdict = _attempt_with_retries(live, knobs, rung)
    else:
        last = state.history[-1]
        knobs, verdict = last.knobs, last.verdict
        if verdict.kind in _RETRIED or verdict.kind is VerdictKind.CHECKPOINT_UNUSABLE:
            # resume after a failure: the same streak, the same budget, the backoff journaled
            verdict = _attempt_with_retries(live, knobs, last.rung, failed=verdict)
    while True:
        state = live.state()
        decision = decide(live.view(state), verdict)
        if isinstance(decision, Finish):
            return _finish(live, decision)
        if isinstance(decision, Compare):
            knobs, verdict = _compare(live, knobs)
            continue
        step = _runnable(live, state)
        if isinstance(step, GiveUp):
            _emit(live, LadderExhausted(reason=step.reason, spent=step.spent,
                                        skipped=step.skipped))
            return _finish(live, Finish(status=RunStatus.EXHAUSTED, reason=step.reason),
                           spent=step.spent)
        new = _from_newest(live, step.knobs)
        _emit(live, LadderStepped(after_attempt=state.done, next_attempt=state.done + 1,
                                  rung=step.rung, changed=_changes(knobs, new),
                                  restored=step.restored, skipped=step.skipped, note=step.note))
        knobs = new
        verdict = _attempt_with_retries(live, knobs, step.rung)


def _changes(before: Knobs, after: Knobs) -> dict[str, list[Any]]:
    return {k: list(v) for k, v in before.diff(after).items()}


def _first(live: _Live) -> tuple[Knobs, str | None]:
    """The first config: the command's own, or the first predicted to fit."""
    start = live.config.walk_start
    if not live.memory.can_skip:
        return start, None
    candidate = _runnable(live, live.state())
    if isinstance(candidate, Step):
        return candidate.knobs, None if candidate.rung == START else candidate.rung
    return start, None  # every config predicted over: _runnable distrusted the predictions


def _runnable(live: _Live, state: RunState) -> Step | GiveUp:
    """The policy's next step, passing over configs predicted not to fit (journaled).

    When every remaining config is predicted over the device, the predictions are distrusted
    for the rest of the run (journaled) and the walk goes on for real from where it stands,
    so that skipping never lands the run on a more degraded config than the walk would.
    """
    memory, start, ladder = live.memory, live.config.walk_start, live.ladder
    predictor, device = memory.predictor, memory.device_mib
    if state.distrusted or predictor is None or device is None:
        if not state.distrusted and memory.count is not None:
            return _listening(live, state, memory.count)
        return next_step(start, state.walk, ladder, can_set=live.config.can_set,
                         refusal=live.config.refusal)
    candidate, skips = next_runnable(start, state.walk, ladder, predict=predictor.predict,
                                     device_mib=device, margin=memory.margin,
                                     can_set=live.config.can_set,
                                     refusal=live.config.refusal,
                                     # the analytic count ranks, traces confirm (if it can)
                                     confirm=getattr(predictor, "confirm", None))
    if isinstance(candidate, GiveUp) and skips:
        checked = _nothing_fits(live, state, candidate, skips, device)
        if checked is not None:
            return checked
        smallest = min(s.prediction.peak_mib for s in skips)
        _emit(live, EstimateDistrusted(reason=(
            f"every remaining config is predicted over the {device:g} MiB device (smallest "
            f"{smallest:.0f} MiB); predictions can be wrong, so the ladder is walked for real "
            "from here and no further config is skipped on a prediction")))
        if not state.walk:
            return Step(knobs=start, rung=START)
        return next_step(start, state.walk, ladder, can_set=live.config.can_set,
                         refusal=live.config.refusal)
    _journal_skips(live, start, skips)
    return candidate


def _journal_skips(live: _Live, start: Knobs, skips: Sequence[Skip]) -> None:
    """Each config passed over without running, journaled with its reason."""
    for skip in skips:
        _emit(live, RungSkipped(rung=skip.rung, knobs=skip.knobs,
                                changed=_changes(start, skip.knobs),
                                predicted_mib=round(skip.prediction.peak_mib, 1),
                                method=str(skip.prediction.method), reason=skip.reason))


def _listening(live: _Live, state: RunState,
               count: Callable[[Knobs], Prediction | None]) -> Step | GiveUp:
    """The walk without predictions, passing over configs its OOMs' own figures rule out
    (journaled as skips); where they rule out every config left, the walk goes on for real."""
    start = live.config.walk_start
    candidate, skips = next_listening(start, state.walk, live.ladder, count=count,
                                      can_set=live.config.can_set,
                                      refusal=live.config.refusal)
    if isinstance(candidate, GiveUp) and skips:
        return next_step(start, state.walk, live.ladder, can_set=live.config.can_set,
                         refusal=live.config.refusal)
    _journal_skips(live, start, skips)
    return candidate


CLEARLY_OVER = 1.10
"""A prediction this far over the device is trusted to say "does not fit": twice the
estimator's measured error (within 5 % of the peak, docs/memory.md)."""


def _nothing_fits(live: _Live, state: RunState, candidate: GiveUp, skips: Sequence[Skip],
                  device: float) -> Step | GiveUp | None:
    """Every remaining config is predicted over the device: check the one predicted smallest.

    Where even that one is predicted clearly over (CLEARLY_OVER), it runs once for real
    (journaled as `estimate.checking`): if it fits, the predictions were wrong and the run
    has its fit; if it OOMs, every other config is predicted larger still and the run stops
    there, exhausted, instead of walking every rung for real. None: near the edge, where the
    predictions are distrusted and the walk goes on for real (the caller's rule).
    """
    smallest = min(skips, key=lambda s: s.prediction.peak_mib)
    if state.checking is not None:
        reason = (f"nothing fits: {state.checking.reason}; it did not fit either, and every "
                  "other config the ladder reaches is predicted larger")
        return GiveUp(reason=reason, spent=candidate.spent, skipped=candidate.skipped)
    if smallest.prediction.peak_mib < device * CLEARLY_OVER:
        return None
    for skip in skips:
        if skip is not smallest:
            _emit(live, RungSkipped(rung=skip.rung, knobs=skip.knobs,
                                    changed=_changes(live.config.walk_start, skip.knobs),
                                    predicted_mib=round(skip.prediction.peak_mib, 1),
                                    method=str(skip.prediction.method), reason=skip.reason))
    said = report.describe_knobs(smallest.knobs.to_dict(), short=True)
    _emit(live, EstimateChecking(
        knobs=smallest.knobs, predicted_mib=round(smallest.prediction.peak_mib, 1),
        reason=(f"every config the ladder reaches is predicted over the {device:g} MiB device; "
                f"the smallest, {said} ({smallest.prediction.peak_mib:.0f} MiB predicted), "
                "runs once to check")))
    return Step(knobs=smallest.knobs, rung=smallest.rung or START,
                note="checking the config predicted smallest")


def _attempt_with_retries(live: _Live, knobs: Knobs, rung: str | None, *,
                          failed: Verdict | None = None) -> Verdict:
    """Run `knobs`; a transient failure, a hang or a lost attempt runs them again.

    Each retry starts from the newest checkpoint the config can load (journaled), after
    tenacity's exponential backoff (journaled with the retry's number and checkpoint). The
    budget is the failure streak's (`progress.streak`): `[transient] retries` failures and
    `max_delay_s` counted from the streak's first failure, so a failure ten hours into
    training is retried like one ten seconds in, and an attempt that made progress starts a
    new streak. Time the supervisor was down (dead until `resume`, or in a backoff its death
    cut short) is not time between attempts: a failure while nobody watched is retried.
    The streak is read from the journal, so `resume` neither resets nor skips it.
    A lost attempt (its wrapper died with no status) is re-run outside that budget.
    `failed`: the last attempt already failed this way (resume): start with the retry.
    """
    verdict = failed if failed is not None else _attempt(live, knobs, rung)
    live.refusal = None
    while verdict.kind in _RETRIED or verdict.kind is VerdictKind.CHECKPOINT_UNUSABLE:
        state = live.state()
        if live.stop.graceful.is_set() or state.done >= live.config.max_attempts:
            return verdict
        if verdict.kind is VerdictKind.CHECKPOINT_UNUSABLE:
            # The checkpoint is gone from the candidates (replay): the same config goes on
            # from the one before it, or fresh. Each time one fewer: this ends.
            knobs = _after_unusable(live, state, knobs)
            verdict = _attempt(live, knobs, rung)
            continue
        current = progress.streak(state.attempts, state.events)
        lost = verdict.kind is VerdictKind.LOST
        refusal = progress.retry_refusal(current, retries=live.ladder.transient_retries,
                                         window_s=live.ladder.transient_max_delay_s,
                                         now=time.time(), lost=lost)
        if refusal is not None:
            live.refusal = refusal
            return verdict
        knobs = _from_newest(live, knobs)
        if verdict.kind is VerdictKind.HANG:
            _extend_watchdog(live)
        delay = 0.0 if lost else float(_BACKOFF(cast("RetryCallState", _Nth(current.failures))))
        _emit(live, RetryScheduled(
            attempt=state.done, delay_s=round(delay, 2), retry=current.failures + current.lost,
            verdict=str(verdict.kind), checkpoint=knobs.resume_from_checkpoint,
            step=step_of(knobs.resume_from_checkpoint)))
        if delay:
            live.sleep(delay)  # Event.wait in the CLI: a signal cuts the backoff short
        if live.stop.graceful.is_set():
            return verdict
        verdict = _attempt(live, knobs, rung)
    return verdict


def _extend_watchdog(live: _Live) -> None:
    """A hang at the same step as the hang before it: the next attempt gets a longer limit."""
    state = live.state()
    hangs: list[tuple[int | None, float | None]] = []
    for record in state.attempts:
        done = record.finished
        if done is None:
            continue
        if done.verdict != str(VerdictKind.HANG):
            hangs.clear()  # only a streak of hangs in a row
            continue
        seen = done.progress or {}
        step, gap = seen.get("step"), seen.get("longest_gap_s")
        # The limit it was judged under: the learnt one (factor x its longest gap, never under
        # the floor), a fixed one, or one a recurrence already made longer.
        limit = max(live.ladder.stall_floor_s, live.ladder.stall_timeout_s or 0.0,
                    live.ladder.stall_factor * gap if isinstance(gap, int | float) else 0.0,
                    _extended_limit(state.events, record.number) or 0.0)
        hangs.append((step if isinstance(step, int) else None, limit))
    grown = liveness.grown_limit(live.ladder.stall_floor_s, hangs,
                                 factor=live.ladder.repeat_factor)
    if grown is not None:
        _emit(live, WatchdogExtended(attempt=state.done + 1, step=grown[1],
                                     limit_s=round(grown[0], 1)))


def _extended_limit(events: Sequence[object], attempt: int) -> float | None:
    """The longer silence limit journaled for `attempt`, if any."""
    found = [e.limit_s for e in events
             if isinstance(e, WatchdogExtended) and e.attempt == attempt]
    return found[-1] if found else None


@dataclass(frozen=True, slots=True)
class _Nth:
    """What tenacity's wait strategies read of a retry: its number."""

    attempt_number: int


def _attempt(live: _Live, knobs: Knobs, rung: str | None, *,
             timed_steps: int | None = None) -> Verdict:
    """Run one attempt of `knobs`; timed for a speed comparison when speed.audition says so."""
    number = len(live.state().attempts) + 1
    timed_steps = timed_steps or _timed_steps(live, knobs, rung)
    attempt_dir = live.run_dir / "attempts" / f"{number:02d}"
    make_dir(attempt_dir, below=live.run_dir)  # made here, never a link planted there
    # Read back through the dialect: the attempt trains the knobs the run reports, or none.
    rendered = render_checked(live.dialect, live.command, knobs, attempt_dir)
    shown = tuple(live.redactor.argv(rendered.argv))
    write_file(attempt_dir / "argv.json", json.dumps(list(shown)) + "\n", parents=True,
               run_dir=live.run_dir)  # a full disk: one line (free space, then resume)
    _take_output(live, knobs)
    before = checkpoints.listing(knobs.output_dir, live.command.cwd)
    started = _emit(live, AttemptStarted(
        attempt=number, rung=rung, knobs=knobs, changed=_changes(live.config.start, knobs),
        argv=shown, log_dir=str(attempt_dir.relative_to(live.run_dir)),
        env_set=_env_set(live, rendered), checkpoints_before=before))

    def spawned(proc: runner.Spawned) -> None:
        _emit(live, AttemptSpawned(attempt=number, pid=proc.pid, create_time=proc.create_time))
        if live.draw_later is None:
            plot.warm()  # the pictures' library loads while the attempt runs, not after it

    outcome = live.run_attempt(_spec(live, attempt_dir, rendered, knobs, on_spawn=spawned,
                                     timed_steps=timed_steps))
    return _record(live, started, outcome)


def _timed_steps(live: _Live, knobs: Knobs, rung: str | None) -> int | None:
    """Steps to time an attempt of `knobs` for (None: it trains to its end).

    The rival of a comparison is always timed, also when it runs again after a resume (a kill
    of the supervisor while it was being timed): never made final untimed.
    """
    if rung == speed.RUNG:  # the rival; once compared, the winner of that rung trains on
        return live.ladder.speed_steps if speed.compared(live.state()) is None else None
    if isinstance(_audition(live, knobs), speed.Alternative):
        return live.ladder.speed_steps
    return None


def _audition(live: _Live, knobs: Knobs) -> speed.Alternative | str | None:
    """speed.audition with what this run knows (its walk, its program, its predictions)."""
    predictor = live.memory.predictor

    def predict(candidate: Knobs) -> float | None:
        prediction = predictor.predict(candidate) if predictor is not None else None
        return prediction.peak_mib if prediction is not None else None

    return speed.audition(live.state(), knobs, live.ladder, can_set=live.config.can_set,
                          predict=predict if predictor is not None else None,
                          device_mib=live.memory.device_mib)


def _compare(live: _Live, knobs: Knobs) -> tuple[Knobs, Verdict]:
    """The fitting config was timed: time its rival, journal the comparison, train on with the
    faster from the newest checkpoint (speed.py). An OOM of the rival settles it too."""
    state = live.state()
    first = state.attempts[-1]
    if first.started.rung == speed.RUNG:
        # The rival has been timed (also when it was timed again after a resume, or a resume
        # fell between its timing and the comparison): the first is the newest timed attempt of
        # another rung (failing that, the newest of another rung: then it is kept).
        others = [a for a in state.attempts
                  if a.started.rung != speed.RUNG and a.finished is not None]
        timed = [a for a in others if a.finished and a.finished.verdict == str(VerdictKind.TIMED)]
        first = (timed or others or [first])[-1]
    else:
        rival = _audition(live, knobs)
        if not isinstance(rival, speed.Alternative):  # nothing left to time it against
            return knobs, _attempt_with_retries(live, _from_newest(live, knobs),
                                                first.started.rung)
        alt = _from_newest(live, rival.knobs)
        verdict = _attempt(live, alt, speed.RUNG, timed_steps=live.ladder.speed_steps)
        if verdict.kind in (VerdictKind.FITS, VerdictKind.INTERRUPTED):
            return alt, verdict  # it trained to the end, or the run was told to stop
        state = live.state()
    result = _emit(live, speed.compare(first, state.attempts[-1]))
    winner = state.attempt(result.winner)
    rung = winner.started.rung if winner is not None else None
    chosen = _from_newest(live, speed.winner_knobs(state, result))
    return chosen, _attempt_with_retries(live, chosen, rung)


def _env_set(live: _Live, rendered: Command) -> dict[str, str]:
    """What the rendered config adds to the command's own environment (a rung's variables)."""
    own = dict(live.command.env)
    return {k: v for k, v in rendered.env if own.get(k) != v}


def _spec(live: _Live, attempt_dir: Path, rendered: Command,  # noqa: PLR0913
          knobs: Knobs | None = None, *,
          on_spawn: Callable[[runner.Spawned], None] | None = None,
          timed_steps: int | None = None) -> runner.AttemptSpec:
    gpu = live.memory.gpu
    argv = rendered.argv
    if live.config.inject_device_memory and live.config.device_mib:
        # The command's own `env PYTHONPATH=...` / `env -i` prefix keeps the injected limit.
        argv = device_memory_argv(argv, int(live.config.device_mib))
    ladder = live.ladder
    env, stop_file = _injected(live, attempt_dir, argv, {**live.env, **dict(rendered.env)})
    number = int(attempt_dir.name) if attempt_dir.name.isdigit() else 0
    extended = _extended_limit(live.state().events, number) or 0.0
    fixed = max(ladder.stall_timeout_s, extended) if ladder.stall_timeout_s else None
    return runner.AttemptSpec(
        argv=argv, env=env, cwd=rendered.cwd,
        log_dir=attempt_dir,
        stop=live.stop, echo=live.echo, timeout_s=live.ladder.attempt_timeout_s,
        stall_s=fixed,
        watchdog=Watchdog(fixed_s=fixed, startup_s=live.ladder.startup_timeout_s,
                          factor=live.ladder.stall_factor,
                          floor_s=max(live.ladder.stall_floor_s, extended)),
        evidence=liveness.Settings(enabled=ladder.liveness_evidence,
                                   stacks=ladder.liveness_stacks,
                                   stack_interval_s=ladder.stack_interval_s,
                                   cpu_busy=ladder.cpu_busy),
        activity_dir=checkpoints.folder(knobs.output_dir if knobs else None, live.command.cwd),
        # Unique across runs (two runs may share a run id in different folders): the tree
        # kill ends every process carrying it.
        marker=str(attempt_dir.resolve()),
        on_spawn=on_spawn, redactor=live.redactor,
        gpu=None if gpu is None or getattr(gpu, "unavailable", None) else gpu,
        release_wait_s=live.ladder.release_wait_s, timed_steps=timed_steps,
        rescue_stop_file=stop_file, rescue_save_s=_save_s(live) if stop_file else None,
        rescue_unmeasured_s=live.ladder.rescue_grace_s,
        rescue_jit=rescue.jit_enabled(argv, rendered.cwd))


def _injected(live: _Live, attempt_dir: Path, argv: Sequence[str], env: Mapping[str, str],
              ) -> tuple[dict[str, str], Path | None]:
    """The attempt's environment with what the injected sitecustomize is asked to do in it.

    The stack sampler (policy [liveness] stacks) in every Python attempt; the rescue hook
    (policy [rescue]) in every attempt: it acts only in a Hugging Face Trainer's train(), with
    one process. Returns the file a polite stop creates, if any.
    """
    ladder = live.ladder
    out = dict(env)
    if liveness.inject_decision(argv, out, enabled=ladder.liveness_stacks):
        out = liveness.sampler_env(out, str(attempt_dir / liveness.STACKS_DIR),
                                   interval_s=ladder.stack_interval_s)
    if not (ladder.rescue_on_oom or ladder.rescue_on_stop or ladder.rescue_on_error):
        return out, None
    stop_file = attempt_dir.resolve() / rescue.STOP_FILE if ladder.rescue_on_stop else None
    return rescue.inject(out, oom=ladder.rescue_on_oom, stop_file=stop_file,
                         error=ladder.rescue_on_error), stop_file


def _save_s(live: _Live) -> float | None:
    """How long a save took in this run: its newest checkpoints' write times, and its rescues."""
    state = live.state()
    newest = sorted(state.checkpoints, key=lambda c: (c.step, c.attempt))[-3:]
    measured = [rescue.save_seconds(Path(c.path) for c in newest)]
    measured += [e.seconds for e in state.events if isinstance(e, CheckpointRescued)]
    known = [s for s in measured if s is not None]
    return max(known) if known else None


def _rescues(live: _Live, number: int, attempt_dir: Path, tail: Sequence[str]) -> None:
    """Journal what the trainer's rescue hook said it did in this attempt."""
    said = rescue.read([*tail, *_log_end(attempt_dir / "stderr.log")])
    seen: set[tuple[str, int, str | None]] = set()
    for saved in said.saved:
        if (saved.why, saved.step, saved.checkpoint) not in seen:
            seen.add((saved.why, saved.step, saved.checkpoint))
            _emit(live, CheckpointRescued(attempt=number, step=saved.step, why=saved.why,
                                          seconds=saved.seconds, checkpoint=saved.checkpoint))
    for failed in said.failed:
        if (failed.why, failed.step, failed.error) not in seen:
            seen.add((failed.why, failed.step, failed.error))
            _emit(live, RescueFailed(attempt=number, step=failed.step, why=failed.why,
                                     error=live.redactor.text(failed.error or "unknown"),
                                     seconds=failed.seconds))


_LOG_END_BYTES = 256 * 1024


def _log_end(path: Path) -> list[str]:
    """The last lines of an attempt's log (the tail the runner kept may have scrolled past)."""
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - _LOG_END_BYTES))
            return handle.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return []


_NOT_LIMITED = ("--device-memory was not in force in this attempt: the injected limit never "
                "announced itself (the command may reset PYTHONPATH in a script, run python "
                "-I/-E/-S, or not run Python at all), so its fit says nothing about a device "
                "of {mib:g} MiB; run the Python program directly, or drop --device-memory")


def _record(live: _Live, started: AttemptStarted, outcome: Outcome) -> Verdict:
    """Judge an attempt's outcome and journal it (with what it measured and wrote)."""
    number, knobs = started.attempt, started.knobs
    verdict = _unusable_or_fatal(live, knobs, live.judge(outcome))
    attempt_dir = live.run_dir / started.log_dir
    measured = trainer_output.measure(outcome.tail, attempt_dir)
    if (live.config.inject_device_memory and verdict.kind is VerdictKind.FITS
            and not measured.announced):
        verdict = Verdict(kind=VerdictKind.FATAL,
                          evidence=_NOT_LIMITED.format(mib=live.config.device_mib or 0))
    ratio = _calibrate(live, knobs, verdict, measured.peak_mib)
    prediction = live.memory.predictor.predict(knobs) if live.memory.predictor else None
    if outcome.release is not None and not outcome.release.get("released", True):
        _emit(live, GpuHeld(attempt=number, detail=str(
            outcome.release.get("describe", "GPU memory still held"))))
    after = checkpoints.listing(knobs.output_dir, live.command.cwd)
    shown = outcome.progress or {}
    credit = checkpoints.credit(started.checkpoints_before, after, since_s=started.ts,
                                max_steps=_run_steps(live.state(), knobs),
                                seen=checkpoints.Seen(
                                    resumed=step_of(knobs.resume_from_checkpoint),
                                    reached=_int_or_none(shown.get("step")),
                                    total=_int_or_none(shown.get("total"))))
    wrote = credit.wrote
    seen = checkpoints.steps_from_logs(outcome.progress, checkpoints.steps_per_epoch(
        [*(p for p, _ in wrote), knobs.resume_from_checkpoint,
         *(c.path for c in checkpoints.own(live.state().checkpoints))]))
    evidence = live.redactor.text(verdict.evidence) if verdict.evidence else None
    steps = ({"steps": measured.steps, "resumed_from_step": measured.resumed_from_step or 0}
             if measured.steps is not None else None)
    if steps is None and wrote:
        # Any HF-style trainer: its newest checkpoint says how far it got.
        resumed_from = step_of(knobs.resume_from_checkpoint)
        steps = {"steps": max(step for _, step in wrote), "resumed_from_step": resumed_from}
    duration = outcome.duration_s
    record = live.state().attempt(number)
    if outcome.adopted and outcome.ended_at and record is not None:
        # Followed after a resume: its duration counts from its own start, not the adoption.
        began = record.spawned.create_time if record.spawned else started.ts
        duration = round(max(duration, outcome.ended_at - began), 3)
    times = [[step, round(after[path] / 1e9, 3)] for path, step in wrote if path in after]
    _emit(live, AttemptFinished(
        attempt=number, verdict=str(verdict.kind),
        oom_kind=str(verdict.oom_kind) if verdict.oom_kind else None,
        evidence=evidence, numbers=numbers_of(verdict), exit_code=outcome.exit_code,
        duration_s=duration, killed_by_supervisor=outcome.killed_by_supervisor,
        adopted=outcome.adopted, kill_s=outcome.kill_s, peak_mib=measured.peak_mib,
        peak_source=measured.peak_source, trained_steps=steps,
        checkpoints=[[path, step] for path, step in wrote],
        gpu_peak_mib=outcome.gpu_peak_mib, gpu_release=outcome.release, calibration=ratio,
        predicted_mib=round(prediction.peak_mib, 1) if prediction else None,
        escaped=outcome.escaped, wrapper_died=outcome.wrapper_died,
        ended_at=outcome.ended_at, progress=seen, checkpoint_times=times,
        watchdog=outcome.watchdog, host_peak_mib=outcome.host_peak_mib, cost=measured.cost,
        fingerprints=credit.fingerprints,
        host_cap_mib=outcome.host_cap_mib, host_cap_source=outcome.host_cap_source,
    ))
    for path, why in credit.foreign:
        _emit(live, CheckpointPassedOver(attempt=number, checkpoint=path, step=step_of(path),
                                         reason=f"it appeared during attempt {number} but {why}"))
    _rescues(live, number, attempt_dir, outcome.tail)
    return verdict


def _calibrate(live: _Live, knobs: Knobs, verdict: Verdict, peak_mib: float | None,
               ) -> float | None:
    """Teach the predictor what this attempt really took (a peak, or an OOM's lower bound)."""
    predictor = live.memory.predictor
    if predictor is None:
        return None
    # The tensor peak the trainer (or the injected code) reported, never NVML's per-process
    # figure: that holds the CUDA context too (934 MiB for a 172 MiB peak on an H200).
    if peak_mib and verdict.kind is VerdictKind.FITS:
        return predictor.calibrate(knobs, peak_mib)
    bound = oom_lower_bound_mib(verdict.numbers) if verdict.is_oom else None
    if bound:
        return predictor.calibrate(knobs, bound, lower_bound=True)
    return None


def _from_newest(live: _Live, knobs: Knobs) -> Knobs:
    """`knobs` continuing from the newest checkpoint they can load; say so either way.

    Every new attempt starts here, whatever ended the last one: a ladder step, a retry after a
    transient failure, a hang or a lost attempt, a resume.
    """
    state = live.state()
    choice = checkpoints.choose(state.checkpoints, knobs, max_steps=_run_steps(state, knobs))
    _say_passed_over(live, state, knobs, choice)
    if choice.checkpoint is not None:
        chosen = choice.checkpoint
        _emit(live, CheckpointResumed(attempt=state.done + 1, checkpoint=chosen.path,
                                      step=chosen.step))
        return dataclasses.replace(knobs, resume_from_checkpoint=chosen.path)
    if choice.passed_over is not None:
        _emit(live, CheckpointSkipped(attempt=state.done + 1, checkpoint=choice.passed_over.path,
                                      step=choice.passed_over.step, reason=choice.reason or ""))
    return dataclasses.replace(knobs,
                               resume_from_checkpoint=live.config.start.resume_from_checkpoint)


def _take_output(live: _Live, knobs: Knobs) -> None:
    """Hold the lock of the folder `knobs` train into (a rung may move it to a sibling)."""
    if live.out_lock is not None:
        live.out_lock.take(checkpoints.folder(knobs.output_dir, live.command.cwd))


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _run_steps(state: RunState, knobs: Knobs) -> int | None:
    """How many steps the run trains: its max_steps, else the trainer's own total as it said
    it in an attempt (None: not known; then only the checkpoint's own plan bounds it)."""
    if knobs.max_steps:
        return knobs.max_steps
    totals = [int(a.finished.progress.get("total") or 0) for a in state.attempts
              if a.finished is not None and a.finished.progress]
    return max(totals) if totals and max(totals) > 0 else None


def _say_passed_over(live: _Live, state: RunState, knobs: Knobs,
                     choice: checkpoints.Choice) -> None:
    """One line (journaled) for each checkpoint folder the next attempt does not take: this
    run's own that are not whole or changed since, and folders this run never wrote."""
    said = {(p.checkpoint, p.reason) for p in state.passed_over}
    said_paths = {p.checkpoint for p in state.passed_over}
    nxt = state.done + 1
    for c, why in choice.unusable:
        if (c.path, why) not in said:
            _emit(live, CheckpointPassedOver(attempt=nxt, checkpoint=c.path, step=c.step,
                                             reason=why))
    written = [c.path for c in state.checkpoints]
    output = checkpoints.folder(knobs.output_dir, live.command.cwd)
    for path, why in checkpoints.strays(output, written):
        if path not in said_paths:
            _emit(live, CheckpointPassedOver(attempt=nxt, checkpoint=path, step=step_of(path),
                                             reason=why))


def _unusable_or_fatal(live: _Live, knobs: Knobs, verdict: Verdict) -> Verdict:
    """A load failure is a checkpoint's fault only where the attempt resumed from one of this
    run's checkpoints; the command's own checkpoint failing to load is fatal (the user's)."""
    if verdict.kind is not VerdictKind.CHECKPOINT_UNUSABLE:
        return verdict
    path = knobs.resume_from_checkpoint
    if path is None:
        return Verdict(kind=VerdictKind.FATAL, evidence=verdict.evidence)
    if path not in {c.path for c in live.state().checkpoints}:
        return Verdict(kind=VerdictKind.FATAL, evidence=(
            f"the checkpoint the command resumes from, {path}, does not load "
            f"({verdict.evidence}); repair it, or start without it"))
    return Verdict(kind=VerdictKind.CHECKPOINT_UNUSABLE,
                   evidence=f"{Path(path).name} does not load: {verdict.evidence}")


def _after_unusable(live: _Live, state: RunState, knobs: Knobs) -> Knobs:
    """The config again, from the checkpoint before the one that failed to load (said why)."""
    last = state.attempts[-1]
    bad = last.knobs.resume_from_checkpoint or ""
    _emit(live, CheckpointPassedOver(
        attempt=state.done + 1, checkpoint=bad, step=step_of(bad),
        reason=(f"attempt {last.number} failed to load it "
                f"({last.finished.evidence if last.finished else 'no verdict'})")))
    return _from_newest(live, knobs)


# --- resume: the attempt a dead supervisor left ----------------------------------------------

def find_leader(marker: str) -> runner.Spawned | None:
    """The attempt wrapper carrying `marker`, if one runs (its spawn was never journaled)."""
    me = os.getpid()
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        try:
            if proc.environ().get(runner.MARKER_ENV) != marker:
                continue
            if "supervisor._wrap" in " ".join(proc.cmdline()):
                return runner.Spawned(pid=proc.pid, create_time=proc.create_time())
        except psutil.Error:
            continue
    return None


def _settle_orphan(live: _Live, pending: AttemptRecord, orphan: str,
                   adopt: Callable[[runner.AttemptSpec, runner.Spawned], Outcome],
                   end_orphan: Callable[[runner.AttemptSpec, runner.Spawned], None]) -> Verdict:
    """The attempt a dead supervisor left: follow it to its end, or end it and say so.

    A kill between `attempt.started` and `attempt.spawned` leaves no pid in the journal: the
    wrapper is then found by the attempt's marker, so no instant leaves an attempt neither
    adoptable nor endable.
    """
    attempt_dir = live.run_dir / pending.started.log_dir
    rendered = live.dialect.render(live.command, pending.knobs, attempt_dir)
    # An attempt being timed when the supervisor died is still timed when adopted.
    spec = _spec(live, attempt_dir, rendered, pending.knobs,
                 timed_steps=_timed_steps(live, pending.knobs, pending.started.rung))
    if spec.watchdog is not None:  # its output so far has no times: the run's cadence
        spec = dataclasses.replace(spec, watchdog=dataclasses.replace(
            spec.watchdog, adopted_gap_s=_longest_gap_s(live)))
    spawned: runner.Spawned | None = (
        runner.Spawned(pid=pending.spawned.pid, create_time=pending.spawned.create_time)
        if pending.spawned is not None else find_leader(spec.marker))
    if spawned is not None and pending.spawned is None:
        _emit(live, AttemptSpawned(attempt=pending.number, pid=spawned.pid,
                                   create_time=spawned.create_time))
    if orphan == "adopt" and spawned is not None:
        return _record(live, pending.started, adopt(spec, spawned))
    if spawned is not None:
        end_orphan(spec, spawned)
    why = ("ended on resume (--orphan end)" if spawned is not None else
           "the supervisor died before the attempt was running; it runs again")
    outcome = Outcome(exit_code=None, duration_s=0.0, interrupted=True, tail=(why,))
    return _record(live, pending.started, outcome)


def _longest_gap_s(live: _Live) -> float:
    """The longest gap between two outputs any finished attempt of this run showed (0: none)."""
    gaps = [0.0]
    for event in live.state().events:
        if isinstance(event, AttemptFinished) and event.progress:
            gap = event.progress.get("longest_gap_s")
            if isinstance(gap, (int, float)) and 0 < gap < bounds.MAX_SECONDS:
                gaps.append(float(gap))
    return max(gaps)


# --- the end ---------------------------------------------------------------------------------

def _finish(live: _Live, decision: Finish, spent: Sequence[str] = ()) -> RunResult:
    state = live.state()
    final: Knobs | None = None
    if decision.status is RunStatus.FITTED and state.history:
        final = state.history[-1].knobs
        _why_not_compared(live, state)
        state = live.state()
        _write_final(live, state, final)
    last = state.history[-1].number if state.history else 0
    exit_code = STATUS_EXIT.get(decision.status, ExitCode.FATAL)
    if decision.status is not RunStatus.FITTED and decision.reason:
        live.log.error("run.stopped", status=str(decision.status), reason=decision.reason)
    _emit(live, RunFinished(status=str(decision.status), exit_code=int(exit_code), attempt=last,
                            reason=live.redactor.text(decision.reason or "") or None,
                            spent=tuple(spent)))
    data = report.write(live.run_dir, live.state(), pictures=live.draw_later is None)
    if live.draw_later is not None:
        live.draw_later(live.run_dir)
    return RunResult(status=str(decision.status), exit_code=exit_code, run_dir=live.run_dir,
                     final_knobs=final, attempts=live.state().done, report=data)


def _why_not_compared(live: _Live, state: RunState) -> None:
    """The run settles without a comparison: say why, where there was a rival to time."""
    fitted = state.attempts[-1]
    if speed.compared(state) is not None or fitted.started.rung == speed.RUNG:
        return
    why = _audition(live, fitted.knobs)
    if isinstance(why, speed.Alternative):
        _emit(live, speed.not_timed(fitted, why))
    elif why is not None:
        _emit(live, SpeedSkipped(attempt=fitted.number, fitted=speed.describe(fitted.knobs),
                                 reason=why))


def _write_final(live: _Live, state: RunState, final: Knobs) -> None:
    """The working config as a fresh run, and (when there is one) the way to continue this run."""
    start = live.config.start
    fresh = dataclasses.replace(final, resume_from_checkpoint=start.resume_from_checkpoint)
    fitted = state.attempts[-1]
    rendered = render_checked(live.dialect, live.command, fresh, live.run_dir / "final")
    fresh_argv: Sequence[str] = (fitted.started.argv if fresh == fitted.knobs
                                 else live.redactor.argv(rendered.argv))
    output_dir = fresh.output_dir
    with contextlib.suppress(CommandError, OSError, ValueError):
        # Read back from the command as rendered: a rung may have moved it to a sibling folder.
        output_dir = live.dialect.read(rendered).output_dir or output_dir
    files = live.dialect.finalize(live.command, fresh, live.run_dir)
    continue_argv: Sequence[str] = ()
    chosen = checkpoints.choose(state.checkpoints, final,
                                max_steps=_run_steps(state, final)).checkpoint
    # A checkpoint at max_steps has nothing left to train: no continue-command.sh (the report
    # says to raise max_steps instead).
    finished = (chosen is not None and final.max_steps is not None
                and chosen.step >= final.max_steps)
    if chosen is not None and not finished:
        more = dataclasses.replace(final, resume_from_checkpoint=chosen.path)
        continue_argv = live.redactor.argv(
            live.dialect.render(live.command, more, live.run_dir / "continue").argv)
    _emit(live, FinalWritten(files=tuple(str(p.relative_to(live.run_dir)) for p in files),
                             fresh_argv=tuple(fresh_argv), continue_argv=tuple(continue_argv),
                             continue_checkpoint=chosen.path if chosen else None,
                             output_dir=output_dir, env=_env_set(live, rendered)))
