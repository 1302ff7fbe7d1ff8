"""The supervisor loop: run, classify, record, then step down the ladder or return.

It reads like torchelastic's `_invoke_run`: run an attempt, classify its outcome, journal it,
then either step one rung down (OOM), retry the same config (transient, hang), or stop.
`resume` rebuilds the same state from the journal and carries on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any, Protocol

import structlog
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_result,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
)

from supervisor import report, runner
from supervisor.classify import OomKind, Outcome, Verdict, VerdictKind, classify
from supervisor.command import Command, environment, locate
from supervisor.dialects import Dialect
from supervisor.estimate import Prediction, oom_lower_bound_mib
from supervisor.gpu import GpuProbe
from supervisor.journal import Journal, replay
from supervisor.knobs import Knobs
from supervisor.plan import START, next_runnable
from supervisor.policy import Attempt, GiveUp, Ladder, Step, next_step
from supervisor.secrets import Redactor

log = structlog.get_logger(__name__)


class ExitCode(IntEnum):
    """The supervisor's exit status: one code for each way a run can end."""

    FITTED = 0
    USAGE = 2
    EXHAUSTED = 3
    FATAL = 4
    TRANSIENT = 5
    INTERRUPTED = 130


_STATUS_EXIT = {
    "fitted": ExitCode.FITTED, "exhausted": ExitCode.EXHAUSTED, "fatal": ExitCode.FATAL,
    "transient": ExitCode.TRANSIENT, "hang": ExitCode.TRANSIENT,
    "interrupted": ExitCode.INTERRUPTED,
}
_RETRIED = (VerdictKind.TRANSIENT, VerdictKind.HANG)


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
    """Skip only configs predicted over the device outright: one near the edge is tried for
    real, since skipping it moves the run to a rung that costs quality (plan's recommendation
    keeps a 10% margin)."""
    gpu: GpuProbe | None = None

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


@dataclass(frozen=True, slots=True, kw_only=True)
class _Pending:
    """An attempt the journal shows started but not finished (the supervisor died)."""

    number: int
    knobs: Knobs
    rung: str | None
    spawned: runner.Spawned | None
    started_at: float


@dataclass(slots=True, kw_only=True)
class _Run:
    """What one supervised run needs at hand; built fresh or from the journal."""

    command: Command
    dialect: Dialect
    ladder: Ladder
    run_dir: Path
    journal: Journal
    start: Knobs
    env: dict[str, str]
    redactor: Redactor
    run_attempt: runner.RunAttempt
    judge: Callable[[Outcome], Verdict]
    sleep: Callable[[float], object]
    stop: runner.StopRequest
    echo: bool
    budget: int
    started_at: float
    history: list[Attempt] = field(default_factory=list)
    """Attempts that ran, in order."""
    walk: list[Attempt] = field(default_factory=list)
    """What the policy has seen: the attempts plus configs skipped on a prediction (number 0)."""
    memory: Memory = field(default_factory=Memory)
    held: str | None = None
    """Set when an attempt's GPU memory did not come back in time (who holds it)."""
    checkpoints: list[tuple[str, int, Knobs]] = field(default_factory=list)
    """Checkpoints written during this run: (path, step, knobs of the attempt that wrote it)."""
    log: Any = None


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
) -> RunResult:
    """Run the command, walk the ladder on each OOM, end with a report and the working config."""
    run_dir.mkdir(parents=True, exist_ok=True)
    start = dialect.read(command)
    base_env = dict(env) if env is not None else environment(command)
    redactor = Redactor.for_run(command.argv, base_env)
    budget = max_attempts or ladder.max_attempts
    with Journal(run_dir / "journal.jsonl") as journal:
        opened = journal.write(
            "run.started", run_id=run_dir.name, argv=redactor.argv(command.argv),
            cwd=command.cwd, dialect=dialect.describe(command), dialect_name=dialect.name,
            knobs_file=getattr(dialect, "source", None) if dialect.name == "knobmap" else None,
            policy={"name": ladder.name, "source": ladder.source,
                    "rungs": [{"name": r.name, "knob": r.knob, "cost": str(r.cost)}
                              for r in ladder.rungs]},
            knobs=start.to_dict(), effective_batch=start.effective_batch,
            world_size_known=locate(command.argv).world_size_known, max_attempts=budget,
        )
        state = _Run(command=command, dialect=dialect, ladder=ladder, run_dir=run_dir,
                     journal=journal, start=start, env=base_env, redactor=redactor,
                     run_attempt=run_attempt, judge=judge, sleep=sleep,
                     stop=stop or runner.StopRequest(), echo=echo, budget=budget,
                     started_at=float(opened["ts"]), log=log.bind(run_id=run_dir.name),
                     memory=memory or Memory())
        state.log.info("run.started", argv=" ".join(redactor.argv(command.argv)),
                       policy=ladder.name, per_device_batch=start.per_device_batch,
                       grad_accum=start.grad_accum, effective_batch=start.effective_batch)
        _journal_memory(state)
        status, reason, spent, final = _drive(state, first=_first(state))
    return _finish(state, status, reason, spent, final)


