"""Outcome -> Verdict: was it out of memory, transient, fatal, or did it fit? Rules are data."""

from __future__ import annotations

import re
import signal
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from supervisor import bounds, launchers
from supervisor._compat import StrEnum
from supervisor.text import plural, printable


class VerdictKind(StrEnum):
    """What one attempt came to, and so what the loop does next.

    `fits`: the command exited 0; the run is finished and the loop stops.
    `oom`: memory ran out (any allocator, or the kernel's OOM killer); the loop steps
    one rung down the ladder. `transient`: an infrastructure hiccup with no OOM anywhere
    (rendezvous, port in use, a network reset); the same knobs are retried with backoff.
    `fatal`: anything else that failed; the loop stops at once rather than burn the night.
    `interrupted`: the supervisor was told to stop; the attempt's tree is ended and recorded.
    `hang`: the watchdog ended an attempt that ran past its time limit or fell silent; it is
    retried like a transient failure (a rank stuck in a collective), bounded the same way.
    `lost`: the attempt's wrapper died without an exit status (a reboot, a preemption, a
    `kill -9` of its group) while no supervisor watched: nothing the command did; it is run
    again from the newest checkpoint, outside the retry budget.
    `no_data`: the trainer failed because its config left it no rows (a shorter cutoff that
    drops every longer sample, axolotl's default); not the command's fault and not memory:
    the rung that produced it is spent with that reason and the ladder walks on from the
    last config that had data (policy.next_step).
    `timed`: training ran, and the supervisor ended it after a few timed steps to compare its
    speed with a config of the same quality (speed.py); the run trains on with the faster of
    the two, from the newest checkpoint.
    `checkpoint_unusable`: the attempt resumed from a checkpoint and died loading it (a torn
    weight, optimizer or state file, in the trainer's own words); that checkpoint is passed
    over and the same config goes on from the one before it (or fresh).
    """

    FITS = "fits"
    OOM = "oom"
    TRANSIENT = "transient"
    FATAL = "fatal"
    INTERRUPTED = "interrupted"
    HANG = "hang"
    LOST = "lost"
    NO_DATA = "no_data"
    TIMED = "timed"
    CHECKPOINT_UNUSABLE = "checkpoint_unusable"


class OomKind(StrEnum):
    """Which allocator ran out."""

    CUDA = "cuda"
    HIP = "hip"
    MPS = "mps"
    XPU = "xpu"  # Intel GPUs (torch.xpu)
    NPU = "npu"  # Ascend NPUs (torch_npu)
    CPU = "cpu"
    TORCH = "torch"  # torch.OutOfMemoryError by type (any device, our simulated one too)
    CUBLAS = "cublas"
    CUDNN = "cudnn"
    NCCL = "nccl"
    PYTHON = "python"  # MemoryError from the Python allocator
    HOST_LOAD = "host_load"  # the weights could not be mapped: host memory, while loading
    KERNEL = "kernel"  # SIGKILL by the kernel's OOM killer


@dataclass(frozen=True, slots=True)
class Rule:
    """One recognisable line: which verdict it means, and the regex that finds it."""

    kind: OomKind | VerdictKind
    pattern: re.Pattern[str]


def _rule(kind: OomKind | VerdictKind, pattern: str) -> Rule:
    return Rule(kind, re.compile(pattern))


