"""A mid-run OOM keeps the steps already trained: the next attempt resumes from the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import pytest

from supervisor.command import Command
from supervisor.dialects.argv import ArgvDialect
from supervisor.journal import read
from supervisor.loop import ExitCode, supervise
from supervisor.policy import Ladder, parse, resolve
from tests.faults.conftest import TRAINER, quiet_env

pytestmark = pytest.mark.process


def _run(tmp_path: Path, *flags: str,
         ladder: Ladder | None = None) -> tuple[ExitCode, list[dict[str, object]]]:
    command = Command(argv=(*TRAINER, *flags, "--save_steps", "1", "--output_dir", "out"),
                      cwd=str(tmp_path))
    result = supervise(command, dialect=ArgvDialect(), ladder=ladder or resolve("default"),
                       run_dir=tmp_path / "run", echo=False, env=quiet_env())
    return result.exit_code, list(read(tmp_path / "run" / "journal.jsonl").records)


def test_oom_after_a_checkpoint_resumes_from_it(tmp_path: Path) -> None:
    """b4 saves checkpoint-1, then OOMs in step 2 (AdamW state); b2 x GA 2 resumes at step 1."""
    # Measured: on a 300 MiB device full b4 x 512 finishes step 1 and OOMs in step 2.
    code, journal = _run(tmp_path, "--per_device_train_batch_size", "4", "--cutoff_len", "512",
                         "--max_steps", "3", "--device-memory", "300")
    assert code is ExitCode.FITTED
    resumed = [e for e in journal if e["event"] == "checkpoint.resumed"]
    assert len(resumed) == 1
    assert resumed[0]["step"] == 1
    started = [e for e in journal if e["event"] == "attempt.started"]
    assert "--resume_from_checkpoint" in started[1]["argv"]  # type: ignore[operator]
    finished = [e for e in journal if e["event"] == "attempt.finished"]
    assert finished[-1]["trained_steps"] == {"steps": 3, "resumed_from_step": 1}
    state = json.loads((tmp_path / "out" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    report = (tmp_path / "run" / "report.md").read_text()
    assert "resumed from" in report
    # Each checkpoint is credited once, to the attempt that wrote it (not by a time window).
    credited = [(e["attempt"], [Path(str(c[0])).name for c in cast("list[list[object]]",
                                                                  e["checkpoints"])])
                for e in finished]
    assert credited == [(1, ["checkpoint-1"]), (2, ["checkpoint-2", "checkpoint-3"])]
    # final-command.sh is a fresh run of the working config; checkpoint-3 is max_steps, so a
    # continuation would train nothing: no continue-command.sh, and the report says what to
    # raise instead.
    fresh = (tmp_path / "run" / "final-command.sh").read_text()
    assert "--resume_from_checkpoint" not in fresh
    assert "--gradient_accumulation_steps 2" in fresh
    assert not (tmp_path / "run" / "continue-command.sh").exists()
    assert "trained all its 3 steps" in report
    assert "raise max_steps" in report


def test_a_rung_that_changes_the_parameter_set_starts_fresh(tmp_path: Path) -> None:
    """Full b4 OOMs after checkpoint-1; the LoRA rung does not load it, and says why."""
    lora_only = parse({"name": "lora-only", "rung": [{
        "action": "set", "knob": "finetuning_type", "value": "lora",
        "with": {"gradient_checkpointing": True}}]})
    code, journal = _run(tmp_path, "--per_device_train_batch_size", "4", "--cutoff_len", "512",
                         "--max_steps", "2", "--device-memory", "300", ladder=lora_only)
    assert code is ExitCode.FITTED
    skipped = [e for e in journal if e["event"] == "checkpoint.skipped"]
    assert len(skipped) == 1
    assert "parameter set changes (full -> lora)" in str(skipped[0]["reason"])
    started = [e for e in journal if e["event"] == "attempt.started"]
    assert "--resume_from_checkpoint" not in started[-1]["argv"]  # type: ignore[operator]
