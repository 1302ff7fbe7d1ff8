"""The LLaMA-Factory tier: the real `llamafactory-cli` (PyPI llamafactory) in its own venv.

The venv (.venv-lf, or $OOM_SUPERVISOR_LF_VENV) is built by build_venv.sh on first use, here or
by `make test`; the tiny Llama, its tokenizer and the dataset are built from fixtures.py's config
in that venv. Nothing is downloaded but the venv's packages.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests import tiers

HERE = Path(__file__).parent
LF_VENV = Path(os.environ.get("OOM_SUPERVISOR_LF_VENV", HERE.parent.parent / ".venv-lf"))


@pytest.fixture(scope="session")
def lf_venv() -> Path:
    """The LLaMA-Factory venv, built (once, ~2 min) if it is missing or out of date."""
    return tiers.build_venv(HERE, LF_VENV)


@pytest.fixture(scope="session")
def lf_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The tiers' offline environment, without version checks or a torchrun of its own."""
    return tiers.tool_env(tmp_path_factory.mktemp("hf-home"), {"DISABLE_VERSION_CHECK": "1"},
                          ("FORCE_TORCHRUN", "NPROC_PER_NODE", "NNODES", "CUDA_VISIBLE_DEVICES"))


@pytest.fixture(scope="session")
def lf_inputs(lf_venv: Path, lf_env: dict[str, str],
              tmp_path_factory: pytest.TempPathFactory) -> Path:
    """model/ and data/ built by fixtures.py with the LLaMA-Factory venv's transformers."""
    return tiers.build_inputs(HERE, lf_venv, lf_env, tmp_path_factory.mktemp("lf-inputs"))
