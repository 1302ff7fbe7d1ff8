"""A checkpoint is resumed only when it is whole and this run's own, on real processes.

The reference trainer (the real HF Trainer) trains 8 steps, saving every 2; at step 5 it fails
once with torchelastic's own RendezvousConnectionError (a transient failure), so the retry
resumes from the newest checkpoint. Between the trainer's exit and the supervisor's record of
it (`run_attempt` wraps the real runner) the test damages or plants folders: what a crash before
the data reached the disk, a sync tool or another process does while the attempt runs.
The rescue on an error is off here ([rescue] on_error = false): with it, the retry would go on
from the checkpoint-5 saved on the way out, and the damaged folders would never be reached.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from supervisor import runner
from supervisor.classify import Outcome
from supervisor.command import Command
from supervisor.dialects.argv import ArgvDialect
from supervisor.journal import read
from supervisor.loop import ExitCode, RunResult, supervise
from tests.faults.conftest import TRAINER, events, quiet_env, start_supervisor, wait_for
from tests.faults.test_goodput import scaled_default

pytestmark = pytest.mark.process

ARGV = (*TRAINER, "--per_device_train_batch_size", "1", "--cutoff_len", "32",
        "--max_steps", "8", "--save_steps", "2", "--output_dir", "out")


def supervise_damaged(tmp_path: Path, damage: Callable[[Path], None],
                      ) -> tuple[RunResult, list[dict[str, Any]], str]:
    """The run, with `damage(output folder)` done as attempt 1 ends: result, journal, report."""
    done: list[int] = []

    def run_attempt(spec: runner.AttemptSpec) -> Outcome:
        outcome = runner.run(spec)
        if not done:
            done.append(1)
            damage(tmp_path / "out")
        return outcome

    result = supervise(Command(argv=ARGV, cwd=str(tmp_path)), dialect=ArgvDialect(),
                       ladder=dataclasses.replace(scaled_default(), rescue_on_error=False),
                       run_dir=tmp_path / "run", echo=False,
                       env={**quiet_env(), "REFERENCE_TRAINER_FAULTS": "transient@5"},
                       sleep=lambda _s: None, run_attempt=run_attempt)
    journal = list(read(tmp_path / "run" / "journal.jsonl").records)
    return result, journal, (tmp_path / "run" / "report.md").read_text(encoding="utf-8")


def of(journal: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [e for e in journal if e["event"] == event]


def half(path: Path) -> None:
    with path.open("r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


def assert_went_on_from_checkpoint_2(result: RunResult, journal: list[dict[str, Any]]) -> None:
    """Fitted, the last attempt resumed from checkpoint-2 and trained to step 8."""
    assert result.exit_code is ExitCode.FITTED
    last = of(journal, "attempt.finished")[-1]
    assert last["trained_steps"] == {"steps": 8, "resumed_from_step": 2}  # the trainer's word
    assert of(journal, "checkpoint.resumed")[-1]["step"] == 2


@pytest.mark.parametrize(("file", "tear", "said"), [
    ("model.safetensors", half, "model.safetensors is cut short"),
    ("trainer_state.json", lambda p: p.write_text('{"global_st', encoding="utf-8"),
     "its trainer_state.json does not parse"),
])
def test_a_torn_newest_checkpoint_is_passed_over(tmp_path: Path, file: str,
                                                 tear: Callable[[Path], None], said: str) -> None:
    """checkpoint-4 torn (trainer_state.json present): passed over with a line; the run
    reaches step 8 from checkpoint-2, never trying the torn one."""
    result, journal, report = supervise_damaged(
        tmp_path, lambda out: tear(out / "checkpoint-4" / file))
    assert [e["verdict"] for e in of(journal, "attempt.finished")] == ["transient", "fits"]
    assert_went_on_from_checkpoint_2(result, journal)
    passed = of(journal, "checkpoint.passed_over")
    assert [(Path(p["checkpoint"]).name, p["attempt"]) for p in passed] == [("checkpoint-4", 2)]
    assert said in passed[0]["reason"]
    assert "## Checkpoints passed over" in report
    assert said in report


def damage_a_member(out: Path) -> None:
    """Zero the local header of optimizer.pt's largest member: its zip directory stays whole,
    so the cheap checks pass it, and torch.load fails (ckpt_unusable_bad_member.txt)."""
    path = out / "checkpoint-4" / "optimizer.pt"
    with zipfile.ZipFile(path) as archive:
        biggest = max(archive.infolist(), key=lambda i: i.file_size)
    with path.open("r+b") as handle:
        handle.seek(biggest.header_offset)
        handle.write(b"\0\0\0\0")


def test_a_checkpoint_that_fails_to_load_is_passed_over_not_fatal(tmp_path: Path) -> None:
    """Attempt 2 resumes checkpoint-4 and dies loading it: 'checkpoint unusable', and attempt 3
    goes on from checkpoint-2 to the end; journal and report say which and why."""
    result, journal, report = supervise_damaged(tmp_path, damage_a_member)
    finished = of(journal, "attempt.finished")
    assert [e["verdict"] for e in finished] == ["transient", "checkpoint_unusable", "fits"]
    assert "PytorchStreamReader failed reading file" in finished[1]["evidence"]
    assert finished[1]["evidence"].startswith("checkpoint-4 does not load: ")
    assert [e["step"] for e in of(journal, "checkpoint.resumed")] == [4, 2]
    assert_went_on_from_checkpoint_2(result, journal)
    passed = of(journal, "checkpoint.passed_over")
    assert [(Path(p["checkpoint"]).name, p["attempt"]) for p in passed] == [("checkpoint-4", 3)]
    assert passed[0]["reason"].startswith("attempt 2 failed to load it")
    assert "attempt 2 failed to load it" in report


def plant(out: Path) -> None:
    """A folder copied in with its times (checkpoint-0007), and a planted checkpoint-99999999."""
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-0007")
    (out / "checkpoint-99999999").mkdir()
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text(encoding="utf-8"))
    state["global_step"] = 99999999
    (out / "checkpoint-99999999" / "trainer_state.json").write_text(json.dumps(state),
                                                                     encoding="utf-8")


def test_planted_and_odd_folders_are_passed_over_and_the_steps_stay_honest(
        tmp_path: Path) -> None:
    """Folders appearing during attempt 1 are never credited or resumed; each gets one line;
    the report counts the trainer's 8 steps, not 99999999."""
    result, journal, report = supervise_damaged(tmp_path, plant)
    assert [e["verdict"] for e in of(journal, "attempt.finished")] == ["transient", "fits"]
    first = of(journal, "attempt.finished")[0]
    assert [Path(p).name for p, _ in first["checkpoints"]] == ["checkpoint-2", "checkpoint-4"]
    assert of(journal, "checkpoint.resumed")[-1]["step"] == 4
    assert of(journal, "attempt.finished")[-1]["trained_steps"] == {
        "steps": 8, "resumed_from_step": 4}
    passed = {Path(p["checkpoint"]).name: p["reason"]
              for p in of(journal, "checkpoint.passed_over")}
    assert passed == {
        "checkpoint-99999999": ("it appeared during attempt 1 but step 99999999 is past the "
                                "run's 8 steps"),
        "checkpoint-0007": ("its name is not checkpoint-<number> (a positive number, no "
                            "leading zeros)")}
    assert len(of(journal, "checkpoint.passed_over")) == 2  # one line each, not one per attempt
    assert "99999999 steps" not in report
    assert result.report["goodput"]["steps"]["kept"] == 8


