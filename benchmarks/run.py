"""Benchmark harness: the speed targets of oom-supervisor, measured on this machine."""

from __future__ import annotations

import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
TRAINER = [PY, "-m", "supervisor.reference_trainer"]


def _supervise(runs: Path, run_id: str, *command: str, verb: str = "run") -> dict[str, object]:
    argv = [PY, "-m", "supervisor", "--log-format", "json", verb, "--quiet",
            "--runs-dir", str(runs), "--run-id", run_id]
    if verb == "run":
        argv += ["--", *command]
    subprocess.run(argv, check=True, env=ENV, cwd=runs, capture_output=True)  # noqa: S603
    report: dict[str, object] = json.loads((runs / run_id / "report.json").read_text())
    return report


def bench_demo(tmp: Path) -> dict[str, float]:
    """Wall seconds of the README's demo."""
    started = time.monotonic()
    report = _supervise(tmp, "demo", verb="demo")
    attempts = report["attempts"]
    assert isinstance(attempts, list)
    return {"wall_s": round(time.monotonic() - started, 1), "attempts": len(attempts),
            "target_s": 180}


def bench_kill(tmp: Path) -> dict[str, float]:
    """Seconds from the OOM line to the last process of a 2-rank torchrun attempt gone."""
    samples = []
    for i in range(3):
        report = _supervise(
            tmp, f"kill{i}", PY, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", "2", "-m", "supervisor.reference_trainer",
            "--per_device_train_batch_size", "8", "--cutoff_len", "512", "--max_steps", "1",
            "--host-memory-cap", "600", "--memory_cap_rank", "1", "--output_dir", "out")
        journal = [json.loads(line) for line in
                   (tmp / f"kill{i}" / "journal.jsonl").read_text().splitlines()]
        first = next(e for e in journal if e["event"] == "attempt.finished")
        samples.append(float(first["kill_s"]))
        assert report["status"] == "fitted"
    return {"median_s": round(statistics.median(samples), 3), "max_s": max(samples),
            "target_s": 1.0}


def bench_overhead(tmp: Path) -> dict[str, float]:
    """Supervisor seconds per attempt: a fitting run under `run` minus the bare command."""
    command = [*TRAINER, "--per_device_train_batch_size", "2", "--cutoff_len", "128",
               "--max_steps", "2", "--output_dir", "out"]
    bare, supervised = [], []
    for i in range(3):
        started = time.monotonic()
        subprocess.run(command, check=True, env=ENV, cwd=tmp, capture_output=True)  # noqa: S603
        bare.append(time.monotonic() - started)
        started = time.monotonic()
        _supervise(tmp, f"over{i}", *command)
        supervised.append(time.monotonic() - started)
    return {"bare_s": round(statistics.median(bare), 2),
            "supervised_s": round(statistics.median(supervised), 2),
            "overhead_s": round(statistics.median(supervised) - statistics.median(bare), 2),
            "target_s": 1.0}


