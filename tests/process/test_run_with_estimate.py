"""`run --device-memory` with the estimator: configs predicted not to fit are skipped, said so."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.process

COMMAND = ["--", sys.executable, "-m", "supervisor.reference_trainer", "--model_name_or_path",
           "tiny", "--per_device_train_batch_size", "8", "--cutoff_len", "1024",
           "--max_steps", "1", "--output_dir", "out"]


def _run(tmp_path: Path, run_id: str, *options: str) -> tuple[list[dict[str, object]], int]:
    proc = subprocess.run(  # noqa: S603 - our own CLI
        [sys.executable, "-m", "supervisor", "--log-format", "json", "run", "--quiet",
         "--runs-dir", str(tmp_path), "--run-id", run_id, "--device-memory", "100MiB",
         "--fresh", *options, *COMMAND],
        capture_output=True, text=True, cwd=tmp_path, timeout=900, check=False,
        env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    journal = [json.loads(line) for line in
               (tmp_path / run_id / "journal.jsonl").read_text().splitlines()]
    return journal, proc.returncode


def test_estimator_reaches_the_fit_in_fewer_real_attempts(tmp_path: Path) -> None:
    """Same command, same 100 MiB device (injected, the trainer never hears of it)."""
    blind, blind_code = _run(tmp_path, "blind", "--no-estimate")
    seeing, seeing_code = _run(tmp_path, "seeing")
    assert (blind_code, seeing_code) == (0, 0)

    def attempts(journal: list[dict[str, object]]) -> list[dict[str, object]]:
        return [e for e in journal if e["event"] == "attempt.finished"]

    assert all(a["verdict"] == "oom" for a in attempts(blind)[:-1])
    assert len(attempts(blind)) >= 3
    assert len(attempts(seeing)) < len(attempts(blind))
    skipped = [e for e in seeing if e["event"] == "rung.skipped"]
    assert skipped
    assert all("MiB device" in str(e["reason"]) for e in skipped)
    assert "predicted" in str(skipped[0]["reason"])
