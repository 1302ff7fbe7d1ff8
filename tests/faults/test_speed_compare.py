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
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.loop import ExitCode
from supervisor.policy import resolve
from tests.faults.conftest import events, quiet_env, start_supervisor, supervise_here, wait_for

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
            "--cutoff_len", "64", "--max_steps", "40", "--save_steps", "3",
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
    assert finished[-1]["trained_steps"]["steps"] == 40
    # No step is lost to the comparison: each timed attempt saves where it stopped (a rescue
    # checkpoint at its next step end), and the next one continues from exactly there.
    rescued = {e["attempt"]: e for e in journal
               if e["event"] == "checkpoint.rescued" and e["why"] == "stop"}
    assert sorted(rescued) == [2, 3]
    assert all(e["seconds"] is not None for e in rescued.values())
    starts = {e["attempt"]: e["step"] for e in resumed}
    assert starts[3] == rescued[2]["step"]
    assert starts[4] == rescued[3]["step"]
    for number in (2, 3):
        assert finished[number - 1]["progress"]["step"] <= rescued[number]["step"]

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


def test_a_kill_while_the_rival_is_timed_then_resume_times_it_again(tmp_path: Path) -> None:
    """SIGKILL of the supervisor while the rival (b2xGA2 with checkpointing) is being timed,
    then `resume`: the rival, adopted, is still timed and ended after its timed steps, the
    comparison is made, and the run trains on with the faster: the rival never becomes the
    working config untimed."""
    argv = (*TRAINER, "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
            "--cutoff_len", "64", "--max_steps", "40", "--save_steps", "3",
            "--output_dir", "out", "--device-memory", str(BUDGET_MIB))
    run_dir = tmp_path / "killed"
    proc = start_supervisor(tmp_path, "killed", *argv)
    try:
        wait_for(lambda: any(e["event"] == "attempt.spawned" and e["attempt"] == 3
                             for e in events(run_dir)), timeout_s=400)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    started = [e for e in events(run_dir) if e["event"] == "attempt.started"]
    assert started[2]["rung"] == "speed-compare"
    resumed = subprocess.run(  # noqa: S603
        [sys.executable, "-m", "supervisor", "--log-format", "json", "resume", str(run_dir),
         "--quiet"], env=quiet_env(), cwd=tmp_path, capture_output=True, timeout=600,
        check=False)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    journal = events(run_dir)
    finished = {e["attempt"]: e for e in journal if e["event"] == "attempt.finished"}
    assert finished[2]["verdict"] == "timed"
    assert finished[3]["verdict"] == "timed"
    assert finished[3]["adopted"] is True
    [compared] = [e for e in journal if e["event"] == "speed.compared"]
    assert compared["attempts"] == [2, 3]
    assert all(n >= 3 for n in compared["timed_steps"])
    started = [e for e in journal if e["event"] == "attempt.started"]
    winner = started[compared["winner"] - 1]["knobs"]
    last = started[-1]
    assert last["attempt"] > 3
    assert {k: last["knobs"][k] for k in ("per_device_batch", "grad_accum",
                                           "gradient_checkpointing")} == {
        k: winner[k] for k in ("per_device_batch", "grad_accum", "gradient_checkpointing")}
    assert finished[last["attempt"]]["verdict"] == "fits"
