"""What a mid-run OOM costs with and without the rescue checkpoint (docs/reliability.md).

The bundled reference trainer, batch 8 x 256 tokens under its own 260 MiB live-bytes device,
30 optimizer steps, a checkpoint every 10; its data gets longer at step 15
(`REFERENCE_TRAINER_FAULTS=longer@15`), and the step after that runs out of memory for real.
The same run twice under `oom-supervisor run`: the shipped default policy (the rescue on) and
the same policy with `[rescue] on_oom = false, on_stop = false` (as before the rescue).
For each: the step the OOM attempt had completed, where the next attempt resumed, the completed
steps trained twice, the steps trained in all, and the seconds the rescue took (wall times on a
shared machine say little; the steps are what a real night pays for).

    .venv/bin/python benchmarks/rescue.py        # ~3 min, ~2.5 CPU-minutes

Prints a markdown table.
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

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
TRAINER = [PY, "-m", "supervisor.reference_trainer", "--per_device_train_batch_size", "8",
           "--cutoff_len", "256", "--device-memory", "260", "--max_steps", "30",
           "--save_steps", "10", "--logging_steps", "1", "--output_dir", "out"]


def _run(folder: Path, *, rescue: bool) -> dict[str, Any]:
    folder.mkdir(parents=True)
    policy = folder / "policy.toml"
    text = (ROOT / "policies" / "default.toml").read_text(encoding="utf-8")
    if not rescue:
        text = text.replace("on_oom = true", "on_oom = false").replace(
            "on_stop = true", "on_stop = false")
    policy.write_text(text, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "REFERENCE_TRAINER_FAULTS": "longer@15",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    began = time.monotonic()
    # A fit store of its own, never read: each run walks from the command's own config.
    done = subprocess.run([PY, "-m", "supervisor", "run", "--quiet", "--policy", str(policy),  # noqa: S603
                           "--fits-db", str(folder / "fits.sqlite"), "--fresh",
                           "--runs-dir", str(folder), "--run-id", "r", "--", *TRAINER],
                          cwd=folder, env=env, capture_output=True, check=False)
    wall_s = time.monotonic() - began
    journal = [json.loads(line) for line in (folder / "r" / "journal.jsonl").read_text(
        encoding="utf-8").splitlines()]
    finished = [e for e in journal if e["event"] == "attempt.finished"]
    resumed = [e for e in journal if e["event"] == "checkpoint.resumed"]
    rescued = [e for e in journal if e["event"] == "checkpoint.rescued"]
    reached = finished[0]["progress"]["step"]
    from_step = resumed[0]["step"] if resumed else 0
    starts = {e["attempt"]: e["step"] for e in resumed}
    trained = sum(e["progress"]["step"] - starts.get(e["attempt"], 0) for e in finished)
    return {"rescue": rescue, "exit": done.returncode, "oom_at_step": reached + 1,
            "resumed_from": from_step, "trained_twice": reached - from_step,
            "rescue_s": rescued[0]["seconds"] if rescued else None,
            "verdicts": [e["verdict"] for e in finished], "trained": trained,
            "wall_s": round(wall_s, 1)}


def main() -> None:
    """Both runs, one after the other, and the table."""
    with tempfile.TemporaryDirectory(prefix="rescue-bench-") as tmp:
        rows = [_run(Path(tmp) / name, rescue=on) for name, on in (("on", True), ("off", False))]
    print("| rescue | attempts | OOM in step | next attempt resumed from | completed steps "  # noqa: T201
          "trained twice | steps trained in all (30 kept) | rescue save |")
    print("| --- | --- | --- | --- | --- | --- | --- |")  # noqa: T201
    for row in rows:
        save = f"{row['rescue_s']:.2f} s" if row["rescue_s"] is not None else "—"
        print(f"| {'on' if row['rescue'] else 'off'} | {', '.join(row['verdicts'])} | "  # noqa: T201
              f"{row['oom_at_step']} | {row['resumed_from']} | {row['trained_twice']} | "
              f"{row['trained']} | {save} |")


if __name__ == "__main__":
    main()
