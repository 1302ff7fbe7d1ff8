"""`oom-supervisor demo` as the README runs it: real OOMs, a fit, the effective batch kept."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.process


def test_demo_walks_several_rungs_and_keeps_the_effective_batch(tmp_path: Path) -> None:
    """Exit 0, >= 3 real OOM verdicts over batch, cutoff, checkpointing and LoRA, then a fit."""
    proc = subprocess.run(  # noqa: S603 - our own CLI
        [sys.executable, "-m", "supervisor", "demo", "--walk", "--quiet", "--runs-dir",
         str(tmp_path), "--run-id", "demo"],
        capture_output=True, text=True, check=False, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    verdicts = [a["verdict"] for a in report["attempts"]]
    assert verdicts[-1] == "fits"
    assert verdicts.count("oom") >= 3
    assert all(a["oom_kind"] == "torch" for a in report["attempts"][:-1])
    rungs = {a["rung"] for a in report["attempts"]}
    assert {"smaller-batch", "shorter-cutoff", "gradient-checkpointing", "lora"} <= rungs
    assert report["effective_batch"]["start"] == report["effective_batch"]["final"] == 4
    assert "working config:" in proc.stderr
    # The working command runs as it is, and really trains with the final config.
    rerun = subprocess.run(["sh", str(tmp_path / "demo" / "final-command.sh")],  # noqa: S603, S607
                           capture_output=True, text=True, check=False, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    result = json.loads(rerun.stdout.strip().splitlines()[-1].split(" ", 1)[1])
    final = report["final_knobs"]
    assert (result["per_device_train_batch_size"], result["gradient_accumulation_steps"],
            result["cutoff_len"], result["finetuning_type"]) == (
        final["per_device_batch"], final["grad_accum"], final["cutoff_len"],
        final["finetuning_type"])
