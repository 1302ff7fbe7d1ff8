"""classify() over tails recorded from real runs (tests/data/tails/README.md says how)."""

from __future__ import annotations

import signal

import pytest

from supervisor.classify import (
    FINISHED_THEN_HUNG,
    FRAGMENTATION_SHARE,
    LAUNCHER_PREFIXES,
    OOM_RULES,
    OomKind,
    OomNumbers,
    Outcome,
    Verdict,
    VerdictKind,
    classify,
    is_oom_line,
    launcher_of,
    parse_numbers,
    shows_fragmentation,
    strip_launcher_prefix,
)
from tests.fakes import TAILS, recorded


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
    ("torchrun_rank1_device_budget_oom.txt", 1, VerdictKind.OOM, OomKind.TORCH),
    ("torchrun_tee_rank1_device_budget_oom.txt", 1, VerdictKind.OOM, OomKind.TORCH),
    ("pdsh_torchrun_rank1_device_budget_oom.txt", 1, VerdictKind.OOM, OomKind.TORCH),
    ("srun_label_rank1_device_budget_oom.txt", 1, VerdictKind.OOM, OomKind.TORCH),
    ("torchrun_rank1_sigkill.txt", 1, VerdictKind.FATAL, None),
    ("torchrun_rank1_valueerror.txt", 1, VerdictKind.FATAL, None),
    ("torchrun_rank1_valueerror_peer.txt", 1, VerdictKind.FATAL, None),
    ("no_data_num_samples0.txt", 1, VerdictKind.NO_DATA, None),
    ("axolotl_no_data_num_samples0.txt", 1, VerdictKind.NO_DATA, None),
    ("axolotl_launcher_python_no_data_num_samples0.txt", 1, VerdictKind.NO_DATA, None),
    ("axolotl_sample_packing_no_data_num_samples0.txt", 1, VerdictKind.NO_DATA, None),
    ("axolotl_host_cap_oom.txt", 1, VerdictKind.OOM, OomKind.CPU),
    ("ckpt_unusable_torn_safetensors.txt", 1, VerdictKind.CHECKPOINT_UNUSABLE, None),
    ("ckpt_unusable_torn_state.txt", 1, VerdictKind.CHECKPOINT_UNUSABLE, None),
    ("ckpt_unusable_torn_optimizer.txt", 1, VerdictKind.CHECKPOINT_UNUSABLE, None),
    ("ckpt_unusable_bad_member.txt", 1, VerdictKind.CHECKPOINT_UNUSABLE, None),
    ("ckpt_unusable_no_weights.txt", 1, VerdictKind.CHECKPOINT_UNUSABLE, None),
    ("nobar_device_budget_oom.txt", 1, VerdictKind.OOM, OomKind.TORCH),
    ("load_mmap_enomem.txt", 1, VerdictKind.OOM, OomKind.HOST_LOAD),
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
     OomNumbers(tried_mib=20.0, capacity_mib=100.0, free_mib=142387.2, allocated_mib=82.31,
                reserved_unallocated_mib=3.69)),
    ("quoted/cuda_oom_torch22.txt",
     OomNumbers(tried_mib=30.0, capacity_mib=11264.0, free_mib=0.0, allocated_mib=17387.52,
                reserved_unallocated_mib=696.75)),
    ("quoted/cuda_oom_torch21.txt",
     OomNumbers(tried_mib=1740.8, capacity_mib=6144.0, free_mib=0.0, allocated_mib=3000.32,
                reserved_unallocated_mib=2355.2)),
    ("quoted/cuda_oom_torch113.txt",  # "9.78 GiB reserved in total" less 9.22 GiB allocated
     OomNumbers(tried_mib=498.0, capacity_mib=11182.08, free_mib=401.81, allocated_mib=9441.28,
                reserved_unallocated_mib=573.44)),
    ("quoted/hip_oom.txt",
     OomNumbers(tried_mib=124.0, capacity_mib=20418.56, free_mib=554.47,
                allocated_mib=16250.88, reserved_unallocated_mib=165.29)),
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


def test_a_launchers_sigkilled_worker_with_oom_killer_evidence_is_a_host_oom() -> None:
    """torchrun exits 1 after rank 1's SIGKILL; with the cgroup's oom_kill count raised, memory."""
    verdict = verdict_of("torchrun_rank1_sigkill.txt", 1, kernel_oom_kills=1)
    assert (verdict.kind, verdict.oom_kind) == (VerdictKind.OOM, OomKind.KERNEL)
    assert "failed (exitcode: -9) local_rank: 1" in (verdict.evidence or "")
    # Without the count nothing says memory: fatal, never guessed (and never "transient").
    assert verdict_of("torchrun_rank1_sigkill.txt", 1).kind is VerdictKind.FATAL


