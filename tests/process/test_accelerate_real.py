"""The real `accelerate launch` in front of the reference trainer: the world size is what
accelerate really starts, not what --num_processes says."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from supervisor.command import Command
from supervisor.dialects import detect
from supervisor.journal import read
from supervisor.loop import ExitCode, supervise
from supervisor.policy import resolve

pytestmark = pytest.mark.process


def test_accelerate_cpu_with_two_processes_runs_one_and_counts_one(
        tmp_path: Path, trainer_env: dict[str, str]) -> None:
    """`accelerate launch --cpu --num_processes 2` takes accelerate's simple launcher: one
    process. The journal's world size is 1 (from the command line, not assumed), a real OOM
    at b8 steps to b4 x GA 2, and the report's effective batch is the real 8 (not 16)."""
    env = {**trainer_env, "HF_HOME": str(tmp_path / "hf")}  # no default accelerate config
    command = Command(argv=(
        sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
        "-m", "supervisor.reference_trainer", "--per_device_train_batch_size", "8",
        "--cutoff_len", "128", "--max_steps", "1", "--device-memory", "120",
        "--output_dir", str(tmp_path / "out")), cwd=str(tmp_path))
    run_dir = tmp_path / "run"
    result = supervise(command, dialect=detect(command), ladder=resolve("default"),
                       run_dir=run_dir, echo=False, env=env)
    assert result.exit_code is ExitCode.FITTED
    events = read(run_dir / "journal.jsonl").records
    config = next(e for e in events if e["event"] == "run.started")["config"]
    assert config["start"]["world_size"] == 1
    assert config["start_sources"]["world_size"] == "command_line"
    assert config["world_size_known"] is True
    started = [e for e in events if e["event"] == "attempt.started"]
    assert {e["knobs"]["world_size"] for e in started} == {1}
    finished = [e for e in events if e["event"] == "attempt.finished"]
    assert finished[0]["verdict"] == "oom"  # a real allocator failure under the budget
    assert finished[-1]["verdict"] == "fits"
    # One trainer process really ran: one result line in the fitting attempt's output.
    last = run_dir / started[-1]["log_dir"] / "stdout.log"
    assert last.read_text(encoding="utf-8").count("reference-trainer.result") == 1
    report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    assert report["effective_batch"] == {"start": 8, "final": 8, "world_size_known": True}
    assert "(effective 8)" in (run_dir / "report.md").read_text(encoding="utf-8")
