"""Ranking same-quality configs by speed (speed.py): which rival, when to skip, who wins, and
the loop that times both, over measured peaks and scripted outcomes."""

from __future__ import annotations

import dataclasses
import json
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from supervisor import speed, status
from supervisor.classify import Outcome
from supervisor.command import Command
from supervisor.dialects.argv import ArgvDialect
from supervisor.estimate import Method, Prediction
from supervisor.events import AttemptFinished, AttemptRecord, AttemptStarted
from supervisor.journal import read
from supervisor.knobs import FinetuningType, Knobs
from supervisor.loop import ExitCode, Memory, Rebuilt, resume, supervise
from supervisor.policy import Attempt, GiveUp, PolicyError, next_step, parse, resolve
from supervisor.runner import AttemptSpec
from tests.fakes import FITS, OOM, outcome_from
from tests.unit.test_policy import without_bnb
from tests.unit.test_walk_lattice import OOM as LATTICE_OOM
from tests.unit.test_walk_lattice import _key, _lattice

# --- the rival, over the measured lattice ------------------------------------------------------


def _walk(device_mib: float) -> tuple[Knobs, list[Attempt], dict[tuple[object, ...], float]]:
    """The default walk over the lattice's measured peaks: the fit and what came before it."""
    start, peaks = _lattice()
    ladder = resolve("default")
    history: list[Attempt] = []
    knobs, rung = start, None
    while peaks[_key(knobs)] > device_mib:
        history.append(Attempt(number=len(history) + 1, knobs=knobs, rung=rung,
                               verdict=LATTICE_OOM))
        step = next_step(start, history, ladder, can_set=without_bnb)
        assert not isinstance(step, GiveUp)
        knobs, rung = step.knobs, step.rung
    return knobs, history, peaks


@pytest.mark.parametrize(("device_mib", "fit", "rival"), [
    # full b1xGA8 (147.6 MiB) fits under 150; full + checkpointing b2xGA4 (135.5) would too
    (150, "b1xGA8, checkpointing off", "b2xGA4, checkpointing on"),
    # LoRA b1xGA8 (84.7) fits under 90; LoRA + checkpointing b2xGA4 (75.7) would too
    (90, "b1xGA8, checkpointing off", "b2xGA4, checkpointing on"),
])
def test_the_rival_of_a_fit_is_the_other_split_and_fits_too(device_mib: float, fit: str,
                                                            rival: str) -> None:
    """On the measured lattice, the walk's fit has a same-quality rival the walk never ran,
    and the rival's measured peak is under the device too: which is faster is a measurement."""
    knobs, history, peaks = _walk(device_mib)
    found = speed.alternative(knobs, history)
    assert found is not None
    assert (speed.describe(knobs), speed.describe(found.knobs)) == (fit, rival)
    assert found.knobs.effective_batch == knobs.effective_batch
    assert found.knobs.finetuning_type == knobs.finetuning_type
    assert found.knobs.cutoff_len == knobs.cutoff_len
    assert peaks[_key(found.knobs)] <= device_mib
    assert all(a.knobs != found.knobs for a in history)


def test_a_rival_known_to_run_out_of_memory_is_none() -> None:
    """Checkpointing on at b2 ran out: checkpointing on at b2 (or more) is no rival."""
    fit = Knobs(per_device_batch=1, grad_accum=8, cutoff_len=512)
    oom = Attempt(number=1, knobs=dataclasses.replace(fit, per_device_batch=2, grad_accum=4,
                                                      gradient_checkpointing=True),
                  rung="gradient-checkpointing", verdict=LATTICE_OOM)
    assert speed.alternative(fit, [oom]) is None
    smaller = dataclasses.replace(oom, knobs=dataclasses.replace(oom.knobs, per_device_batch=1,
                                                                 grad_accum=8))
    assert speed.alternative(fit, [smaller]) is None  # a smaller micro-batch ran out already
    other_method = dataclasses.replace(oom, knobs=dataclasses.replace(
        oom.knobs, finetuning_type=FinetuningType.LORA))
    assert speed.alternative(fit, [other_method]) is not None  # another method says nothing


