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
  that fitted before;
- `blind`: the supervisor is not told the device (the budget is injected into the command's
  environment, not given as `--device-memory`), so nothing is predicted before attempt 1; each
  OOM's own figures then pass over the configs counted clearly above what it showed.

Two architectures, two precisions (issue 19): `SCENARIO_MODEL` is a named size of
supervisor/models.py (`tiny`, the Llama the suite was built on, by default; `tiny-qwen2`, a
Qwen2 with grouped-query attention nobody tuned for), `SCENARIO_PRECISION` is `fp32` (default)
or `bf16` (the script's `--bf16`: Hugging Face mixed precision, autocast over fp32 weights).
Each pair has its own budgets, chosen from its measured lattice (tests/data/peaks/) to land
on each rung.

Each row also says how long the supervisor took before attempt 1 was spawned (its start to
the journal's first `attempt.started`: the estimator's tracing is in there) and how long the
run's OOM attempts took together (the `walk` pass's OOM seconds are what a prediction can
save). `SCENARIO_OUT=rows.json` keeps the rows.

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
MODEL = os.environ.get("SCENARIO_MODEL", "tiny")
PRECISION = os.environ.get("SCENARIO_PRECISION", "fp32")
COMMAND = (PY, str(SCRIPT), "--model_name_or_path", MODEL, "--per_device_train_batch_size",
           "8", "--max_seq_length", "512", "--max_steps", "2", "--output_dir", "out",
           *(("--bf16", "true") if PRECISION == "bf16" else ()))
BUDGETS_BY_SCENARIO: dict[tuple[str, str], tuple[int, ...]] = {
    ("tiny", "fp32"): (400, 200, 130, 100, 70, 40),
    # tests/data/peaks/lattice-tiny-qwen2.json: one budget inside each stretch where another
    # config is the least-degraded fit (tests/unit/test_walk_lattice.py::QWEN2_BUDGETS).
    ("tiny-qwen2", "fp32"): (600, 400, 250, 180, 145, 125, 100, 70, 50),
    # bf16 (the script's --bf16: autocast over fp32 weights): one budget inside each stretch
    # where another config is the least-degraded fit, by the FakeTensor predictions of the
    # bf16-mixed grid (no whole bf16 lattice is measured; every bf16 point that is, six per
    # model, is within 0.4% of its prediction). Where the stretch is narrow it has none.
    ("tiny", "bf16"): (400, 250, 170, 125, 105, 90, 60, 45),
    ("tiny-qwen2", "bf16"): (500, 300, 220, 175, 150, 135, 120, 100, 70, 50),
}
PEERS = ROOT / "benchmarks" / "peers"
HIDDEN = "hidden"
"""A pass flag of ours: the device is injected into the environment, not named to `run`."""
PASSES = {"walk": ("--no-estimate", "--fresh"), "estimate": ("--fresh",),
          "blind": ("--fresh", HIDDEN),
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


def _journal_seconds(journal: Path, began_ts: float,
                     ) -> tuple[float | None, float, float | None]:
    """(seconds from the supervisor's start to attempt 1's start, seconds in OOM attempts,
    attempt 1's own seconds)."""
    first: float | None = None
    first_s: float | None = None
    oom_s = 0.0
    for line in journal.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record.get("event") == "attempt.started" and first is None:
            first = float(record["ts"]) - began_ts
        if record.get("event") == "attempt.finished" and first_s is None:
            first_s = round(float(record.get("duration_s") or 0.0), 1)
        if record.get("event") == "attempt.finished" and record.get("verdict") == "oom":
            oom_s += float(record.get("duration_s") or 0.0)
    return (None if first is None else round(first, 1)), round(oom_s, 1), first_s


def run(tmp: Path, label: str, budget: int, flags: tuple[str, ...], db: Path) -> dict[str, Any]:
    """One supervised run; its attempts, final config, effective batch and seconds."""
    run_id = f"{label}-{budget}"
    began_ts = time.time()
    began = time.monotonic()
    env, device = ENV, ("--device-memory", f"{budget}MiB")
    if HIDDEN in flags:
        from supervisor.device_memory import device_memory_env  # noqa: PLC0415

        env, device = device_memory_env(ENV, budget), ()
        flags = tuple(f for f in flags if f != HIDDEN)
    done = subprocess.run(  # noqa: S603 - our own CLI
        [PY, "-m", "supervisor", "--log-format", "json", "run", "--quiet", "--runs-dir",
         str(tmp), "--run-id", run_id, *device, "--fits-db", str(db),
         *flags, "--", *COMMAND], env=env, cwd=tmp, capture_output=True, text=True,
        check=False)
    seconds = time.monotonic() - began
    report = json.loads((tmp / run_id / "report.json").read_text())
    eb = report["effective_batch"]
    before_s, oom_s, first_s = _journal_seconds(tmp / run_id / "journal.jsonl", began_ts)
    return {"model": MODEL, "precision": PRECISION, "pass": label, "budget_mib": budget,
            "exit": done.returncode, "attempts": len(report["attempts"]),
            "final": _config(report["final_knobs"]),
            "effective_batch": f"{eb['start']}->{eb['final']}", "seconds": round(seconds, 1),
            "before_attempt_1_s": before_s, "attempt_1_s": first_s, "oom_s": oom_s}


def main(argv: list[str]) -> int:
    """Run the three passes over the budgets and print the table."""
    budgets = tuple(int(a) for a in argv) or BUDGETS_BY_SCENARIO.get((MODEL, PRECISION), ())
    if not budgets:
        print(f"no budgets known for {MODEL} {PRECISION}: name them", file=sys.stderr)  # noqa: T201
        return 2
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
                if os.environ.get("SCENARIO_OUT"):
                    Path(os.environ["SCENARIO_OUT"]).write_text(json.dumps(rows, indent=1) + "\n",
                                                                encoding="utf-8")
    print(f"\n{MODEL}, {PRECISION}\n")  # noqa: T201
    print("| pass | budget | attempts | final config | effective batch | exit | seconds | "  # noqa: T201
          "before attempt 1 | attempt 1 | in OOM attempts |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")  # noqa: T201
    for r in rows:
        print(f"| {r['pass']} | {r['budget_mib']} MiB | {r['attempts']} | {r['final']} | "  # noqa: T201
              f"{r['effective_batch']} | {r['exit']} | {r['seconds']} | "
              f"{r['before_attempt_1_s']} s | {r['attempt_1_s']} s | {r['oom_s']} s |")
    for label in chosen:
        mine = [r for r in rows if r["pass"] == label]
        if not mine:
            continue
        mean = sum(r["attempts"] for r in mine) / len(mine)
        before = sum(r["before_attempt_1_s"] or 0.0 for r in mine) / len(mine)
        oom = sum(r["oom_s"] for r in mine) / len(mine)
        print(f"{label}: {mean:.2f} attempts on average; {before:.1f} s before attempt 1, "  # noqa: T201
              f"{oom:.1f} s in OOM attempts (means)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
