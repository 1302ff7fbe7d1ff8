"""Memory limits that turn a too-large training config into a real out-of-memory failure.

Only trainer-side code imports this module (it imports torch); the supervisor stays torch-free.
"""

from __future__ import annotations

import resource
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_MIB = 1024 * 1024


def _vm_size_bytes() -> int:
    """Return this process's current virtual address space size (VmSize) in bytes."""
    for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024  # the kernel reports kB
    msg = "No VmSize line in /proc/self/status; the host memory cap needs Linux procfs."
    raise OSError(msg)


def set_host_memory_cap(cap_mib: int) -> None:
    """Limit further address-space growth to cap_mib, so the CPU allocator really fails."""
    if cap_mib <= 0:
        msg = f"Host memory cap must be a positive number of MiB, got {cap_mib}."
        raise ValueError(msg)
    # RLIMIT_AS bounds address space, not resident memory: measured from the current VmSize,
    # the cap is the headroom left for training. Thread stacks and malloc arenas are address
    # space too, which is why callers pin OMP_NUM_THREADS=1 to make the cap deterministic.
    soft = _vm_size_bytes() + cap_mib * _MIB
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY and soft > hard:
        soft = hard
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


class PeakMemory(Protocol):
    """Something the peak device memory of this process can be read from."""

    @property
    def peak_bytes(self) -> int:
        """Return the highest number of bytes live at once so far."""
        ...


@dataclass(slots=True)
class _Entry:
    """One tracked storage: its size as last seen."""

    nbytes: int


def _tensors(tree: object) -> Iterator[torch.Tensor]:
    """Yield the tensors in an op's (nested) arguments or outputs."""
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (tuple, list)):
        for item in tree:
            yield from _tensors(item)
    elif isinstance(tree, Mapping):
        for item in tree.values():
            yield from _tensors(item)


def _storage(tensor: torch.Tensor) -> torch.UntypedStorage | None:
    """Return the tensor's storage, or None where it has none that holds memory."""
    if tensor.device.type == "meta" or tensor.is_sparse:
        return None
    try:
        return tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):
        # Wrapper subclasses and some layouts have no storage of their own.
        return None


class LiveBytesBudget(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Count live tensor-storage bytes and fail like a GPU allocator past a budget.

    Every storage is counted once, however many views share it, from the first op that
    produces or consumes it until it is freed; the peak is recorded. With a budget, an op whose
    new storages would take the live total past it raises ``torch.OutOfMemoryError`` instead.
    """

    def __init__(self, budget_bytes: int | None = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.budget_bytes = budget_bytes
        self._live: dict[int, _Entry] = {}
        self._live_bytes = 0
        self._peak_bytes = 0
        # Storages die wherever their last reference drops, possibly while this thread is
        # inside _track: the lock must be re-entrant.
        self._lock = threading.RLock()

    @property
    def live_bytes(self) -> int:
        """Return the bytes held by tracked storages now."""
        return self._live_bytes

    @property
    def peak_bytes(self) -> int:
        """Return the highest live total seen so far."""
        return self._peak_bytes

    def track(self, tensors: Iterator[torch.Tensor] | list[torch.Tensor]) -> None:
        """Count storages that existed before this mode was entered (e.g. a model's parameters)."""
        with self._lock:
            for tensor in tensors:
                self._add(tensor, check=False)

    def __torch_dispatch__(
        self,
        func: Callable[..., Any],
        types: object,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:  # noqa: ANN401 - an op returns whatever its schema says
        kwargs = kwargs or {}
        with self._lock:
            # Inputs the mode has not seen yet were made before it was entered (or by a path
            # that bypasses dispatch): they occupy memory all the same.
            for tensor in _tensors((args, kwargs)):
                self._add(tensor, check=False)
        out = func(*args, **kwargs)
        with self._lock:
            for tensor in _tensors(out):
                self._add(tensor, check=True)
        return out

    def _add(self, tensor: torch.Tensor, *, check: bool) -> None:
        """Count the tensor's storage if it is new or has grown; raise past the budget if asked."""
        storage = _storage(tensor)
        if storage is None:
            return
        nbytes = storage.nbytes()
        key = storage._cdata  # noqa: SLF001 - the StorageImpl address: one key per storage, views included
        entry = self._live.get(key)
        grown = nbytes - (entry.nbytes if entry is not None else 0)
        if grown <= 0 and entry is not None:
            return
        if check and self.budget_bytes is not None and self._live_bytes + grown > self.budget_bytes:
            # The new storage is not registered: it dies with the failed op, as on a device.
            msg = (
                f"Simulated device out of memory. Tried to allocate {grown / _MIB:.2f} MiB; "
                f"simulated device of {self.budget_bytes / _MIB:.0f} MiB with "
                f"{self._live_bytes / _MIB:.2f} MiB live (oom-supervisor live-bytes budget)."
            )
            raise torch.OutOfMemoryError(msg)
        if entry is None:
            entry = _Entry(nbytes=nbytes)
            self._live[key] = entry
            # No bookkeeping at interpreter exit: the count no longer matters then.
            weakref.finalize(storage, self._forget, key, entry).atexit = False
        else:
            entry.nbytes = nbytes  # resized in place (e.g. an out= op)
        self._live_bytes += grown
        self._peak_bytes = max(self._peak_bytes, self._live_bytes)

    def _forget(self, key: int, entry: _Entry) -> None:
        """Drop a freed storage from the live total."""
        with self._lock:
            # A new storage may reuse a freed address: only remove the entry this finalizer owns.
            if self._live.get(key) is entry:
                del self._live[key]
                self._live_bytes -= entry.nbytes


class _CudaPeak:
    """Peak device memory as the CUDA caching allocator reports it."""

    @property
    def peak_bytes(self) -> int:
        """Return torch.cuda.max_memory_allocated() for the current device."""
        return int(torch.cuda.max_memory_allocated())


def install_device_budget(budget_mib: int | None) -> PeakMemory:
    """Limit device memory to budget_mib (None: only measure) and return where its peak is read.

    On CUDA the caching allocator enforces the limit; on CPU a LiveBytesBudget is entered for
    the rest of the process, so create the model after calling this.
    """
    if budget_mib is not None and budget_mib <= 0:
        msg = f"Device memory budget must be a positive number of MiB, got {budget_mib}."
        raise ValueError(msg)
    if torch.cuda.is_available():
        if budget_mib is not None:
            total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
            fraction = budget_mib * _MIB / total
            if fraction > 1:
                msg = (
                    f"Device memory budget {budget_mib} MiB exceeds this GPU's "
                    f"{total / _MIB:.0f} MiB; ask for at most that."
                )
                raise ValueError(msg)
            torch.cuda.set_per_process_memory_fraction(fraction)
        torch.cuda.reset_peak_memory_stats()
        return _CudaPeak()
    budget = LiveBytesBudget(None if budget_mib is None else budget_mib * _MIB)
    budget.__enter__()  # type: ignore[no-untyped-call]
    return budget