def _journal_memory(state: _Run) -> None:
    memory = state.memory
    gpu_note = getattr(memory.gpu, "unavailable", None)
    if gpu_note:
        state.journal.write("gpu.unavailable", reason=gpu_note)
    if memory.predictor is not None or memory.device_mib is not None:
        state.journal.write("estimate.setup", device_mib=memory.device_mib,
                            predictor=memory.predictor is not None, margin=memory.margin)


def _first(state: _Run) -> tuple[Knobs, str | None]:
    """The first config: the command's own, or the first predicted to fit."""
    if not state.memory.can_skip:
        return state.start, None
    candidate, skips = _runnable(state, [])
    if isinstance(candidate, Step):
        return candidate.knobs, None if candidate.rung == START else candidate.rung
    # Everything predicted not to fit: predictions can be wrong, so run the smallest for real.
    last = skips[-1]
    state.walk.pop()
    state.log.warning("estimate.distrusted", reason="every config is predicted not to fit; "
                      "running the smallest to check")
    return last.knobs, last.rung


def resume(  # noqa: PLR0913
    run_dir: Path,
    *,
    dialect_for: Callable[[Command, str | None, str | None], Dialect],
    ladder_for: Callable[[str], Ladder],
    orphan: str = "adopt",
    run_attempt: runner.RunAttempt = runner.run,
    adopt: Callable[[runner.AttemptSpec, runner.Spawned], Outcome] = runner.adopt,
    end_orphan: Callable[[runner.AttemptSpec, runner.Spawned], None] = runner.end_orphan,
    judge: Callable[[Outcome], Verdict] = classify,
    sleep: Callable[[float], object] = time.sleep,
    stop: runner.StopRequest | None = None,
    echo: bool = True,
    env: Mapping[str, str] | None = None,
) -> RunResult:
    """Carry on a run whose supervisor died: adopt or end its running attempt, walk on."""
    path = run_dir / "journal.jsonl"
    if not path.is_file():
        msg = f"{path} does not exist; give the folder of a run (runs/<run-id>)"
        raise ResumeError(msg)
    replayed = replay(path)
    events = list(replayed.events)
    started = next((e for e in events if e["event"] == "run.started"), None)
    if started is None:
        msg = f"{path} has no run.started event; it is not an oom-supervisor journal"
        raise ResumeError(msg)
    finished = next((e for e in events if e["event"] == "run.finished"), None)
    if finished is not None:
        msg = (f"run {run_dir.name} already finished ({finished['status']}); nothing to resume. "
               f"Read {run_dir / 'report.md'} or start a new run")
        raise ResumeError(msg)
    command = Command(argv=tuple(started["argv"]), cwd=started.get("cwd"))
    if any("<redacted:" in a for a in command.argv):
        command = _unredact(command, env if env is not None else environment(command))
    dialect = dialect_for(command, started.get("dialect_name"), started.get("knobs_file"))
    ladder = ladder_for(started["policy"]["source"])
    history, pending, checkpoints = _recover(events)
    base_env = dict(env) if env is not None else environment(command)
    with Journal(path) as journal:
        state = _Run(command=command, dialect=dialect, ladder=ladder, run_dir=run_dir,
                     journal=journal, start=Knobs.from_dict(started["knobs"]), env=base_env,
                     redactor=Redactor.for_run(command.argv, base_env), run_attempt=run_attempt,
                     judge=judge, sleep=sleep, stop=stop or runner.StopRequest(), echo=echo,
                     budget=int(started.get("max_attempts", ladder.max_attempts)),
                     started_at=float(started["ts"]), history=history, walk=list(history),
                     checkpoints=checkpoints,
                     log=log.bind(run_id=run_dir.name))
        journal.write("run.resumed", attempts_done=len(history), torn_line=replayed.torn_line,
                      pending=pending.number if pending else None, orphan=orphan)
        state.log.info("run.resumed", attempts_done=len(history),
                       pending=pending.number if pending else None, orphan=orphan)
        first: tuple[Knobs, str | None] | None = None
        if pending is not None:
            verdict = _settle_orphan(state, pending, orphan, adopt, end_orphan)
            if verdict.kind is VerdictKind.INTERRUPTED:
                first = (pending.knobs, pending.rung)  # ended by us: run that config again
        elif not history:
            first = (state.start, None)
        status, reason, spent, final = _drive(state, first=first)
    return _finish(state, status, reason, spent, final)


