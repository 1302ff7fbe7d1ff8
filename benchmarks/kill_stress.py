"""Stress: kill -9 the supervisor at random instants of an attempt's life, then `resume`.

Each repetition starts `oom-supervisor run --device-memory 250MiB` on the reference trainer
(full b8 x 512: two OOMs, then b2 x GA 4 fits), waits for attempt K to start (K random in
1..3), sleeps a random delay (half the repetitions within the first 5 ms, the rest within 3 s),
sends SIGKILL, and runs `resume`. It then checks what issue 8 promises: resume exits 0, every
journal line parses into a typed event, the first life's events are intact, no attempt is
journaled twice, no process of the run is left, and the fitted attempt ran under the same
injected 250 MiB limit. Usage: `python benchmarks/kill_stress.py [N] [SEED]` (default 50, 1).
"""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from supervisor.events import from_record, replay  # noqa: E402 - after the path is set
from supervisor.journal import read  # noqa: E402

PY = sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
COMMAND = (PY, "-m", "supervisor.reference_trainer", "--per_device_train_batch_size", "8",
           "--cutoff_len", "512", "--max_steps", "1", "--output_dir", "out")


def _leftovers(run_dir: Path) -> list[int]:
    prefix = str(run_dir.resolve())
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("OOM_SUPERVISOR_ATTEMPT", "").startswith(prefix):
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


def _records(run_dir: Path) -> list[dict[str, Any]]:
    return list(read(run_dir / "journal.jsonl").records)


def one(tmp: Path, rng: random.Random, index: int) -> dict[str, Any]:
    """One kill and resume; returns what was checked."""
    run_dir = tmp / f"r{index}"
    target = rng.randint(1, 3)
    delay_s = rng.uniform(0, 0.005) if index % 2 == 0 else rng.uniform(0, 3.0)
    argv = [PY, "-m", "supervisor", "--log-format", "json", "run", "--quiet", "--no-estimate",
            "--device-memory", "250MiB", "--runs-dir", str(tmp), "--run-id", run_dir.name,
            "--", *COMMAND]
    with (tmp / f"{run_dir.name}.log").open("ab") as sink:
        proc = subprocess.Popen(argv, stdout=sink, stderr=sink, env=ENV, cwd=tmp,  # noqa: S603
                                start_new_session=True)
    path = run_dir / "journal.jsonl"
    needle = b'"attempt.started"'
    while proc.poll() is None:
        if path.exists() and path.read_bytes().count(needle) >= target:
            break
        time.sleep(0.0005)
    time.sleep(delay_s)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _records(run_dir) if path.exists() else []
    began = time.monotonic()
    resumed = subprocess.run(  # noqa: S603
        [PY, "-m", "supervisor", "--log-format", "json", "resume", str(run_dir), "--quiet"],
        capture_output=True, text=True, env=ENV, cwd=tmp, check=False, timeout=900)
    took = time.monotonic() - began
    problems: list[str] = []
    finished_before = any(r.get("event") == "run.finished" for r in before)
    if resumed.returncode != 0 and not (finished_before and resumed.returncode == 2):  # noqa: PLR2004
        problems.append(f"resume exit {resumed.returncode}: {resumed.stderr.strip()[-300:]}")
    try:
        got = read(path)
        for record in got.records:
            from_record(record)
        state = replay(got.records)
        if got.torn_line is not None:
            problems.append("a torn line remains")
        if list(got.records)[:len(before)] != before:
            problems.append("events of the first life changed")
        counts = collections.Counter(a.number for a in state.attempts)
        if any(n > 1 for n in counts.values()):
            problems.append(f"an attempt journaled twice: {dict(counts)}")
        last = state.attempts[-1]
        if state.status != "fitted" or last.finished is None:
            problems.append(f"status {state.status}")
        else:
            stderr = (run_dir / last.started.log_dir / "stderr.log").read_text()
            if '"limit_mib": 250' not in stderr or (last.finished.peak_mib or 1e9) > 250:  # noqa: PLR2004
                problems.append("the fit was not under the injected 250 MiB limit")
    except Exception as exc:  # noqa: BLE001 - a stress harness reports, it does not stop
        problems.append(f"journal: {exc}")
    if problems and not path.exists():
        # The supervisor ended before it wrote a journal: keep what it said.
        log = (tmp / f"{run_dir.name}.log").read_text(errors="replace")
        problems.append(f"supervisor said: {log.strip()[-400:]}")
    if left := _leftovers(run_dir):
        problems.append(f"processes left: {left}")
        for pid in left:  # ours, by pid: they carry this run's marker
            with_suppressed_kill(pid)
    return {"index": index, "attempt": target, "delay_ms": round(delay_s * 1000, 2),
            "resume_s": round(took, 1), "ok": not problems, "problems": problems}


def with_suppressed_kill(pid: int) -> None:
    """SIGKILL one leftover process of this harness's own runs."""
    try:
        psutil.Process(pid).kill()
    except psutil.Error:
        pass


def main(argv: list[str]) -> int:
    """Run N repetitions and print a summary line as JSON."""
    count = int(argv[0]) if argv else 50
    rng = random.Random(int(argv[1]) if len(argv) > 1 else 1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(count):
            row = one(Path(tmp), rng, index)
            rows.append(row)
            print(json.dumps(row), flush=True)  # noqa: T201
    failed = [r for r in rows if not r["ok"]]
    early = [r for r in rows if r["delay_ms"] <= 5]  # noqa: PLR2004
    summary = {"repetitions": len(rows), "ok": len(rows) - len(failed),
               "within_5ms": len(early), "within_5ms_ok": sum(r["ok"] for r in early),
               "median_resume_s": statistics.median(r["resume_s"] for r in rows)}
    print(json.dumps(summary), flush=True)  # noqa: T201
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