OOM_RULES: tuple[Rule, ...] = (
    _rule(OomKind.CUDA, r"CUDA out of memory\. Tried to allocate"),  # c10 CUDACachingAllocator
    _rule(OomKind.CUDA, r"CUDA error: out of memory"),  # C10_CUDA_CHECK, cudaErrorMemoryAllocation
    _rule(OomKind.HIP, r"HIP out of memory\. Tried to allocate"),  # the same allocator on ROCm
    _rule(OomKind.HIP, r"HIP error: out of memory"),
    _rule(OomKind.MPS, r"MPS backend out of memory"),  # aten/src/ATen/mps/MPSAllocator.mm
    # pytorch/pytorch c10/xpu/XPUCachingAllocator.cpp (00d512ae), TORCH_CHECK_WITH(OutOfMemoryError,
    # ..., "XPU out of memory. Tried to allocate ", ...); intel-extension-for-pytorch's own
    # allocator used the same words before torch 2.4 took XPU in.
    _rule(OomKind.XPU, r"XPU out of memory\. Tried to allocate"),
    # Ascend/pytorch torch_npu/csrc/core/npu/NPUCachingAllocator.cpp (9e73e708): "NPU out of
    # memory. Tried to allocate " (the usual OOM) and "NPU out of memory. Allocation was
    # preemptively rejected because it would exceed per_process_memory_fraction limit."
    _rule(OomKind.NPU, r"NPU out of memory\. (?:Tried to allocate|Allocation was preemptively)"),
    _rule(OomKind.CPU, r"DefaultCPUAllocator: can't allocate memory"),  # c10/core/impl/alloc_cpu
    # c10/core/MapAllocator.cpp: "unable to mmap %zu bytes from file <%s>: %s (%d)", from
    # safetensors' safe_open or torch.load(mmap=True) while the model loads; recorded under
    # RLIMIT_AS (tests/data/tails/load_mmap_enomem.txt).
    _rule(OomKind.HOST_LOAD, r"unable to mmap \d+ bytes from file .*Cannot allocate memory"),
    _rule(OomKind.CUBLAS, r"CUBLAS_STATUS_ALLOC_FAILED"),  # at::cuda::blas, cublasCreate
    _rule(OomKind.CUDNN, r"CUDNN_STATUS_ALLOC_FAILED"),  # cuDNN workspace allocation
    _rule(OomKind.NCCL, r"NCCL WARN .*(?:[Oo]ut of memory|Failed to CUDA calloc|cuMem\w* failed)"),
    _rule(OomKind.NCCL, r"ncclUnhandledCudaError.*out of memory"),
    # The exception type on the traceback's last line, whatever the message says
    # (torch >= 2.5 names it torch.OutOfMemoryError; older ones torch.cuda.OutOfMemoryError).
    # SchedMD/slurm's cgroup plugins, when the step's cgroup saw the OOM killer: "Detected %lu
    # oom_kill event%s in %ps. Some of the step tasks have been OOM Killed." (slurm >= 22.05),
    # "Detected %u oom-kill event(s) in step %u.%u cgroup. ..." before; printed by slurmstepd
    # into the step's stderr. Quoted, not recorded (the SLURM tier runs without task/cgroup).
    _rule(OomKind.KERNEL, r"Detected \d+ oom[-_]kill event"),
    _rule(OomKind.TORCH, r"^(?:torch\.(?:cuda\.)?)?OutOfMemoryError\b"),
    _rule(OomKind.PYTHON, r"^MemoryError\b"),
)
"""Lines that mean out of memory; the first rule that matches names the kind."""

TRANSIENT_RULES: tuple[Rule, ...] = tuple(
    _rule(VerdictKind.TRANSIENT, p) for p in (
        r"RendezvousConnectionError|RendezvousTimeoutError|RendezvousClosedError",  # torchelastic
        r"DistNetworkError",  # c10d TCPStore
        r"EADDRINUSE|[Aa]ddress already in use",
        r"Connection reset by peer",
        r"Watchdog caught collective operation timeout",  # ProcessGroupNCCL
        # pytorch/pytorch torch/csrc/distributed/c10d/NCCLUtils.hpp, C10D_NCCL_CHECK_TIMEOUT:
        # TORCH_CHECK_WITH(DistBackendError, false, "NCCL timeout in: " + __FILE__ ...)
        r"DistBackendError: NCCL timeout\b",
        # A socket timeout while NCCL sets up: torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp,
        # broadcastUniqueNCCLID: "[3] is setting up NCCL communicator and retrieving ncclUniqueId
        # from [0] via c10d key-value store by key '0', but store->get('0') got error: Socket
        # Timeout" (as pasted in github.com/hiyouga/LlamaFactory/issues/3698 and
        # github.com/bytedance/HLLM/issues/20), or an "NCCL error" line that ends the same way.
        r"NCCL (?:error|communicator)\b.*[Ss]ocket [Tt]ime ?out",
        r"(?:HTTP Error |Server Error: |status(?: code)? )50[234]\b",  # hub 5xx
        r"Temporary failure in name resolution",
        # A SLURM requeue landing while srun creates its step (slurm src/srun/allocate.c,
        # "Unable to confirm allocation for job %u: %m", with ESLURM_JOB_PENDING's text "Job is
        # pending execution"; seen on the SLURM tier's one-host cluster): the job comes back.
        r"Unable to confirm allocation for job \d+: Job is pending execution",
    )
)
"""Lines that mean an infrastructure hiccup worth retrying, when no OOM is anywhere."""