def test_checkpointing_on_is_rivalled_by_off_at_half_the_micro_batch() -> None:
    """Checkpointing on at b2xGA4: the rival spends the memory on not recomputing, b1xGA8."""
    fit = Knobs(per_device_batch=2, grad_accum=4, gradient_checkpointing=True)
    found = speed.alternative(fit, [])
    assert found is not None
    assert speed.describe(found.knobs) == "b1xGA8, checkpointing off"
    odd = Knobs(per_device_batch=3, grad_accum=1, gradient_checkpointing=True)
    assert speed.alternative(odd, []) is None
    no_split = Knobs(per_device_batch=4, grad_accum=1)  # accumulation 1 cannot halve
    assert speed.alternative(no_split, []) is None


# --- the comparison, from recorded timings ---------------------------------------------------


def _record(number: int, knobs: Knobs, verdict: str,
            samples: list[list[float]] | None) -> AttemptRecord:
    progress = {"step": int(samples[-1][0]), "samples": samples} if samples else None
    return AttemptRecord(started=AttemptStarted(attempt=number, rung=None, knobs=knobs),
                         finished=AttemptFinished(attempt=number, verdict=verdict,
                                                  progress=progress))


B1 = Knobs(per_device_batch=1, grad_accum=8)
B2_CKPT = Knobs(per_device_batch=2, grad_accum=4, gradient_checkpointing=True)


def test_the_lower_time_per_sample_wins() -> None:
    """Timed 3 steps each (the trainer's own step lines): 0.90 s/step against 0.60; the second
    trains on, with both timings and the reason journaled."""
    first = _record(4, B1, "timed", [[2, 100.0], [5, 102.7]])
    second = _record(5, B2_CKPT, "timed", [[3, 200.0], [6, 201.8]])
    result = speed.compare(first, second)
    assert result.winner == 5
    assert result.attempts == (4, 5)
    assert result.step_s == (0.9, 0.6)
    assert result.timed_steps == (3, 3)
    assert result.samples_per_step == 8
    assert list(result.samples_per_s) == pytest.approx([8.889, 13.333], abs=1e-3)
    assert "75.0 ms per sample against 112.5" in result.reason


@pytest.mark.parametrize(("verdict", "samples", "why"), [
    ("oom", None, "ran out of memory"),
    ("hang", None, "showed no step times"),
    ("timed", [[3, 200.0], [6, 209.0]], "ms per sample against"),  # slower: the first stays
])
def test_the_first_config_stays_unless_the_rival_is_faster(
        verdict: str, samples: list[list[float]] | None, why: str) -> None:
    """An OOM of the rival settles it, as does no timing or a slower one."""
    first = _record(4, B1, "timed", [[2, 100.0], [5, 102.7]])
    result = speed.compare(first, _record(5, B2_CKPT, verdict, samples))
    assert result.winner == 4
    assert why in result.reason


def test_a_timing_needs_two_timed_steps() -> None:
    """One step seen says nothing of the cadence."""
    assert speed.timing(_record(1, B1, "timed", [[2, 100.0]])) is None
    assert speed.timing(_record(1, B1, "timed", None)) is None


# --- the loop: time the fit, time the rival, train on with the faster --------------------------

START = ("python -m supervisor.reference_trainer --per_device_train_batch_size 8 "
         "--cutoff_len 512 --max_steps 40")


def _timed(step_s: float) -> Outcome:
    """What the runner reports of an attempt it ended after 3 timed steps."""
    samples = [[2, 1000.0], [5, 1000.0 + 3 * step_s]]
    return Outcome(exit_code=-15, duration_s=5.0, tail=("training...",), timed=True,
                   progress={"step": 5, "total": 40, "samples": samples})


Script = Callable[[AttemptSpec], Outcome]


