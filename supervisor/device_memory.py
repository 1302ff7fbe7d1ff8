"""`--device-memory SIZE`: run any Python command as if its device had only SIZE of memory.

The command's environment gets a `sitecustomize` (supervisor/_inject/) first on PYTHONPATH
and the size in OOM_SUPERVISOR_DEVICE_MIB; the program needs no change. See docs/memory.md.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

ENV_VAR = "OOM_SUPERVISOR_DEVICE_MIB"
"""The variable the injected sitecustomize reads: the simulated device size in MiB."""

INJECT_DIR = Path(__file__).resolve().parent / "_inject"
"""The directory holding the injected sitecustomize.py."""


def device_memory_env(env: Mapping[str, str], mib: int) -> dict[str, str]:
    """`env` with the injected sitecustomize first on PYTHONPATH and the device size set.

    An existing PYTHONPATH (and any sitecustomize on it) is kept after ours: ours runs it.
    """
    if mib <= 0:
        msg = f"device memory must be a positive number of MiB, got {mib}"
        raise ValueError(msg)
    out = dict(env)
    entries = [e for e in out.get("PYTHONPATH", "").split(os.pathsep)
               if e and Path(e).resolve() != INJECT_DIR]
    out["PYTHONPATH"] = os.pathsep.join([str(INJECT_DIR), *entries])
    out[ENV_VAR] = str(mib)
    return out
