"""The supervisor loop: run, classify, record, then step down the ladder or return."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

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
from supervisor.classify import Outcome, Verdict, VerdictKind, classify
from supervisor.command import Command, environment, locate
from supervisor.dialects import Dialect
from supervisor.journal import Journal
from supervisor.knobs import Knobs
from supervisor.policy import Attempt, GiveUp, Ladder, next_step

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
    "transient": ExitCode.TRANSIENT, "interrupted": ExitCode.INTERRUPTED,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class RunResult:
    """How a supervised run ended, where its record is, and the config that works (if any)."""

    status: str
    exit_code: ExitCode
    run_dir: Path
    final_knobs: Knobs | None
    attempts: int


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
) -> RunResult:
    """Run the command, walk the ladder on each OOM, end with a report and the working config."""
    run_dir.mkdir(parents=True, exist_ok=True)
    stop = stop or runner.StopRequest()
    budget = max_attempts or ladder.max_attempts
    start = dialect.read(command)
    invocation = locate(command.argv)
    base_env = dict(env) if env is not None else environment(command)
    bound = log.bind(run_id=run_dir.name)
    history: list[Attempt] = []

    with Journal(run_dir / "journal.jsonl") as journal:
        journal.write(
            "run.started", run_id=run_dir.name, argv=list(command.argv), cwd=command.cwd,
            dialect=dialect.describe(command),
            policy={"name": ladder.name, "source": ladder.source,
                    "rungs": [{"name": r.name, "knob": r.knob, "cost": str(r.cost)}
                              for r in ladder.rungs]},
            knobs=start.to_dict(), effective_batch=start.effective_batch,
            world_size_known=invocation.world_size_known, max_attempts=budget,
        )
        bound.info("run.started", argv=" ".join(command.argv), policy=ladder.name,
                   per_device_batch=start.per_device_batch, grad_accum=start.grad_accum,
                   effective_batch=start.effective_batch)

        def attempt_once(knobs: Knobs, rung: str | None) -> Verdict:
            number = len(history) + 1
            attempt_dir = run_dir / "attempts" / f"{number:02d}"
            rendered = dialect.render(command, knobs, attempt_dir)
            attempt_dir.mkdir(parents=True, exist_ok=True)
            (attempt_dir / "argv.json").write_text(json.dumps(list(rendered.argv)) + "\n",
                                                   encoding="utf-8")
            changed = {k: list(v) for k, v in start.diff(knobs).items()}
            journal.write("attempt.started", attempt=number, rung=rung, knobs=knobs.to_dict(),
                          changed=changed, argv=list(rendered.argv),
                          log_dir=str(attempt_dir.relative_to(run_dir)))
            alog = bound.bind(attempt=number)
            alog.info("attempt.started", rung=rung or "(as given)",
                      **{k: v[1] for k, v in changed.items()})
            outcome = run_attempt(runner.AttemptSpec(
                argv=rendered.argv, env=base_env, cwd=rendered.cwd, log_dir=attempt_dir,
                stop=stop, echo=echo))
            verdict = judge(outcome)
            history.append(Attempt(number=number, knobs=knobs, rung=rung, verdict=verdict))
            journal.write("attempt.finished", attempt=number, verdict=str(verdict.kind),
                          oom_kind=str(verdict.oom_kind) if verdict.oom_kind else None,
                          evidence=verdict.evidence,
                          numbers=_numbers(verdict), exit_code=outcome.exit_code,
                          duration_s=outcome.duration_s,
                          killed_by_supervisor=outcome.killed_by_supervisor,
                          peak_live_mib=_peak_from_tail(outcome.tail))
            alog.info("attempt.finished", verdict=str(verdict.kind),
                      oom_kind=str(verdict.oom_kind) if verdict.oom_kind else None,
                      exit_code=outcome.exit_code, duration_s=outcome.duration_s,
                      evidence=(verdict.evidence or "")[:200])
            return verdict

        def before_retry(state: RetryCallState) -> None:
            delay = state.next_action.sleep if state.next_action else 0.0
            journal.write("transient.retrying", attempt=len(history), delay_s=round(delay, 2))
            bound.warning("transient.retrying", attempt=len(history), delay_s=round(delay, 2))

        def attempt_with_retries(knobs: Knobs, rung: str | None) -> Verdict:
            # Transient failures retry the *same* knobs; walking the ladder is policy's job.
            retrying = Retrying(
                retry=retry_if_result(lambda v: v.kind is VerdictKind.TRANSIENT
                                      and len(history) < budget),
                stop=stop_after_attempt(ladder.transient_retries + 1)
                | stop_after_delay(ladder.transient_max_delay_s),
                wait=wait_exponential(multiplier=2, min=1, max=60),
                sleep=_returning_none(sleep),
                before_sleep=before_retry,
                retry_error_callback=lambda state: state.outcome.result(),  # type: ignore[union-attr]
            )
            return retrying(attempt_once, knobs, rung)

        knobs, rung = start, None
        status, reason, spent = "exhausted", None, []
        while True:
            if stop.graceful.is_set():
                status, reason = "interrupted", "stopped by signal before the next attempt"
                break
            verdict = attempt_with_retries(knobs, rung)
            if verdict.kind is VerdictKind.FITS:
                status = "fitted"
                bound.info("run.fitted", attempt=len(history), **_short(knobs))
                break
            if verdict.kind is not VerdictKind.OOM:
                status = str(verdict.kind)
                reason = verdict.evidence
                if verdict.kind is VerdictKind.TRANSIENT:
                    reason = f"still failing after {ladder.transient_retries} retries: {reason}"
                bound.error("run.stopped", status=status, evidence=reason)
                break
            if len(history) >= budget:
                reason = (f"the attempt budget of {budget} is spent and the last config still "
                          "runs out of memory; raise --max-attempts or start smaller")
                bound.error("ladder.exhausted", reason=reason)
                break
            step = next_step(start, history, ladder)
            if isinstance(step, GiveUp):
                reason, spent = step.reason, list(step.spent)
                journal.write("ladder.exhausted", reason=reason, spent=spent,
                              skipped=list(step.skipped))
                bound.error("ladder.exhausted", reason=reason)
                break
            changed = {k: list(v) for k, v in knobs.diff(step.knobs).items()}
            journal.write("ladder.stepped", after_attempt=len(history),
                          next_attempt=len(history) + 1, rung=step.rung, changed=changed,
                          restored=[list(r) for r in step.restored], skipped=list(step.skipped))
            bound.info("ladder.stepped", rung=step.rung,
                       **{k: v[1] for k, v in changed.items()},
                       restored=[r[0] for r in step.restored] or None,
                       skipped=list(step.skipped) or None)
            knobs, rung = step.knobs, step.rung

        exit_code = _STATUS_EXIT.get(status, ExitCode.FATAL)
        if status == "fitted":
            files = dialect.finalize(command, knobs, run_dir)
            if files:
                journal.write("final.written", files=[str(p.relative_to(run_dir)) for p in files])
        journal.write("run.finished", status=status, exit_code=int(exit_code),
                      attempt=len(history), reason=reason, spent=spent)
    events = _read_events(run_dir / "journal.jsonl")
    report.write(run_dir, events)
    return RunResult(status=status, exit_code=exit_code, run_dir=run_dir,
                     final_knobs=knobs if status == "fitted" else None, attempts=len(history))


def _returning_none(sleep: Callable[[float], object]) -> Callable[[float], None]:
    """tenacity wants a sleep that returns None; Event.wait (interruptible) returns a bool."""

    def pause(seconds: float) -> None:
        sleep(seconds)

    return pause


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


def _peak_from_tail(tail: tuple[str, ...]) -> float | None:
    """The reference trainer's own peak, when the attempt printed its result line."""
    for line in reversed(tail):
        if line.startswith(_RESULT_PREFIX):
            try:
                value = json.loads(line[len(_RESULT_PREFIX):]).get("peak_live_mib")
            except (ValueError, AttributeError):
                return None
            return float(value) if isinstance(value, int | float) else None
    return None


def _read_events(path: Path) -> list[dict[str, Any]]:
    from supervisor.journal import replay  # noqa: PLC0415 - keeps the loop's imports to its flow

    return list(replay(path).events)