NO_DATA_RULES: tuple[Rule, ...] = (
    # pytorch/pytorch torch/utils/data/sampler.py, RandomSampler.__init__ (torch 2.13):
    # raise ValueError(f"num_samples should be a positive integer value, but got
    # num_samples={self.num_samples}"), over an empty dataset. The HF Trainer's
    # _get_train_sampler returns RandomSampler(train_dataset), and so does axolotl 0.19's
    # AxolotlTrainer._get_train_sampler (also as the base of its MultipackBatchSampler) after
    # handle_long_seq_in_dataset dropped every row longer than sequence_len ("Dropped 64
    # sequences outside valid range ([None, 1024])"); with sample_packing, axolotl's
    # calculate_total_num_steps builds its own RandomSampler first and fails the same way
    # (before the model loads). Recorded: the reference trainer
    # (tests/data/tails/no_data_num_samples0.txt) and the real axolotl 0.19.0
    # (tests/data/tails/axolotl_*no_data_num_samples0.txt: accelerate, --launcher python,
    # sample_packing).
    _rule(VerdictKind.NO_DATA,
          r"num_samples should be a positive integer value, ?but got num_samples=0\b"),
)
"""Lines that mean the config left the trainer no rows to train on."""

CHECKPOINT_RULES: tuple[Rule, ...] = (
    # Recorded from the real HF Trainer (transformers 5.25) resuming damaged copies of a
    # reference-trainer checkpoint: tests/data/tails/ckpt_unusable_*.txt (README there).
    # transformers trainer.py, Trainer._load_from_checkpoint: raise ValueError(f"Can't find a
    # valid checkpoint at {resume_from_checkpoint}") when no weight file is there (no_weights).
    _rule(VerdictKind.CHECKPOINT_UNUSABLE, r"Can't find a valid checkpoint at "),
    # huggingface/safetensors bindings/python/src/lib.rs: SafetensorError("Error while
    # deserializing header: incomplete metadata, file not fully covered") for a truncated
    # model.safetensors, raised by safetensors.torch.load_file (torn_safetensors).
    _rule(VerdictKind.CHECKPOINT_UNUSABLE, r"SafetensorError: Error while deserializing"),
    # pytorch caffe2/serialize/inline_container.cc (torch.load of a zip file): "PytorchStreamReader
    # failed reading zip archive: failed finding central directory" for a truncated optimizer.pt
    # (torn_optimizer), "failed reading file data/1: invalid header or archive is corrupted" for
    # a damaged member (bad_member).
    _rule(VerdictKind.CHECKPOINT_UNUSABLE, r"PytorchStreamReader failed reading"),
    # json: TrainerState.load_from_json over a torn trainer_state.json (torn_state); pickle
    # and EOF errors of torch.load's legacy format. Only with a loading frame (below).
    _rule(VerdictKind.CHECKPOINT_UNUSABLE, r"^(?:json\.decoder\.|json\.)?JSONDecodeError\b"),
    _rule(VerdictKind.CHECKPOINT_UNUSABLE, r"^(?:_pickle\.|pickle\.)?UnpicklingError\b"),
    _rule(VerdictKind.CHECKPOINT_UNUSABLE, r"^EOFError\b"),
)
"""An attempt's last error that means the checkpoint it resumed from does not load."""

CHECKPOINT_LOADING = re.compile(
    r"\bin (?:_load_from_checkpoint|load_from_json|_load_optimizer_and_scheduler|"
    r"_load_rng_state|_load_scaler|_load_callback_state|load_sharded_checkpoint)\b")
"""A traceback frame of the HF Trainer loading a checkpoint (transformers 5.25 trainer.py,
trainer_callback.py, modeling_utils.py): a CHECKPOINT_RULES line counts only below one, so a
torn file elsewhere (a dataset, the base model) is not taken for the checkpoint's."""



@dataclass(frozen=True, slots=True)
class LauncherPrefix:
    """A label a launcher writes before each line of a worker's output, and who writes it."""

    launcher: str
    pattern: re.Pattern[str]


def _prefix(launcher: str, pattern: str) -> LauncherPrefix:
    return LauncherPrefix(launcher, re.compile(pattern))


# A pdsh host label is a host name; an exception's type ("torch.OutOfMemoryError: ") is not one.
_NOT_AN_EXCEPTION = r"(?![\w.]*(?:Error|Exception|Warning|Interrupt|Exit)\b)"

