"""`run --keep-quality` over the real reference trainer: real OOMs, and a stop before LoRA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.process


def test_keep_quality_stops_before_lora_with_exit_3_and_says_what_it_would_try(
        tmp_path: Path) -> None:
    """Full fine-tuning b1 x 256 OOMs on a 70 MiB device with and without checkpointing (real
    `torch.OutOfMemoryError`s from the live-bytes budget); the next rung, LoRA, costs quality,
    so the run stops with exit 3 and the report names it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(  # noqa: S603 - our own CLI
        (sys.executable, "-m", "supervisor", "run", "--device-memory", "70MiB", "--keep-quality",
         "--no-estimate", "--quiet", "--runs-dir", str(tmp_path / "runs"), "--run-id", "kq",
         "--", sys.executable, "-m", "supervisor.reference_trainer",
         "--per_device_train_batch_size", "1", "--cutoff_len", "256", "--max_steps", "1",
         "--output_dir", str(tmp_path / "out")),
        cwd=tmp_path, env=env, capture_output=True, text=True, check=False, timeout=600)
    assert done.returncode == 3, done.stderr[-2000:]
    assert "would try lora (cost quality) next" in done.stderr
    assert "rerun without --keep-quality to allow it" in done.stderr
    records = [json.loads(line) for line in
               (tmp_path / "runs" / "kq" / "journal.jsonl").read_text().splitlines()]
    finished = [r for r in records if r["event"] == "attempt.finished"]
    assert [r["verdict"] for r in finished] == ["oom", "oom"]
    assert all("OutOfMemoryError" in r["evidence"] for r in finished)
    started = [r for r in records if r["event"] == "attempt.started"]
    assert all(r["knobs"]["finetuning_type"] == "full" for r in started)
    exhausted = next(r for r in records if r["event"] == "ladder.exhausted")
    assert "lora (cost quality)" in exhausted["reason"]
    assert "lora: not tried" in exhausted["spent"]
