"""The supervisor over the real reference trainer: every OOM is a real allocator failure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from supervisor.dialects.argv import ArgvDialect
from supervisor.journal import read
from supervisor.loop import ExitCode, supervise
from supervisor.policy import resolve
from tests.process.conftest import trainer

pytestmark = pytest.mark.process

# Measured with OMP_NUM_THREADS=1 (tests/data/tails/README.md, "Measured"): full b8x512 OOMs
# under this cap and b4x512 fits, with >= 100 MiB between them.
HOST_CAP_MIB = 600


def _verdicts(run_dir: Path) -> list[str]:
    return [e["verdict"] for e in read(run_dir / "journal.jsonl").records
            if e["event"] == "attempt.finished"]


def test_host_cap_oom_at_batch_8_then_fits_at_batch_4_ga_2(
        tmp_path: Path, trainer_env: dict[str, str]) -> None:
    """A real `DefaultCPUAllocator` OOM at b8 reruns at b4 x GA 2 (or lower) and finishes."""
    command = trainer(tmp_path, "--per_device_train_batch_size", "8", "--cutoff_len", "512",
                      "--max_steps", "1", "--host-memory-cap", str(HOST_CAP_MIB))
    result = supervise(command, dialect=ArgvDialect(), ladder=resolve("default"),
                       run_dir=tmp_path / "run", echo=False, env=trainer_env)
    assert result.exit_code is ExitCode.FITTED
    events = read(tmp_path / "run" / "journal.jsonl").records
    finished = [e for e in events if e["event"] == "attempt.finished"]
    assert finished[0]["verdict"] == "oom"
    assert finished[0]["oom_kind"] == "cpu"
    assert "DefaultCPUAllocator: can't allocate memory" in finished[0]["evidence"]
    assert finished[-1]["verdict"] == "fits"
    assert result.final_knobs is not None
    assert result.final_knobs.per_device_batch <= 4
    assert result.final_knobs.effective_batch == 8
    started = [e for e in events if e["event"] == "attempt.started"]
    assert "--gradient_accumulation_steps" in started[1]["argv"]


def test_non_memory_failure_stops_after_one_attempt(
        tmp_path: Path, trainer_env: dict[str, str]) -> None:
    """A bad flag is fatal: one attempt, the fatal exit code, the error line in the report."""
    command = trainer(tmp_path, "--per_device_train_batch_size", "8", "--no_such_flag", "1")
    result = supervise(command, dialect=ArgvDialect(), ladder=resolve("default"),
                       run_dir=tmp_path / "run", echo=False, env=trainer_env)
    assert result.exit_code is ExitCode.FATAL
    assert _verdicts(tmp_path / "run") == ["fatal"]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert "--no_such_flag" in report["attempts"][0]["evidence"]
    assert report["steps"] == []


def test_last_rung_still_ooms_exhausts_the_ladder(
        tmp_path: Path, trainer_env: dict[str, str]) -> None:
    """A device too small for anything: every rung is tried for real, then `exhausted`; LoRA
    and freeze each start without checkpointing (as the command had it) and add it again."""
    command = trainer(tmp_path, "--per_device_train_batch_size", "1", "--cutoff_len", "256",
                      "--max_steps", "1", "--device-memory", "8")
    result = supervise(command, dialect=ArgvDialect(), ladder=resolve("default"),
                       run_dir=tmp_path / "run", echo=False, env=trainer_env)
    assert result.exit_code is ExitCode.EXHAUSTED
    assert _verdicts(tmp_path / "run") == ["oom"] * 6
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert [a["rung"] for a in report["attempts"]] == [
        None, "gradient-checkpointing", "lora", "gradient-checkpointing", "freeze",
        "gradient-checkpointing"]
    assert [s.split(":")[0] for s in report["spent"]] == [
        "expandable-segments", "smaller-batch", "shorter-cutoff", "gradient-checkpointing",
        "8bit-optimizer", "lora", "qlora", "freeze"]
    assert not (tmp_path / "run" / "final-command.sh").exists()
