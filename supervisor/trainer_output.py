"""What an attempt's own output says about it: its measured peak, how far it trained, and when.

Read from the tail of the output after the attempt: the bundled reference trainer's result
line (`reference-trainer.result {...}`), and the line the injected `--device-memory` code
prints at exit for ANY Python trainer (`oom-supervisor.peak {...}`, see device_memory.py).

Read while the attempt streams (`Tracker`): the trainer's own progress lines (tqdm's `n/N [`
frame of the Hugging Face Trainer's bar, LLaMA-Factory's `current_steps`/`total_steps`, an HF
log dict such as `{'loss': ...}` as a sign that training began), timed by wall clock, with the
longest silence the trainer has shown since training began: its cadence, which the `Watchdog`
turns into the silence that counts as a hang.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supervisor import bounds, device_memory
from supervisor.files import read_regular

# tqdm's frame: "  40%|████      | 96/240 [03:10<04:45,  1.98s/it]". Only bars without a
# description (the Trainer's training bar has none; "Writing model shards: 1/1 [" has one).
_TQDM = re.compile(rb"(?:^|[\r\n])[ \t]*\d{1,3}%\|[^|\r\n]{0,400}\|[ \t]*(\d+)/(\d+) \[")
# Any tqdm/rich-style frame's counter ("Evaluating:  40%|████   | 4/10 ["), and how a chunk
# splits into frames (tqdm redraws with \r).
_COUNTER = re.compile(rb"\|[ \t]*(\d+)/(\d+)[ \t]*\[")
_PIECES = re.compile(rb"[\r\n]")
_MAX_BARS = 64
_SHORT = 256
_SHORT_PHASE = 4096
# An evaluation's metrics (HF: {'eval_loss': ...}) and a save's own lines and bars.
_PHASE_MARKS = (b"'eval_", b'"eval_', b"Writing model shards", b"Saving model checkpoint",
                b"Saving checkpoint")


def _is_tail(text: bytes) -> bool:
    """The end of a progress frame torn from its head (`05<00:35, 1.0it/s]`)."""
    return text.endswith(b"]") and b"<" in text and b"\n" not in text


# LLaMA-Factory's LogCallback line: {'current_steps': 12, 'total_steps': 240, ...}
_LF_STEPS = re.compile(rb"""['"]current_steps['"]:\s*(\d+),\s*['"]total_steps['"]:\s*(\d+)""")
# An HF Trainer log dict: training has begun even where no step number is printed.
_LOG_DICT = (b"{'loss':", b'{"loss":', b"'train_runtime':", b'"train_runtime":')
# The epoch an HF Trainer log dict of a training step reports ({'loss': ..., 'epoch': '0.2958'}
# through ProgressCallback, a float through PrinterCallback when the bar is off): with the
# steps per epoch a checkpoint's log_history shows, the step a trainer without a bar reached.
_LOSS_EPOCH = re.compile(
    rb"""\{['"]loss['"]:[^{}\n]{0,600}?['"]epoch['"]:\s*['"]?([0-9]+(?:\.[0-9]+)?)""")

CHECKPOINT_NAME = re.compile(r"^checkpoint-([1-9][0-9]*)$")
"""A Hugging Face Trainer checkpoint folder's name; N is the global step it holds: a positive
number in ASCII digits without leading zeros, and nothing else (`checkpoint-0007` and
`checkpoint-7.bak` are not checkpoints of this run)."""


def step_of(path: str | None) -> int:
    """The step number in a `checkpoint-N` path (0 when it is none)."""
    match = CHECKPOINT_NAME.match(Path(path).name) if path else None
    return int(match.group(1)) if match else 0


_RESULT_PREFIX = "reference-trainer.result "


@dataclass(frozen=True, slots=True, kw_only=True)
class Measured:
    """What the attempt's output reported of itself (None where it said nothing)."""

    peak_mib: float | None = None
    peak_source: str | None = None
    """`reference trainer` or `injected (cpu|cuda)`."""
    steps: int | None = None
    resumed_from_step: int | None = None
    announced: bool = False
    """The injected --device-memory code said it was active in this attempt."""
    cost: dict[str, float] | None = None
    """What the trainer measured of its own run (runtime_s, samples_per_s, steps_per_s, loss):
    the HF Trainer's final metrics line, or LLaMA-Factory's all_results.json."""


def _result(tail: Sequence[str]) -> dict[str, Any] | None:
    """The reference trainer's result line, when the attempt printed one."""
    for line in reversed(tail):
        if line.startswith(_RESULT_PREFIX):
            try:
                value = json.loads(line[len(_RESULT_PREFIX):])
            except (ValueError, RecursionError):
                return None
            return value if isinstance(value, dict) else None
    return None


_METRICS = {"train_runtime": "runtime_s", "train_samples_per_second": "samples_per_s",
            "train_steps_per_second": "steps_per_s", "train_loss": "loss"}
# The HF Trainer's last log line: {'train_runtime': '2.807', 'train_samples_per_second': ...}
# (numbers or, since transformers 5, strings); LLaMA-Factory prints the same keys.
_METRIC = re.compile(r"""['"](train_runtime|train_samples_per_second|train_steps_per_second|"""
                     r"""train_loss)['"]\s*:\s*['"]?([0-9.eE+-]+)""")


def _metrics(tail: Sequence[str]) -> dict[str, float] | None:
    """The trainer's own final metrics (the last line that reports train_runtime)."""
    for line in reversed(tail):
        if "train_runtime" not in line:
            continue
        found: dict[str, float] = {}
        for key, value in _METRIC.findall(line):
            # `train_runtime: 1e999`, a 400-digit rate: ignored, never a number of the report
            number = bounds.finite(value, low=-bounds.MAX_SECONDS, high=bounds.MAX_SECONDS)
            if number is not None:
                found[_METRICS[key]] = number
        return found or None
    return None


_HEAD_BYTES = 256 * 1024


def _head(log_dir: Path | None) -> list[str]:
    """The first lines of the attempt's logs: the injected code announces itself there, long
    before a long run's tail."""
    if log_dir is None:
        return []
    lines: list[str] = []
    for name in ("stderr.log", "stdout.log"):
        with contextlib.suppress(OSError):  # never through a link planted in the run folder
            lines += read_regular(log_dir / name, _HEAD_BYTES).decode(
                "utf-8", errors="replace").splitlines()
    return lines


def measure(tail: Sequence[str], log_dir: Path | None = None) -> Measured:
    """Read the attempt's own reports out of its output tail (and the head of its logs)."""
    result = _result(tail) or {}
    injected = device_memory.read_inject_lines([*_head(log_dir), *tail])
    peak: float | None = None
    source: str | None = None
    value = result.get("peak_live_mib")
    if isinstance(value, int | float) and bounds.sane_mib(value) is not None:
        peak, source = float(value), "reference trainer"
    elif injected.peak_mib is not None:
        peak, source = float(injected.peak_mib), f"injected ({injected.device or 'cpu'})"
    cost = _metrics(tail)
    return Measured(
        cost=cost,
        peak_mib=peak, peak_source=source,
        steps=bounds.count(result.get("steps")) if isinstance(result.get("steps"), int)
        else None,
        resumed_from_step=bounds.count(result.get("resumed_from_step"))
        if isinstance(result.get("resumed_from_step"), int) else None,
        announced=injected.announced,
    )


# --- the trainer's own progress, as it streams ----------------------------------------------

class Tracker:
    """Steps the trainer reports, with the wall time each was seen at, and its cadence.

    Fed every chunk of output by the runner's followers (two threads: stdout, stderr). A chunk
    read from a log file that was written before this supervisor followed it (`timed=False`,
    after a `resume`) tells how far the trainer got, but not when: it sets no time and no gap.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.lock = threading.Lock()
        self.total: int | None = None
        self.first: tuple[int, float] | None = None
        """The first step seen completed while timed: (step, wall time)."""
        self.last: tuple[int, float] | None = None
        self.step: int | None = None
        """The highest step seen, timed or not."""
        self.began = False
        """Training has begun (a step, or a log dict)."""
        self.timed_steps = 0
        """Distinct steps seen while timed: two or more show the trainer's cadence."""
        self.began_at: float | None = None
        self.last_output: float | None = None
        self.longest_gap_s = 0.0
        """The longest silence between two outputs since training began (its cadence), a
        silence that ran into or out of an evaluation or a save left out."""
        self.longest_phase_s = 0.0
        """The longest silence that ran into or out of an evaluation or a save."""
        self.in_phase = False
        """The last output that moved was an evaluation's or a save's (its bar, its metrics):
        the silence after it gets the phase's own allowance, not the steps' cadence."""
        self.bar_moved: bytes | None = None
        """The key of the bar whose counter the last chunk moved (None: no bar moved)."""
        self.counters: dict[bytes, bytes] = {}
        """Each progress bar's last counter, by its description and total: a frame whose
        counter did not move is a redraw, not progress."""
        self.ended = False
        """The trainer said its training loop is over (the last step, or its final metrics):
        saving the model and exiting are not steps, and may be silent for long."""
        self.finished = False
        """The trainer printed its final metrics (`train_runtime`, the HF Trainer's last word
        of `train()`, after its final checkpoint): the training itself is done."""
        self.epochs: list[list[float | None]] = []
        """[epoch, wall time] of the first and the last training-step log dict seen."""

    def feed(self, chunk: bytes, *, timed: bool = True, at: float | None = None) -> bool:
        """One chunk of output (any stream). True when it is progress: anything but a progress
        frame redrawn with a counter that did not move (a frozen bar is silence)."""
        now = (at if at is not None else self.clock()) if timed else None
        bar = b"%|" in chunk
        found = _last_step(chunk, bar=bar)
        with self.lock:
            # A step that advances is progress at once (a flood of frames stays cheap).
            if (found is not None and (self.step is None or found[0] > self.step)
                    and (self.total is None or found[1] == self.total)):
                moved = True
                # The training bar has no description: its key is its total alone.
                self.counters[b"/%d" % found[1]] = b"%d" % found[0]
            else:
                moved = self._moved(chunk, bar=bar)
            if now is not None and moved:
                phase = self._is_phase(chunk, found)
                if self.began and self.last_output is not None:
                    gap = now - self.last_output
                    if phase or self.in_phase or self.ended:
                        # After the last step, a gap is the final save's or an upload's:
                        # not the steps' cadence.
                        self.longest_phase_s = max(self.longest_phase_s, gap)
                    else:
                        self.longest_gap_s = max(self.longest_gap_s, gap)
                self.last_output = now
                self.in_phase = phase
            if found is not None:
                step, total = found
                if self.total is None or total == self.total:
                    self.total = total
                    self._at_step(step, now)
            elif any(mark in chunk for mark in _LOG_DICT):
                self._began(now)
            for match in _LOSS_EPOCH.finditer(chunk) if b"epoch" in chunk else ():
                seen: list[float | None] = [float(match.group(1)), now]
                self.epochs = [self.epochs[0], seen] if self.epochs else [seen]
            if b"train_runtime" in chunk:
                self.ended = self.finished = True
            elif self.finished and (b"{'loss':" in chunk or b'{"loss":' in chunk):
                self.finished = False  # a training step after it: a second training began
            elif self.total and self.step == self.total:
                self.ended = True
        return moved

    def _is_phase(self, chunk: bytes, found: tuple[int, int] | None) -> bool:
        """An evaluation's or a save's output: its metrics, or a bar that is not the training
        bar's (an evaluation's bar, `Writing model shards`). Short chunks only: such output is
        a line or a frame, and a flood must not pay for the search."""
        if len(chunk) >= _SHORT_PHASE or (found is not None and found[1] == self.total):
            return False
        if any(mark in chunk for mark in _PHASE_MARKS):
            return True
        return self.total is not None and self.bar_moved is not None \
            and self.bar_moved != b"/%d" % self.total

    def _moved(self, chunk: bytes, *, bar: bool) -> bool:
        """Whether a chunk says something new. Cheap for chunks with no bar in them."""
        self.bar_moved = None
        if not bar:
            # A bare `\r` or newline (a redraw's carriage return, written on its own) says
            # nothing new; a torn frame's tail neither.
            return not (len(chunk) < _SHORT and (not chunk.strip() or _is_tail(chunk.strip())))
        moved = False
        for piece in _PIECES.split(chunk):
            text = piece.strip()
            if not text:
                continue
            if b"%|" not in text:
                if not _is_tail(text):
                    return True
                continue
            counter = _COUNTER.search(text)
            if counter is None:
                continue  # the head of a torn frame
            key = text[:text.index(b"%|")].rstrip(b"0123456789 \t")[-80:] + b"/" + counter[2]
            if self.counters.get(key) != counter[1]:
                if len(self.counters) < _MAX_BARS or key in self.counters:
                    self.counters[key] = counter[1]
                moved = True
                self.bar_moved = key
        return moved

    def _at_step(self, step: int, now: float | None) -> None:
        if step > 0:
            self._began(now)
        if self.step is not None and step <= self.step:
            return
        self.step = step
        if now is None or step == 0:
            return
        if self.first is None:
            self.first = (step, now)
        self.last = (step, now)
        self.timed_steps += 1

    def _began(self, now: float | None) -> None:
        if not self.began:
            self.began = True
            self.began_at = now

    @property
    def cadence_known(self) -> bool:
        """At least one whole step interval has been seen (two timed steps), or, for a trainer
        that prints no step numbers, two outputs since training began."""
        return self.timed_steps >= 2 or (self.began and self.total is None  # noqa: PLR2004
                                         and self.longest_gap_s > 0)

    @property
    def timed_span(self) -> int:
        """Steps between the first and the last step seen while timed (whole intervals)."""
        with self.lock:
            if self.first is None or self.last is None:
                return 0
            return self.last[0] - self.first[0]

    def activity(self, now: float | None = None) -> None:
        """Something the trainer did that printed nothing (a checkpoint being written)."""
        self.feed(b"", at=now)

    def summary(self) -> dict[str, Any] | None:
        """What the journal keeps of it (None when the trainer showed no progress)."""
        with self.lock:
            if self.step is None and not self.began:
                return None
            samples = [list(s) for s in dict.fromkeys(x for x in (self.first, self.last) if x)]
            out: dict[str, Any] = {
                "step": self.step, "total": self.total, "samples": samples,
                "began_at": self.began_at, "longest_gap_s": round(self.longest_gap_s, 2)}
            if self.epochs:
                out["log_epochs"] = [list(e) for e in self.epochs]
            return out


def _last_step(chunk: bytes, *, bar: bool = True) -> tuple[int, int] | None:
    """The last (step, total) a chunk of output reports, if any (cheap when it reports none)."""
    found: tuple[int, int] | None = None
    if bar and b"%|" in chunk:
        for match in _TQDM.finditer(chunk):
            found = _steps(match) or found
    if b"current_steps" in chunk:
        for match in _LF_STEPS.finditer(chunk):
            found = _steps(match) or found
    return found


def _steps(match: re.Match[bytes]) -> tuple[int, int] | None:
    """(step, total) when both are counts a trainer can reach (a 400-digit step is text)."""
    step, total = bounds.count(match.group(1)), bounds.count(match.group(2))
    return None if step is None or total is None else (step, total)


# --- the watchdog ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class Watchdog:
    """When an attempt's silence is a hang (the policy's [watchdog] table).

    `fixed_s` (the policy's `stall_timeout_s`) wins when set. Otherwise the run's own cadence
    decides: before training begins, `startup_s` (model load, tokenisation, a first compile);
    once it has shown its cadence (two steps), `factor` times the longest silence it has shown
    since training began (a
    checkpoint save or an evaluation is a long gap; a checkpoint being written also counts as
    activity), and never less than `floor_s`.
    """

    fixed_s: float | None = None
    startup_s: float | None = 1800.0
    factor: float = 10.0
    floor_s: float = 120.0
    adopted_gap_s: float | None = None
    """An adopted attempt (`resume` after the supervisor was lost): its output from before has
    no times, so its cadence is the longest gap an earlier attempt of this run showed (0: none
    did, the floor). None: a new attempt, which learns its own."""

    def limit(self, tracker: Tracker, *, evidence: bool = False) -> tuple[float, str] | None:
        """The silence that is a hang now, and how it was chosen (None: no limit).

        `evidence`: past the limit, the attempt is ended only if nothing shows work (files
        written, CPU, I/O, a moving stack; liveness.py). Then the silence after the last step
        (the final save, an upload, the exit) is judged by the run's cadence like any other:
        a save writes files and an upload uses the CPU, while a process that hangs on its way
        out (a process group's teardown) shows nothing. Without it, the start-up allowance.
        """
        if self.fixed_s:
            return self.fixed_s, f"{self.fixed_s:g} s (stall_timeout_s)"
        if tracker.ended and evidence and tracker.began:
            # The steps' cadence alone: a long save or upload shows its work as evidence.
            learnt = max(self.floor_s, self.factor * tracker.longest_gap_s)
            return learnt, (f"{learnt:.0f} s after the last training step, with nothing "
                            "showing work")
        if tracker.ended:
            # The final save, an upload, the interpreter's exit: not steps, no cadence.
            if not self.startup_s:
                return None
            return self.startup_s, f"{self.startup_s:g} s after the last training step"
        if not tracker.cadence_known and tracker.began and self.adopted_gap_s is not None:
            # Training had begun before the supervisor was lost: not a start-up any more.
            if self.adopted_gap_s <= 0:
                return self.floor_s, (f"{self.floor_s:g} s, the floor (training had begun "
                                      "before the supervisor was lost)")
            learnt = max(self.floor_s, self.factor * self.adopted_gap_s)
            return learnt, (f"{learnt:.0f} s, {self.factor:g}x the longest gap an earlier "
                            f"attempt of this run showed ({self.adopted_gap_s:.1f} s)")
        if not tracker.cadence_known:
            # Loading, tokenising, a first compile, the first step: nothing to learn from yet.
            if not self.startup_s:
                return None
            return self.startup_s, f"{self.startup_s:g} s before the trainer showed its cadence"
        gap = tracker.longest_gap_s
        learnt = self.factor * gap
        phase = self.factor * tracker.longest_phase_s
        if tracker.in_phase and phase > max(learnt, self.floor_s):
            # After an evaluation's or a save's output: that phase's own allowance.
            return phase, (f"{phase:.0f} s, {self.factor:g}x the longest gap so far around an "
                           f"evaluation or a save ({tracker.longest_phase_s:.1f} s)")
        if learnt <= self.floor_s:
            return self.floor_s, (f"{self.floor_s:g} s, the floor (longest gap so far "
                                  f"{gap:.1f} s)")
        return learnt, f"{learnt:.0f} s, {self.factor:g}x the longest gap so far ({gap:.1f} s)"