def test_fatal_evidence_behind_torchrun_is_the_workers_own_error() -> None:
    """torchrun's ChildFailedError only says a worker failed: the evidence is why it did."""
    for name in ("torchrun_rank1_valueerror.txt", "torchrun_rank1_valueerror_peer.txt"):
        # (the second also holds rank 0's "Connection closed by peer": the symptom, not why)
        assert verdict_of(name, 1).evidence == (
            "[rank1]: ValueError: bad value in the data collator"), name
    # A worker that printed no exception (SIGKILL): torchrun's root cause names it and its
    # signal, never rank 0, which torchrun itself ended with SIGTERM.
    evidence = verdict_of("torchrun_rank1_sigkill.txt", 1).evidence or ""
    assert evidence.startswith("rank 1 on localhost ended: Killed (SIGKILL)")


def test_slurm_oom_kill_event_is_a_host_oom() -> None:
    """slurmstepd's cgroup report (quoted from SchedMD/slurm, both wordings) is an OOM line."""
    new = ("slurmstepd: error: Detected 1 oom_kill event in StepId=1234.0. Some of the step "
           "tasks have been OOM Killed.")
    old = ("slurmstepd: error: Detected 2 oom-kill event(s) in step 1234.0 cgroup. Some of "
           "your processes may have been killed by the cgroup out-of-memory handler.")
    for line in (new, old):
        verdict = classify(Outcome(exit_code=1, duration_s=1.0,
                                   tail=("srun: error: n1: task 1: Killed", line)))
        assert (verdict.kind, verdict.oom_kind) == (VerdictKind.OOM, OomKind.KERNEL)
        assert is_oom_line(line)


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


# --- launcher prefixes ------------------------------------------------------------------------

# Each: a real run whose worker output a launcher labelled (tests/data/tails/README.md), and the
# launchers that labelled its first OOM line, outermost first.
LABELLED_RUNS = [
    ("torchrun_rank1_device_budget_oom.txt", ("torch.distributed excepthook",)),
    ("torchrun_tee_rank1_device_budget_oom.txt",
     ("torchrun --tee", "torch.distributed excepthook")),
    ("pdsh_torchrun_rank1_device_budget_oom.txt", ("pdsh", "torch.distributed excepthook")),
    ("srun_label_rank1_device_budget_oom.txt", ("srun --label", "torch.distributed excepthook")),
]


def _until_first_oom(name: str) -> tuple[str, ...]:
    """The output as the runner has it when it kills on the first OOM line."""
    lines = recorded(name)
    first = next(i for i, line in enumerate(lines) if is_oom_line(line))
    return lines[:first + 1]


@pytest.mark.parametrize(("name", "launchers"), LABELLED_RUNS)
def test_oom_behind_launcher_labels_is_seen_when_the_runner_kills(
        name: str, launchers: tuple[str, ...]) -> None:
    """Rank 1's torch.OutOfMemoryError, labelled by its launcher(s), is an OOM at kill time."""
    seen = _until_first_oom(name)
    assert launcher_of(seen[-1]) == launchers
    assert strip_launcher_prefix(seen[-1]).startswith("torch.OutOfMemoryError: Simulated device")
    verdict = classify(Outcome(exit_code=-15, duration_s=1.0, tail=seen,
                               killed_by_supervisor=True))
    assert (verdict.kind, verdict.oom_kind) == (VerdictKind.OOM, OomKind.TORCH)
    assert verdict.evidence == seen[-1].strip()  # the label stays: it names the rank
    assert verdict.numbers == OomNumbers(tried_mib=10.75, capacity_mib=100.0,
                                         allocated_mib=91.37)


@pytest.mark.parametrize("name", ["pdsh_torchrun_rank1_device_budget_oom.txt",
                                  "srun_label_rank1_device_budget_oom.txt"])
def test_labels_on_every_line_so_only_stripping_finds_the_oom(name: str) -> None:
    """Under pdsh or srun --label no line is unlabelled: without stripping, no rule matches."""
    lines = recorded(name)
    assert not any(rule.pattern.search(line.strip()) for rule in OOM_RULES for line in lines)
    assert classify(Outcome(exit_code=1, duration_s=1.0, tail=lines)).kind is VerdictKind.OOM


