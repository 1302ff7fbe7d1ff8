"""classify() over tails recorded from real runs (tests/data/tails/README.md says how)."""

from __future__ import annotations

import signal

import pytest

from supervisor.classify import (
    OomKind,
    OomNumbers,
    Outcome,
    Verdict,
    VerdictKind,
    classify,
    is_oom_line,
    parse_numbers,
)
from tests.fakes import recorded


def verdict_of(name: str, exit_code: int, *, killed_by_supervisor: bool = False,
               interrupted: bool = False, kernel_oom_kills: int = 0) -> Verdict:
    return classify(Outcome(exit_code=exit_code, duration_s=1.0, tail=recorded(name),
                            killed_by_supervisor=killed_by_supervisor, interrupted=interrupted,
                            kernel_oom_kills=kernel_oom_kills))


@pytest.mark.parametrize(("name", "exit_code", "kind", "oom_kind"), [
    ("device_budget_oom.txt", 1, VerdictKind.OOM, OomKind.TORCH),
    ("device_budget_oom_backward.txt", 1, VerdictKind.OOM, OomKind.TORCH),
    ("host_cap_oom.txt", 1, VerdictKind.OOM, OomKind.CPU),
    ("python_memoryerror.txt", 1, VerdictKind.OOM, OomKind.PYTHON),
    ("fits.txt", 0, VerdictKind.FITS, None),
    ("bad_flag.txt", 2, VerdictKind.FATAL, None),
    ("missing_model_dir.txt", 2, VerdictKind.FATAL, None),
    ("import_error.txt", 1, VerdictKind.FATAL, None),
    ("transient_rendezvous.txt", 1, VerdictKind.TRANSIENT, None),
    ("cuda_device_budget_oom.txt", 1, VerdictKind.OOM, OomKind.CUDA),
    ("quoted/cuda_oom_torch22.txt", 1, VerdictKind.OOM, OomKind.CUDA),
    ("quoted/cuda_oom_torch21.txt", 1, VerdictKind.OOM, OomKind.CUDA),
    ("quoted/cuda_oom_torch113.txt", 1, VerdictKind.OOM, OomKind.CUDA),
    ("quoted/cuda_oom_runtimeerror.txt", 1, VerdictKind.OOM, OomKind.CUDA),
    ("quoted/hip_oom.txt", 1, VerdictKind.OOM, OomKind.HIP),
    ("quoted/mps_oom.txt", 1, VerdictKind.OOM, OomKind.MPS),
    ("quoted/cublas_alloc_failed.txt", 1, VerdictKind.OOM, OomKind.CUBLAS),
])
def test_recorded_tails(name: str, exit_code: int, kind: VerdictKind,
                        oom_kind: OomKind | None) -> None:
    """Each recorded run classifies as what it was."""
    verdict = verdict_of(name, exit_code)
    assert (verdict.kind, verdict.oom_kind) == (kind, oom_kind)
    if kind is not VerdictKind.FITS:
        assert verdict.evidence


def test_fatal_evidence_is_the_error_line() -> None:
    """A bad flag's verdict quotes argparse's own error line."""
    verdict = verdict_of("bad_flag.txt", 2)
    assert verdict.evidence is not None
    assert "unrecognized arguments" in verdict.evidence


@pytest.mark.parametrize(("name", "numbers"), [
    ("cuda_device_budget_oom.txt",  # capped by set_per_process_memory_fraction on an H200
     OomNumbers(tried_mib=20.0, capacity_mib=100.0, free_mib=142387.2, allocated_mib=82.31)),
    ("quoted/cuda_oom_torch22.txt",
     OomNumbers(tried_mib=30.0, capacity_mib=11264.0, free_mib=0.0, allocated_mib=17387.52)),
    ("quoted/cuda_oom_torch21.txt",
     OomNumbers(tried_mib=1740.8, capacity_mib=6144.0, free_mib=0.0, allocated_mib=3000.32)),
    ("quoted/cuda_oom_torch113.txt",
     OomNumbers(tried_mib=498.0, capacity_mib=11182.08, free_mib=401.81, allocated_mib=9441.28)),
    ("quoted/hip_oom.txt",
     OomNumbers(tried_mib=124.0, capacity_mib=20418.56, free_mib=554.47,
                allocated_mib=16250.88)),
])
def test_numbers_in_device_oom_messages_are_parsed(name: str, numbers: OomNumbers) -> None:
    """Tried-to-allocate, capacity, free and allocated come out in MiB, for every wording."""
    verdict = verdict_of(name, 1)
    assert verdict.numbers == numbers


def test_simulated_device_numbers_are_parsed() -> None:
    """The live-bytes budget's message gives the attempt's size and the device's."""
    numbers = verdict_of("device_budget_oom.txt", 1).numbers
    assert numbers is not None
    assert numbers.tried_mib is not None
    assert numbers.tried_mib > 0
    assert numbers.capacity_mib == 100.0


def test_oom_beats_the_exit_status_of_our_own_kill() -> None:
    """Killed by us (SIGTERM) after an OOM line: still an OOM, never a fatal signal."""
    verdict = verdict_of("device_budget_oom.txt", -signal.SIGTERM, killed_by_supervisor=True)
    assert verdict.kind is VerdictKind.OOM


def test_sigkill_with_oom_killer_evidence_is_a_host_oom() -> None:
    """Exit -9 with the cgroup's oom_kill count raised: the kernel OOM killer, walk the ladder."""
    verdict = verdict_of("fits.txt", -signal.SIGKILL, kernel_oom_kills=1)
    assert (verdict.kind, verdict.oom_kind) == (VerdictKind.OOM, OomKind.KERNEL)


def test_sigkill_without_evidence_is_fatal() -> None:
    """Exit -9 with no OOM-killer evidence is not guessed to be memory."""
    verdict = verdict_of("fits.txt", -signal.SIGKILL)
    assert verdict.kind is VerdictKind.FATAL


def test_interrupted_wins() -> None:
    """An attempt stopped because the supervisor was told to stop is `interrupted`."""
    assert verdict_of("device_budget_oom.txt", -15, interrupted=True).kind is (
        VerdictKind.INTERRUPTED)


def test_every_oom_tail_has_a_line_the_runner_kills_on() -> None:
    """The runner's early-kill test fires on each recorded OOM, and on no other tail."""
    oom = ["device_budget_oom.txt", "host_cap_oom.txt", "quoted/cuda_oom_torch22.txt",
           "quoted/hip_oom.txt", "quoted/mps_oom.txt", "quoted/cublas_alloc_failed.txt"]
    other = ["fits.txt", "bad_flag.txt", "import_error.txt", "transient_rendezvous.txt"]
    assert all(any(is_oom_line(line) for line in recorded(n)) for n in oom)
    assert not any(is_oom_line(line) for n in other for line in recorded(n))


def test_parse_numbers_without_numbers() -> None:
    """A CPU allocator failure names no device sizes."""
    assert parse_numbers(recorded("import_error.txt")) is None
