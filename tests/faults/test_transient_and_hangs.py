"""Transient failures retry the same config with backoff; the watchdog ends hung attempts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from supervisor.loop import ExitCode
from supervisor.policy import parse, resolve
from tests.faults.conftest import supervise_here

pytestmark = pytest.mark.process

# A real EADDRINUSE (two sockets bound to one port) for the first $FAILS runs, then the trainer.
FLAKY = f"""\
n=$(cat count 2>/dev/null || echo 0); echo $((n+1)) > count
if [ "$n" -lt "$FAILS" ]; then
  exec {sys.executable} -c "import socket; a=socket.socket(); a.bind(('127.0.0.1', 0)); \\
b=socket.socket(); b.bind(a.getsockname())"
fi
exec {sys.executable} -m supervisor.reference_trainer "$@"
"""


def _flaky(tmp_path: Path) -> tuple[str, ...]:
    (tmp_path / "flaky.sh").write_text(FLAKY, encoding="utf-8")
    return ("sh", "flaky.sh", "--per_device_train_batch_size", "1", "--cutoff_len", "64",
            "--max_steps", "1", "--output_dir", "out")


def test_transient_twice_then_gone_fits_on_the_same_config(tmp_path: Path) -> None:
    """Port in use twice, then free: 3 attempts of one config, two backoff waits, fitted."""
    result, sleeps, journal = supervise_here(tmp_path, _flaky(tmp_path), resolve("default"),
                                             FAILS="2")
    assert result.exit_code is ExitCode.FITTED
    finished = [e for e in journal if e["event"] == "attempt.finished"]
    assert [e["verdict"] for e in finished] == ["transient", "transient", "fits"]
    assert "Address already in use" in str(finished[0]["evidence"])
    started = [e for e in journal if e["event"] == "attempt.started"]
    assert len({json.dumps(e["argv"]) for e in started}) == 1
    assert len(sleeps) == 2
    assert sleeps[0] < sleeps[1]  # exponential backoff


def test_permanent_transient_failure_stops_at_the_bound(tmp_path: Path) -> None:
    """A port that never frees: retries+1 attempts, the transient exit code, a clear reason."""
    ladder = resolve("default")
    result, _, _ = supervise_here(tmp_path, _flaky(tmp_path), ladder, FAILS="99")
    assert result.exit_code is ExitCode.TRANSIENT
    assert result.attempts == ladder.transient_retries + 1
    report = (tmp_path / "run" / "report.md").read_text()
    assert f"still failing after {ladder.transient_retries} retries" in report


@pytest.mark.parametrize(("script", "watchdog", "evidence"), [
    ("print('loading', flush=True)\nimport time\ntime.sleep(600)\n",
     {"stall_timeout_s": 2}, "printed nothing for 2 s (stalled)"),
    ("import time\nwhile True:\n    print('step', flush=True)\n    time.sleep(0.2)\n",
     {"attempt_timeout_s": 3}, "ran past its time limit of 3 s"),
])
def test_hung_attempt_is_ended_and_classified_hang(
        tmp_path: Path, script: str, watchdog: dict[str, int], evidence: str) -> None:
    """Silence or an overrun ends the attempt's tree; retried once, then the run stops."""
    (tmp_path / "job.py").write_text(script, encoding="utf-8")
    ladder = parse({"name": "watched", "watchdog": watchdog, "transient": {"retries": 1},
                    "rung": [{"action": "enable", "knob": "gradient_checkpointing"}]})
    result, _, journal = supervise_here(tmp_path, (sys.executable, "job.py",
                                        "--per_device_train_batch_size", "1"), ladder)
    assert result.exit_code is ExitCode.TRANSIENT
    finished = [e for e in journal if e["event"] == "attempt.finished"]
    assert [e["verdict"] for e in finished] == ["hang", "hang"]
    assert evidence in str(finished[0]["evidence"])
