"""Progress is the unit of work: how far the training got, when a retry may run, and where the
night's time went.

An attempt is a means; what a night produces is optimizer steps that end up in the final model.
This module reads progress from outside an unmodified command, the way NVIDIA's log-based
`GoodputMeasurement` does (current step from the logs) and Google's `ml-goodput-measurement`
defines the result (goodput = the share of wall time spent on steps that are kept):

- the trainer's own progress lines, timed as they stream past, and the watchdog that learns
  the run's cadence from them, live in `trainer_output` (`Tracker`, `Watchdog`): the runner
  uses them during an attempt, and what they saw is journaled with its end;
- `streak` / `retry_refusal`: retry budgets run per failure streak, from the failures
  themselves; an attempt that made progress starts a new streak.
- `goodput`: the run's wall time split into productive time and badput by cause, derived from
  the journal's typed events only, so `report`, `status` and `resume` agree.

Pure.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from supervisor.classify import FINISHED_THEN_HUNG, VerdictKind
from supervisor.events import (
    AttemptRecord,
    AttemptStarted,
    Event,
    RetryScheduled,
    RunResumed,
    RunState,
    TerminalLost,
)
from supervisor.trainer_output import step_of

_NOISE_S = 0.05
"""Badput causes under this many seconds are left out of report.json."""

RETRIED = frozenset({VerdictKind.TRANSIENT, VerdictKind.HANG, VerdictKind.LOST})
"""Verdicts that run the same config again (from the newest checkpoint)."""
_COUNTED = frozenset({VerdictKind.TRANSIENT, VerdictKind.HANG})
"""Verdicts that use up the retry budget (a lost attempt is nothing the command did)."""


# --- retry budgets per failure streak -------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class Streak:
    """The failures since the last attempt that made progress (or ran a new config)."""

    failures: int = 0
    """Failures that count against the retry budget (transient, hang)."""
    lost: int = 0
    """Attempts lost with their wrapper (never counted against the budget)."""
    since: float | None = None
    """When the window opened: the end of the streak's first failure."""
    running_s: float = 0.0
    """How long the streak's later attempts ran: their own time is bounded by the watchdog
    and the retry count, not by the window."""
    down_s: float = 0.0
    """How long, since the streak's first failure and outside its later attempts, the
    supervisor was down (dead until `resume`, or in a backoff its own death cut short): nobody
    was there to retry, so that time is not time between attempts."""


def last_step(record: AttemptRecord) -> int:
    """The highest step an attempt is known to have reached (0 when none)."""
    finished = record.finished
    if finished is None:
        return 0
    steps = [step_of(record.knobs.resume_from_checkpoint)]
    if finished.progress:
        steps.append(int(finished.progress.get("step") or 0))
    if finished.trained_steps:
        steps.append(int(finished.trained_steps.get("steps", 0)))
    steps += [int(s) for _, s in finished.checkpoints]
    return max(steps)


def _progressed(record: AttemptRecord, before: int) -> bool:
    finished = record.finished
    return bool(finished and finished.checkpoints) or last_step(record) > before


def streak(attempts: Sequence[AttemptRecord], events: Sequence[Event] = ()) -> Streak:
    """The current failure streak: the retried failures at the end of the run's attempts.

    The streak ends (going back) at an attempt that did not fail this way, at a different
    config, or at a failure that made progress (wrote a checkpoint, or trained past the
    failure before it): that one opens the streak. `events` (the journal's) tell when the
    supervisor was down, which the streak's window leaves out.
    """
    done = [a for a in attempts if a.finished is not None]
    members: list[AttemptRecord] = []
    for record in reversed(done):
        assert record.finished is not None  # noqa: S101 - filtered above
        if VerdictKind(record.finished.verdict) not in RETRIED:
            break
        if members and _same_config(members[-1], record) is False:
            break
        members.append(record)
    # Progress splits the streak: only failures after the last one that made progress count.
    streak_start = len(members)
    for i in range(len(members) - 1, -1, -1):
        older = members[i + 1] if i + 1 < len(members) else None
        before = last_step(older) if older is not None else 0
        if older is not None and _progressed(members[i], before):
            streak_start = i + 1
    current = members[:streak_start] if streak_start < len(members) else members
    if not current:
        return Streak()
    first = current[-1].finished
    assert first is not None  # noqa: S101
    counted = sum(1 for r in current
                  if r.finished and VerdictKind(r.finished.verdict) in _COUNTED)
    spans = [(r.started.ts, r.finished.ended_at or r.finished.ts)
             for r in current[:-1] if r.finished is not None]
    running = sum(max(0.0, b - a) for a, b in spans)
    since = first.ended_at or first.ts
    down = _covered([*spans, *down_spans(events)], since) - _covered(spans, since)
    return Streak(failures=counted, lost=len(current) - counted, since=since,
                  running_s=running, down_s=down)


