"""The record survives whoever kills what: each of issue 8's faults on real processes.

After each fault, `resume` exits 0 (or the documented code), every journal line parses into a
typed event, no event is lost, no process is left, and the final config fits under the same
device limit as the original run (the injected limit announced itself in the fitted attempt).
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from supervisor.events import from_record, replay
from supervisor.journal import read
from tests.faults.conftest import TRAINER, attempt_processes, events, quiet_env, wait_for

pytestmark = pytest.mark.process

DEVICE = "250MiB"
# Under a 250 MiB device: full b8 x 512 (597 MiB live) and b4 (329) OOM; b2 x GA 4 (195) fits.
COMMAND = (*TRAINER, "--per_device_train_batch_size", "8", "--cutoff_len", "512",
           "--max_steps", "2", "--output_dir", "out")
LONG = (*TRAINER, "--per_device_train_batch_size", "1", "--cutoff_len", "64",
        "--max_steps", "400", "--output_dir", "out")
SHORT = (*TRAINER, "--per_device_train_batch_size", "1", "--cutoff_len", "64",
         "--max_steps", "40", "--output_dir", "out")


def _start(runs: Path, run_id: str, *command: str, env: dict[str, str] | None = None,
           options: tuple[str, ...] = ("--device-memory", DEVICE)) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "supervisor", "--log-format", "json", "run", "--quiet",
            "--no-estimate", "--runs-dir", str(runs), "--run-id", run_id, *options, "--",
            *command]
    with (runs / f"{run_id}.supervisor.log").open("ab") as sink:
        # A session of its own: a SIGHUP or SIGKILL sent here reaches only this supervisor.
        return subprocess.Popen(argv, stdout=sink, stderr=sink, env=env or quiet_env(),  # noqa: S603
                                cwd=runs, start_new_session=True)


def _resume(run_dir: Path, *extra: str, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - our own CLI
        [sys.executable, "-m", "supervisor", "--log-format", "json", "resume", str(run_dir),
         "--quiet", *extra], capture_output=True, text=True, env=env or quiet_env(),
        cwd=run_dir.parent, timeout=timeout, check=False)


def _count(run_dir: Path, kind: str) -> int:
    return sum(1 for e in events(run_dir) if e["event"] == kind)


def _check_record(run_dir: Path, before: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every line parses into a typed event, the first life's events are intact, none repeat."""
    got = read(run_dir / "journal.jsonl")
    assert got.torn_line is None
    for record in got.records:
        from_record(record)  # raises on any record that is not a valid typed event
    state = replay(got.records)
    after = list(got.records)
    assert after[:len(before)] == before
    started = collections.Counter(a.number for a in state.attempts)
    assert all(n == 1 for n in started.values())  # no attempt journaled twice
    assert state.pending is None
    assert attempt_processes(run_dir) == []
    return after


def _fits_under_the_device(run_dir: Path) -> None:
    """The fitted attempt ran under the injected 250 MiB limit and peaked below it."""
    state = replay(read(run_dir / "journal.jsonl").records)
    assert state.status == "fitted"
    last = state.attempts[-1]
    assert last.finished is not None
    assert last.finished.verdict == "fits"
    stderr = (run_dir / last.started.log_dir / "stderr.log").read_text()
    assert 'oom-supervisor.inject {"limit_mib": 250' in stderr
    assert last.finished.peak_mib is not None
    assert last.finished.peak_mib <= 250
    assert state.config.device_mib == 250
    assert state.config.inject_device_memory


@pytest.mark.parametrize("delay_ms", [0, 1, 2, 5])
def test_kill_9_in_the_first_ms_of_an_attempt_then_resume(tmp_path: Path, delay_ms: int) -> None:
    """Between attempt.started and attempt.spawned: resume finds the attempt by its marker."""
    run_dir = tmp_path / "r"
    first = _start(tmp_path, "r", *COMMAND)
    path = run_dir / "journal.jsonl"
    deadline = time.monotonic() + 240
    # Poll the journal every 0.5 ms for the second attempt's start, then kill.
    while time.monotonic() < deadline:
        if path.exists() and path.read_bytes().count(b'"attempt.started"') >= 2:
            break
        time.sleep(0.0005)
    time.sleep(delay_ms / 1000)
    first.send_signal(signal.SIGKILL)
    first.wait()
    before = events(run_dir)
    second = _resume(run_dir)
    assert second.returncode == 0, second.stderr[-3000:]
    _check_record(run_dir, before)
    _fits_under_the_device(run_dir)


