"""A speed comparison between two fitting configs of the same quality, on the real reference
trainer: made, journaled, reported, and the run finishes on the faster.

Measured peaks of the bundled tiny Llama at cutoff 64 (full fine-tuning, effective batch 4):
b2xGA2 97.2 MiB, b1xGA4 90.8, b2xGA2 with checkpointing 89.0. Under a 94 MiB live-bytes budget
(the trainer's own `--device-memory`: every OOM a real `torch.OutOfMemoryError`), the command's
b2xGA2 runs out, the walk fits at b1xGA4, and b2xGA2 with checkpointing fits too: which of the
two is faster is a measurement. The test asserts what was measured and that the run trains on
the config with the lower recorded time per sample, never which one that is (a busy machine
decides).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from supervisor.loop import ExitCode
from supervisor.policy import resolve
from tests.faults.conftest import supervise_here

pytestmark = pytest.mark.process

TRAINER = (sys.executable, "-m", "supervisor.reference_trainer")
BUDGET_MIB = 94


def test_two_fitting_configs_are_timed_and_the_faster_trains_on(tmp_path: Path) -> None:
    """b2xGA2 OOMs; b1xGA4 fits and is timed 3 steps, then b2xGA2 + checkpointing (same method,
    cutoff and effective batch) from the newest checkpoint, 3 steps; `speed.compared` holds both
    step times and the winner (the lower time per sample), the last attempt runs the winner's
    config from a checkpoint to the end, report.md/json show the comparison, and the night's
    time still adds up."""
    argv = (*TRAINER, "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
            "--cutoff_len", "64", "--max_steps", "30", "--save_steps", "3",
            "--output_dir", "out", "--device-memory", str(BUDGET_MIB))
    result, _, journal = supervise_here(tmp_path, argv, resolve("default"))
    assert result.exit_code is ExitCode.FITTED, result.report.get("reason")
    finished = [e for e in journal if e["event"] == "attempt.finished"]
    assert [e["verdict"] for e in finished] == ["oom", "timed", "timed", "fits"]
    started = [e for e in journal if e["event"] == "attempt.started"]
    knobs = [(s["knobs"]["per_device_batch"], s["knobs"]["grad_accum"],
              s["knobs"]["gradient_checkpointing"]) for s in started]
    assert knobs[:3] == [(2, 2, False), (1, 4, False), (2, 2, True)]

    compared = [e for e in journal if e["event"] == "speed.compared"]
    assert len(compared) == 1
    event = compared[0]
    assert event["attempts"] == [2, 3]
    assert event["configs"] == ["b1xGA4, checkpointing off", "b2xGA2, checkpointing on"]
    assert event["samples_per_step"] == 4
    assert all(s is not None and s > 0 for s in event["step_s"])
    assert all(n >= 3 for n in event["timed_steps"])
    faster = 2 if event["step_s"][0] <= event["step_s"][1] else 3
    assert event["winner"] == faster
    assert knobs[3] == knobs[faster - 1]
    resumed = [e for e in journal if e["event"] == "checkpoint.resumed"]
    assert resumed
    assert resumed[-1]["attempt"] == 4  # the winner continues, it does not start over
    assert finished[-1]["trained_steps"]["steps"] == 30

    report = json.loads((tmp_path / "run" / "report.json").read_text(encoding="utf-8"))
    assert report["speed"]["winner"] == faster
    assert report["speed"]["step_s"] == event["step_s"]
    text = (tmp_path / "run" / "report.md").read_text(encoding="utf-8")
    assert "## Speed compared" in text
    assert "**winner**" in text
    good = report["goodput"]
    assert good["productive_s"] + sum(good["badput_s"].values()) == pytest.approx(
        good["wall_s"], abs=0.5)
    assert good["badput_s"].get("compared", 0) > 0
    print("speed.compared", json.dumps(event))  # noqa: T201 - the measured numbers, for the log
