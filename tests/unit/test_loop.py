"""The loop over scripted outcomes (tails recorded from real runs): journal, report, exit codes."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from supervisor.command import Command
from supervisor.dialects.argv import ArgvDialect
from supervisor.journal import replay
from supervisor.loop import ExitCode, RunResult, supervise
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
    events = list(replay(tmp_path / "run" / "journal.jsonl").events)
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
        "attempt.started", "attempt.finished", "run.finished"]
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
    """OOM at every rung from batch 1 x 256: exhausted, and the report names each rung."""
    text = ("python -m supervisor.reference_trainer --per_device_train_batch_size 1 "
            "--cutoff_len 256")
    result, runner, _, _ = go(tmp_path, [OOM] * 4, text=text)
    assert result.exit_code is ExitCode.EXHAUSTED
    assert len(runner.specs) == 4
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert [s.split(":")[0] for s in report["spent"]] == [
        "smaller-batch", "shorter-cutoff", "gradient-checkpointing", "lora", "freeze"]
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
        "attempt.started", "attempt.finished", "run.fitted"]
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
