"""A scripted GpuProbe: devices and, per call, which processes hold how much memory."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from supervisor.gpu import Device, ProcessUsage


@dataclass
class FakeGpu:
    """Plays back one tuple of ProcessUsage per processes() call; the last one repeats."""

    script: list[tuple[ProcessUsage, ...]] = field(default_factory=list)
    device_list: tuple[Device, ...] = (
        Device(index=0, name="Fake H100", uuid="GPU-0000", total_mib=81_559, free_mib=81_000),)
    calls: int = 0

    def devices(self) -> tuple[Device, ...]:
        """The scripted devices."""
        return self.device_list

    def processes(self) -> tuple[ProcessUsage, ...]:
        """The next scripted sample (the last one once the script is spent)."""
        self.calls += 1
        if not self.script:
            return ()
        return self.script.pop(0) if len(self.script) > 1 else self.script[0]


def usage(pid: int, used_mib: int, device: int = 0) -> ProcessUsage:
    """One process's usage on one device."""
    return ProcessUsage(pid=pid, device=device, used_mib=used_mib)


class FakeNvmlError(Exception):
    """What pynvml raises where there is no driver (NVMLError_LibraryNotFound and kin)."""


class FakeNvml:
    """The slice of the pynvml module NvmlProbe uses, over scripted devices."""

    def __init__(self, uuids: tuple[str, ...] = (), *, fail: str | None = None,
                 running: dict[int, list[tuple[int, int | None]]] | None = None) -> None:
        self.uuids = uuids
        self.fail = fail
        self.running = running or {}
        self.shut_down = False

    def nvmlInit(self) -> None:  # noqa: N802 - pynvml's names
        """Fail as the real one does without a driver, when told to."""
        if self.fail is not None:
            raise FakeNvmlError(self.fail)

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        """How many devices."""
        return len(self.uuids)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:  # noqa: N802
        """The handle is the index."""
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> str:  # noqa: N802
        """The device's UUID."""
        return self.uuids[handle]

    def nvmlDeviceGetName(self, handle: int) -> bytes:  # noqa: N802
        """Old pynvml returns bytes."""
        return f"Fake GPU {handle}".encode()

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:  # noqa: N802, ANN401
        """80 GiB, 1 GiB used per device index."""
        return SimpleNamespace(total=80 * 2**30, free=(79 - handle) * 2**30,
                               used=(handle + 1) * 2**30)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[Any]:  # noqa: N802
        """The scripted (pid, used bytes) of a device."""
        return [SimpleNamespace(pid=pid, usedGpuMemory=used)
                for pid, used in self.running.get(handle, [])]

    def nvmlShutdown(self) -> None:  # noqa: N802
        """Remember that it was called."""
        self.shut_down = True