def down_spans(events: Sequence[Event]) -> list[tuple[float, float]]:
    """When the supervisor was down: from when each one before a `resume` was last alive
    (its heartbeat, else its last event) until the resume. A backoff its death cut short
    (a retry scheduled with no attempt started before the resume) is down from its start:
    no retry was coming."""
    out: list[tuple[float, float]] = []
    backoff: float | None = None
    for i, event in enumerate(events):
        if isinstance(event, RetryScheduled):
            backoff = event.ts
        elif isinstance(event, AttemptStarted):
            backoff = None
        elif isinstance(event, RunResumed) and i > 0:
            gone = _gone_at(events, i)
            out.append((min(gone, backoff) if backoff is not None else gone, event.ts))
            backoff = None
    return out


def _covered(spans: Iterable[tuple[float, float]], after: float) -> float:
    """Seconds after `after` that the union of `spans` covers."""
    total, reach = 0.0, after
    for a, b in sorted(spans):
        start = max(a, reach)
        if b > start:
            total += b - start
            reach = b
    return total


def _same_config(a: AttemptRecord, b: AttemptRecord) -> bool:
    return a.knobs.without_progress() == b.knobs.without_progress()


def retry_refusal(current: Streak, *, retries: int, window_s: float, now: float,
                  lost: bool = False) -> str | None:
    """Why the streak may not be retried again (None: it may)."""
    if lost:
        return None  # a lost attempt is re-run; the attempt budget still bounds the run
    if current.failures > retries:
        return f"still failing after {retries} retries on the same config"
    waited = (now - current.since - current.running_s - current.down_s
              if current.since is not None else 0.0)
    if window_s and waited > window_s:
        down = (f", not counting {current.down_s:.0f} s the supervisor was down"
                if current.down_s >= 1 else "")
        return (f"still failing after {current.failures - 1} retries and {waited:.0f} s between "
                f"attempts since the first failure of this streak{down} (the window is "
                f"{window_s:g} s)")
    return None


# --- goodput --------------------------------------------------------------------------------

CAUSES: Mapping[str, str] = {
    "startup": "start-up, model load and save",
    "oom": "out-of-memory attempts",
    "retrained": "steps trained but not kept",
    "hang": "hang detection",
    "failed": "failed and lost attempts",
    "backoff": "retry backoff",
    "gpu_wait": "waiting for GPU memory",
    "down": "supervisor down",
    "interrupted": "interrupted attempts",
    "prediction": "memory prediction before attempt 1",
    "compared": "speed comparison (ending and restarting timed attempts)",
    "supervisor": "supervisor (probe, prediction, reports)",
    "running": "the attempt running now (counted when it ends)",
}
"""Badput causes, in the order the report lists them."""

_TAIL_CAUSE = {"fits": "startup", "oom": "oom", "hang": "hang", "transient": "failed",
               "fatal": "failed", "lost": "failed", "interrupted": "interrupted",
               "no_data": "oom", "timed": "compared", "checkpoint_unusable": "failed"}


@dataclass(frozen=True, slots=True, kw_only=True)
class AttemptTime:
    """Where one attempt's time went."""

    number: int
    verdict: str
    start: float
    end: float
    resumed_from: int
    reached: int
    kept: int
    step_s: float | None
    productive_s: float
    badput: Mapping[str, float]


