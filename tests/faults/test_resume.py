"""kill -9 of the supervisor mid-attempt, then `resume`: nothing lost, nothing run twice."""

from __future__ import annotations

import collections
import signal
import subprocess
import sys
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

# Full b8 (597 MiB live) and b4 (329) OOM on a 250 MiB device; b2 x GA 4 (195) fits.
COMMAND = (*TRAINER, "--per_device_train_batch_size", "8", "--cutoff_len", "512",
           "--max_steps", "6", "--device-memory", "250", "--output_dir", "out")


def _spawned(run_dir: Path, attempt: int) -> bool:
    return any(e["event"] == "attempt.spawned" and e["attempt"] == attempt
               for e in events(run_dir))


@pytest.mark.parametrize("orphan", ["adopt", "end"])
def test_kill_9_then_resume_finishes_without_repeating_an_attempt(
        tmp_path: Path, orphan: str) -> None:
    """The third attempt is running when the supervisor dies; resume adopts (or ends) it."""
    run_dir = tmp_path / "r"
    first = start_supervisor(tmp_path, "r", *COMMAND)
    wait_for(lambda: _spawned(run_dir, 3))
    first.send_signal(signal.SIGKILL)
    first.wait()
    before = events(run_dir)

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
    if orphan == "adopt":
        assert sorted(started) == [1, 2, 3]
        assert finished[3]["adopted"] is True
        assert finished[3]["verdict"] == "fits"
        # Its duration counts from its own start, not from the adoption.
        resumed_at = next(e["ts"] for e in after if e["event"] == "run.resumed")
        spawned = next(e for e in after if e["event"] == "attempt.spawned" and e["attempt"] == 3)
        assert finished[3]["duration_s"] >= resumed_at - spawned["create_time"]
    else:
        assert sorted(started) == [1, 2, 3, 4]
        assert finished[3]["verdict"] == "interrupted"
        assert finished[4]["verdict"] == "fits"
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
