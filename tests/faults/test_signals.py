"""SIGINT/SIGTERM to the supervisor: the attempt's tree ends, `interrupted` recorded, exit 130."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.faults.conftest import TRAINER, attempt_processes, events, start_supervisor, wait_for

pytestmark = pytest.mark.process

LONG = (*TRAINER, "--per_device_train_batch_size", "2", "--cutoff_len", "256",
        "--max_steps", "500", "--output_dir", "out")


@pytest.mark.parametrize(("signals", "name"), [
    ((signal.SIGINT,), "sigint"),
    ((signal.SIGTERM,), "sigterm"),
    ((signal.SIGINT, signal.SIGINT), "twice"),
    ((signal.SIGUSR1,), "sigusr1"),  # Slurm's warning signal (sbatch --signal=B:USR1@120)
])
def test_signal_ends_the_attempt_and_records_it(
        tmp_path: Path, signals: tuple[signal.Signals, ...], name: str) -> None:
    """Graceful on the first signal, immediate on the second; journal, report, exit 130."""
    run_dir = tmp_path / name
    proc = start_supervisor(tmp_path, name, *LONG)
    wait_for(lambda: any(e["event"] == "attempt.spawned" for e in events(run_dir)))
    wait_for(lambda: len(attempt_processes(run_dir)) >= 2)  # shim and trainer are up
    for signum in signals:
        proc.send_signal(signum)
    assert proc.wait(timeout=120) == 130
    journal = events(run_dir)
    assert journal[-1]["event"] == "run.finished"
    assert journal[-1]["status"] == "interrupted"
    finished = [e for e in journal if e["event"] == "attempt.finished"]
    assert [e["verdict"] for e in finished] == ["interrupted"]
    assert (run_dir / "report.md").read_text().count("interrupted") >= 1
    assert attempt_processes(run_dir) == []
