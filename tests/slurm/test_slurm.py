"""The supervisor on a real SLURM cluster: srun steps, sbatch, requeue, final-command.sh.

Every OOM here is real: rank 1 of a 2-task `srun` step of the reference trainer (gloo, CPU)
exceeds its live-bytes budget (`--device-memory 250 --memory_cap_rank 1`); batch 8 needs
~309 MiB per rank at cutoff 256, batch 4 x 2 ~195 MiB (measured under srun, docs/slurm.md).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.faults.conftest import attempt_processes
from tests.faults.conftest import events as read_events
from tests.slurm.conftest import Cluster, wait_until

# One xdist worker starts the session's cluster and runs every test on it.
pytestmark = [pytest.mark.process, pytest.mark.slurm, pytest.mark.xdist_group("slurm")]

PY = sys.executable
TRAINER = (PY, "-m", "supervisor.reference_trainer", "--cutoff_len", "256", "--max_steps", "1",
           "--device-memory", "250", "--memory_cap_rank", "1", "--output_dir", "out")


def _of(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == kind]


def _tasks(attempt_dir: Path) -> list[str]:
    """The attempt's processes that are tasks of an srun step (they carry SLURM_STEP_ID)."""
    found = []
    for proc in attempt_processes(attempt_dir):
        with contextlib.suppress(psutil.Error):
            if "SLURM_STEP_ID" in proc.environ():
                found.append(str(proc.pid))
    return found


def _log_events(path: Path) -> list[dict[str, Any]]:
    found = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            found.append(record)
    return found


@dataclass(frozen=True, slots=True, kw_only=True)
class AllocRun:
    """The salloc scenario, with what was seen right after attempt 1 ended."""

    folder: Path
    run_dir: Path
    job: str
    returncode: int
    steps_after_oom: list[str]
    processes_after_oom: list[str]
    log: Path


