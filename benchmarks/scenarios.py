"""Scenario suite (issues 9 and 12): an HF-argparse script the supervisor knows only by its --help.

`tests/data/programs/hf/train_bash.py` has LLaMA-Factory's legacy file name but Hugging Face
semantics (gradient checkpointing OFF by default, TRL-style `--use_peft --lora_r`). It trains
the bundled tiny Llama, starting full fine-tuning, batch 8, cutoff 512, under live-bytes
budgets of 400, 200, 130, 100, 70 and 40 MiB (`--device-memory`, so every OOM is real).
Three passes, each with no knob map:

- `walk`: `--no-estimate --fresh`: the ladder alone; the final config must be the
  least-degraded one that keeps the effective batch;
- `estimate`: `--fresh` with the estimator on: configs predicted over the device are skipped
  (target: <= 1.5 attempts on average);
- `remembered`: the same again with the fit store of the `walk` pass: 1 attempt per budget
  that fitted before.

Usage: `python benchmarks/scenarios.py [BUDGET ...]`; prints a Markdown table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
SCRIPT = ROOT / "tests" / "data" / "programs" / "hf" / "train_bash.py"
COMMAND = (PY, str(SCRIPT), "--model_name_or_path", "tiny", "--per_device_train_batch_size",
           "8", "--max_seq_length", "512", "--max_steps", "2", "--output_dir", "out")
BUDGETS = (400, 200, 130, 100, 70, 40)
PEERS = ROOT / "benchmarks" / "peers"
PASSES = {"walk": ("--no-estimate", "--fresh"), "estimate": ("--fresh",),
          "remembered": ("--no-estimate",),
          # The peers' strategies on the same scenario, as policies of ours (benchmarks/peers/).
          "accelerate": ("--no-estimate", "--fresh", "--policy", str(PEERS / "accelerate.toml")),
          "composer": ("--no-estimate", "--fresh", "--policy", str(PEERS / "composer.toml"))}


def _config(knobs: dict[str, Any] | None) -> str:
    if not knobs:
        return "none fits"
    method = str(knobs["finetuning_type"])
    if method == "lora":
        method += f" r{knobs['lora_rank']}"
    ckpt = "+ckpt" if knobs["gradient_checkpointing"] else ""
    return (f"{method}{ckpt} b{knobs['per_device_batch']}xGA{knobs['grad_accum']} "
            f"c{knobs['cutoff_len']}")


def run(tmp: Path, label: str, budget: int, flags: tuple[str, ...], db: Path) -> dict[str, Any]:
    """One supervised run; its attempts, final config, effective batch and seconds."""
    run_id = f"{label}-{budget}"
    began = time.monotonic()
    done = subprocess.run(  # noqa: S603 - our own CLI
        [PY, "-m", "supervisor", "--log-format", "json", "run", "--quiet", "--runs-dir",
         str(tmp), "--run-id", run_id, "--device-memory", f"{budget}MiB", "--fits-db", str(db),
         *flags, "--", *COMMAND], env=ENV, cwd=tmp, capture_output=True, text=True,
        check=False)
    seconds = time.monotonic() - began
    report = json.loads((tmp / run_id / "report.json").read_text())
    eb = report["effective_batch"]
    return {"pass": label, "budget_mib": budget, "exit": done.returncode,
            "attempts": len(report["attempts"]), "final": _config(report["final_knobs"]),
            "effective_batch": f"{eb['start']}->{eb['final']}", "seconds": round(seconds, 1)}


def main(argv: list[str]) -> int:
    """Run the three passes over the budgets and print the table."""
    budgets = tuple(int(a) for a in argv) or BUDGETS
    chosen = os.environ.get("SCENARIO_PASSES", "").split(",") if os.environ.get(
        "SCENARIO_PASSES") else list(PASSES)
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        db = tmp / "fits.sqlite3"
        for label, flags in PASSES.items():
            if label not in chosen:
                continue
            for budget in budgets:
                row = run(tmp, label, budget, flags, db)
                rows.append(row)
                print(json.dumps(row), flush=True)  # noqa: T201
    print("\n| pass | budget | attempts | final config | effective batch | exit | seconds |")  # noqa: T201
    print("| --- | --- | --- | --- | --- | --- | --- |")  # noqa: T201
    for r in rows:
        print(f"| {r['pass']} | {r['budget_mib']} MiB | {r['attempts']} | {r['final']} | "  # noqa: T201
              f"{r['effective_batch']} | {r['exit']} | {r['seconds']} |")
    for label in chosen:
        mine = [r for r in rows if r["pass"] == label]
        mean = sum(r["attempts"] for r in mine) / len(mine)
        print(f"{label}: {mean:.2f} attempts on average")  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
