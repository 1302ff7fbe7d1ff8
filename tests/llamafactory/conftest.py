"""The LLaMA-Factory tier: the real `llamafactory-cli` (PyPI llamafactory) in its own venv.

The venv (.venv-lf, or $OOM_SUPERVISOR_LF_VENV) is built by build_venv.sh on first use, here or
by `make test`; the tiny Llama, its tokenizer and the dataset are built from fixtures.py's config
in that venv. Nothing is downloaded but the venv's packages.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).parent
REPO = HERE.parent.parent
LF_VENV = Path(os.environ.get("OOM_SUPERVISOR_LF_VENV", REPO / ".venv-lf"))


@pytest.fixture(scope="session")
def lf_venv() -> Path:
    """The LLaMA-Factory venv, built (once, ~2 min) if it is missing or out of date."""
    script = [shutil.which("bash") or "/bin/bash", str(HERE / "build_venv.sh"), str(LF_VENV)]
    build = subprocess.run(script, check=False, capture_output=True, text=True)  # noqa: S603
    if build.returncode != 0:
        tail = "\n".join(build.stderr.splitlines()[-15:])
        pytest.fail(f"building {LF_VENV} failed (exit {build.returncode}):\n{tail}")
    return LF_VENV


@pytest.fixture(scope="session")
def lf_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Offline, one BLAS thread (a host-memory cap is then repeatable), a private HF cache."""
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
                "HF_HOME": str(tmp_path_factory.mktemp("hf-home")),
                "DISABLE_VERSION_CHECK": "1"})
    for name in ("FORCE_TORCHRUN", "NPROC_PER_NODE", "NNODES", "CUDA_VISIBLE_DEVICES"):
        env.pop(name, None)
    return env


@pytest.fixture(scope="session")
def lf_inputs(lf_venv: Path, lf_env: dict[str, str],
              tmp_path_factory: pytest.TempPathFactory) -> Path:
    """model/ and data/ built by fixtures.py with the LLaMA-Factory venv's transformers."""
    out = tmp_path_factory.mktemp("lf-inputs")
    subprocess.run([str(lf_venv / "bin" / "python"), str(HERE / "fixtures.py"), str(out)],  # noqa: S603
                   check=True, env=lf_env, capture_output=True)
    return out