@dataclass(frozen=True, slots=True, kw_only=True)
class Accident:
    """Something that cost the night time, with what it cost."""

    at: float
    what: str
    cost_s: float
    steps_lost: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Goodput:
    """The run's wall time: productive (steps kept in the final model) and badput by cause."""

    wall_s: float
    productive_s: float
    badput: Mapping[str, float]
    steps_trained: int
    steps_kept: int
    measured: bool
    """False when some attempt showed no step progress (its time is counted whole)."""
    provisional: bool
    """True while no attempt has fitted: 'kept' is what the newest checkpoint holds."""
    attempts: tuple[AttemptTime, ...] = ()
    accidents: tuple[Accident, ...] = field(default_factory=tuple)
    begin: float = 0.0
    """When the run's wall time began (the predictions before run.started included)."""

    @property
    def share(self) -> float:
        """Goodput as a fraction of wall time."""
        return self.productive_s / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def steps_retrained(self) -> int:
        """Steps trained more than once (or trained and thrown away)."""
        return max(0, self.steps_trained - self.steps_kept)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (report.json)."""
        return {
            "goodput": round(self.share, 4), "wall_s": round(self.wall_s, 1),
            "productive_s": round(self.productive_s, 1),
            "badput_s": {k: round(v, 1) for k, v in self.badput.items() if v > _NOISE_S},
            "steps": {"trained": self.steps_trained, "kept": self.steps_kept,
                      "retrained": self.steps_retrained},
            "measured": self.measured, "provisional": self.provisional,
            "accidents": [{"at": round(a.at, 2), "what": a.what, "cost_s": round(a.cost_s, 1),
                           "steps_lost": a.steps_lost} for a in self.accidents],
            # In time order, from the run's beginning: what goodput.png draws lane by lane.
            "attempts": [{"attempt": a.number, "verdict": a.verdict,
                          "start_s": round(a.start - self.begin, 2),
                          "end_s": round(a.end - self.begin, 2),
                          "productive_s": round(a.productive_s, 2),
                          "badput_s": {k: round(v, 2) for k, v in a.badput.items() if v > 0}}
                         for a in self.attempts],
        }


def _samples(record: AttemptRecord) -> list[tuple[int, float]]:
    """(step, wall time) points an attempt is known to have passed."""
    finished = record.finished
    out: list[tuple[int, float]] = []
    if finished is None:
        return out
    if finished.progress:
        out += [(int(s), float(t)) for s, t in finished.progress.get("samples") or ()]
    out += [(int(s), float(t)) for s, t in finished.checkpoint_times]
    return sorted(set(out))


def _lineage(state: RunState) -> tuple[dict[int, int], bool]:
    """attempt number -> the highest of its steps kept in the final model (or the newest
    checkpoint, while nothing has fitted), and whether that is provisional."""
    by_path = {c.path: c for c in state.checkpoints}
    records = {a.number: a for a in state.attempts}
    fitted = [a for a in state.attempts
              if a.finished is not None and a.finished.verdict == "fits"]
    kept: dict[int, int] = {}
    provisional = not fitted
    if fitted:
        head: tuple[int, int] | None = (fitted[-1].number, last_step(fitted[-1]))
    elif state.checkpoints:
        newest = max(state.checkpoints, key=lambda c: (c.step, c.attempt))
        head = (newest.attempt, newest.step)
    else:
        head = None
    while head is not None and head[0] not in kept:
        number, upto = head
        kept[number] = upto
        record = records.get(number)
        source = by_path.get(record.knobs.resume_from_checkpoint or "") if record else None
        head = (source.attempt, source.step) if source is not None else None
    return kept, provisional


def goodput(state: RunState, *, now: float | None = None) -> Goodput:
    """Where the run's wall time went, from its journal alone."""
    end = state.finished.ts if state.finished else (now if now is not None else state.last_ts)
    # The estimator's predictions ran before run.started: the run's wall time begins there.
    predicted = state.config.estimate_s or 0.0
    begin = state.started_at - predicted
    # ...and before them the supervisor's own start (imports, the --help probe): its clock.
    launched = state.config.process_started_at
    if launched is not None and launched < begin:
        begin = launched
    kept_upto, provisional = _lineage(state)
    intervals: list[tuple[float, float, str, int]] = []
    """(start, end, cause, priority): the highest priority covering a moment names it."""
    attempts: list[AttemptTime] = []
    measured = True
    trained = kept_total = 0
    accidents: list[Accident] = []
    for record in state.attempts:
        start = record.started.ts
        if record.finished is None:
            finish = end
            verdict = "running"
        else:
            finish = min(record.finished.ended_at or record.finished.ts, record.finished.ts)
            verdict = record.finished.verdict
        finish = max(start, min(finish, end))
        resumed = step_of(record.knobs.resume_from_checkpoint)
        reached = max(last_step(record), resumed)
        hung_on_exit = verdict == "fits" and record.finished is not None and (
            record.finished.evidence or "").startswith(FINISHED_THEN_HUNG)
        samples = [s for s in _samples(record) if start <= s[1] <= finish + 1.0]
        keep_to = kept_upto.get(record.number)
        kept = max(0, min(reached, keep_to) - resumed) if keep_to is not None else 0
        steps = max(0, reached - resumed)
        trained += steps
        kept_total += kept
        step_s: float | None = None
        parts: dict[str, float] = {}
        productive = 0.0
        if steps and samples:
            (s0, t0), (s1, t1) = samples[0], samples[-1]
            step_s = (t1 - t0) / (s1 - s0) if s1 > s0 else (t1 - start) / max(1, s1 - resumed)
            begin_training = max(start, t0 - (s0 - resumed) * step_s)
            end_training = min(finish, max(t1, begin_training))
            span = end_training - begin_training
            productive = span * (kept / steps) if steps else 0.0
            # A fit that hung on its way out: the wait for the watchdog is the hang's.
            tail = "hang" if hung_on_exit else _TAIL_CAUSE.get(verdict, "failed")
            parts["startup"] = begin_training - start
            parts["retrained"] = span - productive
            parts[tail] = parts.get(tail, 0.0) + finish - end_training
            intervals += [(start, begin_training, "startup", 3),
                          (begin_training, end_training, "train", 3),
                          (end_training, finish, tail, 3)]
        elif verdict == "running":
            intervals.append((start, finish, "running", 3))
            parts["running"] = finish - start
        elif verdict == "fits":
            measured = False
            productive = finish - start
            intervals.append((start, finish, "train", 3))
            parts["train"] = finish - start
        else:
            cause = _TAIL_CAUSE.get(verdict, "failed")
            intervals.append((start, finish, cause, 3))
            parts[cause] = finish - start
        if record.finished is not None and record.finished.gpu_release:
            waited = float(record.finished.gpu_release.get("waited_s") or 0.0)
            intervals.append((finish, finish + waited, "gpu_wait", 2))
        attempts.append(AttemptTime(number=record.number, verdict=verdict, start=start,
                                    end=finish, resumed_from=resumed, reached=reached, kept=kept,
                                    step_s=step_s, productive_s=productive,
                                    badput={k: v for k, v in parts.items() if k != "train"}))
        if hung_on_exit:
            accidents.append(Accident(
                at=finish, what=f"attempt {record.number} trained to the end, then did not exit",
                cost_s=parts.get("hang", 0.0), steps_lost=0))
        if verdict not in ("fits", "running"):
            lost_steps = steps - kept
            accidents.append(Accident(
                at=finish, what=_describe(record, verdict, resumed, reached),
                cost_s=sum(v for k, v in parts.items() if k != "train"),
                steps_lost=lost_steps))
    if predicted:
        intervals.append((state.started_at - predicted, state.started_at, "prediction", 1))
    events = state.events
    for i, event in enumerate(events):
        if isinstance(event, RetryScheduled):
            intervals.append((event.ts, event.ts + event.delay_s, "backoff", 2))
        elif isinstance(event, RunResumed) and i > 0:
            intervals.append((_gone_at(events, i), event.ts, "down", 1))
    badput = _sweep(intervals, begin, end)
    productive = sum(a.productive_s for a in attempts)
    badput["retrained"] = badput.pop("train", 0.0) - productive
    badput = {k: max(0.0, badput.get(k, 0.0)) for k in CAUSES}
    accidents += _supervisor_accidents(events, state)
    accidents.sort(key=lambda a: a.at)
    return Goodput(wall_s=max(0.0, end - begin), productive_s=productive, badput=badput,
                   steps_trained=trained, steps_kept=kept_total, measured=measured,
                   provisional=provisional, attempts=tuple(attempts),
                   accidents=tuple(accidents), begin=begin)


