"""The SLURM tier: a private one-host cluster (munged, slurmctld, slurmd) per test session.

cluster.sh installs slurm-wlm and munge from Debian's packages when they are missing (root
only), writes a config of its own into a temp folder (free ports, its own munge key) and starts
the daemons; they are stopped by their recorded pids at the end. Where no cluster can be started
(not root, no packages, a daemon that will not start) every test here is skipped with the reason.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).parent
SCRIPT = HERE / "cluster.sh"
_DAEMONS = ("slurmd", "slurmctld", "munged")  # stopped in this order


@dataclass(frozen=True, slots=True, kw_only=True)
class Cluster:
    """A running one-host cluster: its folder and the environment that points at it."""

    folder: Path
    env: dict[str, str]

    def run(self, *argv: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
        """A SLURM command against this cluster (output captured as text)."""
        return subprocess.run(argv, env=self.env, capture_output=True, text=True,  # noqa: S603
                              timeout=timeout_s, check=False, stdin=subprocess.DEVNULL)

    def steps(self, job: str) -> list[str]:
        """`squeue --steps` of one job: the ids (JOB.STEP) of its steps still known to SLURM."""
        out = self.run("squeue", "--steps", "--noheader", "--format=%i", f"--jobs={job}")
        return [s for s in out.stdout.split() if s.startswith(f"{job}.")]

    def job_state(self, job: str) -> str:
        """JobState of `scontrol show job` ("" once SLURM has forgotten the job)."""
        out = self.run("scontrol", "show", "job", job).stdout
        for word in out.split():
            if word.startswith("JobState="):
                return word.partition("=")[2]
        return ""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _base_env(folder: Path) -> dict[str, str]:
    # A tier run inside a real SLURM job must not see that job's allocation.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update({"SLURM_CONF": str(folder / "slurm.conf"), "OMP_NUM_THREADS": "1",
                "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONUNBUFFERED": "1",
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"})
    return env


def _stop(folder: Path, env: dict[str, str]) -> None:
    """Cancel what is left on the cluster, then end its daemons by their recorded pids."""
    if shutil.which("scancel"):
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(["scancel", "--quiet", "--full", "--user", str(os.getuid())],  # noqa: S603, S607
                           env=env, capture_output=True, timeout=20, check=False)
    for name in _DAEMONS:
        pid_file = folder / f"{name}.pid.mine"
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            continue
        if pid <= 1:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
                if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                    break
            except (ProcessLookupError, OSError):
                break
            time.sleep(0.1)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A one-host SLURM cluster of this session's own (skips the tier when none can start)."""
    bash = shutil.which("bash") or "/bin/bash"
    install = subprocess.run([bash, str(SCRIPT), "install"], capture_output=True, text=True,  # noqa: S603
                             check=False, timeout=900)
    if install.returncode != 0:
        pytest.skip(f"no SLURM cluster: {install.stderr.strip()[-300:]}")
    folder = tmp_path_factory.mktemp("slurm")
    env = _base_env(folder)
    start_env = {**env, "SLURMCTLD_PORT": str(_free_port()), "SLURMD_PORT": str(_free_port())}
    start = subprocess.run([bash, str(SCRIPT), "start", str(folder)], env=start_env,  # noqa: S603
                           capture_output=True, text=True, check=False, timeout=120)
    if start.returncode != 0:
        _stop(folder, env)
        pytest.skip(f"no SLURM cluster: {start.stderr.strip()[-300:]}")
    try:
        yield Cluster(folder=folder, env=env)
    finally:
        _stop(folder, env)
        # The daemons' children (slurmstepd) are gone with their steps; the pids files stay
        # with the logs in the temp folder for a post-mortem.


def wait_until(predicate: Callable[[], object], *, timeout_s: float, what: str) -> None:
    """Poll `predicate()` every 0.2 s; fail naming `what` when it does not hold in time."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    pytest.fail(f"{what}: not within {timeout_s:g} s")