SLOW = (*TRAINER, "--per_device_train_batch_size", "1", "--cutoff_len", "32",
        "--max_steps", "400", "--save_steps", "50", "--output_dir", "out")


def _second_run(tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603
        [sys.executable, "-m", "supervisor", "run", "--quiet", "--no-estimate",
         "--runs-dir", str(tmp_path), "--run-id", "second", "--", *SLOW],
        cwd=tmp_path, env=quiet_env(), capture_output=True, text=True, timeout=300, check=False)


def test_a_second_run_on_the_same_output_folder_is_refused_in_one_line(tmp_path: Path) -> None:
    """The first run holds the output folder; the second (another run folder, the same
    `--output_dir`) exits 2 with one line naming the first, and leaves no run folder."""
    first = start_supervisor(tmp_path, "first", *SLOW)
    try:
        wait_for(lambda: any(e["event"] == "attempt.spawned"
                             for e in events(tmp_path / "first")))
        second = _second_run(tmp_path)
    finally:
        first.terminate()
        first.wait(timeout=120)
    assert second.returncode == ExitCode.USAGE
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1, second.stderr
    assert f"run folder {tmp_path / 'first'}" in lines[0]
    assert f"pid {first.pid}" in lines[0]
    assert "Traceback" not in second.stderr
    assert not (tmp_path / "second" / "journal.jsonl").exists()


