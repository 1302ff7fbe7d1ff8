"""Among configs that cost the same quality, settle on the faster: which to compare, and how.

The walk finds a config that fits; a config of the same quality (the same method, rank,
cutoff and effective batch: only the micro-batch / accumulation split and gradient
checkpointing differ) may fit too, and which of the two trains faster is a measurement, not a
rule: checkpointing recomputes the forward pass (~20-30 % more compute) but lets the
micro-batch double, and a larger micro-batch uses the device better. So, once per run:

- `audition`: before an attempt starts, is there a same-quality alternative worth timing? Only
  once the walk has moved off the command's own config (a config the user chose is not
  second-guessed), only an alternative not known to run out of memory (an attempt, or a
  config skipped on its prediction, at that split or a smaller micro-batch), and not one the
  estimator already ranks (predicted over the device). The runner then ends the fitting
  attempt after `steps` timed steps (`[speed] steps`), gracefully;
- `timing`: the trainer's own step times, as the runner's Tracker saw them stream past;
- `compare`: the alternative is timed the same way (an OOM there settles it: keep the
  first), and the lower time per sample wins; the run trains on with the winner from the
  newest checkpoint, as every attempt does.

Pure: fed the journal's typed events, so report, status and resume read the same answer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from supervisor.classify import VerdictKind
from supervisor.events import AttemptRecord, RunState, SpeedCompared, SpeedSkipped
from supervisor.knobs import Knobs
from supervisor.policy import Attempt, CanSet, Ladder, blocked
from supervisor.trainer_output import step_of

RUNG = "speed-compare"
"""The rung name an alternative's timing attempt carries (not a ladder rung: it spends none)."""

_SPLIT = ("per_device_batch", "grad_accum", "gradient_checkpointing")

WORTH = 10
"""A comparison is made only when at least WORTH x `[speed] steps` steps are left to train
(when the command says how many): two restarts and the timed steps must be paid back."""
"""The knobs a same-quality alternative may change: speed only, never what is trained."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Alternative:
    """A same-quality config to time against the one that runs, and why it is a rival."""

    knobs: Knobs
    why: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Timing:
    """One attempt's measured speed: seconds per optimizer step over its timed steps."""

    attempt: int
    step_s: float
    steps: int
    samples_per_step: int

    @property
    def sample_s(self) -> float:
        """Seconds per training sample (what two splits of one effective batch share)."""
        return self.step_s / self.samples_per_step

    @property
    def samples_per_s(self) -> float:
        """Training samples per second."""
        return self.samples_per_step / self.step_s if self.step_s > 0 else 0.0


def describe(knobs: Knobs) -> str:
    """`b2xGA4, checkpointing on`: the split that differs between rivals."""
    ckpt = "on" if knobs.gradient_checkpointing else "off"
    return f"b{knobs.per_device_batch}xGA{knobs.grad_accum}, checkpointing {ckpt}"