LAUNCHER_PREFIXES: tuple[LauncherPrefix, ...] = (
    # pytorch/pytorch torch/distributed/distributed_c10d.py, init_process_group installs
    # _distributed_excepthook: f"{excepthook_prefix}: {s}" with excepthook_prefix =
    # f"[rank{get_rank()}]" before each line of an uncaught exception's traceback.
    _prefix("torch.distributed excepthook", r"\[rank\d+\]: "),
    # pytorch/pytorch torch/distributed/elastic/multiprocessing/tail_log.py, TailLog:
    # header = f"[{self._name}{local_rank}]:" (torchrun --tee/--redirects; role "default"), or
    # the user's --log-line-prefix-template; no space follows the colon.
    _prefix("torchrun --tee", r"\[[^\]\s]+\]: ?"),
    # SchedMD/slurm src/common/write_labelled_message.c, _build_label: "%*d: " (task id,
    # right-aligned to the widest), "P%u %*d: " for a heterogeneous job's components.
    _prefix("srun --label", r"(?:P\d+ )? *\d+: "),
    # chaos/pdsh src/pdsh/dsh.c labels each line "%S: " with the host (DeepSpeed's multi-node
    # launcher runs pdsh, so its lines read "worker-1: ...").
    _prefix("pdsh", rf"{_NOT_AN_EXCEPTION}[A-Za-z0-9][A-Za-z0-9.-]*: "),
)
"""Launcher labels, stripped (repeatedly: they nest) before any rule is matched."""

_PREFIXES = re.compile("(?:(?:" + "|".join(f"(?:{p.pattern.pattern})" for p in LAUNCHER_PREFIXES)
                       + r")\s*)+")
_MAX_LINE = 16_384  # a longer line is cut for matching: a regex over megabytes stalls the runner


def strip_launcher_prefix(line: str) -> str:
    """The line as the program wrote it: surrounding space and any launcher labels removed."""
    # A terminal escape before the text (a retitle, a clear screen) hides no rule's match.
    text = printable(line[:_MAX_LINE * 2]).strip()[:_MAX_LINE]
    match = _PREFIXES.match(text)
    return text[match.end():].lstrip() if match else text


def launcher_of(line: str) -> tuple[str, ...]:
    """Which launchers labelled this line, outermost first (empty when none did)."""
    text, found = line.strip(), []
    while True:
        for prefix in LAUNCHER_PREFIXES:
            match = prefix.pattern.match(text)
            if match:
                found.append(prefix.launcher)
                text = text[match.end():].lstrip()
                break
        else:
            return tuple(found)


_OOM_ANY = re.compile("|".join(f"(?:{r.pattern.pattern})" for r in OOM_RULES))