PLAN_MODELS = {
    # Llama-2-7B and Llama-2-70B config.json shapes (meta-llama on the Hugging Face hub).
    "7b": ({"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 32}, 30),
    "70b": ({"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
             "num_attention_heads": 64, "num_key_value_heads": 8}, 60),
}


def bench_plan(tmp: Path) -> dict[str, float]:
    """Seconds for `plan` over the whole default ladder on Llama-7B and -70B config.json files.

    Decoder layers are traced two at a time and scaled (supervisor/_estimate_child.py); the
    targets are 30 s (7B, 93 s when the whole model was traced) and 60 s (70B).
    """
    out: dict[str, float] = {}
    for name, (shape, target) in PLAN_MODELS.items():
        model = tmp / f"llama-{name}"
        model.mkdir()
        (model / "config.json").write_text(json.dumps({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
            "max_position_embeddings": 4096, "torch_dtype": "bfloat16", **shape}))
        started = time.monotonic()
        cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(  # noqa: S603
            [PY, "-m", "supervisor", "plan", "--device-memory", "80GiB", "--", PY,
             "-m", "supervisor.reference_trainer", "--model_name_or_path", str(model),
             "--finetuning_type", "full", "--per_device_train_batch_size", "8",
             "--cutoff_len", "2048", "--bf16", "true"],
            env=ENV, cwd=tmp, capture_output=True, text=True, check=False)
        wall = time.monotonic() - started
        used = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode not in {0, 3}:
            return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}  # type: ignore[dict-item]
        out[f"{name}_wall_s"] = round(wall, 1)
        # CPU seconds of plan and its children: on a shared machine the wall time depends on
        # the neighbours; CPU / cores is what an idle machine of this size would take.
        out[f"{name}_cpu_s"] = round(used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime,
                                     1)
        out[f"{name}_rows"] = sum(1 for line in proc.stdout.splitlines()
                                  if re.match(r"^\s*\d+\*?\s{2}", line))
        out[f"{name}_target_s"] = target
    return out


FIXED_PAIRS = int(os.environ.get("FIXED_PAIRS", "10"))
FIXED_STEPS = os.environ.get("FIXED_STEPS", "12")
FIXED_BASELINE = os.environ.get("FIXED_BASELINE")
"""A folder holding another version's `supervisor` package (e.g. `git archive REV supervisor
policies | tar -x -C DIR`): timed too, in the same rounds, as the figure to compare with."""


def bench_fixed(tmp: Path) -> dict[str, float]:
    """The supervisor's fixed cost on a fit of about 10 s: the same fitting command alone and
    under `run`, in FIXED_PAIRS interleaved pairs (plain, supervised, plain, ...); the median
    of the pairwise differences and of the ratios (target: under 0.5 s)."""
    command = [*TRAINER, "--model_name_or_path", "tiny", "--per_device_train_batch_size", "1",
               "--cutoff_len", "64", "--max_steps", FIXED_STEPS, "--output_dir", "out"]
    # As installed: `pip install` compiles the package's bytecode; a checkout run with
    # PYTHONDONTWRITEBYTECODE would compile every edited module on every start instead.
    for tree in (ROOT / "supervisor", *([Path(FIXED_BASELINE)] if FIXED_BASELINE else [])):
        subprocess.run([PY, "-m", "compileall", "-q", str(tree)], check=False,  # noqa: S603
                       capture_output=True, env={**ENV, "PYTHONDONTWRITEBYTECODE": ""})
    plain, supervised, plain_cpu, supervised_cpu = [], [], [], []
    base: list[float] = []
    base_cpu: list[float] = []
    own: dict[str, list[float]] = {"new": [], "base": []}

    def own_seconds(run_id: str, began: float) -> float:
        """The supervisor's seconds around the command: its start to the attempt's spawn,
        and the attempt's end to its own exit (the command's own time left out)."""
        events = [json.loads(line) for line in
                  (tmp / run_id / "journal.jsonl").read_text().splitlines()]
        spawned = next(e["ts"] for e in events if e["event"] == "attempt.spawned")
        finished = next(e["ts"] for e in events if e["event"] == "attempt.finished")
        return (spawned - began) + (time.time() - finished)

    def timed(argv: list[str], wall: list[float], cpu: list[float],
              env: dict[str, str] = ENV) -> None:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.monotonic()
        subprocess.run(argv, check=True, env=env, cwd=tmp, capture_output=True)  # noqa: S603
        wall.append(time.monotonic() - started)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)

    for i in range(FIXED_PAIRS):
        timed(command, plain, plain_cpu)
        began = time.time()
        timed([PY, "-m", "supervisor", "--log-format", "json", "run", "--quiet", "--fresh",
               "--runs-dir", str(tmp), "--run-id", f"fixed{i}", "--fits-db",
               str(tmp / "fits.sqlite3"), "--", *command], supervised, supervised_cpu)
        own["new"].append(own_seconds(f"fixed{i}", began))
        if FIXED_BASELINE:
            began = time.time()
            timed([PY, "-m", "supervisor", "--log-format", "json", "run", "--quiet", "--fresh",
                   "--runs-dir", str(tmp), "--run-id", f"base{i}", "--fits-db",
                   str(tmp / "fits.sqlite3"), "--", *command], base, base_cpu,
                  env={**ENV, "PYTHONPATH": FIXED_BASELINE})
            own["base"].append(own_seconds(f"base{i}", began))
    pairs = [s - p for p, s in zip(plain, supervised, strict=True)]
    ratios = [s / p for p, s in zip(plain, supervised, strict=True)]
    cpu = [s - p for p, s in zip(plain_cpu, supervised_cpu, strict=True)]
    # Wall seconds on a shared machine swing by more than the cost itself; the CPU seconds of
    # the supervisor's processes (the command's own subtracted, pair by pair) do not.
    return {"plain_median_s": round(statistics.median(plain), 2),
            "supervised_median_s": round(statistics.median(supervised), 2),
            "fixed_median_s": round(statistics.median(pairs), 2),
            "fixed_min_s": round(min(pairs), 2), "fixed_max_s": round(max(pairs), 2),
            "ratio_median": round(statistics.median(ratios), 3),
            "fixed_cpu_median_s": round(statistics.median(cpu), 2),
            "fixed_cpu_min_s": round(min(cpu), 2), "fixed_cpu_max_s": round(max(cpu), 2),
            "own_median_s": round(statistics.median(own["new"]), 2),
            "own_min_s": round(min(own["new"]), 2), "own_max_s": round(max(own["new"]), 2),
            "load_average": round(os.getloadavg()[0], 1), "pairs": FIXED_PAIRS,
            "target_s": 0.5,
            **({"baseline_fixed_median_s": round(statistics.median(
                [b - p for p, b in zip(plain, base, strict=True)]), 2),
                "baseline_fixed_cpu_median_s": round(statistics.median(
                    [b - p for p, b in zip(plain_cpu, base_cpu, strict=True)]), 2),
                "baseline_own_median_s": round(statistics.median(own["base"]), 2)}
               if base else {})}