def alternative(knobs: Knobs, walk: Sequence[Attempt]) -> Alternative | None:
    """The same-quality rival of `knobs`, or None when there is none worth timing.

    Checkpointing off at micro-batch b: the rival is checkpointing on at 2b (accumulation
    halved); at b or below it would only recompute more, slower without a doubt. Checkpointing
    on at b: the rival is checkpointing off at b/2 (or 1), the memory that checkpointing bought
    spent on not recomputing. A rival already known to run out of memory (it, or the same
    setting at a smaller micro-batch, ran out or was skipped on its prediction) is none.
    """
    batch, accum = knobs.per_device_batch, knobs.grad_accum
    if knobs.gradient_checkpointing:
        if batch > 1 and batch % 2:
            return None
        half = max(1, batch // 2)
        rival = dataclasses.replace(knobs, gradient_checkpointing=False, per_device_batch=half,
                                    grad_accum=accum * (batch // half))
        why = f"no recomputation, at micro-batch {half}"
    else:
        if accum % 2:
            return None
        rival = dataclasses.replace(knobs, gradient_checkpointing=True,
                                    per_device_batch=batch * 2, grad_accum=accum // 2)
        why = "twice the micro-batch, with recomputation"
    if _known_oom(rival, walk):
        return None
    return Alternative(knobs=rival.without_progress(), why=why)


def _same_but_split(a: Knobs, b: Knobs) -> bool:
    """The same config but for the speed split (and the checkpoint it continued from)."""
    def rest(knobs: Knobs) -> dict[str, object]:
        return {k: v for k, v in knobs.without_progress().to_dict().items() if k not in _SPLIT}
    return rest(a) == rest(b)


def _known_oom(rival: Knobs, walk: Sequence[Attempt]) -> bool:
    """A config with the rival's setting at its micro-batch or a smaller one ran out (or was
    skipped on its prediction), or the rival itself was tried already."""
    for seen in walk:
        if not _same_but_split(seen.knobs, rival):
            continue
        if seen.knobs.without_progress() == rival.without_progress():
            return True  # tried (or skipped) already, whatever it came to
        if (seen.verdict.is_oom
                and seen.knobs.gradient_checkpointing == rival.gradient_checkpointing
                and seen.knobs.per_device_batch <= rival.per_device_batch):
            return True
    return False


Predict = Callable[[Knobs], float | None]
"""A config's predicted peak in MiB (None: no prediction)."""


def audition(state: RunState, knobs: Knobs, ladder: Ladder, *,  # noqa: PLR0913 - the run's facts
             can_set: CanSet | None = None,
             predict: Predict | None = None, device_mib: float | None = None,
             ) -> Alternative | str | None:
    """Whether the attempt about to run `knobs` is timed against a rival (and which).

    An Alternative: time this attempt for `ladder.speed_steps` steps, then the rival. A string:
    there is a rival, but no timing is needed or allowed (the reason, journaled if the run
    settles on `knobs`). None: nothing to compare (no rival, the command's own config, or a
    comparison was already made or declined in this run).
    """
    if any(isinstance(e, SpeedCompared | SpeedSkipped) for e in state.events):
        return None
    if knobs.without_progress() == state.config.walk_start.without_progress():
        return None
    rival = alternative(knobs, state.walk)
    if rival is None or blocked(knobs, rival.knobs, can_set) is not None:
        return None
    if not ladder.speed_compare:
        return (f"not compared with {describe(rival.knobs)}: switched off "
                "([speed] compare = false)")
    left = knobs.max_steps - step_of(knobs.resume_from_checkpoint) if knobs.max_steps else None
    if left is not None and left < WORTH * ladder.speed_steps:
        steps = "1 step left to train is" if left == 1 else f"{left} steps left to train are"
        return (f"not compared with {describe(rival.knobs)}: {steps} "
                f"too few to pay for timing two configs (fewer than {WORTH} x "
                f"{ladder.speed_steps})")
    # Only with a device size: a prediction (maybe a trace) that could rank nothing is not made.
    predicted = (predict(rival.knobs) if predict is not None and device_mib is not None
                 else None)
    if predicted is not None and device_mib is not None and predicted > device_mib:
        return (f"the estimator ranks it: {describe(rival.knobs)} is predicted at "
                f"{predicted:.0f} MiB, over the {device_mib:g} MiB device, so "
                f"{describe(knobs)} is the fastest of the two that fits")
    return rival


def timing(record: AttemptRecord) -> Timing | None:
    """Seconds per optimizer step from the trainer's own progress lines (None: not seen).

    The first timed step is where the clock starts: model load, the first step's warm-up and
    a checkpoint's load are not in it.
    """
    finished = record.finished
    samples = (finished.progress or {}).get("samples") if finished is not None else None
    if not samples or len(samples) < 2:  # noqa: PLR2004 - two points make one interval
        return None
    (s0, t0), (s1, t1) = samples[0], samples[-1]
    if s1 <= s0 or t1 <= t0:
        return None
    return Timing(attempt=record.number, step_s=(t1 - t0) / (s1 - s0), steps=int(s1 - s0),
                  samples_per_step=record.knobs.effective_batch)


def compare(first: AttemptRecord, second: AttemptRecord) -> SpeedCompared:
    """The comparison of two timed attempts of the same quality: the lower time per sample
    wins; a rival that ran out of memory, failed or showed no step times leaves the first."""
    mine, theirs = timing(first), timing(second)
    verdict = second.finished.verdict if second.finished is not None else "unfinished"
    if mine is None:
        winner, reason = first, "the first config showed no step times; it is kept"
    elif verdict == str(VerdictKind.OOM):
        winner, reason = first, f"{describe(second.knobs)} ran out of memory"
    elif theirs is None:
        winner, reason = first, (f"{describe(second.knobs)} showed no step times "
                                 f"({verdict}); the first is kept")
    elif theirs.sample_s < mine.sample_s:
        winner, reason = second, (f"{theirs.sample_s * 1000:.1f} ms per sample against "
                                  f"{mine.sample_s * 1000:.1f}")
    else:
        winner, reason = first, (f"{mine.sample_s * 1000:.1f} ms per sample against "
                                 f"{theirs.sample_s * 1000:.1f}")
    timings = (mine, theirs)
    return SpeedCompared(
        attempts=(first.number, second.number),
        configs=(describe(first.knobs), describe(second.knobs)),
        step_s=tuple(round(t.step_s, 4) if t else None for t in timings),
        timed_steps=tuple(t.steps if t else 0 for t in timings),
        samples_per_s=tuple(round(t.samples_per_s, 3) if t else None for t in timings),
        samples_per_step=first.knobs.effective_batch,
        winner=winner.number, reason=reason)


def not_timed(record: AttemptRecord, rival: Alternative) -> SpeedSkipped:
    """The fitting attempt was to be timed but trained to its end first (or showed no steps)."""
    progress = record.finished.progress if record.finished is not None else None
    why = ("the trainer printed no step progress to time" if not progress or
           not progress.get("samples") else "training ended before the timed steps were in")
    return SpeedSkipped(attempt=record.number, fitted=describe(record.knobs),
                        alternative=describe(rival.knobs), reason=f"not compared: {why}")


def winner_knobs(state: RunState, compared: SpeedCompared) -> Knobs:
    """The config the run trains on after a comparison."""
    record = state.attempt(compared.winner)
    if record is None:
        msg = f"speed.compared names attempt {compared.winner}, which the journal does not hold"
        raise ValueError(msg)
    return record.knobs.without_progress()


def compared(state: RunState) -> SpeedCompared | SpeedSkipped | None:
    """The run's one comparison (or the reason none was made), if any."""
    return next((e for e in state.events if isinstance(e, SpeedCompared | SpeedSkipped)), None)
