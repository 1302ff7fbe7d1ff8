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
    # Memory on every run, with no device figure: each attempt's host (resident) peak, the
    # size the CPU allocator's message names, and a picture with something in it.
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert all(a["host_peak_mib"] and a["host_peak_mib"] > 50 for a in report["attempts"])
    assert report["attempts"][0]["numbers"]["tried_mib"] > 0
    assert (tmp_path / "run" / "memory.png").stat().st_size > 1000
    assert "host memory peak" in (tmp_path / "run" / "report.md").read_text()
    # The cost, as the trainer measured it: samples per second and loss of the fitting attempt.
    cost = report["attempts"][-1]["cost"]
    assert cost["samples_per_s"] > 0
    assert cost["loss"] > 0


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


def test_a_cutoff_that_drops_every_row_is_spent_and_the_walk_reaches_lora(
        tmp_path: Path, trainer_env: dict[str, str]) -> None:
    """Rows of 512 tokens, dropped under a shorter cutoff (`--sample_len`, as axolotl drops
    them): halving the cutoff leaves the real HF Trainer no rows (torch's RandomSampler:
    num_samples=0). That attempt is `no_data`, the cutoff rung is spent with that reason, and
    the ladder walks on to LoRA, which fits under the 70 MiB budget (measured: 47.9 MiB)."""
    command = trainer(tmp_path, "--per_device_train_batch_size", "2", "--cutoff_len", "512",
                      "--sample_len", "512", "--max_steps", "1", "--device-memory", "70")
    result = supervise(command, dialect=ArgvDialect(), ladder=resolve("default"),
                       run_dir=tmp_path / "run", echo=False, env=trainer_env)
    assert result.exit_code is ExitCode.FITTED
    events = read(tmp_path / "run" / "journal.jsonl").records
    finished = [e for e in events if e["event"] == "attempt.finished"]
    started = {e["attempt"]: e for e in events if e["event"] == "attempt.started"}
    dry = [e for e in finished if e["verdict"] == "no_data"]
    assert len(dry) == 1
    assert started[dry[0]["attempt"]]["rung"] == "shorter-cutoff"
    assert "but got num_samples=0" in dry[0]["evidence"]
    assert all(e["verdict"] == "oom" for e in finished[:-1] if e is not dry[0])
    stepped = [e for e in events if e["event"] == "ladder.stepped"]
    assert any(s.startswith("shorter-cutoff: cutoff_len=256 leaves the trainer no data")
               for e in stepped for s in e["skipped"])
    assert result.final_knobs is not None
    assert str(result.final_knobs.finetuning_type) == "lora"
    assert result.final_knobs.cutoff_len == 512
    assert result.final_knobs.effective_batch == 2
