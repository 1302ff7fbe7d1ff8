"""Fault tests: the supervisor itself run as a user would, then hurt on purpose."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from supervisor.command import Command
from supervisor.dialects.argv import ArgvDialect
from supervisor.journal import read
from supervisor.loop import RunResult, supervise
from supervisor.policy import Ladder

TRAINER = (sys.executable, "-m", "supervisor.reference_trainer")


def quiet_env() -> dict[str, str]:
    """One BLAS thread, offline, unbuffered: what every process test runs with."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    return env


def start_supervisor(runs: Path, run_id: str, *command: str,
                     verb: tuple[str, ...] = ("run",)) -> subprocess.Popen[bytes]:
    """`python -m supervisor run --quiet --runs-dir RUNS --run-id ID -- COMMAND`, backgrounded."""
    argv = [sys.executable, "-m", "supervisor", "--log-format", "json", *verb]
    if verb == ("run",):
        argv += ["--quiet", "--runs-dir", str(runs), "--run-id", run_id, "--", *command]
    with (runs / f"{run_id}.supervisor.log").open("ab") as sink:
        return subprocess.Popen(argv, stdout=sink, stderr=sink,  # noqa: S603
                                env=quiet_env(), cwd=runs)


def events(run_dir: Path) -> list[dict[str, Any]]:
    """The journal's events (whole lines only)."""
    path = run_dir / "journal.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def wait_for(predicate: Callable[[], bool], timeout_s: float = 240.0) -> None:
    """Poll until predicate() holds; fail the test with the timeout otherwise."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    msg = f"condition not met within {timeout_s} s"
    raise AssertionError(msg)


def attempt_processes(run_dir: Path) -> list[psutil.Process]:
    """Live processes whose environment marks them as part of the given run's attempts."""
    marker_prefix = str(run_dir.resolve())
    found = []
    for proc in psutil.process_iter():
        try:
            value = proc.environ().get("OOM_SUPERVISOR_ATTEMPT", "")
        except psutil.Error:
            continue
        if value.startswith(marker_prefix):
            found.append(proc)
    return found


def supervise_here(tmp_path: Path, argv: tuple[str, ...], ladder: Ladder,
                   **env: str) -> tuple[RunResult, list[float], list[dict[str, Any]]]:
    """supervise() in-process on a plain argv command in tmp_path: its result, the backoff
    waits it asked for (not slept), and its journal."""
    sleeps: list[float] = []
    result = supervise(Command(argv=argv, cwd=str(tmp_path)), dialect=ArgvDialect(),
                       ladder=ladder, run_dir=tmp_path / "run", echo=False,
                       env={**quiet_env(), **env}, sleep=sleeps.append)
    return result, sleeps, list(read(tmp_path / "run" / "journal.jsonl").records)

