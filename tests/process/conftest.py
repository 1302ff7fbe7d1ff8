"""Process tests drive the real reference trainer; one thread keeps host-memory caps repeatable."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from supervisor.command import Command

pytestmark = pytest.mark.process


@pytest.fixture
def trainer_env() -> dict[str, str]:
    """The environment attempts run in: one BLAS thread (deterministic peaks), offline."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONUNBUFFERED": "1"})
    return env


def trainer(tmp_path: Path, *flags: str) -> Command:
    """`python -m supervisor.reference_trainer FLAGS --output_dir tmp`, as a user would write it."""
    return Command(argv=(sys.executable, "-m", "supervisor.reference_trainer", *flags,
                         "--output_dir", str(tmp_path / "out")), cwd=str(tmp_path))