@pytest.mark.parametrize(("line", "program_wrote"), [
    # Labels in the formats their sources print (see LAUNCHER_PREFIXES), beyond the recorded
    # ones: padded and heterogeneous-job srun labels, nesting, a torchrun role name.
    ("1: [rank1]: torch.OutOfMemoryError: x", "torch.OutOfMemoryError: x"),
    (" 7: MemoryError", "MemoryError"),  # srun pads the task id to the widest
    ("P1 0: MemoryError", "MemoryError"),  # srun, a heterogeneous job's component 1
    ("worker-1: 1: [default1]:[rank1]: MemoryError", "MemoryError"),
    ("[trainer3]:x", "x"),  # torchrun --role trainer
    # Not labels: an exception's type, a traceback, a plain message.
    ("torch.OutOfMemoryError: x", "torch.OutOfMemoryError: x"),
    ("torch.cuda.OutOfMemoryError: x", "torch.cuda.OutOfMemoryError: x"),
    ("RuntimeError: CUDA out of memory.", "RuntimeError: CUDA out of memory."),
    ("KeyboardInterrupt: x", "KeyboardInterrupt: x"),
    ("Traceback (most recent call last):", "Traceback (most recent call last):"),
    ('  File "a.py", line 3, in <module>', 'File "a.py", line 3, in <module>'),
])
def test_strip_launcher_prefix(line: str, program_wrote: str) -> None:
    """Labels are removed however they nest; exception names are never taken for host names."""
    assert strip_launcher_prefix(line) == program_wrote


def test_every_prefix_names_its_source() -> None:
    """Each launcher prefix is data with a name (its source is quoted beside it)."""
    assert len({p.launcher for p in LAUNCHER_PREFIXES}) == len(LAUNCHER_PREFIXES)


def test_a_huge_line_is_judged_on_its_start() -> None:
    """A megabyte line without a newline costs one bounded match, and still finds an OOM."""
    assert is_oom_line("[rank1]: torch.OutOfMemoryError: x" + " " * 2_000_000 + "y")
    assert not is_oom_line("[rank1]: " + "a" * 2_000_000)


# --- devices this machine cannot produce ------------------------------------------------------

# QUOTED FROM SOURCE, NOT RECORDED: each line is the message format of the allocator's source
# (repo and path beside each rule in supervisor/classify.py) with example sizes filled in.
XPU_OOM = ("torch.OutOfMemoryError: XPU out of memory. Tried to allocate 2.00 GiB. GPU 0 has a "
           "total capacity of 15.11 GiB of which 1.02 GiB is free. Of the allocated memory "
           "12.50 GiB is allocated by PyTorch, and 1.37 GiB is reserved by PyTorch but "
           "unallocated. Please use `empty_cache` to release all unoccupied cached memory.")
NPU_OOM = ("RuntimeError: NPU out of memory. Tried to allocate 260.00 MiB (NPU 0; 28.50 GiB "
           "total capacity; 10.24 GiB already allocated; 10.24 GiB current active; 149.57 MiB "
           "free; 10.78 GiB reserved in total by PyTorch).If reserved memory is >> allocated "
           "memory try setting max_split_size_mb to avoid fragmentation.")
NPU_FRACTION_OOM = ("torch.OutOfMemoryError: NPU out of memory. Allocation was preemptively "
                    "rejected because it would exceed per_process_memory_fraction limit. "
                    "Requested size: 1.00 GiB")


@pytest.mark.parametrize(("line", "oom_kind", "numbers"), [
    (XPU_OOM, OomKind.XPU, OomNumbers(tried_mib=2048.0, capacity_mib=15472.64, free_mib=1044.48,
                                      allocated_mib=12800.0, reserved_unallocated_mib=1402.88)),
    (NPU_OOM, OomKind.NPU, OomNumbers(tried_mib=260.0, capacity_mib=29184.0, free_mib=149.57,
                                      allocated_mib=10485.76, reserved_unallocated_mib=552.96)),
    (NPU_FRACTION_OOM, OomKind.NPU, None),
])
def test_xpu_and_npu_ooms(line: str, oom_kind: OomKind, numbers: OomNumbers | None) -> None:
    """Intel XPU and Ascend NPU allocator failures are OOMs of their kind, sizes parsed."""
    for labelled in (line, f"[rank3]: {line}", f"worker-2: 3: {line}"):
        assert is_oom_line(labelled)
        verdict = classify(Outcome(exit_code=1, duration_s=1.0, tail=("Traceback", labelled)))
        assert (verdict.kind, verdict.oom_kind, verdict.numbers) == (
            VerdictKind.OOM, oom_kind, numbers)


