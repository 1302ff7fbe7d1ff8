"""`oom-supervisor status`: a live run started in the background, a finished one, a dead one."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from supervisor import status
from supervisor.journal import holder

pytestmark = pytest.mark.process

RUNS = Path(__file__).parent.parent / "data" / "runs"


def _wait_for(predicate: object, timeout_s: float = 300) -> str:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        last = predicate()  # type: ignore[operator]
        if last:
            return str(last)
        time.sleep(0.5)
    pytest.fail(f"timed out; last seen:\n{last}")


def test_status_of_a_live_run_then_of_the_same_run_finished(tmp_path: Path) -> None:
    """While the real trainer runs: the attempt, its elapsed time, its last lines, a live pid."""
    runs = tmp_path / "runs"
    proc = subprocess.Popen(  # noqa: S603 - our own CLI, the real reference trainer
        [sys.executable, "-m", "supervisor", "demo", "--walk", "--device-memory", "150MiB",
         "--max-attempts", "1", "--runs-dir", str(runs), "--run-id", "live"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        run_dir = runs / "live"

        def running() -> str:
            if not (run_dir / "journal.jsonl").is_file() or holder(run_dir) is None:
                return ""
            text = status.render(status.newest_run(runs))
            return text if "last lines of attempts/01/" in text else ""

        text = _wait_for(running)
        assert "running attempt 1 of at most 1" in text
        assert f"supervisor alive (pid {proc.pid})" in text
        assert "attempt 1 (as given) running for " in text
        assert "full fine-tuning, batch 4, cutoff 1024, checkpointing off" in text
        assert "  | " in text  # a line the trainer wrote
        assert proc.wait(timeout=300) == 3  # one attempt, out of memory, budget spent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    done = status.render(run_dir)
    assert "ladder exhausted" in done
    assert "supervisor ended" in done
    assert "oom (torch)" in done


def test_status_of_a_recorded_finished_run() -> None:
    """Each attempt with its verdict and memory against the device, and the working config."""
    text = status.render(RUNS / "demo-70")
    assert "fitted: the command finished" in text
    assert "supervisor ended" in text
    assert text.count("oom (torch)") == 9
    assert "peak 47.9 MiB of 70.0 MiB (68%)" in text
    assert "working config: LoRA r8, batch 1 x 4 accumulated (effective 4), cutoff 512" in text
    folder = RUNS / "demo-70"
    assert f"  folder {folder}" in text
    # Every line but the folder's (as long as the checkout's path) fits a 120-column terminal.
    assert max(len(line) for line in text.splitlines() if str(folder) not in line) <= 120


def test_status_of_a_run_whose_supervisor_died(tmp_path: Path) -> None:
    """A journal that stops mid-attempt with nobody holding the folder says how to resume."""
    run = tmp_path / "dead"
    run.mkdir()
    lines = (RUNS / "demo-150" / "journal.jsonl").read_text().splitlines(keepends=True)
    started = next(i for i, line in enumerate(lines) if '"attempt": 2' in line)
    (run / "journal.jsonl").write_text("".join(lines[:started + 1]))
    text = status.render(run, now=lambda: 1796073600.0)
    assert "running attempt 2 of at most 32" in text
    assert f"NO supervisor is running on it (it died); carry on with: oom-supervisor resume {run}" \
        in text


def test_newest_run_and_no_run(tmp_path: Path) -> None:
    """The default RUN_DIR is the run whose journal changed last; none is a StatusError."""
    with pytest.raises(status.StatusError, match="no run under"):
        status.newest_run(tmp_path)
    for name, mtime in (("a", 100.0), ("b", 200.0)):
        (tmp_path / name).mkdir()
        journal = tmp_path / name / "journal.jsonl"
        journal.write_text("{}\n")
        import os  # noqa: PLC0415

        os.utime(journal, (mtime, mtime))
    assert status.newest_run(tmp_path).name == "b"