# --- goodput from the trainer's own steps -------------------------------------------------------

NO_BAR = (*TRAINER, "--per_device_train_batch_size", "8", "--cutoff_len", "256",
          "--max_steps", "12", "--save_steps", "5", "--device-memory", "260",
          "--logging_steps", "1", "--output_dir", "out")


def test_a_failure_without_a_bar_is_placed_at_the_trainers_own_step(tmp_path: Path) -> None:
    """The HF Trainer with its bar off runs out of memory after step 8 (the data got longer):
    the journal and the report place it at step 8, the trainer's own count of log dicts, not
    at checkpoint-5's step (the rescue checkpoint saved on the OOM is at that same step 8);
    the steps trained are the trainer's, not the checkpoints'."""
    result = supervise(Command(argv=NO_BAR, cwd=str(tmp_path)), dialect=ArgvDialect(),
                       ladder=scaled_default(), run_dir=tmp_path / "run", echo=False,
                       env={**quiet_env(), "REFERENCE_TRAINER_FAULTS": "longer@7",
                            "REFERENCE_TRAINER_NO_BAR": "1"}, sleep=lambda _s: None)
    journal = list(read(tmp_path / "run" / "journal.jsonl").records)
    first = of(journal, "attempt.finished")[0]
    assert first["verdict"] == "oom"
    output = "".join((tmp_path / "run" / "attempts" / "01" / f"{name}.log").read_text(
        encoding="utf-8", errors="replace") for name in ("stdout", "stderr"))
    logged = output.count("{'loss':")  # one log dict a step (logging_steps 1)
    assert logged > 5  # past checkpoint-5: the case where the two differ
    # Its periodic save at step 5, and the rescue checkpoint saved on the OOM at the last step
    # the trainer completed: the trainer's own count, which the periodic saves do not give.
    assert [Path(p).name for p, _ in first["checkpoints"]] == ["checkpoint-5",
                                                               f"checkpoint-{logged}"]
    rescued = of(journal, "checkpoint.rescued")
    assert [(r["attempt"], r["why"], r["step"]) for r in rescued] == [(1, "oom", logged)]
    assert first["progress"]["step"] == logged
    assert "log dicts" in first["progress"]["step_source"]
    accidents = [a["what"] for a in result.report["goodput"]["accidents"]]
    assert f"attempt 1 out of memory at step {logged}" in accidents
    assert result.report["goodput"]["steps"]["trained"] >= logged


def test_resume_of_the_same_run_takes_the_output_folder_again(tmp_path: Path) -> None:
    """The supervisor is SIGKILLed mid-attempt; `resume` of its run takes the output folder
    again (a second run is then refused, naming the resumed supervisor)."""
    first = start_supervisor(tmp_path, "first", *SLOW)
    wait_for(lambda: any(e["event"] == "attempt.spawned" for e in events(tmp_path / "first")))
    first.kill()
    first.wait(timeout=60)
    resumed = start_supervisor(tmp_path, "first",
                               verb=("resume", str(tmp_path / "first"), "--quiet"))
    try:
        wait_for(lambda: any(e["event"] == "run.resumed" for e in events(tmp_path / "first")))
        second = _second_run(tmp_path)
    finally:
        resumed.terminate()
        resumed.wait(timeout=120)
    assert second.returncode == ExitCode.USAGE
    assert f"pid {resumed.pid}, run folder {tmp_path / 'first'}" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