def test_torn_last_line_then_resume(tmp_path: Path) -> None:
    """Half a line (power loss) is kept aside; resume appends whole events after the whole ones."""
    run_dir = tmp_path / "r"
    first = _start(tmp_path, "r", *COMMAND)
    wait_for(lambda: _count(run_dir, "attempt.spawned") >= 2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    before = events(run_dir)
    with (run_dir / "journal.jsonl").open("ab") as journal:
        journal.write(b'{"v": 1, "ts": 1.0, "event": "attempt.fini')
    second = _resume(run_dir)
    assert second.returncode == 0, second.stderr[-3000:]
    kept = (run_dir / "journal.torn-1.txt").read_bytes()
    assert kept == b'{"v": 1, "ts": 1.0, "event": "attempt.fini'
    after = _check_record(run_dir, before)
    resumed = [e for e in after if e["event"] == "run.resumed"]
    assert resumed[0]["torn_kept"] == "journal.torn-1.txt"
    _fits_under_the_device(run_dir)
    report = subprocess.run(  # noqa: S603
        [sys.executable, "-m", "supervisor", "report", str(run_dir)], capture_output=True,
        text=True, env=quiet_env(), check=False)
    assert report.returncode == 0, report.stderr


def test_a_second_run_or_resume_on_a_live_folder_is_refused(tmp_path: Path) -> None:
    """One writer per run folder: the second gets one line naming the holder's pid, exit 2."""
    run_dir = tmp_path / "r"
    first = _start(tmp_path, "r", *LONG, options=())
    try:
        wait_for(lambda: _count(run_dir, "attempt.spawned") >= 1)
        again = subprocess.run(  # noqa: S603
            [sys.executable, "-m", "supervisor", "run", "--runs-dir", str(tmp_path), "--run-id",
             "r", "--", *LONG], capture_output=True, text=True, env=quiet_env(), cwd=tmp_path,
            timeout=120, check=False)
        assert again.returncode == 2
        assert "already holds a run" in again.stderr
        assert "Traceback" not in again.stderr
        resumed = _resume(run_dir, timeout=120)
        assert resumed.returncode == 2
        assert f"in use by pid {first.pid}" in resumed.stderr
        assert len(resumed.stderr.strip().splitlines()) == 1
        assert first.poll() is None  # the first supervisor was not disturbed
        assert _count(run_dir, "run.resumed") == 0
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 130
    assert attempt_processes(run_dir) == []


def test_sighup_keeps_supervising_into_the_run_folder(tmp_path: Path) -> None:
    """A dropped ssh: the supervisor journals it, writes on into supervisor.log, and fits."""
    run_dir = tmp_path / "r"
    first = _start(tmp_path, "r", *COMMAND)
    wait_for(lambda: _count(run_dir, "attempt.spawned") >= 1)
    first.send_signal(signal.SIGHUP)
    assert first.wait(timeout=300) == 0
    journal = events(run_dir)
    lost = [e for e in journal if e["event"] == "terminal.lost"]
    assert len(lost) == 1
    assert lost[0]["output_to"] == str((run_dir / "supervisor.log").resolve())
    assert (run_dir / "supervisor.log").stat().st_size > 0
    _check_record(run_dir, [])
    _fits_under_the_device(run_dir)


def _wrapper_pid(run_dir: Path, attempt: int) -> int:
    return next(int(e["pid"]) for e in events(run_dir)
                if e["event"] == "attempt.spawned" and e["attempt"] == attempt)


def test_a_dead_wrapper_is_rerun_and_the_run_fits(tmp_path: Path) -> None:
    """kill -9 of the supervisor and then of the attempt's whole group (a reboot, a preempted
    job): no exit status was written; resume judges the attempt lost (nothing the command did),
    runs it again and the run fits, instead of stopping the night as fatal."""
    run_dir = tmp_path / "r"
    first = _start(tmp_path, "r", *SHORT, options=())
    wait_for(lambda: _count(run_dir, "attempt.spawned") >= 1)
    wait_for(lambda: len(attempt_processes(run_dir)) >= 2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    wrapper = _wrapper_pid(run_dir, 1)
    # The wrapper leads a session (and group) our supervisor created for this attempt.
    assert os.getpgid(wrapper) == wrapper
    os.killpg(wrapper, signal.SIGKILL)
    wait_for(lambda: not attempt_processes(run_dir), timeout_s=30)
    before = events(run_dir)
    second = _resume(run_dir, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    after = _check_record(run_dir, before)
    finished = [e for e in after if e["event"] == "attempt.finished"]
    assert [(e["attempt"], e["verdict"]) for e in finished] == [(1, "lost"), (2, "fits")]
    assert finished[0]["wrapper_died"] is True
    retry = next(e for e in after if e["event"] == "transient.retrying")
    assert retry["verdict"] == "lost"
    assert retry["delay_s"] == 0
    assert after[-1]["status"] == "fitted"


def test_sigterm_during_resume_is_honoured(tmp_path: Path) -> None:
    """resume adopting a long attempt ends it on SIGTERM, records it, exits 130."""
    run_dir = tmp_path / "r"
    first = _start(tmp_path, "r", *LONG, options=())
    wait_for(lambda: _count(run_dir, "attempt.spawned") >= 1)
    first.send_signal(signal.SIGKILL)
    first.wait()
    second = subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "supervisor", "--log-format", "json", "resume", str(run_dir),
         "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=quiet_env(),
        cwd=tmp_path, start_new_session=True)
    wait_for(lambda: _count(run_dir, "run.resumed") >= 1)
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=120) == 130
    journal = events(run_dir)
    assert journal[-1]["event"] == "run.finished"
    assert journal[-1]["status"] == "interrupted"
    assert attempt_processes(run_dir) == []


def test_resume_keeps_the_device_limit_and_asks_for_secrets_by_name(tmp_path: Path) -> None:
    """kill -9, then resume from a shell without HF_TOKEN: refused naming it; with it, the run
    goes on under the same injected 250 MiB limit (never a false fit on the bare machine)."""
    run_dir = tmp_path / "r"
    env = {**quiet_env(), "HF_TOKEN": "hf_resumeTESTsecret123"}
    first = _start(tmp_path, "r", *COMMAND, env=env)
    wait_for(lambda: _count(run_dir, "attempt.spawned") >= 2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    before = events(run_dir)
    bare = {k: v for k, v in env.items() if k != "HF_TOKEN"}
    refused = _resume(run_dir, env=bare, timeout=120)
    assert refused.returncode == 2
    assert "HF_TOKEN" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert events(run_dir) == before  # a refused resume writes nothing
    second = _resume(run_dir, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    _check_record(run_dir, before)
    _fits_under_the_device(run_dir)
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert b"hf_resumeTESTsecret123" not in path.read_bytes(), path
