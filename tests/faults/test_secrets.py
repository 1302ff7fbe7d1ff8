"""A secret planted in the environment and in argv reaches no file under the run folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.command import Command
from supervisor.dialects.argv import ArgvDialect
from supervisor.loop import ExitCode, supervise
from supervisor.policy import resolve
from tests.faults.conftest import quiet_env

pytestmark = pytest.mark.process

SECRETS = {"HF_TOKEN": "hf_plantedSecret0001", "WANDB_API_KEY": "wandbPlantedSecret0002",
           "HUB_TOKEN": "hubPlantedSecret0003"}
# Prints what a careless script prints: its environment's tokens and its argv.
LEAKY = """\
import os, sys
print("HF_TOKEN", os.environ.get("HF_TOKEN"), "WANDB", os.environ.get("WANDB_API_KEY"))
print("argv", sys.argv, flush=True)
"""


def test_secrets_appear_in_no_file_and_final_command_still_runs(tmp_path: Path) -> None:
    """Journal, logs, argv.json, reports and final-command.sh all carry placeholders only."""
    (tmp_path / "leaky.py").write_text(LEAKY, encoding="utf-8")
    argv = ("env", f"WANDB_API_KEY={SECRETS['WANDB_API_KEY']}", sys.executable, "leaky.py",
            "--per_device_train_batch_size", "2", "--hub_token", SECRETS["HUB_TOKEN"])
    env = {**quiet_env(), "HF_TOKEN": SECRETS["HF_TOKEN"]}
    result = supervise(Command(argv=argv, cwd=str(tmp_path)), dialect=ArgvDialect(),
                       ladder=resolve("default"), run_dir=tmp_path / "run", echo=False, env=env)
    assert result.exit_code is ExitCode.FITTED
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert len(files) >= 6
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        for value in SECRETS.values():
            assert value not in text, f"{value} leaked into {path}"
    stdout = (tmp_path / "run" / "attempts" / "01" / "stdout.log").read_text()
    assert "<redacted:HF_TOKEN>" in stdout
    script = (tmp_path / "run" / "final-command.sh").read_text()
    assert '"${WANDB_API_KEY:?' in script
    assert '"${HUB_TOKEN:?' in script
    # Runnable as is once the secrets are in the environment again.
    rerun = subprocess.run(["sh", str(tmp_path / "run" / "final-command.sh")],  # noqa: S603, S607
                           capture_output=True, text=True, check=False,
                           env={**env, **SECRETS}, timeout=60)
    assert rerun.returncode == 0, rerun.stderr
    assert SECRETS["HUB_TOKEN"] in rerun.stdout
