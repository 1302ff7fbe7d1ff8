"""The TRL tier: the real `trl sft` CLI (PyPI trl, with peft) in its own venv.

The venv (.venv-trl, or $OOM_SUPERVISOR_TRL_VENV) is built by build_venv.sh on first use; the
tiny Llama, its tokenizer and a text dataset are built by fixtures.py in that venv. Nothing is
downloaded but the venv's packages.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).parent
REPO = HERE.parent.parent
TRL_VENV = Path(os.environ.get("OOM_SUPERVISOR_TRL_VENV", REPO / ".venv-trl"))


@pytest.fixture(scope="session")
def trl_venv() -> Path:
    """The TRL venv, built (once, a few minutes) if it is missing or out of date."""
    script = [shutil.which("bash") or "/bin/bash", str(HERE / "build_venv.sh"), str(TRL_VENV)]
    build = subprocess.run(script, check=False, capture_output=True, text=True)  # noqa: S603
    if build.returncode != 0:
        tail = "\n".join(build.stderr.splitlines()[-15:])
        pytest.fail(f"building {TRL_VENV} failed (exit {build.returncode}):\n{tail}")
    return TRL_VENV


@pytest.fixture(scope="session")
def trl_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Offline, one BLAS thread (a host-memory cap is then repeatable), a private HF cache."""
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
                "HF_HOME": str(tmp_path_factory.mktemp("hf-home")),
                "WANDB_DISABLED": "true"})
    for name in ("CUDA_VISIBLE_DEVICES", "ACCELERATE_USE_CPU"):
        env.pop(name, None)
    return env


@pytest.fixture(scope="session")
def trl_inputs(trl_venv: Path, trl_env: dict[str, str],
               tmp_path_factory: pytest.TempPathFactory) -> Path:
    """model/ and text/train.jsonl built by fixtures.py with the TRL venv's transformers."""
    out = tmp_path_factory.mktemp("trl-inputs")
    subprocess.run([str(trl_venv / "bin" / "python"), str(HERE / "fixtures.py"), str(out)],  # noqa: S603
                   check=True, env=trl_env, capture_output=True)
    return out