def _drive(state: _Run, *, first: tuple[Knobs, str | None] | None,
           ) -> tuple[str, str | None, list[str], Knobs | None]:
    """The loop proper. `first` is a config to run before looking at the history."""
    verdict: Verdict
    knobs: Knobs
    if first is not None:
        knobs, rung = first
        if state.stop.graceful.is_set():
            return "interrupted", "stopped by signal before the first attempt", [], None
        verdict = _attempt_with_retries(state, knobs, rung)
    else:
        knobs, verdict = state.history[-1].knobs, state.history[-1].verdict
        if verdict.kind in _RETRIED:
            verdict = _attempt_with_retries(state, knobs, state.history[-1].rung)
    while True:
        if state.held and state.ladder.on_held_memory == "stop" and \
                verdict.kind is not VerdictKind.FITS:
            held = (f"GPU memory was not released after attempt {len(state.history)} "
                    f"({state.held}); the policy says stop ([gpu] on_held_memory)")
            state.log.error("run.stopped", status="fatal", evidence=held)
            return "fatal", held, [], knobs
        if verdict.kind is VerdictKind.FITS:
            state.log.info("run.fitted", attempt=len(state.history), **_short(knobs))
            return "fitted", None, [], knobs
        if verdict.kind is not VerdictKind.OOM:
            status, reason = str(verdict.kind), verdict.evidence
            if verdict.kind in _RETRIED:
                reason = (f"still failing after {state.ladder.transient_retries} retries "
                          f"on the same config: {reason}")
            state.log.error("run.stopped", status=status, evidence=reason)
            return status, reason, [], knobs
        if len(state.history) >= state.budget:
            reason = (f"the attempt budget of {state.budget} is spent and the last config still "
                      "runs out of memory; raise --max-attempts or start smaller")
            state.journal.write("ladder.exhausted", reason=reason, spent=[], skipped=[])
            state.log.error("ladder.exhausted", reason=reason)
            return "exhausted", reason, [], knobs
        if state.stop.graceful.is_set():
            return "interrupted", "stopped by signal before the next attempt", [], knobs
        step, _ = _runnable(state, state.walk)
        if isinstance(step, GiveUp):
            state.journal.write("ladder.exhausted", reason=step.reason, spent=list(step.spent),
                                skipped=list(step.skipped))
            state.log.error("ladder.exhausted", reason=step.reason)
            return "exhausted", step.reason, list(step.spent), knobs
        new = _with_checkpoint(state, step)
        changed = {k: list(v) for k, v in knobs.diff(new).items()}
        state.journal.write("ladder.stepped", after_attempt=len(state.history),
                            next_attempt=len(state.history) + 1, rung=step.rung, changed=changed,
                            restored=[list(r) for r in step.restored],
                            skipped=list(step.skipped), note=step.note)
        state.log.info("ladder.stepped", rung=step.rung,
                       **{k: v[1] for k, v in changed.items() if k != "resume_from_checkpoint"},
                       restored=[r[0] for r in step.restored] or None,
                       skipped=list(step.skipped) or None, note=step.note)
        knobs = new
        verdict = _attempt_with_retries(state, knobs, step.rung)