def is_oom_line(line: str) -> bool:
    """True if a single output line says out of memory (the runner's early-kill test)."""
    return _OOM_ANY.search(strip_launcher_prefix(line)) is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """What one attempt did, as the runner saw it."""

    exit_code: int | None
    """The child's return code; negative is the signal that ended it (as in subprocess)."""
    duration_s: float
    tail: tuple[str, ...] = ()
    """The last lines of stdout and stderr, interleaved as they came."""
    oom_line: str | None = None
    """The first output line that matched an OOM rule while the attempt ran."""
    killed_by_supervisor: bool = False
    interrupted: bool = False
    kernel_oom_kills: int = 0
    """How many processes the kernel's OOM killer took in our cgroup during the attempt."""
    hung: str | None = None
    """Why the watchdog ended the attempt (time limit, silence), if it did."""
    finished_training: bool = False
    """The watchdog ended it after the trainer had printed its final metrics, outside a save:
    it trained to the end and then did not exit."""
    kill_s: float | None = None
    """Seconds from seeing the OOM line to the last process of the attempt gone."""
    adopted: bool = False
    """Followed by a resumed supervisor rather than started by this one."""
    gpu_peak_mib: float | None = None
    """Peak GPU memory of the attempt's processes, sampled ~2 Hz (None without a GPU)."""
    release: dict[str, object] | None = None
    """Whether the attempt's GPU memory came back after it, and who still holds memory."""
    wrapper_died: bool = False
    """The attempt's wrapper was gone with no exit status written (a resumed supervisor saw)."""
    escaped: tuple[str, ...] = ()
    """Processes that had left the attempt's tree (found by the environment marker, ended)."""
    ended_at: float | None = None
    """Wall time the command itself ended (when its status was written, if no one watched)."""
    progress: dict[str, Any] | None = None
    """The trainer's own progress as it streamed (trainer_output.Tracker.summary)."""
    watchdog: str | None = None
    """The silence limit in force at the end, and how it was chosen."""
    host_peak_mib: float | None = None
    """Peak resident memory of the attempt's processes, sampled every 0.5 s (psutil)."""
    host_cap_mib: float | None = None
    """The host memory limit the command ran under (its RLIMIT_AS, else its cgroup's), MiB."""
    host_cap_source: str | None = None
    """What that limit is: `RLIMIT_AS` (prlimit --as, ulimit -v) or `cgroup memory.max`."""
    failed_task: str | None = None
    """The launcher's line for a task that failed while its peers lived (the attempt was
    ended after a grace for it)."""
    task_lines: tuple[str, ...] = ()
    """That task's own last lines (its labelled lines, its own output file, or the lines
    just before the launcher's line): the evidence, never a peer the supervisor ended."""
    task_source: str | None = None
    """Where task_lines came from, in words."""
    timed: bool = False
    """Ended by the supervisor once its timed steps were in (a speed comparison, speed.py)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class OomNumbers:
    """The sizes an OOM message reports, in MiB (None where the message does not say)."""

    tried_mib: float | None = None
    capacity_mib: float | None = None
    free_mib: float | None = None
    allocated_mib: float | None = None
    reserved_unallocated_mib: float | None = None
    """Held by the caching allocator but in no tensor: what fragmentation keeps from a request."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    """The classification of one Outcome, with the line that shows it."""

    kind: VerdictKind
    oom_kind: OomKind | None = None
    evidence: str | None = None
    numbers: OomNumbers | None = None

    @property
    def is_oom(self) -> bool:
        """True when the attempt ran out of memory."""
        return self.kind is VerdictKind.OOM


_SIZE = r"([\d.]+) ?([KMGT]i?B|bytes)"
_NUMBER_PATTERNS: dict[str, tuple[re.Pattern[str], ...]] = {
    "tried_mib": (re.compile(rf"Tried to allocate {_SIZE}"),
                  # c10/core/impl/alloc_cpu.cpp: "...: you tried to allocate 67108864 bytes."
                  re.compile(rf"you tried to allocate {_SIZE}")),
    # Under set_per_process_memory_fraction the message says what this process is allowed:
    # that, not the card's size, is the capacity the attempt ran into.
    "capacity_mib": (re.compile(rf"{_SIZE} allowed;"),
                     re.compile(rf"total capaci?ty of {_SIZE}"),  # torch >= 2.1 ("capacty" in 2.1)
                     re.compile(rf"{_SIZE} total capacity"),  # torch < 2.1
                     re.compile(rf"simulated device of {_SIZE}")),  # our live-bytes budget
    "free_mib": (re.compile(rf"of which {_SIZE} is free"), re.compile(rf"{_SIZE} free\b")),
    "allocated_mib": (re.compile(rf"{_SIZE} is allocated by PyTorch"),
                      re.compile(rf"{_SIZE} already allocated"),
                      re.compile(rf"with {_SIZE} live")),
    # torch >= 2.1 (CUDA, HIP, XPU) says it outright; older CUDA and torch_npu say how much is
    # reserved in total, and the rest is derived below (reserved - allocated).
    "reserved_unallocated_mib": (re.compile(rf"{_SIZE} is reserved by PyTorch but unallocated"),),
}
_RESERVED_TOTAL = re.compile(rf"{_SIZE} reserved in total by PyTorch")
_UNIT_MIB = {"B": 1 / 2**20, "bytes": 1 / 2**20, "KB": 1 / 1024, "KiB": 1 / 1024,
             "MB": 1.0, "MiB": 1.0,
             "GB": 1024.0, "GiB": 1024.0, "TB": 2**20, "TiB": 2**20}


def parse_numbers(lines: Iterable[str]) -> OomNumbers | None:
    """Sizes from CUDA/HIP-style OOM messages (and ours); None if no line gives any."""
    found: dict[str, float] = {}
    reserved_total: float | None = None
    for line in lines:
        for key, patterns in _NUMBER_PATTERNS.items():
            if key in found:
                continue
            for pattern in patterns:
                match = pattern.search(line)
                value = _mib(match) if match else None
                if value is not None:
                    found[key] = value
                    break
        total = _RESERVED_TOTAL.search(line)
        if reserved_total is None and total:
            reserved_total = _mib(total)
    allocated = found.get("allocated_mib")
    if ("reserved_unallocated_mib" not in found and reserved_total is not None
            and allocated is not None and reserved_total >= allocated):
        found["reserved_unallocated_mib"] = round(reserved_total - allocated, 2)
    return OomNumbers(**found) if found else None


def _mib(match: re.Match[str]) -> float | None:
    """The size in MiB, or None when the text is no sane size (`1.2.3`, 400 digits)."""
    number = bounds.finite(match.group(1), low=0.0)
    if number is None:
        return None
    return bounds.finite(round(number * _UNIT_MIB[match.group(2)], 2), low=0.0,
                         high=bounds.MAX_MIB)


FRAGMENTATION_SHARE = 0.02
"""Reserved-but-unallocated memory under this share of all the allocator holds is rounding."""


def shows_fragmentation(numbers: OomNumbers | None) -> bool:
    """True when the OOM's own figures say fragmentation, not size, refused the request.

    That is: the memory the caching allocator held but had given to no tensor was at least
    the request (so the bytes were there, only not in one block: the case CUDA's message
    sends to `expandable_segments:True`), and it was more than FRAGMENTATION_SHARE (2%) of
    all the allocator held. Below that it is the allocator's normal rounding (2 MiB small
    segments, 20 MiB large ones) on a small attempt, which expandable segments would not
    give back. Without both figures it is False: never guessed.
    """
    if numbers is None or numbers.tried_mib is None or numbers.reserved_unallocated_mib is None:
        return False
    spare = numbers.reserved_unallocated_mib
    held = spare + (numbers.allocated_mib or 0.0)
    return spare >= numbers.tried_mib and spare > FRAGMENTATION_SHARE * held


RECOVERED = "it ran out of memory, caught the error and recovered by itself"
"""The evidence of a fit whose attempt printed an OOM and still exited 0."""
FINISHED_THEN_HUNG = "it trained to the end and printed its final metrics, then did not exit"
"""The evidence of a fit whose attempt the watchdog ended on its way out (a teardown hang)."""


def classify(outcome: Outcome) -> Verdict:
    """Decide what an attempt came to; OOM evidence anywhere beats every other reading."""
    if outcome.interrupted:
        return Verdict(kind=VerdictKind.INTERRUPTED, evidence="stopped by signal to the supervisor")
    # The evidence is journaled and shown: without the trainer's terminal control sequences.
    lines = [printable(line).rstrip() for line in outcome.tail]
    oom_lines = [line for line in lines if is_oom_line(line)]
    oom_line = printable(outcome.oom_line).rstrip() if outcome.oom_line is not None else None
    if oom_line is not None and oom_line not in oom_lines:
        oom_lines.insert(0, oom_line)
    if outcome.exit_code == 0 and not outcome.killed_by_supervisor:
        # An OOM it printed and then exited 0: the program caught it and recovered by itself.
        return Verdict(kind=VerdictKind.FITS,
                       evidence=f"{RECOVERED}: {_most_specific(oom_lines)}" if oom_lines else None)
    if oom_lines:
        evidence = _most_specific(oom_lines)
        kind = _oom_kind(evidence)
        if kind is OomKind.HOST_LOAD:
            evidence = (f"host memory ran out while loading the model (the walk goes on: a "
                        f"config that loads less, quantised weights, may fit; else raise the "
                        f"host memory limit): {evidence}")
        return Verdict(kind=VerdictKind.OOM, oom_kind=kind, evidence=evidence,
                       numbers=parse_numbers(oom_lines))
    if outcome.timed:
        return Verdict(kind=VerdictKind.TIMED, evidence=(
            "ended after its timed steps, to compare its speed with a config of the same "
            "quality"))
    if outcome.hung is not None and outcome.finished_training:
        # Retrying would train it all again (or hang the same way): the training is done.
        return Verdict(kind=VerdictKind.FITS, evidence=(
            f"{FINISHED_THEN_HUNG}; the watchdog ended it: it {outcome.hung}"))
    if outcome.hung is not None:
        return Verdict(kind=VerdictKind.HANG, evidence=f"the watchdog ended it: it {outcome.hung}")
    if outcome.exit_code is None:
        # Nothing the command did: its wrapper is gone (reboot, preemption, kill -9 of the
        # group). The run goes on from the newest checkpoint.
        return Verdict(kind=VerdictKind.LOST, evidence=(
            "the attempt's wrapper died without writing its exit status" if outcome.wrapper_died
            else "the attempt ended while no supervisor watched it and left no exit status"))
    ended = _task_verdict(outcome)
    if ended is not None:
        return ended
    dry = _no_data_line(lines)
    if dry is not None:
        return Verdict(kind=VerdictKind.NO_DATA, evidence=dry)
    unusable = _checkpoint_line(lines)
    if unusable is not None and not outcome.killed_by_supervisor:
        return Verdict(kind=VerdictKind.CHECKPOINT_UNUSABLE, evidence=unusable)
    worker = (_killed_worker(lines) if outcome.kernel_oom_kills > 0
              and not outcome.killed_by_supervisor else None)
    if worker is not None and outcome.exit_code != 0:
        # A launcher (torchrun, srun) outlived the worker the kernel's OOM killer took.
        evidence = (f"{worker}; the kernel's OOM killer fired "
                    f"{plural(outcome.kernel_oom_kills, 'time')} in this cgroup")
        return Verdict(kind=VerdictKind.OOM, oom_kind=OomKind.KERNEL, evidence=evidence)
    if outcome.exit_code == -signal.SIGKILL and not outcome.killed_by_supervisor:
        if outcome.kernel_oom_kills > 0:
            evidence = (f"killed by SIGKILL; the kernel's OOM killer fired "
                        f"{plural(outcome.kernel_oom_kills, 'time')} in this cgroup")
            return Verdict(kind=VerdictKind.OOM, oom_kind=OomKind.KERNEL, evidence=evidence)
        return Verdict(kind=VerdictKind.FATAL,
                       evidence="killed by SIGKILL from outside, with no OOM-killer evidence")
    cause = _rank_cause(lines)
    if cause is not None:
        # A rank's own error (a bug, a bad input) beside its peers' "connection reset": the
        # same config would fail again, so it is fatal, whatever the peers say.
        return Verdict(kind=VerdictKind.FATAL, evidence=cause)
    signalled = launchers.torchrun_ended_rank(lines)
    if signalled is not None:
        # torchrun ended the other ranks itself; the one a signal ended speaks for the attempt.
        end, own, source = signalled
        return Verdict(kind=VerdictKind.FATAL, evidence=launchers.evidence(end, own, source))
    for line in reversed(lines):
        if _is_transient(line):
            return Verdict(kind=VerdictKind.TRANSIENT, evidence=line.strip())
    return Verdict(kind=VerdictKind.FATAL, evidence=_error_line(lines, outcome.exit_code))


def _task_verdict(outcome: Outcome) -> Verdict | None:
    """A launcher said one task ended while its peers lived (the step was ended for it): the
    verdict from that task's own lines, never from a peer the supervisor ended."""
    end = launchers.task_end(outcome.failed_task) if outcome.failed_task else None
    if end is None:
        return None
    own = [printable(line).rstrip() for line in outcome.task_lines]
    if end.signal_name == "SIGKILL" and outcome.kernel_oom_kills > 0:
        return Verdict(kind=VerdictKind.OOM, oom_kind=OomKind.KERNEL, evidence=(
            f"{end.describe()}; the kernel's OOM killer fired {outcome.kernel_oom_kills} "
            "time(s) in this cgroup"))
    for line in reversed(own):
        if _is_transient(line):
            return Verdict(kind=VerdictKind.TRANSIENT, evidence=line.strip())
    for line in reversed(own):
        stripped = strip_launcher_prefix(line)
        if (_EXCEPTION.match(stripped) and not _LAUNCHER_WRAPPER.search(stripped)
                and not _PEER_SYMPTOM.search(stripped)):
            return Verdict(kind=VerdictKind.FATAL, evidence=(
                line.strip() if not end.by_signal else f"{end.describe()}; {line.strip()}"))
    return Verdict(kind=VerdictKind.FATAL, evidence=launchers.evidence(
        end, own, outcome.task_source or "its own lines"))


