"""The axolotl tier: the real `axolotl train` (PyPI axolotl 0.19.0) in its own venv.

The venv (.venv-axolotl, or $OOM_SUPERVISOR_AXOLOTL_VENV) is built by build_venv.sh on first use;
the tiny Llama, its tokenizer and an alpaca dataset are built by fixtures.py in that venv.
Nothing is downloaded but the venv's packages.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests import tiers

HERE = Path(__file__).parent
AXOLOTL_VENV = Path(os.environ.get("OOM_SUPERVISOR_AXOLOTL_VENV",
                                   HERE.parent.parent / ".venv-axolotl"))


@pytest.fixture(scope="session")
def axolotl_venv() -> Path:
    """The axolotl venv, built (once, ~3 min, 4.3 GB) if it is missing or out of date."""
    return tiers.build_venv(HERE, AXOLOTL_VENV)


@pytest.fixture(scope="session")
def axolotl_env(axolotl_venv: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The tiers' offline environment as an activated venv gives it (`axolotl train` starts
    `accelerate` from PATH), telemetry and wandb off, and the probe that names q_proj's class."""
    extra = {"PATH": f"{axolotl_venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
             "AXOLOTL_DO_NOT_TRACK": "1", "WANDB_MODE": "disabled",
             "PYTHONPATH": str(HERE / "probe")}
    return tiers.tool_env(tmp_path_factory.mktemp("hf-home"), extra,
                          ("CUDA_VISIBLE_DEVICES", "ACCELERATE_USE_CPU", "VIRTUAL_ENV"))


@pytest.fixture(scope="session")
def axolotl_inputs(axolotl_venv: Path, axolotl_env: dict[str, str],
                   tmp_path_factory: pytest.TempPathFactory) -> Path:
    """model/ and data/train.jsonl built by fixtures.py with the axolotl venv's transformers."""
    return tiers.build_inputs(HERE, axolotl_venv, axolotl_env,
                              tmp_path_factory.mktemp("axolotl-inputs"))
