"""`--device-memory SIZE`: run any Python command as if its device had only SIZE of memory.

The command's environment gets a `sitecustomize` (supervisor/_inject/) first on PYTHONPATH
and the size in OOM_SUPERVISOR_DEVICE_MIB; the program needs no change. A leading `env`
in the command's own argv (`env PYTHONPATH=src python train.py`, `env -i ...`) would drop
ours, so `device_memory_argv` rewrites that prefix to keep it. What nothing can rewrite (a
shell script that exports its own PYTHONPATH, `python -I`/`-E`/`-S`) is caught instead: the
injected code announces itself in the attempt's output, once per process when the limit is
in force, and reports its peak at exit; `read_inject_lines` reads both, and an attempt under
`--device-memory` without the announcement is an error, never a fit. See docs/memory.md.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from supervisor import bounds

ENV_VAR = "OOM_SUPERVISOR_DEVICE_MIB"
"""The variable the injected sitecustomize reads: the simulated device size in MiB."""

INJECT_DIR = Path(__file__).resolve().parent / "_inject"
"""The directory holding the injected sitecustomize.py."""

INJECT_MARK = "oom-supervisor.inject"
"""Start of the line each limited process writes to stderr once its limit is in force."""

PEAK_MARK = "oom-supervisor.peak"
"""Start of the line each limited process writes to stderr at exit, with its peak."""

_LINE = re.compile(r"(oom-supervisor\.(?:inject|peak)) (\{[^{}]*\})")


def device_memory_env(env: Mapping[str, str], mib: int) -> dict[str, str]:
    """`env` with the injected sitecustomize first on PYTHONPATH and the device size set.

    An existing PYTHONPATH (and any sitecustomize on it) is kept after ours: ours runs it.
    """
    _check_mib(mib)
    out = dict(env)
    out["PYTHONPATH"] = _with_ours(out.get("PYTHONPATH", ""))
    out[ENV_VAR] = str(mib)
    return out


def with_inject_path(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with the injected sitecustomize first on PYTHONPATH (what it does is set apart).

    An existing PYTHONPATH (and any sitecustomize on it) is kept after ours: ours runs it.
    """
    out = dict(env)
    out["PYTHONPATH"] = _with_ours(out.get("PYTHONPATH", ""))
    return out


def device_memory_argv(argv: Sequence[str], mib: int) -> tuple[str, ...]:
    """`argv` with every leading `env` keeping the injection (run it with device_memory_env).

    `env PYTHONPATH=x prog` becomes `env PYTHONPATH=<ours>:x prog`; an `env -i` or
    `env -u PYTHONPATH` also gets `PYTHONPATH=<ours>` and `OOM_SUPERVISOR_DEVICE_MIB=N`
    assignments. Anything else is returned unchanged.
    """
    _check_mib(mib)
    out = list(argv)
    i = 0
    while i < len(out) and PurePath(out[i]).name == "env":
        i = _rewrite_env(out, i, mib)
    return tuple(out)


def _rewrite_env(argv: list[str], start: int, mib: int) -> int:
    """Rewrite the `env` invocation at argv[start]; return the index of what it runs."""
    i = start + 1
    cleared: set[str] = set()
    everything = False
    while i < len(argv):
        word = argv[i]
        if word == "--":
            i += 1
            break
        if word in {"-i", "--ignore-environment", "-"}:
            everything = True
        elif word in {"-u", "--unset", "-C", "--chdir"} and i + 1 < len(argv):
            if word in {"-u", "--unset"}:
                cleared.add(argv[i + 1])
            i += 1
        elif word.startswith("--unset="):
            cleared.add(word.split("=", 1)[1])
        elif word.startswith("-u") and len(word) > 2:  # noqa: PLR2004 - `-uNAME`
            cleared.add(word[2:])
        elif not word.startswith("-"):
            break
        i += 1
    assigned: set[str] = set()
    while i < len(argv) and "=" in argv[i] and not argv[i].startswith("="):
        name, value = argv[i].split("=", 1)
        if name == "PYTHONPATH":
            argv[i] = f"PYTHONPATH={_with_ours(value)}"
        assigned.add(name)
        i += 1
    extra = []
    for name, value in (("PYTHONPATH", str(INJECT_DIR)), (ENV_VAR, str(mib))):
        if name not in assigned and (everything or name in cleared):
            extra.append(f"{name}={value}")
    argv[i:i] = extra
    return i + len(extra)


def inject_pythonpath(pythonpath: str) -> str:
    """`pythonpath` with the injected sitecustomize's folder first (once)."""
    return _with_ours(pythonpath)


def _with_ours(pythonpath: str) -> str:
    entries = [e for e in pythonpath.split(os.pathsep)
               if e and Path(e).resolve() != INJECT_DIR]
    return os.pathsep.join([str(INJECT_DIR), *entries])


def _check_mib(mib: int) -> None:
    if mib <= 0:
        msg = f"device memory must be a positive number of MiB, got {mib}"
        raise ValueError(msg)


@dataclass(frozen=True, slots=True, kw_only=True)
class InjectReport:
    """What the injected code said in one attempt's output."""

    announced: bool
    """At least one process announced the limit in force (False under --device-memory: error)."""
    limit_mib: int | None = None
    peak_mib: float | None = None
    """The highest peak any process reported at exit (None: none reported one)."""
    device: str | None = None
    """"cuda" if any process limited CUDA, else "cpu" (None: no announcement)."""
    pids: tuple[int, ...] = ()
    """The processes that announced, in order."""


def _marker(payload: str) -> dict[str, Any] | None:
    """A marker line's JSON when it is an object with a pid that can be one; None otherwise."""
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or bounds.count(data.get("pid"), low=1) is None:
        return None
    return data


def read_inject_lines(lines: Iterable[str]) -> InjectReport:
    """Read the injected code's announcement and peak lines (any launcher prefix allowed)."""
    limits: list[int] = []
    devices: list[str] = []
    pids: list[int] = []
    peaks: dict[int, float] = {}
    for line in lines:
        for mark, payload in _LINE.findall(line):
            data = _marker(payload)
            if data is None:
                continue  # a torn or malformed line (two ranks at once, a trainer's text)
            pid = data["pid"]
            if mark == INJECT_MARK:
                raw = data.get("limit_mib")
                limit = 0.0 if raw in (None, 0) else bounds.sane_mib(raw)
                if limit is None:
                    continue  # `"abc"`, a list, 1e999: not an announcement of ours
                limits.append(int(limit))
                devices.append(str(data.get("device"))[:16])
                if pid not in pids:
                    pids.append(pid)
            else:
                peak = bounds.sane_mib(data.get("peak_mib"))
                if peak is not None:
                    peaks[pid] = max(peaks.get(pid, 0.0), peak)
    if not pids:
        return InjectReport(announced=False,
                            peak_mib=max(peaks.values()) if peaks else None)
    return InjectReport(announced=True, limit_mib=max(limits),
                        peak_mib=max(peaks.values()) if peaks else None,
                        device="cuda" if "cuda" in devices else "cpu", pids=tuple(pids))