def _runnable(state: _Run, walked: list[Attempt]) -> tuple[Step | GiveUp, list[Any]]:
    """The policy's next step, passing over configs predicted not to fit (journaled)."""
    memory = state.memory
    if not memory.can_skip or memory.predictor is None or memory.device_mib is None:
        return next_step(state.start, walked, state.ladder), []
    candidate, skips = next_runnable(state.start, walked, state.ladder,
                                     predict=memory.predictor.predict,
                                     device_mib=memory.device_mib, margin=memory.margin)
    for skip in skips:
        state.walk.append(skip.attempt)
        state.journal.write("rung.skipped", rung=skip.rung, knobs=skip.knobs.to_dict(),
                            changed={k: list(v) for k, v in state.start.diff(skip.knobs).items()},
                            predicted_mib=round(skip.prediction.peak_mib, 1),
                            method=str(skip.prediction.method), reason=skip.reason)
        state.log.info("rung.skipped", rung=skip.rung or "(as given)", reason=skip.reason)
    return candidate, list(skips)


def _attempt_with_retries(state: _Run, knobs: Knobs, rung: str | None) -> Verdict:
    """Transient failures retry the *same* knobs; walking the ladder is policy's job."""

    def before_retry(retry_state: RetryCallState) -> None:
        delay = retry_state.next_action.sleep if retry_state.next_action else 0.0
        state.journal.write("transient.retrying", attempt=len(state.history),
                            delay_s=round(delay, 2))
        state.log.warning("transient.retrying", attempt=len(state.history),
                          delay_s=round(delay, 2))

    def pause(seconds: float) -> None:
        state.sleep(seconds)  # Event.wait in the CLI: a signal cuts the backoff short

    retrying = Retrying(
        retry=retry_if_result(lambda v: v.kind in _RETRIED and len(state.history) < state.budget
                              and not state.stop.graceful.is_set()),
        stop=stop_after_attempt(state.ladder.transient_retries + 1)
        | stop_after_delay(state.ladder.transient_max_delay_s),
        wait=wait_exponential(multiplier=2, min=1, max=60),
        sleep=pause,
        before_sleep=before_retry,
        retry_error_callback=_last_result,
    )
    return retrying(_attempt, state, knobs, rung)


def _last_result(retry_state: RetryCallState) -> Verdict:
    """Out of retries: the last verdict stands (tenacity would raise RetryError instead)."""
    assert retry_state.outcome is not None  # noqa: S101 - tenacity sets it before calling
    verdict: Verdict = retry_state.outcome.result()
    return verdict


def _attempt(state: _Run, knobs: Knobs, rung: str | None) -> Verdict:
    number = len(state.history) + 1
    attempt_dir = state.run_dir / "attempts" / f"{number:02d}"
    rendered = state.dialect.render(state.command, knobs, attempt_dir)
    attempt_dir.mkdir(parents=True, exist_ok=True)
    shown = state.redactor.argv(rendered.argv)
    (attempt_dir / "argv.json").write_text(json.dumps(shown) + "\n", encoding="utf-8")
    changed = {k: list(v) for k, v in state.start.diff(knobs).items()}
    state.journal.write("attempt.started", attempt=number, rung=rung, knobs=knobs.to_dict(),
                        changed=changed, argv=shown,
                        log_dir=str(attempt_dir.relative_to(state.run_dir)))
    alog = state.log.bind(attempt=number)
    alog.info("attempt.started", rung=rung or "(as given)",
              **{k: v[1] for k, v in changed.items() if k != "resume_from_checkpoint"})

    def spawned(proc: runner.Spawned) -> None:
        state.journal.write("attempt.spawned", attempt=number, pid=proc.pid,
                            create_time=proc.create_time)

    began = time.time()
    outcome = state.run_attempt(_spec(state, attempt_dir, rendered,
                                      on_spawn=spawned))
    return _record(state, number, knobs, rung, outcome, began=began)


