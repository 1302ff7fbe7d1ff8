"""NVIDIA devices through NVML: capacity, per-process usage sampled during an attempt, release.

The only module that imports `pynvml` (from the nvidia-ml-py distribution). Without a driver
every probe answers "no devices" and says why once (`NvmlProbe.unavailable`); nothing fails.
Everything else takes a `GpuProbe`, so tests run on a fake one (tests/fakes_gpu.py).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

log = structlog.get_logger(__name__)

_MIB = 2**20


@dataclass(frozen=True, slots=True, kw_only=True)
class Device:
    """One visible GPU: NVML index, name, and memory now."""

    index: int
    name: str
    uuid: str
    total_mib: int
    free_mib: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ProcessUsage:
    """A process holding memory on a device (used_mib 0 where the driver does not say)."""

    pid: int
    device: int
    used_mib: int


class GpuProbe(Protocol):
    """What the supervisor asks of the GPUs; the real one is NvmlProbe."""

    def devices(self) -> tuple[Device, ...]:
        """The visible devices (none without a driver)."""
        ...

    def processes(self) -> tuple[ProcessUsage, ...]:
        """Compute processes on the visible devices, one entry per (pid, device)."""
        ...


def visible_indices(value: str | None, uuids: tuple[str, ...]) -> tuple[int, ...]:
    """The NVML indices CUDA_VISIBLE_DEVICES leaves visible, given every device's UUID.

    Unset: all. Entries are indices or (prefixes of) `GPU-` UUIDs; as CUDA does, the list ends
    at the first entry that names no device. Indices are NVML's (PCI bus) order: set
    CUDA_DEVICE_ORDER=PCI_BUS_ID where CUDA's default (fastest first) could differ.
    """
    if value is None:
        return tuple(range(len(uuids)))
    chosen: list[int] = []
    for raw in value.split(","):
        entry = raw.strip()
        index: int | None = None
        if entry.isdigit():
            index = int(entry) if int(entry) < len(uuids) else None
        elif entry.startswith("GPU-"):
            matches = [i for i, u in enumerate(uuids) if u.startswith(entry)]
            index = matches[0] if len(matches) == 1 else None
        if index is None or index in chosen:
            break
        chosen.append(index)
    return tuple(chosen)


class NvmlProbe:
    """GpuProbe over NVML, restricted to the devices CUDA_VISIBLE_DEVICES leaves visible."""

    def __init__(self, *, env: Mapping[str, str] | None = None, nvml: Any = None) -> None:  # noqa: ANN401
        self.unavailable: str | None = None
        """Why there are no devices (no driver, no library), said once; None when NVML works."""
        self._nvml = nvml
        self._handles: dict[int, Any] = {}
        env = os.environ if env is None else env
        try:
            if self._nvml is None:
                import pynvml  # type: ignore[import-untyped]  # noqa: PLC0415 - the one place

                self._nvml = pynvml
            self._nvml.nvmlInit()
            count = self._nvml.nvmlDeviceGetCount()
            handles = [self._nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            uuids = tuple(_text(self._nvml.nvmlDeviceGetUUID(h)) for h in handles)
        except Exception as error:  # noqa: BLE001 - NVMLError_* or ImportError: no GPU here
            self.unavailable = (f"no NVIDIA GPU: NVML unavailable ({_reason(error)}); "
                                "GPU memory sampling and release checks are off")
            return
        for index in visible_indices(env.get("CUDA_VISIBLE_DEVICES"), uuids):
            self._handles[index] = handles[index]
        if not self._handles:
            self.unavailable = ("no visible NVIDIA GPU (CUDA_VISIBLE_DEVICES="
                                f"{env.get('CUDA_VISIBLE_DEVICES')!r}); GPU sampling is off")

    def devices(self) -> tuple[Device, ...]:
        """The visible devices with their memory now."""
        found = []
        for index, handle in self._handles.items():
            with contextlib.suppress(Exception):
                memory = self._nvml.nvmlDeviceGetMemoryInfo(handle)
                found.append(Device(index=index, name=_text(self._nvml.nvmlDeviceGetName(handle)),
                                    uuid=_text(self._nvml.nvmlDeviceGetUUID(handle)),
                                    total_mib=int(memory.total) // _MIB,
                                    free_mib=int(memory.free) // _MIB))
        return tuple(found)

    def processes(self) -> tuple[ProcessUsage, ...]:
        """Compute processes on the visible devices (pids as the driver sees them)."""
        found = []
        for index, handle in self._handles.items():
            try:
                running = self._nvml.nvmlDeviceGetComputeRunningProcesses(handle)
            except Exception:  # noqa: BLE001, S112 - a device that stops answering holds nothing we can name
                continue
            for proc in running:
                used = getattr(proc, "usedGpuMemory", None)
                found.append(ProcessUsage(pid=int(proc.pid), device=index,
                                          used_mib=int(used) // _MIB if used else 0))
        return tuple(found)

    def utilization(self) -> dict[int, int]:
        """Each process's SM utilisation (%) over the driver's recent samples (pid -> %)."""
        found: dict[int, int] = {}
        for handle in self._handles.values():
            try:
                samples = self._nvml.nvmlDeviceGetProcessUtilization(handle, 0)
            except Exception:  # noqa: BLE001, S112 - not supported, or no sample yet
                continue
            for sample in samples:
                pid = int(getattr(sample, "pid", 0))
                found[pid] = max(found.get(pid, 0), int(getattr(sample, "smUtil", 0) or 0))
        return found

    def close(self) -> None:
        """Shut NVML down (safe to call when it never started)."""
        if self.unavailable is None and self._nvml is not None:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
            self._handles.clear()


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _reason(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def smallest_device_mib(probe: GpuProbe) -> int | None:
    """Total memory of the smallest visible device (what a per-device plan must fit), or None."""
    devices = probe.devices()
    return min((d.total_mib for d in devices), default=None)


# --- sampling during an attempt --------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class Peak:
    """The highest device memory an attempt's processes held at once, as sampled."""

    peak_mib: int
    """Summed over the attempt's processes and the visible devices."""
    per_device_mib: Mapping[int, int] = field(default_factory=dict)
    """Each device's own peak (for a per-device budget: the largest of these)."""
    samples: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for the journal and report."""
        return {"peak_mib": self.peak_mib, "samples": self.samples,
                "per_device_mib": {str(k): v for k, v in self.per_device_mib.items()}}


class Sampler:
    """Samples the attempt's process tree on every visible device, about twice a second.

    `pids` is called at each sample (the tree grows: launchers start workers later).
    Use as `start()` ... `stop() -> Peak`, or call `sample()` yourself.
    """

    def __init__(self, probe: GpuProbe, pids: Callable[[], Iterable[int]], *,
                 interval_s: float = 0.5) -> None:
        self._probe = probe
        self._pids = pids
        self._interval_s = interval_s
        self._peak = 0
        self._per_device: dict[int, int] = {}
        self._samples = 0
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> int:
        """Take one sample now; return the MiB the tree holds."""
        ours = set(self._pids())
        per_device: dict[int, int] = {}
        for usage in self._probe.processes():
            if usage.pid in ours:
                per_device[usage.device] = per_device.get(usage.device, 0) + usage.used_mib
        held = sum(per_device.values())
        with self._lock:
            self._samples += 1
            self._peak = max(self._peak, held)
            for device, used in per_device.items():
                self._per_device[device] = max(self._per_device.get(device, 0), used)
        return held

    def start(self) -> None:
        """Sample in a daemon thread until stop()."""
        self._done.clear()
        self._thread = threading.Thread(target=self._loop, name="gpu-sampler", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._done.is_set():
            try:
                self.sample()
            except Exception:  # sampling must never end an attempt
                log.debug("gpu.sample_failed", exc_info=True)
            self._done.wait(self._interval_s)

    def stop(self) -> Peak:
        """Stop sampling and return the peak."""
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        return self.peak

    @property
    def peak(self) -> Peak:
        """The peak so far."""
        with self._lock:
            return Peak(peak_mib=self._peak, per_device_mib=dict(self._per_device),
                        samples=self._samples)


def activity(probe: GpuProbe | None, pids: Collection[int],
             before: Mapping[int, int]) -> tuple[bool | None, dict[int, int]]:
    """Whether the given processes used a GPU lately: their memory changed since `before`
    (pid -> MiB, as returned last time) or the driver reports SM utilisation for them.

    Returns (busy, memory now); busy is None where no GPU is visible (no probe).
    """
    if probe is None:
        return None, {}
    ours = set(pids)
    held: dict[int, int] = {}
    try:
        for usage in probe.processes():
            if usage.pid in ours:
                held[usage.pid] = held.get(usage.pid, 0) + usage.used_mib
        utilization = getattr(probe, "utilization", None)
        busy_sm = callable(utilization) and any(
            pid in ours and share > 0 for pid, share in utilization().items())
    except Exception:  # noqa: BLE001 - sampling must never end an attempt
        return None, dict(before)
    changed = bool(before) and held != dict(before)
    return bool(busy_sm or changed), held


# --- after an attempt ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class ReleaseResult:
    """Whether the attempt's processes let go of device memory in time, and who still holds it."""

    released: bool
    waited_s: float
    ours: tuple[ProcessUsage, ...] = ()
    """The attempt's processes still holding memory at the end (empty when released)."""
    foreign: tuple[ProcessUsage, ...] = ()
    """Other processes holding memory on the visible devices (not ours to end)."""

    def describe(self) -> str:
        """One line for the journal and log."""
        def named(usages: tuple[ProcessUsage, ...]) -> str:
            return ", ".join(f"pid {u.pid} ({u.used_mib} MiB on GPU {u.device})" for u in usages)

        parts = [f"released after {self.waited_s:.1f} s" if self.released else
                 f"still held after {self.waited_s:.1f} s by {named(self.ours)}"]
        if self.foreign:
            parts.append(f"other processes hold memory: {named(self.foreign)}")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for the journal."""
        def rows(usages: tuple[ProcessUsage, ...]) -> list[dict[str, int]]:
            return [{"pid": u.pid, "device": u.device, "used_mib": u.used_mib} for u in usages]

        return {"released": self.released, "waited_s": round(self.waited_s, 2),
                "ours": rows(self.ours), "foreign": rows(self.foreign)}


def wait_for_release(probe: GpuProbe, pids: Collection[int], *, timeout_s: float = 30.0,  # noqa: PLR0913 - keyword-only edges
                     interval_s: float = 0.5, sleep: Callable[[float], object] = time.sleep,
                     clock: Callable[[], float] = time.monotonic,
                     own_pid: int | None = None) -> ReleaseResult:
    """Wait until none of `pids` holds device memory, at most timeout_s; name who still does.

    `own_pid` (default: this process) is never counted as foreign.
    """
    own = os.getpid() if own_pid is None else own_pid
    ours_set = set(pids)
    started = clock()
    while True:
        usages = probe.processes()
        ours = tuple(u for u in usages if u.pid in ours_set)
        foreign = tuple(u for u in usages if u.pid not in ours_set and u.pid != own)
        waited = clock() - started
        if not ours:
            return ReleaseResult(released=True, waited_s=waited, foreign=foreign)
        if waited >= timeout_s:
            return ReleaseResult(released=False, waited_s=waited, ours=ours, foreign=foreign)
        sleep(interval_s)
