"""The rescue checkpoint on real processes: a step that runs out of memory saves the last
completed step first, a polite stop saves at the next step end, and nothing is lost on the way
out but the step in progress (docs/reliability.md, "The rescue checkpoint")."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from supervisor._compat import tomllib
from supervisor.policy import Ladder, parse
from tests.faults.conftest import attempt_processes, events, quiet_env, supervise_here, wait_for

pytestmark = pytest.mark.process

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = ROOT / "policies" / "default.toml"
INJECT = ROOT / "supervisor" / "_inject"
TRAINER = (sys.executable, "-m", "supervisor.reference_trainer")
# b8 x 256 tokens fits the 260 MiB live-bytes device while the samples are half as long; from
# step 5 on they are whole (`longer@5`), and the step after that runs out of memory.
GROWING = (*TRAINER, "--per_device_train_batch_size", "8", "--cutoff_len", "256",
           "--device-memory", "260", "--max_steps", "10", "--save_steps", "4",
           "--logging_steps", "1", "--output_dir", "out")


def _policy(**rescue: object) -> Ladder:
    data: dict[str, Any] = tomllib.loads(DEFAULT.read_text(encoding="utf-8"))
    data["rescue"].update(rescue)
    return parse(data, source="default.toml")


def _kinds(journal: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in journal if e["event"] == kind]


def test_an_oom_mid_run_saves_the_last_step_and_the_next_config_goes_on_from_it(
        tmp_path: Path) -> None:
    """The data gets longer at step 5; the step after it runs out of memory. The hook saves
    checkpoint-N at the last completed step, journaled with its seconds, and the smaller batch
    resumes there: no completed step is trained twice, only the one that failed."""
    result, _, journal = supervise_here(tmp_path, GROWING, _policy(),
                                        REFERENCE_TRAINER_FAULTS="longer@5")
    assert result.status == "fitted", journal[-1]
    finished = _kinds(journal, "attempt.finished")
    assert [e["verdict"] for e in finished] == ["oom", "fits"]
    [rescued] = _kinds(journal, "checkpoint.rescued")
    assert rescued["why"] == "oom"
    assert rescued["attempt"] == 1
    assert rescued["seconds"] > 0
    step = rescued["step"]
    assert step > 4  # past the last periodic checkpoint (checkpoint-4): that is what it saves
    folder = tmp_path / "out" / f"checkpoint-{step}"
    assert Path(rescued["checkpoint"]) == folder.resolve()
    assert json.loads((folder / "trainer_state.json").read_text())["global_step"] == step
    # Credited to the attempt that wrote it, and the next config continues from it.
    assert [str(folder.resolve()), step] in [[str(Path(p).resolve()), s]
                                             for p, s in finished[0]["checkpoints"]]
    [resumed] = _kinds(journal, "checkpoint.resumed")
    assert (resumed["attempt"], resumed["step"]) == (2, step)
    # The highest step the OOM attempt completed is the rescued one: only the failed step
    # (in progress when memory ran out) is trained again.
    assert finished[0]["progress"]["step"] == step
    assert finished[1]["trained_steps"] == {"steps": 10, "resumed_from_step": step}
    assert not list((tmp_path / "out").glob(".oom-supervisor-rescue-*"))
    report = (tmp_path / "run" / "report.md").read_text(encoding="utf-8")
    assert f"ran out of memory in the step after step {step}, and first saved" in report


def test_a_rescue_that_fails_leaves_no_folder_and_the_run_goes_on_from_the_last_checkpoint(
        tmp_path: Path) -> None:
    """From step 5 no file may grow past 1 MiB (a full disk, for real: EFBIG): the rescue's save
    fails, leaves no checkpoint folder (nor its staging folder), is journaled as failed, and the
    next config continues from the last periodic checkpoint, checkpoint-4."""
    result, _, journal = supervise_here(tmp_path, GROWING, _policy(),
                                        REFERENCE_TRAINER_FAULTS="longer@5,full@5")
    assert result.status == "fitted", journal[-1]
    [failed] = _kinds(journal, "checkpoint.rescue_failed")
    assert failed["why"] == "oom"
    assert "too large" in failed["error"].lower()
    assert _kinds(journal, "checkpoint.rescued") == []
    assert not (tmp_path / "out" / f"checkpoint-{failed['step']}").exists()
    [resumed] = _kinds(journal, "checkpoint.resumed")
    assert resumed["step"] == 4
    assert not list((tmp_path / "out").glob(".oom-supervisor-rescue-*"))


def test_the_rescue_can_be_switched_off(tmp_path: Path) -> None:
    """[rescue] on_oom = false: the hook is not asked to save; the run goes back to
    checkpoint-4 as before."""
    result, _, journal = supervise_here(tmp_path, GROWING, _policy(on_oom=False),
                                        REFERENCE_TRAINER_FAULTS="longer@5")
    assert result.status == "fitted", journal[-1]
    assert _kinds(journal, "checkpoint.rescued") == []
    assert _kinds(journal, "checkpoint.resumed")[0]["step"] == 4


STEADY = (*TRAINER, "--per_device_train_batch_size", "2", "--cutoff_len", "64",
          "--max_steps", "10", "--save_steps", "4", "--logging_steps", "1", "--output_dir", "out")


def test_a_transient_error_mid_run_saves_the_last_step_and_the_retry_goes_on_from_it(
        tmp_path: Path) -> None:
    """torchelastic's rendezvous error at the end of step 6 (between checkpoint-4 and
    checkpoint-8): the hook saves checkpoint-6 on the way out, and the retry of the same config
    resumes there: no step is trained twice."""
    result, _, journal = supervise_here(tmp_path, STEADY, _policy(),
                                        REFERENCE_TRAINER_FAULTS="transient@6")
    assert result.status == "fitted", journal[-1]
    finished = _kinds(journal, "attempt.finished")
    assert [e["verdict"] for e in finished] == ["transient", "fits"]
    [rescued] = _kinds(journal, "checkpoint.rescued")
    assert (rescued["why"], rescued["attempt"], rescued["step"]) == ("error", 1, 6)
    assert rescued["seconds"] > 0
    folder = tmp_path / "out" / "checkpoint-6"
    assert json.loads((folder / "trainer_state.json").read_text())["global_step"] == 6
    [resumed] = _kinds(journal, "checkpoint.resumed")
    assert (resumed["attempt"], resumed["step"]) == (2, 6)
    assert finished[1]["trained_steps"] == {"steps": 10, "resumed_from_step": 6}
    report = (tmp_path / "run" / "report.md").read_text(encoding="utf-8")
    assert "failed after step 6, and first saved" in report


def test_the_error_rescue_can_be_switched_off(tmp_path: Path) -> None:
    """[rescue] on_error = false: the retry goes back to checkpoint-4, as before."""
    result, _, journal = supervise_here(tmp_path, STEADY, _policy(on_error=False),
                                        REFERENCE_TRAINER_FAULTS="transient@6")
    assert result.status == "fitted", journal[-1]
    assert _kinds(journal, "checkpoint.rescued") == []
    assert _kinds(journal, "checkpoint.resumed")[0]["step"] == 4


def test_no_rescue_with_several_ranks(tmp_path: Path) -> None:
    """Under torchrun with two ranks, rank 0 runs out of memory: the hook stays off on both
    (a save by one rank would wait for the other forever) and says so; no folder is written."""
    env = {**quiet_env(), "PYTHONPATH": os.pathsep.join([str(INJECT), str(ROOT)]),
           "OOM_SUPERVISOR_RESCUE": json.dumps({"oom": True, "stop_file": None}),
           "REFERENCE_TRAINER_FAULTS": "longer@2"}
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            "2", "-m", "supervisor.reference_trainer", "--per_device_train_batch_size", "8",
            "--cutoff_len", "256", "--device-memory", "260", "--memory_cap_rank", "0",
            "--max_steps", "6", "--output_dir", "out"]
    # Its own session: whatever happens, the test ends every process it started.
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE,  # noqa: S603
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=300)
    finally:
        # torchrun's workers run in sessions of their own: end them by pid, then its group.
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    done = subprocess.CompletedProcess(argv, proc.returncode, "", stderr)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if "oom-supervisor.rescue" in line]
    offs = [line for line in lines if '"off"' in line]
    assert len(offs) == 2, done.stderr[-3000:]
    assert all('"world_size": 2' in line for line in offs)
    assert not any('"saved"' in line or '"armed"' in line for line in lines)
    assert "OutOfMemoryError" in done.stderr
    assert not list((tmp_path / "out").glob("checkpoint-*"))


PACED = (*TRAINER, "--per_device_train_batch_size", "2", "--cutoff_len", "64",
         "--max_steps", "40", "--save_steps", "10", "--logging_steps", "1", "--output_dir", "out")


def test_sigterm_mid_run_saves_at_the_next_step_and_resume_goes_on_from_it(
        tmp_path: Path) -> None:
    """SIGTERM to the supervisor while the trainer is between periodic checkpoints: the trainer
    saves at its next step end and stops (journaled with its seconds), and `resume` continues
    from that checkpoint: at most the step in progress is lost."""
    run_dir = tmp_path / "sigterm"
    argv = [sys.executable, "-m", "supervisor", "--log-format", "json", "run", "--quiet",
            "--runs-dir", str(tmp_path), "--run-id", "sigterm", "--", *PACED]
    env = {**quiet_env(), "REFERENCE_TRAINER_STEP_S": "0.4"}
    with (tmp_path / "supervisor.log").open("ab") as sink:
        proc = subprocess.Popen(argv, stdout=sink, stderr=sink, env=env, cwd=tmp_path)  # noqa: S603
    stderr_log = run_dir / "attempts" / "01" / "stderr.log"

    def past(step: int) -> bool:
        text = stderr_log.read_text(errors="replace") if stderr_log.exists() else ""
        return f"| {step}/40 [" in text

    wait_for(lambda: past(12))  # past checkpoint-10, before checkpoint-20
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 130
    journal = events(run_dir)
    [rescued] = _kinds(journal, "checkpoint.rescued")
    assert rescued["why"] == "stop"
    assert rescued["seconds"] is not None
    step = rescued["step"]
    assert step >= 12
    first = _kinds(journal, "attempt.finished")[0]
    assert first["verdict"] == "interrupted"
    assert first["progress"]["step"] <= step  # no completed step beyond the rescue was lost
    assert (tmp_path / "out" / f"checkpoint-{step}" / "trainer_state.json").is_file()
    assert attempt_processes(run_dir) == []

    resumed = subprocess.run(  # noqa: S603
        [sys.executable, "-m", "supervisor", "--log-format", "json", "resume", str(run_dir),
         "--quiet"], env={**quiet_env()}, cwd=tmp_path, capture_output=True, timeout=600,
        check=False)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    journal = events(run_dir)
    after = _kinds(journal, "checkpoint.resumed")
    assert after[-1]["step"] == step
    last = _kinds(journal, "attempt.finished")[-1]
    assert last["verdict"] == "fits"
    assert last["trained_steps"] == {"steps": 40, "resumed_from_step": step}


def test_a_trainer_with_jit_checkpointing_gets_the_time_to_save_on_sigterm(
        tmp_path: Path) -> None:
    """The rescue hook switched off, the trainer run with transformers' own
    `--enable_jit_checkpoint` and no periodic saves, steps of 5 s: on SIGTERM it waits 3 s,
    then saves at its next step boundary, mostly later than the usual 5 s before the SIGKILL.
    The supervisor gives it JIT's wait plus a save and a step, so the checkpoint is whole and
    credited to the attempt."""
    policy = tmp_path / "no-rescue.toml"
    policy.write_text(DEFAULT.read_text(encoding="utf-8").replace(
        "on_oom = true", "on_oom = false").replace("on_stop = true", "on_stop = false"),
        encoding="utf-8")
    run_dir = tmp_path / "jit"
    argv = [sys.executable, "-m", "supervisor", "--log-format", "json", "run", "--quiet",
            "--policy", str(policy), "--runs-dir", str(tmp_path), "--run-id", "jit", "--",
            *TRAINER, "--per_device_train_batch_size", "2", "--cutoff_len", "64",
            "--max_steps", "40", "--output_dir", "out",
            "--enable_jit_checkpoint"]
    env = {**quiet_env(), "REFERENCE_TRAINER_STEP_S": "5"}
    with (tmp_path / "supervisor.log").open("ab") as sink:
        proc = subprocess.Popen(argv, stdout=sink, stderr=sink, env=env, cwd=tmp_path)  # noqa: S603
    stderr_log = run_dir / "attempts" / "01" / "stderr.log"
    wait_for(lambda: stderr_log.exists() and "| 2/40 [" in stderr_log.read_text(errors="replace"))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 130
    journal = events(run_dir)
    assert _kinds(journal, "checkpoint.rescued") == []  # the hook was off: this is JIT's save
    [finished] = _kinds(journal, "attempt.finished")
    [(path, step)] = finished["checkpoints"]  # JIT's: there are no periodic saves
    assert step >= 2
    assert not (Path(path) / "checkpoint-is-incomplete.txt").exists()
    assert json.loads((Path(path) / "trainer_state.json").read_text())["global_step"] == step
    assert attempt_processes(run_dir) == []
