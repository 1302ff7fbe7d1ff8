"""A 2-process torchrun (gloo, CPU) where only rank 1 runs out of host memory for real."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from supervisor.command import Command
from supervisor.dialects.argv import ArgvDialect
from supervisor.journal import read
from supervisor.loop import ExitCode, supervise
from supervisor.policy import resolve
from tests.faults.conftest import attempt_processes, quiet_env

pytestmark = pytest.mark.process


def test_one_rank_ooms_the_whole_tree_ends_and_the_ladder_walks(tmp_path: Path) -> None:
    """Rank 1's DefaultCPUAllocator failure ends torchrun and both workers; b4 x GA 2 fits."""
    argv = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            "2", "-m", "supervisor.reference_trainer", "--per_device_train_batch_size", "8",
            "--cutoff_len", "512", "--max_steps", "1", "--host-memory-cap", "600",
            "--memory_cap_rank", "1", "--output_dir", "out")
    command = Command(argv=argv, cwd=str(tmp_path))
    dialect = ArgvDialect()
    assert dialect.read(command).effective_batch == 16  # both ranks count
    result = supervise(command, dialect=dialect, ladder=resolve("default"),
                       run_dir=tmp_path / "run", echo=False, env=quiet_env())
    assert result.exit_code is ExitCode.FITTED
    finished = [e for e in read(tmp_path / "run" / "journal.jsonl").records
                if e["event"] == "attempt.finished"]
    assert finished[0]["verdict"] == "oom"
    assert finished[0]["oom_kind"] == "cpu"
    # torchrun ends its workers itself within the grace an OOM'd command gets to exit on its
    # own (runner.OOM_EXIT_GRACE_S); a peer that hangs is ended by the runner after it
    # (tests/process/test_runner.py). Either way nothing of the attempt is left.
    assert finished[0]["duration_s"] < 300
    assert finished[-1]["verdict"] == "fits"
    assert result.final_knobs is not None
    assert result.final_knobs.effective_batch == 16
    assert attempt_processes(tmp_path / "run") == []
    # A figure, not an assertion: how long ending the tree took after the OOM line.
    print(f"\nOOM line -> last process of the attempt gone: {finished[0]['kill_s']} s")  # noqa: T201


# Rank 1 says its last words after one all-reduce and aborts (SIGABRT, how an uncaught C++/NCCL
# error ends a process); rank 0 would wait in the next all-reduce.
ABORTING_RANK = """\
import argparse, os, time
import torch
import torch.distributed as dist
argparse.ArgumentParser().add_argument("--per_device_train_batch_size", type=int)
dist.init_process_group("gloo")
t = torch.ones(1)
dist.all_reduce(t)
if dist.get_rank() == 1:
    print("rank 1 last words: the collective's buffer is bad", flush=True)
    os.abort()
time.sleep(1)
dist.all_reduce(t)
"""


@pytest.mark.parametrize("tee", [(), ("--tee", "3")], ids=["plain", "tee"])
def test_a_rank_ended_by_a_signal_is_named_with_its_own_last_line(
        tmp_path: Path, tee: tuple[str, ...]) -> None:
    """torchrun ends the other rank itself; the verdict names rank 1 and SIGABRT and quotes
    rank 1's own last line, not torchrun's wrapper nor rank 0's SIGTERM."""
    (tmp_path / "job.py").write_text(ABORTING_RANK, encoding="utf-8")
    argv = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            "2", *tee, "job.py", "--per_device_train_batch_size", "1")
    command = Command(argv=argv, cwd=str(tmp_path))
    result = supervise(command, dialect=ArgvDialect(), ladder=resolve("default"),
                       run_dir=tmp_path / "run", echo=False, env=quiet_env())
    assert result.exit_code is ExitCode.FATAL
    finished = [e for e in read(tmp_path / "run" / "journal.jsonl").records
                if e["event"] == "attempt.finished"]
    assert [f["verdict"] for f in finished] == ["fatal"]
    evidence = finished[0]["evidence"]
    assert evidence.startswith("rank 1 on ")
    assert "ended: Aborted (SIGABRT)" in evidence
    assert evidence.endswith("rank 1 last words: the collective's buffer is bad")
    assert attempt_processes(tmp_path / "run") == []