def _spec(state: _Run, attempt_dir: Path, rendered: Command,
          on_spawn: Callable[[runner.Spawned], None] | None = None) -> runner.AttemptSpec:
    return runner.AttemptSpec(
        argv=rendered.argv, env=state.env, cwd=rendered.cwd, log_dir=attempt_dir,
        stop=state.stop, echo=state.echo, timeout_s=state.ladder.attempt_timeout_s,
        stall_s=state.ladder.stall_timeout_s,
        # Unique across runs (two runs may share a run id in different folders): the tree
        # kill ends every process carrying it.
        marker=str(attempt_dir.resolve()),
        on_spawn=on_spawn, redactor=state.redactor, gpu=_usable(state.memory.gpu),
        release_wait_s=state.ladder.release_wait_s)


def _usable(gpu: GpuProbe | None) -> GpuProbe | None:
    return None if gpu is None or getattr(gpu, "unavailable", None) else gpu


def _record(state: _Run, number: int, knobs: Knobs, rung: str | None,  # noqa: PLR0913
            outcome: Outcome, *, began: float) -> Verdict:
    verdict = state.judge(outcome)
    attempt = Attempt(number=number, knobs=knobs, rung=rung, verdict=verdict)
    state.history.append(attempt)
    state.walk.append(attempt)
    ratio = _calibrate(state, knobs, verdict, outcome)
    if outcome.release is not None and not outcome.release.get("released", True):
        state.held = str(outcome.release.get("describe", "GPU memory still held"))
        state.log.warning("gpu.held", attempt=number, detail=state.held)
    written = _checkpoints(state.command, knobs.output_dir, since=began)
    state.checkpoints.extend((path, step, knobs) for path, step in written)
    evidence = state.redactor.text(verdict.evidence) if verdict.evidence else None
    state.journal.write("attempt.finished", attempt=number, verdict=str(verdict.kind),
                        oom_kind=str(verdict.oom_kind) if verdict.oom_kind else None,
                        evidence=evidence, numbers=_numbers(verdict),
                        exit_code=outcome.exit_code, duration_s=outcome.duration_s,
                        killed_by_supervisor=outcome.killed_by_supervisor,
                        adopted=outcome.adopted, kill_s=outcome.kill_s,
                        peak_live_mib=_peak_from_tail(outcome.tail),
                        trained_steps=_steps_from_tail(outcome.tail),
                        checkpoints=[[path, step] for path, step in written],
                        gpu_peak_mib=outcome.gpu_peak_mib, gpu_release=outcome.release,
                        calibration=ratio)
    state.log.bind(attempt=number).info(
        "attempt.finished", verdict=str(verdict.kind),
        oom_kind=str(verdict.oom_kind) if verdict.oom_kind else None,
        exit_code=outcome.exit_code, duration_s=outcome.duration_s,
        evidence=(evidence or "")[:200])
    return verdict


def _calibrate(state: _Run, knobs: Knobs, verdict: Verdict, outcome: Outcome) -> float | None:
    """Teach the predictor what this attempt really took (a peak, or an OOM's lower bound)."""
    predictor = state.memory.predictor
    if predictor is None:
        return None
    # The trainer's own tensor peak only: NVML's per-process figure also holds the CUDA
    # context (500-900 MiB; measured 934 MiB for a 172 MiB peak on an H200), which would
    # inflate every later prediction.
    measured = _peak_from_tail(outcome.tail)
    if measured and verdict.kind is VerdictKind.FITS:
        return predictor.calibrate(knobs, measured)
    bound = oom_lower_bound_mib(verdict.numbers) if verdict.is_oom else None
    if bound:
        return predictor.calibrate(knobs, bound, lower_bound=True)
    return None


