"""oom-supervisor's simulated device, injected on PYTHONPATH by `--device-memory`.

When OOM_SUPERVISOR_DEVICE_MIB is set, the program's own `import torch` is followed by a
device memory limit of that many MiB: on CUDA `torch.cuda.set_per_process_memory_fraction`
for every visible device, applied when CUDA initialises (real CUDA out-of-memory errors); on
CPU the live-bytes budget of `supervisor._sim` (a real `torch.OutOfMemoryError` past it).
A program that never imports torch pays nothing but this file. When OOM_SUPERVISOR_STACKS is
set (every Python attempt, while the policy's stack sampler is on), a small thread samples the
main thread's frames for the watchdog (stacks.py; written to the attempt folder, never to the
program's output). When OOM_SUPERVISOR_RESCUE is set, the rescue hook of Hugging Face Trainer
programs (rescue.py beside this file) is armed too. Then the sitecustomize this one shadows, if
any, runs as it would have.

Each process whose limit is in force says so on stderr, once:
`oom-supervisor.inject {"limit_mib": N, "device": "cpu"|"cuda", "pid": P}`, and at exit
`oom-supervisor.peak {"peak_mib": X, "device": ..., "pid": P}` (the live-bytes peak on CPU,
torch.cuda.max_memory_allocated on CUDA). The supervisor treats an attempt without the first
line as unlimited: an error, never a fit (supervisor.device_memory.read_inject_lines).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.machinery
import importlib.util
import json
import os
import sys
from types import ModuleType
from typing import Any

ENV_VAR = "OOM_SUPERVISOR_DEVICE_MIB"
_HERE = os.path.dirname(os.path.abspath(__file__))  # noqa: PTH100, PTH120 - os.path is cheaper to import at start-up
_SIM = os.path.join(os.path.dirname(_HERE), "_sim.py")  # noqa: PTH118, PTH120
_MIB = 1024 * 1024
_RESCUE = os.path.join(_HERE, "rescue.py")  # noqa: PTH118
RESCUE_ENV = "OOM_SUPERVISOR_RESCUE"
_kept: list[object] = []  # the CPU budget must live as long as the process


def _say(message: str) -> None:
    sys.stderr.write(f"oom-supervisor device memory: {message}\n")


def _announce(mark: str, **values: object) -> None:
    # Straight to fd 2, unbuffered: the line must reach the log even when the program
    # replaced sys.stderr, and must not interleave with a traceback being written.
    line = f"{mark} {json.dumps({**values, 'pid': os.getpid()})}\n"
    with contextlib.suppress(OSError):
        os.write(2, line.encode())


def _at_exit(device: str, peak_bytes: Any) -> None:  # noqa: ANN401 - a callable from torch
    def report() -> None:
        try:
            peak = int(peak_bytes())
        except Exception:  # noqa: BLE001 - at exit, a missing peak must not mask the exit status
            return
        _announce("oom-supervisor.peak", peak_mib=round(peak / _MIB, 2), device=device)

    atexit.register(report)


def _limit_cuda(torch: Any, mib: int) -> None:  # noqa: ANN401 - torch is not imported here
    def limit() -> None:
        for index in range(torch.cuda.device_count()):
            total = torch.cuda.get_device_properties(index).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, mib * _MIB / total), index)
        _announce("oom-supervisor.inject", limit_mib=mib, device="cuda")
        _at_exit("cuda", lambda: max(torch.cuda.max_memory_allocated(i)
                                     for i in range(torch.cuda.device_count())))

    # Queued until CUDA initialises: a process that never uses CUDA (a launcher) never
    # creates a context for it, and each worker limits the devices it really sees.
    lazy_call = getattr(torch.cuda, "_lazy_call", None)
    if lazy_call is not None:
        lazy_call(limit)
    else:
        limit()


def _limit_cpu(mib: int) -> None:
    # By path, under a private name: the program's interpreter may not have our package.
    spec = importlib.util.spec_from_file_location("_oom_supervisor_sim", _SIM)
    if spec is None or spec.loader is None:
        _say(f"cannot load {_SIM}; no limit applied")
        return
    sim = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = sim
    spec.loader.exec_module(sim)
    budget = sim.LiveBytesBudget(mib * _MIB)
    budget.__enter__()
    _kept.append(budget)
    _announce("oom-supervisor.inject", limit_mib=mib, device="cpu")
    _at_exit("cpu", lambda: budget.peak_bytes)


def _apply(torch: Any, mib: int) -> None:  # noqa: ANN401 - torch is not imported here
    try:
        if torch.cuda.is_available():
            _limit_cuda(torch, mib)
        else:
            _limit_cpu(mib)
    except Exception as error:  # noqa: BLE001 - never break the program we were asked to limit
        _say(f"could not apply the {mib} MiB limit: {type(error).__name__}: {error}")


class _AfterTorch:
    """A meta-path finder that lets torch load as usual, then applies the limit.

    Every spec of `torch` it is asked for gets the wrapped loader, until torch has really been
    executed: `importlib.util.find_spec("torch")` alone (transformers' availability check runs
    it before the program's own `import torch`) must not use the hook up.
    """

    def __init__(self, mib: int) -> None:
        self.mib = mib
        self.applied = False
        self._looking = False

    def find_spec(self, fullname: str, path: object = None,  # noqa: ARG002 - the finder protocol
                  target: object = None) -> importlib.machinery.ModuleSpec | None:  # noqa: ARG002
        if fullname != "torch" or self.applied or self._looking:
            return None
        self._looking = True  # find the real spec below without coming back here
        try:
            spec = importlib.util.find_spec("torch")
        finally:
            self._looking = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader: Any = spec.loader
        original = loader.exec_module
        finder = self

        def exec_module(module: ModuleType) -> None:
            original(module)
            if not finder.applied:
                finder.applied = True
                _apply(module, finder.mib)

        loader.exec_module = exec_module
        return spec


def _install() -> None:
    raw = os.environ.get(ENV_VAR)
    if not raw:
        return
    try:
        mib = int(raw)
    except ValueError:
        mib = 0
    if mib <= 0:
        _say(f"{ENV_VAR}={raw!r} is not a positive number of MiB; no limit applied")
        return
    if "torch" in sys.modules:
        _apply(sys.modules["torch"], mib)
    else:
        sys.meta_path.insert(0, _AfterTorch(mib))


def _start_stacks() -> None:
    """The main thread's sampler for the watchdog (stacks.py), when OOM_SUPERVISOR_STACKS asks."""
    if not os.environ.get("OOM_SUPERVISOR_STACKS"):
        return
    spec = importlib.util.spec_from_file_location(
        "_oom_supervisor_stacks", os.path.join(_HERE, "stacks.py"))  # noqa: PTH118
    if spec is None or spec.loader is None:
        return
    try:
        stacks = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(stacks)
        stacks.start()
    except Exception:  # noqa: BLE001, S110 - the sampler is evidence, never a reason to fail
        pass


def _chain() -> None:
    """Run the sitecustomize that this directory shadows, as `sitecustomize`."""
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]  # noqa: PTH100
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)


def _rescue() -> None:
    """Load the rescue hook (rescue.py beside this file) when OOM_SUPERVISOR_RESCUE asks."""
    raw = os.environ.get(RESCUE_ENV)
    if not raw:
        return
    try:
        spec = importlib.util.spec_from_file_location("_oom_supervisor_rescue", _RESCUE)
        if spec is None or spec.loader is None:
            return
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        module.install(raw)
    except Exception as error:  # noqa: BLE001 - never break the program we were asked to watch
        sys.stderr.write(f"oom-supervisor rescue: not armed ({type(error).__name__}: {error})\n")


_install()
_start_stacks()
_rescue()
_chain()