# How a launcher reports a worker that died of SIGKILL: torchrun's ChildFailedError summary
# (torch/distributed/elastic/multiprocessing/errors: "exitcode  : -9 (pid: N)" and "traceback :
# Signal 9 (SIGKILL) received by PID N", recorded in tests/data/tails/torchrun_rank1_sigkill.txt)
# and srun's "srun: error: HOST: task N: Killed" (src/srun/srun_job.c, the signal's strsignal).
_KILLED_WORKER = re.compile(r"Signal 9 \(SIGKILL\) received by PID \d+|"
                            r"exitcode\s*:\s*-9\b|task \d+: Killed\b")


def _killed_worker(lines: list[str]) -> str | None:
    """The line saying a launcher's worker was SIGKILLed (the OOM killer's way), if any."""
    for line in lines:
        match = _KILLED_WORKER.search(strip_launcher_prefix(line))
        if match is not None:
            return f"a worker was killed by SIGKILL: {strip_launcher_prefix(line)[:300]}"
    return None


def _no_data_line(lines: list[str]) -> str | None:
    """The trainer's own line saying it was given no rows, if it printed one."""
    for line in reversed(lines):
        stripped = strip_launcher_prefix(line)
        if any(rule.pattern.search(stripped) for rule in NO_DATA_RULES):
            return stripped
    return None