def _run(tmp_path: Path, decide: Script, *, policy: dict[str, Any] | None = None,
         memory: Memory | None = None, start: str = START,
         ) -> tuple[list[AttemptSpec], list[dict[str, Any]]]:
    specs: list[AttemptSpec] = []

    def runner(spec: AttemptSpec) -> Outcome:
        specs.append(spec)
        spec.log_dir.mkdir(parents=True, exist_ok=True)
        return decide(spec)

    ladder = resolve("default") if policy is None else parse(policy, source="test.toml")
    result = supervise(Command(argv=tuple(shlex.split(start)), cwd=str(tmp_path)),
                       dialect=ArgvDialect(), ladder=ladder, run_dir=tmp_path / "run",
                       run_attempt=runner, echo=False, env={}, memory=memory)
    assert result.exit_code is ExitCode.FITTED
    return specs, list(read(tmp_path / "run" / "journal.jsonl").records)


def _by_config(rival_step_s: float | None) -> Script:
    """b8 runs out; b4xGA2 fits (1.0 s/step when timed); checkpointing b8xGA1 takes
    `rival_step_s` (None: runs out of memory)."""
    def decide(spec: AttemptSpec) -> Outcome:
        argv = " ".join(spec.argv)
        if "--gradient_checkpointing" in argv:
            if rival_step_s is None:
                return outcome_from(*OOM)
            return _timed(rival_step_s) if spec.timed_steps else outcome_from(*FITS)
        if "--per_device_train_batch_size 8" in argv:
            return outcome_from(*OOM)
        return _timed(1.0) if spec.timed_steps else outcome_from(*FITS)
    return decide


def test_the_fit_and_its_rival_are_timed_and_the_faster_trains_on(tmp_path: Path) -> None:
    """b8 OOMs; b4xGA2 is timed 3 steps (1.0 s/step), then checkpointing b8xGA1 (0.5 s/step):
    the rival is faster per sample, journaled with both timings, and the run finishes on it,
    untimed. report.json and report.md show what was compared."""
    specs, journal = _run(tmp_path, _by_config(0.5))
    assert [s.timed_steps for s in specs] == [None, 3, 3, None]
    compared = [e for e in journal if e["event"] == "speed.compared"]
    assert len(compared) == 1
    assert compared[0]["attempts"] == [2, 3]
    assert compared[0]["configs"] == ["b4xGA2, checkpointing off", "b8xGA1, checkpointing on"]
    assert compared[0]["step_s"] == [1.0, 0.5]
    assert compared[0]["winner"] == 3
    finished = [e["verdict"] for e in journal if e["event"] == "attempt.finished"]
    assert finished == ["oom", "timed", "timed", "fits"]
    last = " ".join(specs[-1].argv)
    assert "--gradient_checkpointing" in last
    assert "--per_device_train_batch_size 8" in last
    report = json.loads((tmp_path / "run" / "report.json").read_text(encoding="utf-8"))
    assert report["speed"]["winner"] == 3
    assert report["final_knobs"]["gradient_checkpointing"] is True
    text = (tmp_path / "run" / "report.md").read_text(encoding="utf-8")
    assert "## Speed compared" in text
    assert "| 3 | b8xGA1, checkpointing on | 3 | 0.5 |" in text
    shown = status.render(tmp_path / "run")
    assert "speed compared: b4xGA2, checkpointing off (attempt 2) 1.000 s/step" in shown
    assert "b8xGA1, checkpointing on trains on" in shown


def test_a_rival_that_runs_out_of_memory_leaves_the_fit(tmp_path: Path) -> None:
    """The rival's OOM settles the question: b4xGA2 trains on."""
    specs, journal = _run(tmp_path, _by_config(None))
    compared = next(e for e in journal if e["event"] == "speed.compared")
    assert compared["winner"] == 2
    assert "ran out of memory" in compared["reason"]
    assert "--gradient_checkpointing" not in " ".join(specs[-1].argv)
    assert [s.timed_steps for s in specs] == [None, 3, 3, None]


def test_switched_off_it_times_nothing_and_says_so(tmp_path: Path) -> None:
    """[speed] compare = false: no attempt is timed; the report says why nothing was compared."""
    data = {**_policy(), "speed": {"compare": False}}
    specs, journal = _run(tmp_path, _by_config(0.5), policy=data)
    assert [s.timed_steps for s in specs] == [None, None]
    skipped = next(e for e in journal if e["event"] == "speed.skipped")
    assert "switched off" in skipped["reason"]