def _sweep(intervals: Iterable[tuple[float, float, str, int]], begin: float,
           end: float) -> dict[str, float]:
    """Seconds of [begin, end] under each cause: the highest priority wins, priority 3 over 2
    over 1; what nothing covers is the supervisor's own time."""
    spans = [(max(begin, a), min(end, b), cause, prio) for a, b, cause, prio in intervals
             if min(end, b) > max(begin, a)]
    points = sorted({begin, end, *(a for a, _, _, _ in spans), *(b for _, b, _, _ in spans)})
    totals: dict[str, float] = {}
    for a, b in itertools.pairwise(points):
        mid = (a + b) / 2
        covering = [(prio, cause) for s, e, cause, prio in spans if s <= mid < e]
        cause = max(covering)[1] if covering else "supervisor"
        totals[cause] = totals.get(cause, 0.0) + (b - a)
    return totals


def _gone_at(events: Sequence[Event], i: int) -> float:
    """When the supervisor before the resume at `events[i]` was last alive: its heartbeat,
    else its last journaled event."""
    resumed = events[i]
    last_event = events[i - 1].ts
    alive = resumed.last_alive if isinstance(resumed, RunResumed) else None
    return max(last_event, min(alive, resumed.ts)) if alive else last_event


def _describe(record: AttemptRecord, verdict: str, resumed: int, reached: int) -> str:
    what = {"oom": "out of memory", "hang": "hung", "transient": "transient failure",
            "lost": "lost (its wrapper died)", "fatal": "failed",
            "interrupted": "interrupted", "no_data": "no data left",
            "timed": "ended for a speed comparison",
            "checkpoint_unusable": "could not load its checkpoint"}.get(verdict, verdict)
    where = f"at step {reached}" if reached > resumed else (
        "before its first step" if not resumed else f"before passing step {resumed}")
    return f"attempt {record.number} {what} {where}"


