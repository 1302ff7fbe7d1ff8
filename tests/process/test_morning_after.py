"""What the supervisor decided on its own is said: a remembered fit names the run it came from
(console, report.md, status) and how to get the command's own config back."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.faults.conftest import events, quiet_env

pytestmark = pytest.mark.process

TRAINER = (sys.executable, "-m", "supervisor.reference_trainer", "--per_device_train_batch_size",
           "8", "--cutoff_len", "512", "--host-memory-cap", "600")


def _run(tmp_path: Path, run_id: str, *job: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - our own CLI
        [sys.executable, "-m", "supervisor", "--log-format", "plain", "run", "--no-estimate",
         "--fits-db", str(tmp_path / "fits.sqlite"), "--runs-dir", str(tmp_path / "runs"),
         "--run-id", run_id, "--", *TRAINER, *job], capture_output=True, text=True,
        env=quiet_env(), cwd=tmp_path, timeout=600, check=False)


def test_a_remembered_fit_is_named_where_it_came_from(tmp_path: Path) -> None:
    """Run a walks b8 -> b4x2; run b, the same job with another output folder and step count,
    starts at b4x2, says it was remembered from run a and which differences it ignored."""
    first = _run(tmp_path, "a", "--max_steps", "1", "--output_dir", "out")
    assert first.returncode == 0, first.stderr[-3000:]
    second = _run(tmp_path, "b", "--max_steps", "2", "--output_dir", "out-b")
    assert second.returncode == 0, second.stderr[-3000:]
    started = [e for e in events(tmp_path / "runs" / "b") if e["event"] == "attempt.started"]
    assert len(started) == 1
    assert started[0]["knobs"]["per_device_batch"] == 4
    console = second.stdout + second.stderr
    assert "remembered from run a" in console
    assert "--fresh" in console
    ignored = "--max_steps 1 -> 2; --output_dir out -> out-b"
    assert ignored in console
    report = (tmp_path / "runs" / "b" / "report.md").read_text()
    assert "Remembered fit" in report
    assert "run a" in report
    assert ignored in report
    status = subprocess.run(  # noqa: S603
        [sys.executable, "-m", "supervisor", "status", str(tmp_path / "runs" / "b")],
        capture_output=True, text=True, env=quiet_env(), timeout=120, check=False)
    assert "remembered from run a" in status.stdout