DEMO_START = ["--model_name_or_path", "tiny", "--finetuning_type", "full",
              "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
              "--cutoff_len", "1024", "--max_steps", "1"]
"""The demo's ambitious command (cli.demo_command)."""
PREDICT_BUDGETS = tuple(int(b) for b in os.environ.get("PREDICT_BUDGETS", "70").split(","))


def bench_predict(tmp: Path) -> dict[str, float]:
    """`run --device-memory` on the demo's command with a fresh trace store: the seconds from
    the command's start to attempt 1 beside attempt 1's own seconds (target: ratio <= 1),
    then the same again with the traces kept by the first run."""
    out: dict[str, float] = {}
    for budget in PREDICT_BUDGETS:
        for label in ("cold", "kept"):
            run_id = f"predict-{budget}-{label}"
            began = time.time()
            subprocess.run(  # noqa: S603 - our own CLI
                [PY, "-m", "supervisor", "--log-format", "json", "run", "--quiet",
                 "--runs-dir", str(tmp), "--run-id", run_id, "--fresh",
                 "--fits-db", str(tmp / "fits.sqlite3"), "--device-memory", f"{budget}MiB",
                 "--", *TRAINER, *DEMO_START, "--output_dir", str(tmp / "out")],
                check=True, env=ENV, cwd=tmp, capture_output=True)
            events = [json.loads(line) for line in
                      (tmp / run_id / "journal.jsonl").read_text().splitlines()]
            started = next(e for e in events if e["event"] == "attempt.started")
            finished = next(e for e in events if e["event"] == "attempt.finished")
            before = float(started["ts"]) - began
            attempt = float(finished["duration_s"])
            attempts = sum(1 for e in events if e["event"] == "attempt.finished")
            key = f"{budget}mib_{label}"
            out[f"{key}_before_attempt_1_s"] = round(before, 1)
            out[f"{key}_attempt_1_s"] = round(attempt, 1)
            out[f"{key}_ratio"] = round(before / attempt, 2)
            out[f"{key}_attempts"] = attempts
    out["target_ratio"] = 1.0
    return out