# --- NCCL transients --------------------------------------------------------------------------

# QUOTED, NOT RECORDED (no NCCL here): the first two as pasted in the issue named; the third is
# the message format of torch/csrc/distributed/c10d/NCCLUtils.hpp's C10D_NCCL_CHECK_TIMEOUT.
NCCL_TRANSIENTS = [
    # github.com/hiyouga/LlamaFactory/issues/3698
    ("torch.distributed.DistBackendError: [4] is setting up NCCL communicator and retrieving "
     "ncclUniqueId from [0] via c10d key-value store by key '0', but store->get('0') got error: "
     "Socket Timeout"),
    # github.com/arrival-ltd/catalyst-rl-tutorial/issues/15
    ("[rank1]:[E ProcessGroupNCCL.cpp:1182] [Rank 1] NCCL watchdog thread terminated with "
     "exception: [Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=880, "
     "OpType=BROADCAST, NumelIn=131137536, NumelOut=131137536, Timeout(ms)=1800000) ran for "
     "1800695 milliseconds before timing out."),
    ("torch.distributed.DistBackendError: NCCL timeout in: "
     "../torch/csrc/distributed/c10d/NCCLUtils.hpp:178"),
]


@pytest.mark.parametrize("line", NCCL_TRANSIENTS)
def test_nccl_timeouts_are_transient(line: str) -> None:
    """An NCCL socket or collective timeout is retried, not fatal; an OOM anywhere still wins."""
    assert classify(Outcome(exit_code=1, duration_s=1.0, tail=(line,))).kind is (
        VerdictKind.TRANSIENT)
    assert not is_oom_line(line)
    with_oom = (*_until_first_oom("torchrun_rank1_device_budget_oom.txt"), line)
    assert classify(Outcome(exit_code=1, duration_s=1.0, tail=with_oom)).kind is VerdictKind.OOM


# --- the early-kill test and the verdict agree ------------------------------------------------

ALL_TAILS = sorted(str(p.relative_to(TAILS)) for p in TAILS.rglob("*.txt"))


@pytest.mark.parametrize("name", ALL_TAILS)
def test_is_oom_line_agrees_with_classify(name: str) -> None:
    """The runner kills early on a tail exactly when classify would call it an OOM."""
    verdict = verdict_of(name, 1)
    assert any(is_oom_line(line) for line in recorded(name)) == (verdict.kind is VerdictKind.OOM)


# --- fragmentation ------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "fragmented"), [
    ("cuda_device_budget_oom.txt", False),  # 3.69 MiB spare, 20 MiB asked: plain too small
    ("quoted/cuda_oom_torch21.txt", True),  # 2.30 GiB spare, 1.70 GiB asked, 0 bytes free
    ("quoted/cuda_oom_torch22.txt", True),  # 696.75 MiB spare (3.9% held), 30 MiB asked
    ("quoted/cuda_oom_torch113.txt", True),  # 9.78 - 9.22 GiB spare, 498 MiB asked
    ("quoted/hip_oom.txt", False),  # 165.29 MiB spare covers 124 MiB, but is 1.0% of 16 GiB held
    ("device_budget_oom.txt", False),  # the live-bytes budget has no cache: no figure
    ("host_cap_oom.txt", False),
])
def test_shows_fragmentation_on_recorded_messages(name: str, fragmented: bool) -> None:  # noqa: FBT001
    """Fragmentation is read from the OOM's own figures, never guessed without them."""
    assert shows_fragmentation(verdict_of(name, 1).numbers) is fragmented


def test_fragmentation_needs_more_than_rounding() -> None:
    """Spare memory that covers a tiny request but is under 2% of what is held is rounding."""
    held = 10_000.0
    small = OomNumbers(tried_mib=2.0, allocated_mib=held,
                       reserved_unallocated_mib=FRAGMENTATION_SHARE * held * 0.9)
    large = OomNumbers(tried_mib=2.0, allocated_mib=held,
                       reserved_unallocated_mib=FRAGMENTATION_SHARE * held * 1.5)
    assert not shows_fragmentation(small)
    assert shows_fragmentation(large)
    assert not shows_fragmentation(None)
    assert not shows_fragmentation(OomNumbers(tried_mib=2.0))


