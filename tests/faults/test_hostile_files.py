"""Run folders that turn hostile under the supervisor (issue 16), as a user would meet them.

A trainer that wipes the run folder; a `.lock` or `journal.jsonl` replaced by a FIFO. One line
each, never a traceback, and `status` never blocks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.faults.conftest import quiet_env

pytestmark = pytest.mark.process

WIPE = """\
import argparse, os, shutil
from pathlib import Path
p = argparse.ArgumentParser()
p.add_argument("--per_device_train_batch_size", type=int, default=8)
p.parse_args()
shutil.rmtree(Path(os.environ["OOM_SUPERVISOR_ATTEMPT"]).parent.parent)
"""
FITS = """\
import argparse
p = argparse.ArgumentParser()
p.add_argument("--per_device_train_batch_size", type=int, default=8)
p.parse_args()
"""


def _cli(cwd: Path, *words: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "supervisor", *words], cwd=cwd,  # noqa: S603
                          env=quiet_env(), capture_output=True, text=True, timeout=timeout_s,
                          check=False)


def _run(tmp_path: Path, run_id: str, script: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / f"{run_id}.py").write_text(script, encoding="utf-8")
    return _cli(tmp_path, "run", "--quiet", "--no-estimate", "--runs-dir", str(tmp_path / "runs"),
                "--run-id", run_id, "--", sys.executable, f"{run_id}.py",
                "--per_device_train_batch_size", "4")


def test_a_trainer_that_wipes_the_run_folder_gets_one_line(tmp_path: Path) -> None:
    """The report and plot cannot be written: one line naming the path, no traceback."""
    done = _run(tmp_path, "wipe", WIPE)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, done.stderr
    assert "its folder is gone" in errors[0]
    assert str(tmp_path / "runs" / "wipe") in errors[0]


def test_a_fifo_lock_neither_hangs_status_nor_resume(tmp_path: Path) -> None:
    """`status` shows the run at once; `resume` refuses the lock in one line."""
    assert _run(tmp_path, "fifo", FITS).returncode == 0
    run_dir = tmp_path / "runs" / "fifo"
    (run_dir / ".lock").unlink()
    os.mkfifo(run_dir / ".lock")
    status = _cli(tmp_path, "status", str(run_dir), timeout_s=60)
    assert status.returncode == 0, status.stderr
    assert "fitted" in status.stdout
    resumed = _cli(tmp_path, "resume", str(run_dir), timeout_s=60)
    assert resumed.returncode == 2
    assert "Traceback" not in resumed.stderr
    assert "is a FIFO (named pipe), not a regular file" in resumed.stderr


def test_a_fifo_journal_is_named_for_what_it_is(tmp_path: Path) -> None:
    """Not "missing": a FIFO where the journal should be, said in one line, never read."""
    run_dir = tmp_path / "runs" / "x"
    run_dir.mkdir(parents=True)
    os.mkfifo(run_dir / "journal.jsonl")
    for verb in ("status", "report", "resume"):
        done = _cli(tmp_path, verb, str(run_dir), timeout_s=60)
        assert done.returncode == 2, (verb, done.stderr)
        assert "is a FIFO (named pipe), not a regular file" in done.stderr, verb
        assert "Traceback" not in done.stderr