def _settle_orphan(state: _Run, pending: _Pending, orphan: str,
                   adopt: Callable[[runner.AttemptSpec, runner.Spawned], Outcome],
                   end_orphan: Callable[[runner.AttemptSpec, runner.Spawned], None]) -> Verdict:
    """The attempt a dead supervisor left: follow it to its end, or end it and say so."""
    attempt_dir = state.run_dir / "attempts" / f"{pending.number:02d}"
    rendered = state.dialect.render(state.command, pending.knobs, attempt_dir)
    spec = _spec(state, attempt_dir, rendered)
    if orphan == "adopt" and pending.spawned is not None:
        state.log.info("attempt.adopted", attempt=pending.number, pid=pending.spawned.pid)
        return _record(state, pending.number, pending.knobs, pending.rung,
                       adopt(spec, pending.spawned), began=pending.started_at)
    if pending.spawned is not None:
        end_orphan(spec, pending.spawned)
    outcome = Outcome(exit_code=None, duration_s=0.0, interrupted=True,
                      tail=("ended on resume (--orphan end)",))
    return _record(state, pending.number, pending.knobs, pending.rung, outcome,
                   began=pending.started_at)


def _with_checkpoint(state: _Run, step: Step) -> Knobs:
    """Resume from the newest checkpoint the new config can load; say so either way.

    Only checkpoints this run wrote count, each judged against the config of the attempt
    that wrote it (not merely the last one: an earlier attempt may have trained differently).
    """
    new = step.knobs
    alive = [c for c in state.checkpoints if (Path(c[0]) / "trainer_state.json").is_file()]
    if not alive:
        return dataclasses.replace(new, resume_from_checkpoint=state.start.resume_from_checkpoint)
    alive.sort(key=lambda c: c[1])
    compatible = [c for c in alive if _incompatible(c[2], new) is None]
    if not compatible:
        path, steps, producer = alive[-1]
        why_not = _incompatible(producer, new)
        state.journal.write("checkpoint.skipped", attempt=len(state.history) + 1,
                            checkpoint=path, step=steps, reason=why_not)
        state.log.info("checkpoint.skipped", checkpoint=path, reason=why_not)
        return dataclasses.replace(new, resume_from_checkpoint=None)
    path, steps, _ = compatible[-1]
    state.journal.write("checkpoint.resumed", attempt=len(state.history) + 1, checkpoint=path,
                        step=steps)
    state.log.info("checkpoint.resumed", checkpoint=path, step=steps)
    return dataclasses.replace(new, resume_from_checkpoint=path)


_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def _checkpoints(command: Command, output_dir: str | None, *,
                 since: float) -> list[tuple[str, int]]:
    """`output_dir/checkpoint-N` folders (HF Trainer layout) written since `since`.

    Checkpoints older than the attempt belong to some other training: never resume from those.
    """
    if not output_dir:
        return []
    base = Path(output_dir)
    if not base.is_absolute() and command.cwd:
        base = Path(command.cwd) / base
    try:
        entries = list(base.iterdir())
    except OSError:
        return []
    found = []
    for entry in entries:
        match = _CHECKPOINT.match(entry.name)
        state_file = entry / "trainer_state.json"
        with contextlib.suppress(OSError):
            if match and state_file.is_file() and state_file.stat().st_mtime >= since - 1.0:
                found.append((str(entry), int(match.group(1))))
    return sorted(found, key=lambda c: c[1])


def _incompatible(before: Knobs, after: Knobs) -> str | None:
    """Why a checkpoint of `before` cannot seed `after`, or None when it can."""
    if before.finetuning_type != after.finetuning_type:
        return (f"the parameter set changes ({before.finetuning_type} -> "
                f"{after.finetuning_type}): starting fresh")
    if (before.lora_rank, before.freeze_trainable_layers) != (
            after.lora_rank, after.freeze_trainable_layers):
        return "the trainable parameters change (rank or frozen layers): starting fresh"
    if before.effective_batch != after.effective_batch:
        return (f"the effective batch changes ({before.effective_batch} -> "
                f"{after.effective_batch}): the optimizer state and data position would not match")
    return None


