"""Measure the reference trainer's peak live MiB for every config of the default ladder's walk.

Usage: .venv/bin/python scripts/measure_peaks.py {tiny|small} OUT.json

Runs `python -m supervisor.reference_trainer` once per config (CPU, OMP_NUM_THREADS=1,
--max_steps 2, no budget: the live-bytes tracker only measures) and writes what each result
line says. tests/data/peaks/README.md names the runs recorded with it.
"""

# A script: its output is the progress it prints.
# ruff: noqa: INP001, T201

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from supervisor.knobs import Knobs
from supervisor.plan import walk
from supervisor.policy import resolve

START = Knobs(per_device_batch=8, grad_accum=1, cutoff_len=1024)
"""The demo's ambitious start: full fine-tuning, batch 8 x 1024 tokens."""


def flags(model: str, knobs: Knobs, out: str) -> list[str]:
    """The reference trainer's flags for one config."""
    argv = ["--model_name_or_path", model, "--max_steps", "2", "--output_dir", out,
            "--per_device_train_batch_size", str(knobs.per_device_batch),
            "--gradient_accumulation_steps", str(knobs.grad_accum),
            "--cutoff_len", str(knobs.cutoff_len),
            "--finetuning_type", str(knobs.finetuning_type),
            "--lora_rank", str(knobs.lora_rank),
            "--freeze_trainable_layers", str(knobs.freeze_trainable_layers)]
    if knobs.gradient_checkpointing:
        argv.append("--gradient_checkpointing")
    return argv


def main() -> int:
    model, out_path = sys.argv[1], Path(sys.argv[2])
    import peft  # noqa: PLC0415 - only for the versions recorded
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    rows = []
    for knobs, rung in walk(START, resolve("default")):
        with tempfile.TemporaryDirectory() as tmp:
            argv = [sys.executable, "-m", "supervisor.reference_trainer",
                    *flags(model, knobs, tmp)]
            started = time.monotonic()
            proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)  # noqa: S603
            wall = time.monotonic() - started
        line = next((x for x in reversed(proc.stdout.splitlines())
                     if x.startswith("reference-trainer.result ")), None)
        if proc.returncode != 0 or line is None:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        result = json.loads(line.split(" ", 1)[1])
        rows.append({"knobs": knobs.to_dict(), "rung": rung,
                     "argv": ["python", "-m", "supervisor.reference_trainer",
                              *flags(model, knobs, "TMP")],
                     "peak_live_mib": result["peak_live_mib"],
                     "max_rss_mib": result["max_rss_mib"], "wall_s": round(wall, 1)})
        print(f"{len(rows):2d} {rung or '(start)':24s} b{knobs.per_device_batch}xGA"
              f"{knobs.grad_accum} L{knobs.cutoff_len} gc={knobs.gradient_checkpointing} "
              f"{knobs.finetuning_type}: {result['peak_live_mib']} MiB, {wall:.1f} s",
              flush=True)
    record = {
        "model": model, "start": START.to_dict(), "policy": "default",
        "recorded": time.strftime("%Y-%m-%d", time.gmtime()),
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers.__version__, "peft": peft.__version__,
                        "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU only",
                        "OMP_NUM_THREADS": "1"},
        "rows": rows,
    }
    out_path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
