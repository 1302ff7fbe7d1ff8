"""The loop over scripted outcomes (tails recorded from real runs): journal, report, exit codes."""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from supervisor.command import Command
from supervisor.dialects.argv import ArgvDialect
from supervisor.estimate import Method, Prediction
from supervisor.events import replay
from supervisor.journal import read
from supervisor.knobs import Knobs
from supervisor.loop import ExitCode, Memory, RunResult, supervise
from supervisor.policy import parse, resolve
from tests.fakes import FATAL, FITS, OOM, ScriptedRunner

START = ("python -m supervisor.reference_trainer --per_device_train_batch_size 8 "
         "--cutoff_len 512 --max_steps 2")
TRANSIENT = ("transient_rendezvous.txt", 1)


def go(tmp_path: Path, script: list[tuple[str, int]], *, text: str = START,
       policy: str = "default", max_attempts: int | None = None,
       ) -> tuple[RunResult, ScriptedRunner, list[dict[str, Any]], list[float]]:
    runner = ScriptedRunner(list(script))
    sleeps: list[float] = []
    result = supervise(Command(argv=tuple(shlex.split(text)), cwd=str(tmp_path)),
                       dialect=ArgvDialect(), ladder=resolve(policy), run_dir=tmp_path / "run",
                       run_attempt=runner, sleep=sleeps.append, max_attempts=max_attempts,
                       echo=False, env={})
    events = list(read(tmp_path / "run" / "journal.jsonl").records)
    return result, runner, events, sleeps


def test_oom_at_batch_8_steps_to_batch_4_ga_2_and_fits(tmp_path: Path) -> None:
    """A real OOM at batch 8 reruns at batch 4 x GA 2; the journal and report hold both."""
    result, runner, events, _ = go(tmp_path, [OOM, FITS])
    assert result.exit_code is ExitCode.FITTED
    assert [shlex.join(s.argv) for s in runner.specs] == [
        START, START.replace("--per_device_train_batch_size 8", "--per_device_train_batch_size 4")
        + " --gradient_accumulation_steps 2"]
    assert [e["event"] for e in events] == [
        "run.started", "attempt.started", "attempt.finished", "ladder.stepped",
        "attempt.started", "attempt.finished", "speed.skipped", "final.written",
        "run.finished"]
    assert [e["verdict"] for e in events if e["event"] == "attempt.finished"] == ["oom", "fits"]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["effective_batch"] == {"start": 8, "final": 8, "world_size_known": True}
    assert report["final_knobs"]["per_device_batch"] == 4
    script = (tmp_path / "run" / "final-command.sh").read_text()
    assert script.endswith("exec " + shlex.join(runner.specs[-1].argv) + "\n")


def test_fatal_failure_stops_after_one_attempt(tmp_path: Path) -> None:
    """A bad flag: one attempt, exit code for fatal, the error line in the report, no ladder."""
    result, runner, events, _ = go(tmp_path, [FATAL])
    assert result.exit_code is ExitCode.FATAL
    assert len(runner.specs) == 1
    assert "ladder.stepped" not in [e["event"] for e in events]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "unrecognized arguments" in report
    assert not (tmp_path / "run" / "final-command.sh").exists()


def test_exhausted_ladder_lists_every_rung(tmp_path: Path) -> None:
    """OOM at every rung from batch 1 x 256: exhausted, and the report names each rung.

    Six attempts: full, then with checkpointing; LoRA and freeze each start without it (as
    the command had it) and add it again."""
    text = ("python -m supervisor.reference_trainer --per_device_train_batch_size 1 "
            "--cutoff_len 256")
    result, runner, _, _ = go(tmp_path, [OOM] * 6, text=text)
    assert result.exit_code is ExitCode.EXHAUSTED
    assert len(runner.specs) == 6
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert [s.split(":")[0] for s in report["spent"]] == [
        "expandable-segments", "smaller-batch", "shorter-cutoff", "gradient-checkpointing",
        "8bit-optimizer", "lora", "qlora", "freeze"]
    md = (tmp_path / "run" / "report.md").read_text()
    for rung in ("smaller-batch", "gradient-checkpointing", "lora", "freeze"):
        assert rung in md


def test_attempt_budget_stops_the_walk(tmp_path: Path) -> None:
    """--max-attempts 2 stops after two OOMs with the exhausted code and says why."""
    result, runner, _, _ = go(tmp_path, [OOM, OOM], max_attempts=2)
    assert result.exit_code is ExitCode.EXHAUSTED
    assert len(runner.specs) == 2
    assert "attempt budget of 2" in (tmp_path / "run" / "report.md").read_text()


