"""A launcher's word that one task ended, and that task's own last words: over srun's output
recorded from the Slurm tier's real srun (tests/data/tails/srun_*task1_*.txt, README there)."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor import launchers
from supervisor.classify import Outcome, VerdictKind, classify

TAILS = Path(__file__).resolve().parents[1] / "data" / "tails"

HOW = {"abort": ("Aborted", "SIGABRT"), "kill": ("Killed", "SIGKILL"),
       "segv": ("Segmentation fault", "SIGSEGV")}


def _recorded(name: str) -> list[str]:
    return (TAILS / name).read_text(encoding="utf-8").splitlines()


@pytest.mark.parametrize("label", ["", "label_"])
@pytest.mark.parametrize("how", sorted(HOW))
def test_the_ended_task_is_named_and_quoted_not_the_peer_the_cancel_ended(
        how: str, label: str) -> None:
    lines = _recorded(f"srun_{label}task1_{how}.txt")
    found = launchers.read_ended_task(lines)
    assert found is not None
    end, own, source = found
    assert end.tasks == (1,)
    assert (end.how, end.signal_name) == HOW[how]
    assert end.by_signal
    assert own[-1].endswith("rank 1 on stderr: about to fail")
    assert not any("rank 0" in line for line in own) if label else True
    assert ("task 1's own lines" in source) if label else ("without srun --label" in source)
    # The verdict is built from task 1's own words; the peer's "task 0: Killed" is not it.
    outcome = Outcome(exit_code=137, duration_s=8.0, tail=tuple(lines), killed_by_supervisor=True,
                      failed_task=end.line, task_lines=own, task_source=source)
    verdict = classify(outcome)
    assert verdict.kind is VerdictKind.FATAL
    assert verdict.evidence is not None
    assert "rank 1 on stderr: about to fail" in verdict.evidence
    assert f"task 1 on vm ended: {HOW[how][0]} ({HOW[how][1]})" in verdict.evidence
    assert "task 0" not in verdict.evidence


def test_before_this_the_peer_the_supervisor_cancelled_was_the_evidence() -> None:
    """Without the ended task's own lines, the tail's last error line is the cancelled peer's:
    what the verdict said before (and what it must not say)."""
    lines = _recorded("srun_task1_kill.txt")
    verdict = classify(Outcome(exit_code=137, duration_s=8.0, tail=tuple(lines),
                               killed_by_supervisor=True))
    assert verdict.evidence == "srun: error: vm: task 0: Killed"


def test_a_sigkilled_task_under_the_oom_killer_is_memory() -> None:
    lines = _recorded("srun_label_task1_kill.txt")
    found = launchers.read_ended_task(lines)
    assert found is not None
    end, own, source = found
    verdict = classify(Outcome(exit_code=137, duration_s=8.0, tail=tuple(lines),
                               killed_by_supervisor=True, kernel_oom_kills=1,
                               failed_task=end.line, task_lines=own, task_source=source))
    assert verdict.kind is VerdictKind.OOM
    assert "task 1 on vm ended: Killed (SIGKILL)" in str(verdict.evidence)


@pytest.mark.parametrize(("line", "tasks", "how"), [
    ("srun: error: vm: task 1: Aborted", (1,), "Aborted"),
    ("srun: error: vm: task 1: Aborted (core dumped)", (1,), "Aborted (core dumped)"),
    ("srun: error: node-3: tasks 0-2,5: Exited with exit code 2", (0, 1, 2, 5),
     "Exited with exit code 2"),
    ("srun: error: vm: task 3: Terminated by signal 6", (3,), "Aborted"),
    ("srun: error: vm: tasks [1-2]: Bus error", (1, 2), "Bus error"),
])
def test_srun_task_end_lines(line: str, tasks: tuple[int, ...], how: str) -> None:
    end = launchers.task_end(line)
    assert end is not None
    assert end.tasks == tasks
    assert end.how == how


@pytest.mark.parametrize("line", [
    "srun: error: vm: task 1: Exited with exit code 0",  # not a failure
    "srun: Job step aborted: Waiting up to 7 seconds for job step to finish.",
    "1: rank 1 says task 1: Aborted",
])
def test_not_a_task_end(line: str) -> None:
    assert launchers.task_end(line) is None


def test_a_tasks_own_output_file_wins_over_the_stream() -> None:
    """srun --output=task-%j-%t.log: the stream has no task output; the file has it."""
    argv = ["srun", "--ntasks", "2", "--output=logs/task-%j-%2t.log", "python", "job.py"]
    assert launchers.per_task_files(argv) == ("logs/task-%j-%2t.log",)
    assert launchers.expand("logs/task-%j-%2t.log", task=1, job="7", step="0",
                            host="vm") == "logs/task-7-01.log"
    end = launchers.task_end("srun: error: vm: task 1: Aborted")
    assert end is not None
    own, source = launchers.own_lines(end, ["srun: Job step aborted"],
                                      {1: ["rank 1 on stderr: about to fail"]})
    assert own == ("rank 1 on stderr: about to fail",)
    assert source == "task 1's own output file"


@pytest.mark.parametrize(("name", "source"), [
    ("torchrun_rank1_abort.txt", "the output just before torchrun saw it end"),
    ("torchrun_tee_rank1_abort.txt", "rank 1's own lines"),
])
def test_a_torchrun_rank_ended_by_a_signal_is_named_and_quoted(name: str, source: str) -> None:
    """torchrun ends the other ranks itself and names the root cause: rank 1, SIGABRT. The
    verdict quotes rank 1's own last line, not torchrun's wrapper nor rank 0's SIGTERM."""
    lines = _recorded(name)
    verdict = classify(Outcome(exit_code=1, duration_s=6.0, tail=tuple(lines)))
    assert verdict.kind is VerdictKind.FATAL
    evidence = str(verdict.evidence)
    assert evidence.startswith("rank 1 on localhost ended: Aborted (SIGABRT)")
    assert source in evidence
    assert evidence.endswith("rank 1 last words: the collective's buffer is bad")


def test_a_sigkilled_torchrun_rank_is_named_too() -> None:
    """The recorded SIGKILL of rank 1 (no output of its own): named, said to have printed
    nothing; with the OOM killer's count it stays a kernel OOM (classify's earlier rule)."""
    lines = _recorded("torchrun_rank1_sigkill.txt")
    verdict = classify(Outcome(exit_code=1, duration_s=6.0, tail=tuple(lines)))
    assert verdict.kind is VerdictKind.FATAL
    assert str(verdict.evidence).startswith("rank 1 on localhost ended: Killed (SIGKILL)")
    oom = classify(Outcome(exit_code=1, duration_s=6.0, tail=tuple(lines), kernel_oom_kills=1))
    assert oom.kind is VerdictKind.OOM
