"""The TRL tier: the real `trl sft` CLI (PyPI trl, with peft) in its own venv.

The venv (.venv-trl, or $OOM_SUPERVISOR_TRL_VENV) is built by build_venv.sh on first use; the
tiny Llama, its tokenizer and a text dataset are built by fixtures.py in that venv. Nothing is
downloaded but the venv's packages.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests import tiers

HERE = Path(__file__).parent
TRL_VENV = Path(os.environ.get("OOM_SUPERVISOR_TRL_VENV", HERE.parent.parent / ".venv-trl"))


@pytest.fixture(scope="session")
def trl_venv() -> Path:
    """The TRL venv, built (once, a few minutes) if it is missing or out of date."""
    return tiers.build_venv(HERE, TRL_VENV)


@pytest.fixture(scope="session")
def trl_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The tiers' offline environment, with wandb off and no device or accelerate choice."""
    return tiers.tool_env(tmp_path_factory.mktemp("hf-home"), {"WANDB_DISABLED": "true"},
                          ("CUDA_VISIBLE_DEVICES", "ACCELERATE_USE_CPU"))


@pytest.fixture(scope="session")
def trl_inputs(trl_venv: Path, trl_env: dict[str, str],
               tmp_path_factory: pytest.TempPathFactory) -> Path:
    """model/ and text/train.jsonl built by fixtures.py with the TRL venv's transformers."""
    return tiers.build_inputs(HERE, trl_venv, trl_env, tmp_path_factory.mktemp("trl-inputs"))