def _supervisor_accidents(events: Sequence[Event], state: RunState) -> list[Accident]:
    out: list[Accident] = []
    for i, event in enumerate(events):
        if isinstance(event, TerminalLost):
            out.append(Accident(at=event.ts, what=(
                f"the terminal was lost (SIGHUP); supervising went on, output to "
                f"{Path(event.output_to).name}"), cost_s=0.0))
        elif isinstance(event, RunResumed) and i > 0:
            gap = event.ts - _gone_at(events, i)
            adopted = ""
            if event.pending is not None:
                record = state.attempt(event.pending)
                if record is not None and record.finished is not None:
                    adopted = (f"; attempt {event.pending} was "
                               f"{'adopted' if record.finished.adopted else 'settled'} "
                               f"({record.finished.verdict}, "
                               f"{record.finished.duration_s:.0f} s from its own start)")
            out.append(Accident(at=event.ts, what=(
                f"the supervisor was gone {gap:.0f} s until `resume`{adopted}"), cost_s=0.0))
        elif isinstance(event, RetryScheduled):
            source = f" from {Path(event.checkpoint).name}" if event.checkpoint else " fresh"
            out.append(Accident(at=event.ts, what=(
                f"retry {event.retry} of attempt {event.attempt}'s config after "
                f"{event.delay_s:g} s backoff,{source}"), cost_s=event.delay_s))
    return out


def describe_share(share: float) -> str:
    """`87.3 %`."""
    return f"{100 * share:.1f} %"