def test_transient_failure_retries_the_same_config_with_backoff(tmp_path: Path) -> None:
    """Two transient failures then a fit: three attempts on one config, two backoff sleeps."""
    result, runner, events, sleeps = go(tmp_path, [TRANSIENT, TRANSIENT, FITS])
    assert result.exit_code is ExitCode.FITTED
    assert len({s.argv for s in runner.specs}) == 1
    assert len(runner.specs) == 3
    assert len(sleeps) == 2
    assert sleeps[0] <= sleeps[1]
    assert [e["event"] for e in events].count("transient.retrying") == 2


def test_transient_failure_that_persists_stops_at_the_bound(tmp_path: Path) -> None:
    """A permanent transient failure: retries+1 attempts, then the transient exit code."""
    policy = resolve("default")
    result, runner, _, _ = go(tmp_path, [TRANSIENT] * (policy.transient_retries + 1))
    assert result.exit_code is ExitCode.TRANSIENT
    assert len(runner.specs) == policy.transient_retries + 1


def test_log_events_are_dotted_and_in_order(tmp_path: Path) -> None:
    """The console log tells the same story as the journal, with stable event names."""
    with capture_logs() as logs:
        go(tmp_path, [OOM, FITS])
    assert [e["event"] for e in logs] == [
        "run.started", "attempt.started", "attempt.finished", "ladder.stepped",
        "attempt.started", "attempt.finished", "speed.skipped", "final.written",
        "run.finished"]
    assert all(e.get("run_id") == "run" for e in logs)


def test_structural_rung_restores_and_report_says_so(tmp_path: Path) -> None:
    """Batch 2 x 256 OOMs twice; gradient checkpointing restores batch 2 and the report says so."""
    text = ("python -m supervisor.reference_trainer --per_device_train_batch_size 2 "
            "--cutoff_len 256")
    result, _, _, _ = go(tmp_path, [OOM, OOM, FITS], text=text)
    assert result.final_knobs is not None
    assert (result.final_knobs.per_device_batch, result.final_knobs.gradient_checkpointing) == (
        2, True)
    md = (tmp_path / "run" / "report.md").read_text()
    assert "rung gradient-checkpointing restored per_device_batch 1 -> 2" in md


def test_custom_policy_table_is_walked(tmp_path: Path) -> None:
    """A one-rung policy from a table: one step, then exhausted."""
    ladder = parse({"name": "one", "rung": [{"action": "enable",
                                             "knob": "gradient_checkpointing"}]})
    runner = ScriptedRunner([OOM, OOM])
    result = supervise(Command(argv=tuple(shlex.split(START))), dialect=ArgvDialect(),
                       ladder=ladder, run_dir=tmp_path / "run", run_attempt=runner,
                       echo=False, env={})
    assert result.exit_code is ExitCode.EXHAUSTED
    assert "--gradient_checkpointing" in runner.specs[1].argv


@pytest.mark.parametrize("name", ["device_budget_oom.txt", "host_cap_oom.txt"])
def test_each_attempt_keeps_its_argv_and_logs(tmp_path: Path, name: str) -> None:
    """attempts/NN/ holds the exact argv and the output of that attempt."""
    go(tmp_path, [(name, 1), FITS])
    first = tmp_path / "run" / "attempts" / "01"
    assert json.loads((first / "argv.json").read_text()) == shlex.split(START)
    assert (first / "stdout.log").read_text().strip()


class _Everything:
    """A predictor that calls every config too big (a badly wrong model config, say)."""

    def __init__(self, peak_mib: float) -> None:
        self.peak_mib = peak_mib

    def predict(self, knobs: Knobs) -> Prediction:
        return Prediction(peak_mib=self.peak_mib * knobs.per_device_batch, method=Method.ANALYTIC)

    def calibrate(self, knobs: Knobs, measured_mib: float, *,  # noqa: ARG002
                  lower_bound: bool = False) -> float:  # noqa: ARG002
        return 1.0


def test_when_every_config_is_predicted_just_over_the_walk_starts_at_the_command(
        tmp_path: Path) -> None:
    """Predictions all over the device but near its edge (the smallest 72 MiB on 70, under
    CLEARLY_OVER): distrusted, journaled, and the command's own config runs first, so skipping
    never lands the run on a more degraded config than the walk would."""
    runner = ScriptedRunner([OOM, FITS])
    result = supervise(Command(argv=tuple(shlex.split(START)), cwd=str(tmp_path)),
                       dialect=ArgvDialect(), ladder=resolve("default"),
                       run_dir=tmp_path / "run", run_attempt=runner, echo=False, env={},
                       memory=Memory(predictor=_Everything(72.0), device_mib=70.0))
    assert result.exit_code is ExitCode.FITTED
    events = list(read(tmp_path / "run" / "journal.jsonl").records)
    kinds = [e["event"] for e in events]
    assert kinds.count("estimate.distrusted") == 1
    assert "rung.skipped" not in kinds
    assert shlex.join(runner.specs[0].argv) == START
    assert "--per_device_train_batch_size 4" in shlex.join(runner.specs[1].argv)
    md = (tmp_path / "run" / "report.md").read_text()
    assert "Skipped" not in md