@pytest.fixture(scope="module")
def alloc_run(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> AllocRun:
    """`salloc -n 2 oom-supervisor run -- srun --ntasks 2 --label TRAINER`, followed live."""
    folder = tmp_path_factory.mktemp("alloc")
    run_dir = folder / "runs" / "alloc"
    log = folder / "supervisor.log"
    argv = ["salloc", "--ntasks", "2", "--job-name", "oomtier-alloc",
            PY, "-m", "supervisor", "--log-format", "json", "run", "--quiet",
            "--runs-dir", "runs", "--run-id", "alloc", "--",
            "srun", "--ntasks", "2", "--label", *TRAINER,
            "--per_device_train_batch_size", "8"]
    with log.open("wb") as sink:
        proc = subprocess.Popen(argv, cwd=folder, env=cluster.env, stdout=sink,  # noqa: S603
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_until(lambda: _of(read_events(run_dir), "attempt.finished") or proc.poll() is not None,
                   timeout_s=600, what="attempt 1 of the salloc run finished")
        # Right now the runner has ended attempt 1 (scancel, tree kill, squeue wait) and
        # attempt 2 is at most starting: attempt 1's step and tasks must be gone already.
        job = cluster.run("squeue", "--noheader", "--format=%i",
                          "--name=oomtier-alloc").stdout.strip()
        steps = cluster.steps(job) if job else []
        first = run_dir / "attempts" / "01"
        leftover = [f"{p.pid} {' '.join(p.cmdline())[:80]}" for p in attempt_processes(first)]
        # Generous: under `make test` the other xdist worker shares the two cores.
        code = proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return AllocRun(folder=folder, run_dir=run_dir, job=job, returncode=code,
                    steps_after_oom=steps, processes_after_oom=leftover, log=log)


def test_rank1_oom_in_an_srun_step_cancels_the_step_and_the_next_rung_fits(
        alloc_run: AllocRun) -> None:
    """Rank 1 OOMs: step JOB.0 ends (by itself, or scancelled when rank 0 lingers) and is gone
    from squeue, b4 x GA 2 fits (world 2)."""
    events = read_events(alloc_run.run_dir)
    finished = _of(events, "attempt.finished")
    assert alloc_run.returncode == 0, alloc_run.log.read_text()[-3000:]
    assert [f["verdict"] for f in finished] == ["oom", "fits"]
    assert "1: [rank1]: torch.OutOfMemoryError" in finished[0]["evidence"]
    cancels = [e for e in _log_events(alloc_run.log) if e.get("event") == "slurm.step_cancelled"]
    assert alloc_run.job
    # After an OOM line the command gets its grace to exit by itself: under gloo rank 0 reads
    # "Connection reset by peer" and exits, srun says so for task 0 and the step ends alone
    # (measured: a few seconds). Only when rank 0 lingers past srun's task-1 line and the
    # failed-task grace is the step ended, through SLURM, not only on this node.
    stderr = (alloc_run.run_dir / "attempts" / "01" / "stderr.log").read_text(errors="replace")
    if finished[0]["killed_by_supervisor"]:
        assert [c["steps"] for c in cancels] == [[f"{alloc_run.job}.0"]]
    else:
        assert cancels == []
        assert "task 0: Exited with exit code 1" in stderr
    assert "task 1: Exited with exit code 1" in stderr
    # Either way nothing of the step is left.
    assert f"{alloc_run.job}.0" not in alloc_run.steps_after_oom
    assert alloc_run.processes_after_oom == []
    # World size 2 from srun's --ntasks: the effective batch counts both ranks, and is kept.
    started = _of(events, "attempt.started")
    assert [(s["knobs"]["per_device_batch"], s["knobs"]["grad_accum"], s["knobs"]["world_size"])
            for s in started] == [(8, 1, 2), (4, 2, 2)]


def test_final_command_runs_in_a_fresh_allocation(cluster: Cluster, alloc_run: AllocRun) -> None:
    """final-command.sh (itself `srun --ntasks 2 ...`) runs under `sbatch --wait` and exits 0."""
    script = alloc_run.run_dir / "final-command.sh"
    assert "srun --ntasks 2" in script.read_text()
    out = alloc_run.folder / "final.out"
    done = cluster.run("sbatch", "--wait", "--ntasks", "2", "--job-name", "oomtier-final",
                       f"--output={out}", f"--chdir={alloc_run.folder}", str(script),
                       timeout_s=600)
    text = out.read_text(errors="replace") if out.exists() else ""
    assert done.returncode == 0, done.stderr + text[-3000:]
    assert text.count("reference-trainer.result") == 2  # both ranks trained their step


BATCH_SCRIPT = """#!/bin/sh
# The docs/slurm.md pattern: a requeued job resumes its run folder; a first start runs.
run="runs/job-$SLURM_JOB_ID"
echo "batch start: restart ${{SLURM_RESTART_COUNT:-0}}"
if [ -f "$run/journal.jsonl" ]; then
    exec {py} -m supervisor --log-format json resume --quiet "$run"
fi
exec {py} -m supervisor --log-format json run --quiet --runs-dir runs \\
    --run-id "job-$SLURM_JOB_ID" -- srun --label {trainer} \\
    --per_device_train_batch_size 4 --gradient_accumulation_steps 2
"""


def test_requeued_batch_job_resumes_the_same_run_without_repeating_an_attempt(
        cluster: Cluster, tmp_path: Path) -> None:
    """sbatch --requeue; `scontrol requeue` mid-attempt; the job resumes job-N and fits."""
    script = tmp_path / "job.sh"
    script.write_text(BATCH_SCRIPT.format(py=PY, trainer=" ".join(TRAINER)))
    out = tmp_path / "job.out"
    submitted = cluster.run("sbatch", "--parsable", "--requeue", "--ntasks", "2",
                            "--job-name", "oomtier-batch", f"--output={out}",
                            "--open-mode=append", f"--chdir={tmp_path}", str(script))
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    run_dir = tmp_path / "runs" / f"job-{job}"
    # Requeue once the step's tasks run (before that, srun would fail to start its step).
    wait_until(lambda: _tasks(run_dir / "attempts" / "01"), timeout_s=120,
               what="attempt 1's trainer tasks running")
    requeued = cluster.run("scontrol", "requeue", job)
    assert requeued.returncode == 0, requeued.stderr
    # SLURM holds a requeued job back ~121 s (BeginTime): let it start at once.
    wait_until(lambda: cluster.job_state(job) == "PENDING", timeout_s=60,
               what=f"job {job} pending after the requeue")
    cluster.run("scontrol", "update", f"jobid={job}", "StartTime=now")
    wait_until(lambda: "restart 1" in out.read_text(errors="replace")
               and cluster.job_state(job) in ("COMPLETED", "FAILED", ""),
               timeout_s=900, what=f"job {job} restarted and ended")
    text = out.read_text(errors="replace")
    assert "batch start: restart 0" in text
    assert "batch start: restart 1" in text
    events = read_events(run_dir)
    assert cluster.job_state(job) in ("COMPLETED", ""), text[-3000:]
    numbers = [e["attempt"] for e in _of(events, "attempt.started")]
    assert numbers == sorted(set(numbers)), numbers  # each attempt number once
    assert len(_of(events, "run.resumed")) == 1
    assert _of(events, "run.finished")[-1]["status"] == "fitted"
    # No -n on srun: the world size is the allocation's (sbatch --ntasks 2).
    assert {e["knobs"]["world_size"] for e in _of(events, "attempt.started")} == {2}


# Rank 1 raises torchelastic's own RendezvousConnectionError the first time; rank 0 waits for
# it for an hour, as a peer does in a collective. The second time both ranks finish.
FAILING_RANK = """\
import os, sys, time
from pathlib import Path
if "--help" in sys.argv:
    sys.exit(print("usage: job.py [--per_device_train_batch_size N]"))
rank = int(os.environ.get("SLURM_PROCID", "0"))
first = not Path("fired").exists()
print(f"rank {rank} ready", flush=True)
if first and rank == 1:
    time.sleep(2)
    Path("fired").write_text("x")
    from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError
    raise RendezvousConnectionError("The connection to the C10d store has failed.")
if first:
    time.sleep(3600)
print(f"rank {rank} done", flush=True)
"""


def test_a_rank_that_raises_ends_its_srun_step_with_its_own_error(
        cluster: Cluster, tmp_path: Path) -> None:
    """Slurm's default KillOnBadExit=0 keeps a step alive when one task fails: the supervisor
    ends it a few seconds after srun says so; the verdict is rank 1's own (transient) error,
    so the same config runs again and fits."""
    (tmp_path / "job.py").write_text(FAILING_RANK, encoding="utf-8")
    argv = ["salloc", "--ntasks", "2", "--job-name", "oomtier-rank",
            PY, "-m", "supervisor", "--log-format", "json", "run", "--quiet",
            "--runs-dir", "runs", "--run-id", "rank", "--",
            "srun", "--ntasks", "2", "--label", PY, "job.py", "--per_device_train_batch_size", "1"]
    done = subprocess.run(argv, cwd=tmp_path, env=cluster.env, capture_output=True,  # noqa: S603
                          text=True, timeout=600, check=False, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    events = read_events(tmp_path / "runs" / "rank")
    finished = _of(events, "attempt.finished")
    assert [f["verdict"] for f in finished] == ["transient", "fits"]
    assert "RendezvousConnectionError" in finished[0]["evidence"]
    assert finished[0]["evidence"].startswith("1: ")  # rank 1's own line, not rank 0's
    # Rank 0 would have waited an hour: ended a few seconds after rank 1 failed.
    assert finished[0]["duration_s"] < 60
    assert attempt_processes(tmp_path / "runs" / "rank" / "attempts" / "01") == []


# Task 1 says its last words, writes when it died, then dies by a signal (SIGABRT: how an
# uncaught C++/NCCL error ends a process; SIGKILL: the OOM killer's way); task 0 waits for an
# hour, as a peer in a collective would.
DYING_RANK = """\
import os, signal, sys, time
from pathlib import Path
if "--help" in sys.argv:
    sys.exit(print("usage: job.py [--per_device_train_batch_size N]"))
rank = int(os.environ.get("SLURM_PROCID", "0"))
print(f"rank {rank} step 1 loss 2.31", flush=True)
if rank == 1:
    time.sleep(2)
    print("rank 1 last words: the collective's buffer is bad", file=sys.stderr, flush=True)
    Path("died").write_text(repr(time.time()))
    if os.environ["HOW"] == "abort":
        os.abort()
    os.kill(os.getpid(), signal.SIGKILL)
time.sleep(3600)
"""


@pytest.mark.parametrize("label", [("--label",), (), ("--output=task-%j-%t.log",)],
                         ids=["label", "no-label", "per-task-files"])
@pytest.mark.parametrize(("how", "said"), [("abort", "Aborted (SIGABRT)"),
                                           ("kill", "Killed (SIGKILL)")])
def test_a_rank_ended_by_a_signal_ends_the_step_and_is_quoted(
        cluster: Cluster, tmp_path: Path, how: str, said: str, label: tuple[str, ...]) -> None:
    """srun says `task 1: Aborted` (or `Killed`) and keeps the step alive: the supervisor ends
    it within 10 s, and the verdict quotes task 1's own last line, never the peer it ended:
    from its labelled lines, from the lines before srun's, or from its own output file."""
    (tmp_path / "job.py").write_text(DYING_RANK, encoding="utf-8")
    argv = ["salloc", "--ntasks", "2", "--job-name", f"oomtier-{how}",
            PY, "-m", "supervisor", "--log-format", "json", "run", "--quiet",
            "--runs-dir", "runs", "--run-id", "dies", "--",
            "srun", "--ntasks", "2", *label, PY, "job.py",
            "--per_device_train_batch_size", "1"]
    done = subprocess.run(argv, cwd=tmp_path, env={**cluster.env, "HOW": how},  # noqa: S603
                          capture_output=True, text=True, timeout=600, check=False,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 4, done.stdout[-3000:] + done.stderr[-3000:]  # fatal: no retry
    events = read_events(tmp_path / "runs" / "dies")
    finished = _of(events, "attempt.finished")
    assert [f["verdict"] for f in finished] == ["fatal"]
    evidence = finished[0]["evidence"]
    assert "task 1 on " in evidence
    assert f"ended: {said}" in evidence
    assert evidence.endswith("rank 1 last words: the collective's buffer is bad")
    assert "task 0" not in evidence
    died = float((tmp_path / "died").read_text())
    # Measured: about 6 s (srun's line, the 5 s grace, scancel); task 0 would wait an hour.
    assert finished[0]["ended_at"] - died < 10, finished[0]["ended_at"] - died
    assert attempt_processes(tmp_path / "runs" / "dies" / "attempts" / "01") == []
