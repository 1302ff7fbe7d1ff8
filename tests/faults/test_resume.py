"""kill -9 of the supervisor mid-attempt, then `resume`: nothing lost, nothing run twice."""

from __future__ import annotations

import collections
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.faults.conftest import (
    TRAINER,
    attempt_processes,
    events,
    quiet_env,
    start_supervisor,
    wait_for,
)

pytestmark = pytest.mark.process

# Full b8 (597 MiB live) OOMs on a 250 MiB device; b4 (329) is ruled out by its figures;
# b2 x GA 4 (195) fits.
COMMAND = (*TRAINER, "--per_device_train_batch_size", "8", "--cutoff_len", "512",
           "--max_steps", "6", "--device-memory", "250", "--output_dir", "out")


def _spawned(run_dir: Path, attempt: int) -> bool:
    return any(e["event"] == "attempt.spawned" and e["attempt"] == attempt
               for e in events(run_dir))


@pytest.mark.parametrize("orphan", ["adopt", "end"])
def test_kill_9_then_resume_finishes_without_repeating_an_attempt(
        tmp_path: Path, orphan: str) -> None:
    """The fitting attempt is running when the supervisor dies; resume adopts (or ends) it.

    b8 OOMs; its figures rule b4 out (counted over the 250 MiB the OOM showed), so the second
    attempt (b2 x GA 4) is the one that fits, and the one running at the kill."""
    run_dir = tmp_path / "r"
    first = start_supervisor(tmp_path, "r", *COMMAND)
    try:
        wait_for(lambda: _spawned(run_dir, 2))
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    before = events(run_dir)
    assert not any(e["event"] == "attempt.finished" and e["attempt"] == 2 for e in before)

    second = subprocess.run(  # noqa: S603 - our own CLI
        [sys.executable, "-m", "supervisor", "--log-format", "json", "resume", str(run_dir),
         "--quiet", "--orphan", orphan],
        capture_output=True, text=True, env=quiet_env(), cwd=tmp_path, timeout=300,
        check=False)
    assert second.returncode == 0, second.stderr[-3000:]
    after = events(run_dir)
    assert after[:len(before)] == before  # the first life's events are all still there
    kinds = [e["event"] for e in after]
    assert "run.resumed" in kinds
    assert kinds[-1] == "run.finished"
    assert after[-1]["status"] == "fitted"
    started = collections.Counter(e["attempt"] for e in after if e["event"] == "attempt.started")
    assert all(count == 1 for count in started.values())  # no attempt ran twice
    finished = {e["attempt"]: e for e in after if e["event"] == "attempt.finished"}
    assert finished[1]["verdict"] == "oom"
    if orphan == "adopt":
        assert sorted(started) == [1, 2]
        assert finished[2]["adopted"] is True
        assert finished[2]["verdict"] == "fits"
        # Its duration counts from its own start, not from the adoption.
        resumed_at = next(e["ts"] for e in after if e["event"] == "run.resumed")
        spawned = next(e for e in after if e["event"] == "attempt.spawned" and e["attempt"] == 2)
        assert finished[2]["duration_s"] >= resumed_at - spawned["create_time"]
    else:
        assert sorted(started) == [1, 2, 3]
        assert finished[2]["verdict"] == "interrupted"
        assert finished[3]["verdict"] == "fits"
    assert attempt_processes(run_dir) == []


def test_resume_of_a_finished_run_is_refused(tmp_path: Path) -> None:
    """A run that ended says so in one line instead of running again."""
    run_dir = tmp_path / "r"
    done = start_supervisor(tmp_path, "r", *TRAINER, "--per_device_train_batch_size", "1",
                            "--cutoff_len", "64", "--max_steps", "1", "--output_dir", "out")
    assert done.wait(timeout=300) == 0
    again = subprocess.run(  # noqa: S603
        [sys.executable, "-m", "supervisor", "resume", str(run_dir)], capture_output=True,
        text=True, env=quiet_env(), cwd=tmp_path, timeout=120, check=False)
    assert again.returncode == 2
    assert "already finished (fitted); nothing to resume" in again.stderr
    assert again.stderr.count("\n") == 1


# The first run waits (silently) until told to fail, then fails with a real EADDRINUSE (two
# sockets bound to one port); every later run is the trainer.
FAIL_WHEN_TOLD = f"""\
n=$(cat count 2>/dev/null || echo 0); echo $((n+1)) > count
if [ "$n" -lt 1 ]; then
  echo waiting
  while [ ! -e fail-now ]; do sleep 0.1; done
  exec {sys.executable} -c "import socket; a=socket.socket(); a.bind(('127.0.0.1', 0)); \\
b=socket.socket(); b.bind(a.getsockname())"
fi
exec {sys.executable} -m supervisor.reference_trainer "$@"
"""

WINDOW_S = 10
"""The retry window of the policy copy: the shipped 600 s divided by 60."""


def test_a_failure_while_the_supervisor_is_down_is_retried_after_a_late_resume(
        tmp_path: Path) -> None:
    """SIGKILL of the supervisor, a transient failure while it is down, `resume` more than
    `max_delay_s` later: the downtime is not time between attempts, so it is retried, fits."""
    shipped = Path(__file__).resolve().parents[2] / "policies" / "default.toml"
    text = shipped.read_text(encoding="utf-8")
    assert "max_delay_s = 600" in text
    (tmp_path / "scaled.toml").write_text(
        text.replace("max_delay_s = 600", f"max_delay_s = {WINDOW_S}"), encoding="utf-8")
    (tmp_path / "flaky.sh").write_text(FAIL_WHEN_TOLD, encoding="utf-8")
    run_dir = tmp_path / "r"
    first = start_supervisor(tmp_path, "r", verb=(
        "run", "--policy", str(tmp_path / "scaled.toml"), "--quiet", "--runs-dir",
        str(tmp_path), "--run-id", "r", "--", "sh", "flaky.sh",
        "--per_device_train_batch_size", "1", "--cutoff_len", "64", "--max_steps", "1",
        "--output_dir", "out"))
    wait_for(lambda: _spawned(run_dir, 1))
    first.send_signal(signal.SIGKILL)
    first.wait()
    (tmp_path / "fail-now").touch()  # the attempt fails with nobody watching
    wait_for(lambda: attempt_processes(run_dir) == [], timeout_s=60)
    failed_at = time.time()
    time.sleep(WINDOW_S + 3)  # nobody resumes before the window would be over

    second = subprocess.run(  # noqa: S603 - our own CLI
        [sys.executable, "-m", "supervisor", "--log-format", "json", "resume", str(run_dir),
         "--quiet"], capture_output=True, text=True, env=quiet_env(), cwd=tmp_path,
        timeout=300, check=False)
    assert second.returncode == 0, second.stderr[-3000:]
    after = events(run_dir)
    resumed = next(e for e in after if e["event"] == "run.resumed")
    assert resumed["ts"] - failed_at > WINDOW_S
    finished = [e for e in after if e["event"] == "attempt.finished"]
    assert [e["verdict"] for e in finished] == ["transient", "fits"]
    assert "Address already in use" in str(finished[0]["evidence"])
    assert any(e["event"] == "transient.retrying" for e in after)
    assert after[-1]["event"] == "run.finished"
    assert after[-1]["status"] == "fitted"