@pytest.mark.parametrize(("verdicts", "code"), [([OOM], ExitCode.EXHAUSTED),
                                               ([FITS], ExitCode.FITTED)])
def test_when_every_config_is_predicted_clearly_over_the_smallest_is_checked_once(
        tmp_path: Path, verdicts: list[Any], code: ExitCode) -> None:
    """Every config predicted far over the device (issue 19: `run` walked all 16 rungs where
    the estimator rightly said nothing fits): the config predicted smallest runs once. An OOM
    there ends the run, exhausted, after that one attempt, with the account; a fit there is
    the run's fit (the predictions were wrong)."""
    runner = ScriptedRunner(list(verdicts))
    result = supervise(Command(argv=tuple(shlex.split(START)), cwd=str(tmp_path)),
                       dialect=ArgvDialect(), ladder=resolve("default"),
                       run_dir=tmp_path / "run", run_attempt=runner, echo=False, env={},
                       memory=Memory(predictor=_Everything(10_000.0), device_mib=70.0))
    assert result.exit_code is code
    assert len(runner.specs) == 1
    assert "--per_device_train_batch_size 1" in shlex.join(runner.specs[0].argv)
    events = list(read(tmp_path / "run" / "journal.jsonl").records)
    kinds = [e["event"] for e in events]
    assert kinds.count("estimate.checking") == 1
    assert "estimate.distrusted" not in kinds
    assert kinds.index("estimate.checking") < kinds.index("attempt.started")
    md = (tmp_path / "run" / "report.md").read_text()
    assert "checked for real instead of skipped" in md
    if code is ExitCode.EXHAUSTED:
        exhausted = next(e for e in events if e["event"] == "ladder.exhausted")
        assert exhausted["reason"].startswith("nothing fits: every config the ladder reaches")
        assert "it did not fit either" in exhausted["reason"]


def test_a_remembered_fit_is_where_the_walk_starts_and_it_only_goes_down(
        tmp_path: Path) -> None:
    """A fit remembered for this key is the first attempt; an OOM there walks on down from it
    (batch 2 -> 1), never back up to the command's batch 8."""
    start = ArgvDialect().read(Command(argv=tuple(shlex.split(START)), cwd=str(tmp_path)))
    remembered = dataclasses.replace(start, per_device_batch=2, grad_accum=4)
    runner = ScriptedRunner([OOM, FITS])
    result = supervise(Command(argv=tuple(shlex.split(START)), cwd=str(tmp_path)),
                       dialect=ArgvDialect(), ladder=resolve("default"),
                       run_dir=tmp_path / "run", run_attempt=runner, echo=False, env={},
                       fits_key="k", remembered=remembered, remembered_from="earlier")
    assert result.exit_code is ExitCode.FITTED
    argvs = [shlex.join(s.argv) for s in runner.specs]
    assert "--per_device_train_batch_size 2" in argvs[0]
    assert "--gradient_accumulation_steps 4" in argvs[0]
    assert "--per_device_train_batch_size 1" in argvs[1]
    assert "--gradient_accumulation_steps 8" in argvs[1]
    state = replay(read(tmp_path / "run" / "journal.jsonl").records)
    assert state.config.start == start  # the report still compares with the command's own
    assert state.config.remembered == remembered


PROGRAMS = Path(__file__).resolve().parents[1] / "data" / "programs"


def test_a_rung_the_program_lacks_is_skipped_with_its_reason(tmp_path: Path) -> None:
    """A plain argparse script with no LoRA or freeze flag (read from its real --help): the ladder
    never appends a flag it would reject; the skipped rungs are journaled with the reason."""
    text = (f"python {PROGRAMS / 'argparse_train.py'} --per_device_train_batch_size 2 "
            "--max_length 256")
    runner = ScriptedRunner([OOM] * 8)
    result = supervise(Command(argv=tuple(shlex.split(text)), cwd=str(tmp_path)),
                       dialect=ArgvDialect(), ladder=resolve("default"),
                       run_dir=tmp_path / "run", run_attempt=runner, echo=False, env={})
    assert result.exit_code is ExitCode.EXHAUSTED
    for spec in runner.specs:
        assert "--finetuning_type" not in spec.argv
        assert not any(a.startswith("--lora") for a in spec.argv)
    events = list(read(tmp_path / "run" / "journal.jsonl").records)
    skipped = [s for e in events if e["event"] in ("ladder.stepped", "ladder.exhausted")
               for s in e.get("skipped", [])]
    assert any(s.startswith("lora: the program takes no flag") for s in skipped), skipped
    state = replay(events)
    assert state.config.rewritable is not None
    assert "finetuning_type" not in state.config.rewritable