def test_a_short_run_is_not_worth_timing(tmp_path: Path) -> None:
    """20 steps to train: two restarts and 2 x 3 timed steps would not pay back (fewer than
    10 x 3 steps left), so nothing is timed and the reason is journaled."""
    specs, journal = _run(tmp_path, _by_config(0.5),
                          start=START.replace("--max_steps 40", "--max_steps 20"))
    assert [s.timed_steps for s in specs] == [None, None]
    skipped = next(e for e in journal if e["event"] == "speed.skipped")
    assert "20 steps left to train are too few" in skipped["reason"]
    assert skipped["fitted"] == "b4xGA2, checkpointing off"


class _Predictor:
    """Predicts checkpointing configs at 200 MiB, the others at 50."""

    def predict(self, knobs: Knobs) -> Prediction:
        return Prediction(peak_mib=200.0 if knobs.gradient_checkpointing else 50.0,
                          method=Method.ANALYTIC)

    def calibrate(self, knobs: Knobs, measured_mib: float, *,  # noqa: ARG002
                  lower_bound: bool = False) -> float:  # noqa: ARG002
        return 1.0


def test_a_rival_predicted_over_the_device_is_ranked_without_timing(tmp_path: Path) -> None:
    """The estimator can say: the rival is predicted over the device, so nothing is timed and
    the reason is journaled."""
    specs, journal = _run(tmp_path, _by_config(0.5),
                          memory=Memory(predictor=_Predictor(), device_mib=100.0))
    assert all(s.timed_steps is None for s in specs)
    skipped = next(e for e in journal if e["event"] == "speed.skipped")
    assert "the estimator ranks it" in skipped["reason"]
    assert "200 MiB, over the 100 MiB device" in skipped["reason"]


def _policy() -> dict[str, Any]:
    from supervisor._compat import tomllib  # noqa: PLC0415

    path = Path(__file__).resolve().parents[2] / "policies" / "default.toml"
    data: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    return data


@pytest.mark.parametrize(("table", "message"), [
    ({"compare": "yes"}, "compare must be true or false"),
    ({"steps": 0}, "[speed] steps must be >= 1"),
    ({"steps": 2.5}, "[speed] steps must be a whole number"),
    ({"rounds": 2}, "rounds"),
])
def test_bad_speed_settings_fail_at_load_with_one_line(table: dict[str, Any],
                                                       message: str) -> None:
    """A bad [speed] value names the key and what it must be."""
    with pytest.raises(PolicyError, match=None) as caught:
        parse({**_policy(), "speed": table}, source="p.toml")
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_resume_between_the_rival_and_the_comparison_compares_them(tmp_path: Path) -> None:
    """The supervisor died after both timings but before `speed.compared`: `resume` compares
    the two journaled timings (nothing is timed again) and trains on with the winner."""
    _run(tmp_path, _by_config(0.5))
    path = tmp_path / "run" / "journal.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    cut = next(i for i, line in enumerate(lines) if '"speed.compared"' in line)
    path.write_text("".join(lines[:cut]), encoding="utf-8")
    specs: list[AttemptSpec] = []

    def runner(spec: AttemptSpec) -> Outcome:
        specs.append(spec)
        spec.log_dir.mkdir(parents=True, exist_ok=True)
        return _by_config(0.5)(spec)

    def rebuild(_: object) -> Rebuilt:
        return Rebuilt(command=Command(argv=tuple(shlex.split(START)), cwd=str(tmp_path)),
                       dialect=ArgvDialect(), ladder=resolve("default"), env={},
                       memory=Memory())

    result = resume(tmp_path / "run", rebuild=rebuild, run_attempt=runner, echo=False)
    assert result.exit_code is ExitCode.FITTED
    journal = list(read(path).records)
    compared = [e for e in journal if e["event"] == "speed.compared"]
    assert [(e["attempts"], e["winner"]) for e in compared] == [([2, 3], 3)]
    assert [s.timed_steps for s in specs] == [None]
    assert "--gradient_checkpointing" in " ".join(specs[0].argv)
