"""What the real-tool tiers (tests/llamafactory, tests/trl, tests/axolotl) share: venv, env, inputs.

Each tier has its own venv built by `<tier>/build_venv.sh` (which sources tests/tier_venv.sh),
its own environment for the tool (offline, one BLAS thread, a private HF cache) and its own
inputs (a tiny model and a dataset) built by `<tier>/fixtures.py` inside that venv.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest


def build_venv(tier: Path, venv: Path) -> Path:
    """The tier's venv, built (once, a few minutes) if it is missing or out of date."""
    script = [shutil.which("bash") or "/bin/bash", str(tier / "build_venv.sh"), str(venv)]
    build = subprocess.run(script, check=False, capture_output=True, text=True)  # noqa: S603
    if build.returncode != 0:
        tail = "\n".join(build.stderr.splitlines()[-15:])
        pytest.fail(f"building {venv} failed (exit {build.returncode}):\n{tail}")
    return venv


def tool_env(hf_home: Path, extra: Mapping[str, str], drop: Iterable[str]) -> dict[str, str]:
    """Offline, one BLAS thread (a host-memory cap is then repeatable), a private HF cache."""
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
                "HF_HOME": str(hf_home), **extra})
    for name in drop:
        env.pop(name, None)
    return env


def build_inputs(tier: Path, venv: Path, env: Mapping[str, str], out: Path) -> Path:
    """The tier's tiny model and dataset, built by its fixtures.py with the venv's transformers."""
    subprocess.run([str(venv / "bin" / "python"), str(tier / "fixtures.py"), str(out)],  # noqa: S603
                   check=True, env=dict(env), capture_output=True)
    return out