def _checkpoint_line(lines: list[str]) -> str | None:
    """The trainer's error loading the checkpoint it resumed from, if that is how it died."""
    loading = False
    found = None
    for line in lines:
        stripped = strip_launcher_prefix(line)
        if CHECKPOINT_LOADING.search(stripped):
            loading = True
        elif loading and any(rule.pattern.search(stripped) for rule in CHECKPOINT_RULES):
            found = stripped
    return found


def _oom_kind(line: str) -> OomKind:
    stripped = strip_launcher_prefix(line)
    return OomKind(next(r.kind for r in OOM_RULES if r.pattern.search(stripped)))


def _most_specific(lines: list[str]) -> str:
    """Prefer a line naming the allocator (CUDA, CPU, ...) over a bare exception type."""
    for line in lines:
        kind = _oom_kind(line)
        if kind not in (OomKind.TORCH, OomKind.PYTHON):
            return line.strip()
    return lines[-1].strip()


_ERROR_LINE = re.compile(r"(Error|Exception|error:|Errno|No such file|not found|Traceback)")


# Launchers' own exceptions that wrap a worker's failure (torch.distributed.elastic's
# ChildFailedError; accelerate / deepspeed launchers' subprocess.CalledProcessError; the
# torch.multiprocessing.spawn wrapper).
_LAUNCHER_WRAPPER = re.compile(r"ChildFailedError|CalledProcessError|ProcessRaisedException|"
                               r"ProcessExitedException")