FLOOD_MB = int(os.environ.get("FLOOD_MB", "500"))
FLOOD_SCRIPT = """\
import runpy, sys
if "--help" not in sys.argv:  # the dialect may ask the program for its flags: no flood then
    block = b"".join(b"flood %08d: the chatter of a noisy trainer, one line of many ........\\n"
                     % i for i in range(12_800))  # 1 MiB
    out = sys.stdout.buffer
    for _ in range(int(sys.argv[1])):
        out.write(block)
    out.flush()
# Then a real training step that runs out of memory under the injected --device-memory limit.
sys.argv = ["reference_trainer", *sys.argv[2:]]
runpy.run_module("supervisor.reference_trainer", run_name="__main__")
"""


def bench_flood(tmp: Path) -> dict[str, float]:
    """FLOOD_MB (500) MiB of output, then a real OOM: verdict, supervisor RSS, log sizes."""
    import psutil  # noqa: PLC0415 - a dependency of the supervisor; only this bench samples

    (tmp / "flood.py").write_text(FLOOD_SCRIPT, encoding="utf-8")
    argv = [PY, "-m", "supervisor", "--log-format", "json", "run", "--quiet",
            "--runs-dir", str(tmp), "--run-id", "flood", "--max-attempts", "1",
            "--device-memory", "70MiB", "--no-estimate", "--",
            PY, "flood.py", str(FLOOD_MB), "--model_name_or_path", "tiny",
            "--finetuning_type", "full", "--per_device_train_batch_size", "4",
            "--cutoff_len", "1024", "--max_steps", "1", "--output_dir", "out"]
    started = time.monotonic()
    with (tmp / "supervisor.log").open("wb") as sink:
        proc = subprocess.Popen(argv, env=ENV, cwd=tmp, stdout=sink, stderr=sink)  # noqa: S603
        watched = psutil.Process(proc.pid)
        peak_rss = 0
        while proc.poll() is None:
            with __import__("contextlib").suppress(psutil.Error):
                peak_rss = max(peak_rss, watched.memory_info().rss)
            time.sleep(0.1)
    wall = time.monotonic() - started
    journal = [json.loads(line) for line in
               (tmp / "flood" / "journal.jsonl").read_text().splitlines()]
    finished = next(e for e in journal if e["event"] == "attempt.finished")
    logs = tmp / "flood" / "attempts" / "01"
    stdout_log = (logs / "stdout.log").read_bytes()
    return {"output_mib": FLOOD_MB, "verdict": finished["verdict"],
            "supervisor_peak_rss_mib": round(peak_rss / 2**20, 1), "rss_target_mib": 100,
            "stdout_log_mib": round(len(stdout_log) / 2**20, 1),
            "stderr_log_kib": round((logs / "stderr.log").stat().st_size / 1024, 1),
            "head_and_tail_kept": stdout_log.startswith(b"flood 00000000")
            and b"bytes of this log were dropped" in stdout_log,
            "wall_s": round(wall, 1), "exit_code": proc.returncode}


BENCHES: dict[str, Callable[[Path], dict[str, float]]] = {
    "demo": bench_demo, "kill": bench_kill, "overhead": bench_overhead, "plan": bench_plan,
    "flood": bench_flood, "predict": bench_predict, "fixed": bench_fixed}


def main(names: list[str]) -> int:
    """Run the named benchmarks (all by default), print a table, write results.json."""
    chosen = names or list(BENCHES)
    results: dict[str, dict[str, float]] = {}
    for name in chosen:
        with tempfile.TemporaryDirectory() as tmp:
            results[name] = BENCHES[name](Path(tmp))
        print(f"{name:10} {json.dumps(results[name])}", flush=True)  # noqa: T201
    out = ROOT / "benchmarks" / "results.json"
    previous = json.loads(out.read_text()) if out.exists() else {}
    previous.update(results)
    previous["_machine"] = {"cpus": os.cpu_count(), "when": time.strftime("%Y-%m-%d %H:%M")}
    out.write_text(json.dumps(previous, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
