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


def test_demo_act_one_fits_at_once_with_the_prediction_shown(tmp_path: Path) -> None:
    """Act 1 (the default): told the device's size, the supervisor predicts the ladder, skips
    what cannot fit and runs the first config predicted to fit: one attempt, no OOM, and the
    report puts the prediction beside the measured peak (measured 47.9 vs 47.9 MiB)."""
    proc = subprocess.run(  # noqa: S603 - our own CLI
        [sys.executable, "-m", "supervisor", "--log-format", "plain", "demo", "--runs-dir",
         str(tmp_path), "--run-id", "act1"],
        capture_output=True, text=True, check=False, timeout=1200, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "act1" / "report.json").read_text())
    assert [a["verdict"] for a in report["attempts"]] == ["fits"]
    fit = report["attempts"][0]
    assert fit["predicted_mib"] == pytest.approx(fit["peak_mib"], rel=0.05)
    assert len(report["skipped_on_prediction"]) >= 5  # the walk's configs predicted over the device
    assert "fitted after 1 attempt (0 out of memory)" in proc.stderr
    assert "predicted 47" in proc.stderr
