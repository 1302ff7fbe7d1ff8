"""The runner on real processes: output teed, the whole tree ended on the first OOM line."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import psutil
import pytest

from supervisor.classify import VerdictKind, classify
from supervisor.runner import AttemptSpec, StopRequest, run

pytestmark = pytest.mark.process

TRAINER = f"{shlex.quote(sys.executable)} -m supervisor.reference_trainer"


def _alive(marker: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if marker in " ".join(cmdline) and "pytest" not in " ".join(cmdline):
            found.append(proc)
    return found


def test_real_oom_ends_the_whole_tree_at_once(tmp_path: Path,
                                              trainer_env: dict[str, str]) -> None:
    """A launcher that would wait on a hung peer (sleep) is ended with it on the OOM line.

    The peer runs in a session of its own, as torchrun's workers do, so only the runner's
    memory of descendants (not the process group) can end it.
    """
    script = (f"setsid sleep 3171 & sleep 3172 & {TRAINER} --per_device_train_batch_size 8 "
              f"--cutoff_len 512 --max_steps 1 --device-memory 50 --output_dir {tmp_path}/o; "
              "wait")
    outcome = run(AttemptSpec(argv=("sh", "-c", script), env=trainer_env,
                              log_dir=tmp_path / "logs", echo=False, grace_s=2.0))
    # The shell would `wait` for its sleepers for an hour: the attempt ending at all means the
    # runner ended the tree on the OOM line rather than waiting for the leader.
    assert outcome.killed_by_supervisor
    assert outcome.oom_line is not None
    assert outcome.oom_line.startswith("torch.OutOfMemoryError")
    assert classify(outcome).kind is VerdictKind.OOM
    assert _alive("sleep 3171") == []
    assert _alive("sleep 3172") == []
    assert "OutOfMemoryError" in (tmp_path / "logs" / "stderr.log").read_text()


def test_output_is_teed_line_by_line(tmp_path: Path, trainer_env: dict[str, str]) -> None:
    """stdout and stderr go to their own files; the tail keeps both."""
    outcome = run(AttemptSpec(
        argv=(sys.executable, "-c",
              "import sys; print('to-out'); print('to-err', file=sys.stderr)"),
        env=trainer_env, log_dir=tmp_path, echo=False))
    assert outcome.exit_code == 0
    assert (tmp_path / "stdout.log").read_text() == "to-out\n"
    assert (tmp_path / "stderr.log").read_text() == "to-err\n"
    assert sorted(outcome.tail) == ["to-err", "to-out"]


def test_missing_program_is_reported_not_raised(tmp_path: Path) -> None:
    """A command that cannot start is an attempt with exit 127 and the reason in its tail."""
    outcome = run(AttemptSpec(argv=("/nonexistent/python", "train.py"), env={},
                              log_dir=tmp_path, echo=False))
    assert outcome.exit_code == 127
    assert "cannot start" in outcome.tail[0]
    assert classify(outcome).kind is VerdictKind.FATAL


def test_stop_request_ends_the_attempt_as_interrupted(tmp_path: Path) -> None:
    """A stop asked before the attempt ends is honoured at once and classified `interrupted`."""
    stop = StopRequest()
    stop.request()
    outcome = run(AttemptSpec(argv=("sleep", "3173"), env={}, log_dir=tmp_path, echo=False,
                              stop=stop, grace_s=1.0))
    assert outcome.interrupted
    assert classify(outcome).kind is VerdictKind.INTERRUPTED
    assert _alive("sleep 3173") == []


def test_torchrun_error_files_join_the_tail(tmp_path: Path, trainer_env: dict[str, str]) -> None:
    """A rank that dies with an OOM under torchrun (@record) leaves error.json; its text is read."""
    argv = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            "1", "-m", "supervisor.reference_trainer", "--per_device_train_batch_size", "8",
            "--max_steps", "1", "--device-memory", "50", "--output_dir", str(tmp_path / "o"))
    outcome = run(AttemptSpec(argv=argv, env=trainer_env, log_dir=tmp_path / "logs",
                              echo=False), is_oom=lambda _line: False)  # let torchrun report
    assert any(line.startswith("[") and "error.json] " in line and "OutOfMemoryError" in line
               for line in outcome.tail)
    assert classify(outcome).kind is VerdictKind.OOM


HOLDS = ("import time; block = bytearray(80 * 1024 * 1024); block[::4096] = b'x' * "
         "len(block[::4096]); time.sleep(4)")


@pytest.mark.parametrize("launcher", ["sh", "srun"])
def test_host_memory_under_srun_is_unknown_not_srun_s_own(
        tmp_path: Path, trainer_env: dict[str, str], launcher: str) -> None:
    """Under srun the step's tasks are not srun's children (slurmstepd runs them, on other nodes
    too): the attempt's host memory is unknown, never srun's own few MiB. Without srun the
    tree's 80 MiB are counted. (A stand-in `srun` that runs its task as a child.)"""
    fake = tmp_path / "bin" / launcher
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\n"$@"\n', encoding="utf-8")
    fake.chmod(0o755)
    outcome = run(AttemptSpec(argv=(str(fake), sys.executable, "-c", HOLDS), env=trainer_env,
                              log_dir=tmp_path / "logs", echo=False))
    assert outcome.exit_code == 0
    if launcher == "sh":
        assert outcome.host_peak_mib is not None
        assert outcome.host_peak_mib >= 80
    else:
        assert outcome.host_peak_mib is None


def test_the_host_cap_the_command_runs_under_is_read_from_its_processes(
        tmp_path: Path, trainer_env: dict[str, str]) -> None:
    """`prlimit --as=3000000000 python ...`: the attempt's own RLIMIT_AS, read from its process
    (whoever set it: prlimit, ulimit -v, an inherited limit), is what memory.png draws."""
    outcome = run(AttemptSpec(argv=("prlimit", "--as=3000000000", sys.executable, "-c",
                                    "import time; time.sleep(3)"),
                              env=trainer_env, log_dir=tmp_path / "logs", echo=False))
    assert outcome.exit_code == 0
    assert outcome.host_cap_source == "RLIMIT_AS"
    assert outcome.host_cap_mib == pytest.approx(3_000_000_000 / 2**20, abs=0.1)