def _recover(events: list[dict[str, Any]]
             ) -> tuple[list[Attempt], _Pending | None, list[tuple[str, int, Knobs]]]:
    """History, the unfinished attempt and the run's checkpoints, rebuilt from the journal."""
    started: dict[int, dict[str, Any]] = {}
    spawned: dict[int, runner.Spawned] = {}
    history: list[Attempt] = []
    checkpoints: list[tuple[str, int, Knobs]] = []
    for event in events:
        kind = event["event"]
        if kind == "attempt.started":
            started[event["attempt"]] = event
        elif kind == "attempt.spawned":
            spawned[event["attempt"]] = runner.Spawned(pid=int(event["pid"]),
                                                       create_time=float(event["create_time"]))
        elif kind == "attempt.finished" and event["attempt"] in started:
            begun = started.pop(event["attempt"])
            verdict = Verdict(kind=VerdictKind(event["verdict"]),
                              oom_kind=OomKind(event["oom_kind"]) if event.get("oom_kind")
                              else None, evidence=event.get("evidence"))
            knobs = Knobs.from_dict(begun["knobs"])
            history.append(Attempt(number=event["attempt"], knobs=knobs,
                                   rung=begun.get("rung"), verdict=verdict))
            checkpoints.extend((str(p), int(s), knobs) for p, s in event.get("checkpoints", []))
    pending = None
    if started:
        number = max(started)
        begun = started[number]
        pending = _Pending(number=number, knobs=Knobs.from_dict(begun["knobs"]),
                           rung=begun.get("rung"), spawned=spawned.get(number),
                           started_at=float(begun["ts"]))
    return history, pending, checkpoints


def _unredact(command: Command, env: Mapping[str, str]) -> Command:
    """Put secrets back into a journaled argv from the environment, or say which are missing."""
    words = []
    for word in command.argv:
        restored = word
        for name in re.findall(r"<redacted:([A-Za-z_][A-Za-z0-9_]*)>", word):
            if name not in env:
                msg = (f"the command had a secret that was redacted from the journal; set {name} "
                       "in the environment and run resume again")
                raise ResumeError(msg)
            restored = restored.replace(f"<redacted:{name}>", env[name])
        words.append(restored)
    return dataclasses.replace(command, argv=tuple(words))


def _finish(state: _Run, status: str, reason: str | None, spent: list[str],
            final: Knobs | None) -> RunResult:
    exit_code = _STATUS_EXIT.get(status, ExitCode.FATAL)
    with Journal(state.run_dir / "journal.jsonl") as journal:
        if status == "fitted" and final is not None:
            files = state.dialect.finalize(state.command, final, state.run_dir)
            if files:
                journal.write("final.written",
                              files=[str(p.relative_to(state.run_dir)) for p in files])
        journal.write("run.finished", status=status, exit_code=int(exit_code),
                      attempt=len(state.history), reason=state.redactor.text(reason or "") or None,
                      spent=spent)
    data = report.write(state.run_dir, list(replay(state.run_dir / "journal.jsonl").events))
    return RunResult(status=status, exit_code=exit_code, run_dir=state.run_dir,
                     final_knobs=final if status == "fitted" else None,
                     attempts=len(state.history), report=data)


def _numbers(verdict: Verdict) -> dict[str, float] | None:
    if verdict.numbers is None:
        return None
    return {k: v for k in ("tried_mib", "capacity_mib", "free_mib", "allocated_mib")
            if (v := getattr(verdict.numbers, k)) is not None}


def _short(knobs: Knobs) -> dict[str, Any]:
    return {"per_device_batch": knobs.per_device_batch, "grad_accum": knobs.grad_accum,
            "cutoff_len": knobs.cutoff_len,
            "gradient_checkpointing": knobs.gradient_checkpointing,
            "finetuning_type": str(knobs.finetuning_type)}


_RESULT_PREFIX = "reference-trainer.result "


def _result(tail: tuple[str, ...]) -> dict[str, Any] | None:
    """The reference trainer's result line, when the attempt printed one."""
    for line in reversed(tail):
        if line.startswith(_RESULT_PREFIX):
            try:
                value = json.loads(line[len(_RESULT_PREFIX):])
            except ValueError:
                return None
            return value if isinstance(value, dict) else None
    return None


def _peak_from_tail(tail: tuple[str, ...]) -> float | None:
    value = (_result(tail) or {}).get("peak_live_mib")
    return float(value) if isinstance(value, int | float) else None


def _steps_from_tail(tail: tuple[str, ...]) -> dict[str, int] | None:
    result = _result(tail)
    if result is None:
        return None
    return {"steps": int(result.get("steps", 0)),
            "resumed_from_step": int(result.get("resumed_from_step", 0))}