# torch/distributed/elastic/multiprocessing/api.py: "failed (exitcode: -9) local_rank: 1 (pid:
# N) of binary: ..." (tests/data/tails/torchrun_rank1_sigkill.txt).
_WORKER_FAILED = re.compile(r"failed \(exitcode: -?\d+\) local_rank: \d+")
_EXCEPTION = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Z]\w*(?:Error|Exception)\b")


# What a rank prints when a PEER died: its symptom, never the cause (gloo's pair.cc "Connection
# closed by peer ... typically caused by a remote worker crashing", recorded in
# tests/data/tails/torchrun_rank1_valueerror_peer.txt; resets and broken pipes likewise).
_PEER_SYMPTOM = re.compile(r"Connection (?:closed|reset) by peer|remote worker crash|"
                           r"Broken pipe|DistBackendError")


def _is_transient(line: str) -> bool:
    stripped = strip_launcher_prefix(line)
    return any(rule.pattern.search(stripped) for rule in TRANSIENT_RULES)


def _rank_cause(lines: list[str]) -> str | None:
    """A labelled rank's own exception that is neither a peer's symptom nor transient."""
    for line in reversed(lines):
        if not launcher_of(line):
            continue
        stripped = strip_launcher_prefix(line)
        if (_EXCEPTION.match(stripped) and not _LAUNCHER_WRAPPER.search(stripped)
                and not _PEER_SYMPTOM.search(stripped) and not _is_transient(line)):
            return line.strip()
    return None


def _worker_exception(lines: list[str]) -> str | None:
    """The last exception line a worker printed, if any (classify has already taken a rank's
    own error, `_rank_cause`, before it got here: what is left is a symptom or unlabelled)."""
    for line in reversed(lines):
        stripped = strip_launcher_prefix(line)
        if _EXCEPTION.match(stripped) and not _LAUNCHER_WRAPPER.search(stripped):
            return line.strip()
    # No exception printed (a signal): torchrun's line naming the worker and its exit code.
    return next((line.strip() for line in lines if _WORKER_FAILED.search(line)), None)


def _error_line(lines: list[str], exit_code: int | None) -> str:
    # The injected --device-memory code prints its peak line at exit, after any traceback: it
    # is never the reason an attempt failed.
    lines = [line for line in lines if not line.lstrip().startswith("oom-supervisor.")]
    for line in reversed(lines):
        if line.strip() and _ERROR_LINE.search(line):
            if _LAUNCHER_WRAPPER.search(line):
                # torchrun's ChildFailedError (or a launcher's CalledProcessError) only says a
                # worker failed: the worker's own exception, further up, says why.
                return _worker_exception(lines) or line.strip()
            return line.strip()
    last = next((line.strip() for line in reversed(lines) if line.strip()), None)
    if exit_code is not None and exit_code < 0:
        name = signal.Signals(-exit_code).name if -exit_code in signal.valid_signals() else ""
        return f"killed by signal {-exit_code} {name}".strip()
    return last or f"exited with status {exit_code} and printed nothing"
