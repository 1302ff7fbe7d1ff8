"""The supervisor installs and runs on Python 3.10, without torch (issue 9, item 5).

The venv (`pip install -e` of this repo: the runtime deps as pyproject lists them, with their
3.10-only markers) is built fresh in the session's temp folder (about 25 s); being editable,
it runs the code in this tree.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROGRAM = ROOT / "tests" / "data" / "programs" / "argparse_train.py"

pytestmark = [pytest.mark.process, pytest.mark.xdist_group("python310")]


def _python310() -> str | None:
    """A working python3.10: on PATH (a pyenv shim may not run), else ~/.pyenv/versions/3.10*."""
    pyenv = sorted(str(p) for p in Path.home().glob(".pyenv/versions/3.10*/bin/python3.10"))
    for candidate in [shutil.which("python3.10"), *reversed(pyenv)]:
        if candidate is None:
            continue
        probe = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2])"],  # noqa: S603
                               capture_output=True, text=True, timeout=30, check=False)
        if probe.returncode == 0 and probe.stdout.strip() == "(3, 10)":
            return candidate
    return None


def _clean_env() -> dict[str, str]:
    """This environment minus what would point a 3.10 interpreter at the 3.11 dev venv."""
    env = {k: v for k, v in os.environ.items()
           if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"}}
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    return env


@pytest.fixture(scope="module")
def venv310(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh 3.10 venv with this project installed (editable), torch absent."""
    python = _python310()
    if python is None:
        pytest.skip("no python3.10 on PATH or under ~/.pyenv/versions/3.10*/bin")
    venv = tmp_path_factory.mktemp("py310") / "venv"
    env = _clean_env()
    subprocess.run([python, "-m", "venv", str(venv)], check=True, env=env, timeout=120)  # noqa: S603
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",  # noqa: S603
                    "--disable-pip-version-check", "-e", str(ROOT)],
                   check=True, env=env, timeout=300)
    return venv


def test_venv_is_310_without_torch_and_uses_the_stand_ins(venv310: Path) -> None:
    """The interpreter is 3.10, torch is not there, and _compat's 3.10 branch is the one taken."""
    probe = ("import enum, importlib.util, sys; from supervisor import _compat; "
             "print(sys.version_info[:2], importlib.util.find_spec('torch') is None, "
             "hasattr(enum, 'StrEnum'), _compat.tomllib.__name__)")
    out = subprocess.run([str(venv310 / "bin" / "python"), "-c", probe], check=True,  # noqa: S603
                         capture_output=True, text=True, env=_clean_env(), timeout=60).stdout
    assert out.split() == ["(3,", "10)", "True", "False", "tomli"]


def test_run_fits_on_310(venv310: Path, tmp_path: Path) -> None:
    """`oom-supervisor run` under 3.10 on a script that exits 0: exit 0, a journal that parses."""
    runs = tmp_path / "runs"
    argv = [str(venv310 / "bin" / "oom-supervisor"), "run", "--runs-dir", str(runs),
            "--run-id", "py310", "--quiet", "--fits-db", str(tmp_path / "fits.sqlite3"), "--",
            str(venv310 / "bin" / "python"), str(PROGRAM),
            "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2"]
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True,  # noqa: S603
                          env=_clean_env(), timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    lines = (runs / "py310" / "journal.jsonl").read_text(encoding="utf-8").splitlines()
    events = [json.loads(line) for line in lines]
    assert events[0]["event"] == "run.started"
    assert events[-1]["event"] == "run.finished"
    assert events[-1]["status"] == "fitted"
    assert (runs / "py310" / "report.md").is_file()
    status = subprocess.run([str(venv310 / "bin" / "oom-supervisor"), "status",  # noqa: S603
                             str(runs / "py310")], capture_output=True, text=True,
                            env=_clean_env(), timeout=60, check=False)
    assert status.returncode == 0, status.stderr
    assert "fitted" in status.stdout



def test_demo_without_torch_says_what_to_install(venv310: Path, tmp_path: Path) -> None:
    """A plain tool install has no torch: the demo says so in one line, before any attempt."""
    demo = subprocess.run([str(venv310 / "bin" / "oom-supervisor"), "demo", "--runs-dir",  # noqa: S603
                           str(tmp_path / "runs")], capture_output=True, text=True,
                          env=_clean_env(), timeout=120, check=False)
    assert demo.returncode == 2, demo.stderr
    lines = [line for line in demo.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, demo.stderr
    assert "oom-supervisor[train,plot]" in lines[0]
    assert "Traceback" not in demo.stderr
    assert not (tmp_path / "runs").exists()  # nothing was started