def test_srun_racing_a_requeue_is_transient() -> None:
    """srun's own line when a requeue lands while it creates its step (seen on the SLURM tier's
    cluster): the job comes back, so the same config is retried rather than the run stopped."""
    line = "srun: error: Unable to confirm allocation for job 7: Job is pending execution"
    verdict = classify(Outcome(exit_code=1, duration_s=0.1, tail=(line,)))
    assert verdict.kind is VerdictKind.TRANSIENT


def test_no_rows_left_is_its_own_verdict_with_the_trainers_line() -> None:
    """torch's RandomSampler over an empty dataset (every row dropped by the cutoff) is
    `no_data`, with that line as evidence; behind torchrun's label too; an OOM still wins."""
    verdict = verdict_of("no_data_num_samples0.txt", 1)
    assert verdict.evidence == ("ValueError: num_samples should be a positive integer value, "
                                "but got num_samples=0")
    labelled = tuple(f"[rank0]: {line}" for line in recorded("no_data_num_samples0.txt"))
    assert classify(Outcome(exit_code=1, duration_s=1.0, tail=labelled)).kind is (
        VerdictKind.NO_DATA)
    both = recorded("no_data_num_samples0.txt") + recorded("device_budget_oom.txt")
    assert classify(Outcome(exit_code=1, duration_s=1.0, tail=both)).kind is VerdictKind.OOM


# --- a checkpoint that does not load ----------------------------------------------------------

@pytest.mark.parametrize(("name", "said"), [
    ("ckpt_unusable_torn_safetensors.txt", "incomplete metadata, file not fully covered"),
    ("ckpt_unusable_torn_state.txt", "JSONDecodeError: Unterminated string"),
    ("ckpt_unusable_torn_optimizer.txt", "failed finding central directory"),
    ("ckpt_unusable_bad_member.txt", "failed reading file data/1"),
    ("ckpt_unusable_no_weights.txt", "Can't find a valid checkpoint at dmg/no_weights"),
])
def test_a_checkpoint_that_fails_to_load_says_so_in_the_trainers_words(name: str,
                                                                       said: str) -> None:
    """The evidence is the trainer's own last error line, below its checkpoint-loading frame."""
    verdict = verdict_of(name, 1)
    assert verdict.kind is VerdictKind.CHECKPOINT_UNUSABLE
    assert said in str(verdict.evidence)


def test_the_same_error_outside_a_checkpoint_load_is_fatal() -> None:
    """A torn JSON file the trainer reads elsewhere (a dataset): no loading frame, so fatal."""
    tail = tuple(line for line in recorded("ckpt_unusable_torn_state.txt")
                 if "load_from_json" not in line and "_load_from_checkpoint" not in line)
    verdict = classify(Outcome(exit_code=1, duration_s=1.0, tail=tail))
    assert verdict.kind is VerdictKind.FATAL
    assert "JSONDecodeError" in str(verdict.evidence)


def test_a_model_that_cannot_be_mapped_is_out_of_host_memory() -> None:
    """`unable to mmap ... Cannot allocate memory` while loading (RLIMIT_AS): an OOM of host
    memory, not a fatal error, and the verdict says what can still help."""
    verdict = verdict_of("load_mmap_enomem.txt", 1)
    assert verdict.kind is VerdictKind.OOM
    assert verdict.evidence is not None
    assert verdict.evidence.startswith("host memory ran out while loading the model")
    assert "unable to mmap 181688528 bytes" in verdict.evidence


def test_a_hang_after_the_final_metrics_is_a_fit_and_an_oom_still_wins() -> None:
    """Ended by the watchdog after its final metrics (outside a save): the training is done,
    a fit that says so; ended before them, a hang; an OOM line beats both."""
    hung = "printed nothing for 11 s (stalled; the limit was 10 s after the last training step)"
    done = classify(Outcome(exit_code=-signal.SIGTERM, duration_s=20.0, hung=hung,
                            killed_by_supervisor=True, finished_training=True))
    assert done.kind is VerdictKind.FITS
    assert done.evidence is not None
    assert done.evidence.startswith(FINISHED_THEN_HUNG)
    assert hung in done.evidence
    before = classify(Outcome(exit_code=-signal.SIGTERM, duration_s=20.0, hung=hung,
                              killed_by_supervisor=True))
    assert before.kind is VerdictKind.HANG
    oom = classify(Outcome(exit_code=-signal.SIGTERM, duration_s=20.0, hung=hung,
                           killed_by_supervisor=True, finished_training=True,
                           tail=recorded("device_budget_oom.txt")))
    assert oom.kind is VerdictKind.OOM
