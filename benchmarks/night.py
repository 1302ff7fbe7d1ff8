"""A time-scaled night: how much of the wall time ends up in the final model (goodput).

1/60 of a real night: 240 optimizer steps of the bundled reference trainer, each at least
2.5 s (150 s at full scale), a checkpoint every 20 steps, under the trainer's own 260 MiB
live-bytes device budget, so every OOM is a real allocator failure of a real training step.
The five usual accidents, in one run:

1. the data gets longer at step 71 (`REFERENCE_TRAINER_FAULTS=longer@71`: samples of 256
   tokens instead of 128): the start config (batch 8, 194 MiB) runs out of memory (329 MiB);
2. the trainer hangs silently after step 110 (`hang@110`);
3. a rendezvous error after step 150 (`transient@150`, torchelastic's
   RendezvousConnectionError);
4. the terminal is dropped (SIGHUP to the supervisor at 150 s);
5. the supervisor is SIGKILLed (at 420 s) and `oom-supervisor resume` runs 10 s later.

Beside it, the same command with no accident (the ceiling), and what users write today, with the
same accidents, for a night as long as the supervised one: a shell loop (`until CMD; do :;
done`), the loop continuing from the newest checkpoint (`--resume_from_checkpoint`), and a
torchrun-style restart of the same config (`torchrun --max_restarts 3`). The policy is the
shipped default with every time constant that the step time sets divided by 60 (`stall_floor_s`
2, `max_delay_s` 10, `release_wait_s` 1); `startup_timeout_s` stays 1800 (loading a model is not
faster in a time-scaled night).

    .venv/bin/python benchmarks/night.py            # ~15 min; all five runs at once
    NIGHT_ONLY=supervised .venv/bin/python benchmarks/night.py
    NIGHT_ONLY=evaluating .venv/bin/python benchmarks/night.py   # ~13 min, ~6 CPU-minutes
    NIGHT_ONLY=evaluating NIGHT_STEPS=110 .venv/bin/python benchmarks/night.py  # two evaluations
    NIGHT_EVIDENCE=false ...   # the same, judged by silence alone (the policy's [liveness])

A second night, `evaluating`: the same command with no accident but an evaluation every 50
steps that prints nothing for NIGHT_EVAL_S seconds of real CPU work (30 by default: 12 steps
long, past the ~25 s silence limit the trainer's cadence teaches the watchdog, as a 5-minute
evaluation is past the limit that 1-second steps teach): no attempt may be lost to it.

Prints a markdown table (docs/benchmarks.md keeps the last one) and writes night.json beside
the runs. Goodput is taken from each supervised run's report.json (derived from its journal);
a baseline's is the time of the steps its newest checkpoint holds (at the ceiling's measured
step time) over a night as long as the supervised one (each baseline is stuck at the OOM of
step 71, so what it holds after its own 1.3 x 600 s is what it holds at dawn).

Each supervised night is also read from the trainer's own step log, apart from report.json
(`trainer_log`): each attempt's progress bar says which steps it completed and when on the
trainer's clock; the final model's steps are followed back through the checkpoints each attempt
resumed from; their time over the wall time measured here is the goodput beside report.json's,
and a completed step that a later attempt trained again is a step trained twice (per accident).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
SCALE = 60
STEPS, SAVE, STEP_S = int(os.environ.get("NIGHT_STEPS", "240")), 20, 2.5
FAULTS = "longer@71,hang@110,transient@150"
HUP_AT_S, KILL_AT_S, DOWN_S = 150.0, 420.0, 10.0
TRAINER = [PY, "-m", "supervisor.reference_trainer", "--per_device_train_batch_size", "8",
           "--cutoff_len", "256", "--max_steps", str(STEPS), "--save_steps", str(SAVE),
           "--device-memory", "260", "--logging_steps", "10", "--output_dir", "out"]


def _env(faults: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1", "REFERENCE_TRAINER_STEP_S": str(STEP_S)}
    if faults:
        env["REFERENCE_TRAINER_FAULTS"] = faults
    return env


def _policy(folder: Path) -> Path:
    """The shipped default policy, every time constant a step's time sets divided by SCALE
    (the start-up allowance stays: loading a model is not faster in a time-scaled night)."""
    text = (ROOT / "policies" / "default.toml").read_text(encoding="utf-8")
    for key, full in (("max_delay_s", 600), ("release_wait_s", 60)):
        text = text.replace(f"{key} = {full}", f"{key} = {full // SCALE}")
    text = text.replace("stall_floor_s = 120", f"stall_floor_s = {120 / SCALE:g}")
    if os.environ.get("NIGHT_EVIDENCE") == "false":  # silence alone, as before [liveness]
        text = text.replace("evidence = true", "evidence = false")
    path = folder / "night.toml"
    path.write_text(text, encoding="utf-8")
    return path


EVAL_STEPS = 50
EVAL_S = float(os.environ.get("NIGHT_EVAL_S", "30"))


def supervised(folder: Path, *, accidents: bool, evaluating: bool = False) -> dict[str, Any]:
    """One supervised night; with `accidents`, SIGHUP, SIGKILL and resume on the way; with
    `evaluating`, a silent evaluation every EVAL_STEPS steps."""
    folder.mkdir(parents=True)
    policy = _policy(folder)
    trainer = [*TRAINER, "--eval_steps", str(EVAL_STEPS)] if evaluating else TRAINER
    argv = [PY, "-m", "supervisor", "--log-format", "json", "run", "--quiet", "--no-estimate",
            "--fresh", "--policy", str(policy), "--runs-dir", str(folder), "--run-id", "night",
            "--", *trainer]
    # No accident: the same data, which never gets longer.
    env = _env(FAULTS if accidents else "longer@999999")
    if evaluating:
        env["REFERENCE_TRAINER_EVAL_S"] = f"{EVAL_S:g}"
    started = time.monotonic()
    with (folder / "supervisor.log").open("ab") as sink:
        first = subprocess.Popen(argv, stdout=sink, stderr=sink, env=env,  # noqa: S603
                                 cwd=folder, start_new_session=True)
        if accidents:
            _at(started, HUP_AT_S, first)
            first.send_signal(signal.SIGHUP)
            _at(started, KILL_AT_S, first)
            if first.poll() is None:
                first.send_signal(signal.SIGKILL)
                first.wait()
                time.sleep(DOWN_S)
                subprocess.run(  # noqa: S603 - our own CLI
                    [PY, "-m", "supervisor", "--log-format", "json", "resume",
                     str(folder / "night"), "--quiet"], stdout=sink, stderr=sink, env=env,
                    cwd=folder, check=False, start_new_session=True)
        first.wait()
    wall_s = time.monotonic() - started
    report: dict[str, Any] = json.loads((folder / "night" / "report.json").read_text())
    journal = [json.loads(line) for line in
               (folder / "night" / "journal.jsonl").read_text().splitlines()]
    log = trainer_log(folder / "night", journal, wall_s)
    log["report_goodput"] = report["goodput"]["goodput"]
    log["difference_points"] = round(100 * (report["goodput"]["goodput"] - log["goodput"]), 2)
    return {"wall_s": round(wall_s, 1), "status": report["status"], "trainer_log": log,
            "goodput": report["goodput"], "worst_extra": _worst_extra(journal),
            "accidents": [a["what"] for a in report["goodput"]["accidents"]],
            "attempts": sum(1 for e in journal if e["event"] == "attempt.finished"),
            "hangs": sum(1 for e in journal if e["event"] == "attempt.finished"
                         and e["verdict"] == "hang")}


def evaluating_night(tmp: Path) -> dict[str, Any]:
    """The second night alone: a silent evaluation every EVAL_STEPS steps, no accident."""
    row = supervised(tmp / "evaluating", accidents=False, evaluating=True)
    samples = tmp / "evaluating" / "night" / "attempts" / "01" / "liveness-samples.jsonl"
    judged = [json.loads(line)["state"] for line in samples.read_text().splitlines()] \
        if samples.is_file() else []
    row["samples_judged_working"] = judged.count("working")
    row["samples_judged_hung"] = judged.count("hung")
    return row


def _at(started: float, offset_s: float, proc: subprocess.Popen[bytes]) -> None:
    while time.monotonic() - started < offset_s and proc.poll() is None:
        time.sleep(0.5)


def _worst_extra(journal: list[dict[str, Any]]) -> int:
    """Steps an accident retrained beyond those since the newest checkpoint it had (0: none)."""
    seen: list[int] = []
    worst = 0
    for event in journal:
        if event["event"] == "attempt.finished":
            seen += [int(step) for _, step in event.get("checkpoints") or ()]
        if event["event"] == "attempt.started" and seen:
            knobs = event["knobs"]
            resumed = knobs.get("resume_from_checkpoint") or ""
            step = int(resumed.rsplit("-", 1)[-1]) if "checkpoint-" in resumed else 0
            worst = max(worst, max(seen) - step)
    return worst


# --- the trainer's own step log: goodput and steps trained twice, apart from the report ----

_FRAME = re.compile(r"(\d+)/(\d+) \[(?:(\d+):)?(\d+):(\d+)<")
"""A frame of the Trainer's progress bar: `40/240 [01:40<...`, the step and the time since the
bar began (tqdm's own clock, whole seconds)."""


def _frames(attempt_dir: Path, total: int) -> list[tuple[int, float]]:
    """(step, seconds since the training bar began) for every frame of the training bar."""
    path = attempt_dir / "stderr.log"
    text = path.read_bytes().decode("utf-8", errors="replace") if path.is_file() else ""
    out: list[tuple[int, float]] = []
    for match in _FRAME.finditer(text):
        if int(match[2]) == total:
            hours, minutes, seconds = int(match[3] or 0), int(match[4]), int(match[5])
            out.append((int(match[1]), float(3600 * hours + 60 * minutes + seconds)))
    return out


def _bar_time(points: list[tuple[int, float]], step: int) -> float:
    """Seconds since the bar began when `step` ended: its frame's time, else interpolated
    between the frames either side (tqdm skips frames when steps come fast)."""
    below = max((p for p in points if p[0] <= step), default=points[0])
    above = min((p for p in points if p[0] >= step), default=points[-1])
    if above[0] == below[0]:
        return below[1]
    return below[1] + (above[1] - below[1]) * (step - below[0]) / (above[0] - below[0])


def trainer_log(run_dir: Path, journal: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    """The night as the trainer's own progress bar tells it, apart from report.json.

    Each attempt's bar (in its `attempts/NN/stderr.log`) says which steps it completed and,
    on its own clock, when. The step it resumed from is the checkpoint its command was given.
    The final model holds the fitted attempt's steps, then, going back, the steps of the
    attempt that trained the checkpoint it resumed from, and so on; their time on the
    trainer's clock, over the night's wall time measured here, is the goodput. A step trained
    twice is a completed step that a later attempt trained again.
    """
    total = STEPS
    rows: list[dict[str, Any]] = []
    verdicts = {e["attempt"]: e["verdict"] for e in journal if e["event"] == "attempt.finished"}
    for event in journal:
        if event["event"] != "attempt.started":
            continue
        number = int(event["attempt"])
        resumed_from = str(event["knobs"].get("resume_from_checkpoint") or "")
        resumed = int(resumed_from.rsplit("-", 1)[-1]) if "checkpoint-" in resumed_from else 0
        frames = _frames(run_dir / "attempts" / f"{number:02d}", total)
        # The bar starts at 0 whichever step the attempt resumed from; its first update jumps.
        points = [(resumed, 0.0)] + [(s, t) for s, t in frames if s > resumed]
        reached = max(s for s, _ in points)
        rows.append({"attempt": number, "verdict": verdicts.get(number, "running"),
                     "resumed": resumed, "reached": reached, "points": points, "undrawn": 0})
    # The bar is drawn after the program's own step-end callbacks: an error or a hang in one
    # leaves the step it completed undrawn. The checkpoint the next attempt resumed from (this
    # attempt's rescue) says it was completed; its time is the attempt's mean step.
    for row, after in itertools.pairwise(rows):
        if row["reached"] < after["resumed"] == row["reached"] + 1 and len(row["points"]) > 1:
            (s0, t0), (s1, t1) = row["points"][0], max(row["points"])
            row["points"].append((after["resumed"], t1 + (t1 - t0) / (s1 - s0)))
            row["reached"], row["undrawn"] = after["resumed"], 1
    earlier = 0
    for row in rows:
        row["trained"] = row["reached"] - row["resumed"]
        row["trained_twice"] = max(0, min(earlier, row["reached"]) - row["resumed"])
        earlier = max(earlier, row["reached"])
    # Back from the fitted attempt: whose steps the final model holds, and their time.
    kept_s, segments = 0.0, []
    index: int | None = max((i for i, r in enumerate(rows) if r["verdict"] == "fits"),
                            default=None)
    upto = rows[index]["reached"] if index is not None else 0
    while index is not None:
        row = rows[index]
        kept_s += _bar_time(row["points"], upto) - _bar_time(row["points"], row["resumed"])
        segments.append([row["attempt"], row["resumed"], upto])
        if row["resumed"] == 0:
            break
        upto = row["resumed"]
        index = max((i for i in range(index) if rows[i]["resumed"] < upto <= rows[i]["reached"]),
                    default=None)
    # Each accident: what the attempt after it trained again of what had been trained before.
    accidents = [{"attempt": a["attempt"], "verdict": a["verdict"], "reached": a["reached"],
                  "next_resumed": b["resumed"], "trained_twice": b["trained_twice"]}
                 for a, b in itertools.pairwise(rows) if a["verdict"] != "fits"]
    return {"goodput": round(kept_s / wall_s, 4) if wall_s > 0 else 0.0,
            "kept_s": round(kept_s, 1), "wall_s": round(wall_s, 1),
            "steps_trained": sum(r["trained"] for r in rows),
            "steps_kept": sum(b - a for _, a, b in segments),
            "trained_twice": sum(r["trained_twice"] for r in rows),
            "kept_segments": segments[::-1], "accidents": accidents,
            "attempts": [{k: v for k, v in r.items() if k != "points"} for r in rows]}


SHELL_LOOP = "until {cmd}; do :; done"
RESUME_LOOP = ("while :; do last=$(ls -d out/checkpoint-* 2>/dev/null | sort -t- -k2 -n | "
               "tail -n 1); {cmd} ${{last:+--resume_from_checkpoint $last}} && break; done")


def baseline(folder: Path, name: str, night_s: float) -> dict[str, Any]:
    """What users write today, with the same accidents, for `night_s` seconds."""
    folder.mkdir(parents=True)
    cmd = " ".join(TRAINER)
    if name == "shell loop":
        argv = ["sh", "-c", SHELL_LOOP.format(cmd=cmd)]
    elif name == "resume loop":
        argv = ["sh", "-c", RESUME_LOOP.format(cmd=cmd)]
    else:  # torchrun-style restart of the same config
        argv = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                "--max_restarts", "3", *TRAINER[1:]]
    started = time.monotonic()
    with (folder / "out.log").open("ab") as sink:
        proc = subprocess.Popen(argv, stdout=sink, stderr=sink, env=_env(FAULTS),  # noqa: S603
                                cwd=folder, start_new_session=True)
        try:
            proc.wait(timeout=night_s)
            ended = "gave up"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the session this benchmark started
            proc.wait()
            ended = "still looping at dawn"
    kept = 0
    for state in (folder / "out").glob("checkpoint-*/trainer_state.json"):
        kept = max(kept, int(json.loads(state.read_text())["global_step"]))
    return {"wall_s": round(max(night_s, time.monotonic() - started), 1), "kept": kept,
            "ended": ended, "returned_after_s": round(time.monotonic() - started, 1)}


def main() -> None:
    only = os.environ.get("NIGHT_ONLY", "")
    tmp = Path(tempfile.mkdtemp(prefix="night-"))
    results: dict[str, Any] = {}

    def go(name: str, fn: Any, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401
        results[name] = fn(tmp / name.replace(" ", "-"), *args, **kwargs)

    night_s = STEPS * STEP_S * 1.3
    if only == "evaluating":
        row = evaluating_night(tmp)
        (tmp / "night.json").write_text(json.dumps({"evaluating": row}, indent=2) + "\n")
        good = row["goodput"]
        print(f"| oom-supervisor, a silent {EVAL_S:g} s evaluation every {EVAL_STEPS} steps | "
              f"{row['wall_s']:.0f} s | {good['steps']['kept']} | {good['steps']['trained']} | "
              f"{100 * good['goodput']:.1f} % | {row['status']}, {row['attempts']} attempt(s), "
              f"{row['hangs']} hang(s); {row['samples_judged_working']} samples judged "
              f"working past the limit |")
        print(f"\n(runs and night.json in {tmp})")
        return
    threads = [threading.Thread(target=go, args=("ceiling", supervised),
                                kwargs={"accidents": False}),
               threading.Thread(target=go, args=("supervised", supervised),
                                kwargs={"accidents": True})]
    if only != "supervised":
        threads += [threading.Thread(target=go, args=(name, baseline, name, night_s))
                    for name in ("shell loop", "resume loop", "torchrun restart")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ceiling = results["ceiling"]["goodput"]
    step_s = ceiling["productive_s"] / max(1, ceiling["steps"]["kept"])
    night = results["supervised"]["wall_s"]
    for name in ("shell loop", "resume loop", "torchrun restart"):
        if name in results:
            row = results[name]
            # Each is stuck at the OOM of step 71 (or gave up there): what its newest
            # checkpoint holds after `night_s` is all it holds at the end of a night as long as
            # the supervised one.
            row["night_s"] = max(row["wall_s"], night)
            row["goodput"] = round(row["kept"] * step_s / row["night_s"], 4)
    results["projection"] = _project(results["supervised"]["goodput"], step_s)
    (tmp / "night.json").write_text(json.dumps(results, indent=2) + "\n")
    table = _table(results, step_s)
    (tmp / "night.md").write_text(table + "\n")
    print(table)
    print(f"\n(runs, night.json and night.md in {tmp})")


def _project(good: dict[str, Any], step_s: float) -> dict[str, float]:
    """A real night: the step time x SCALE, and with it the steps lost since the last checkpoint
    and the learnt hang limit (a multiple of the longest gap); start-up, the OOM and failure
    tails, backoff, the supervisor's own time and its downtime as measured (they do not grow
    with the step time)."""
    badput = good["badput_s"]
    scaled = {"retrained", "hang"}
    productive = good["productive_s"] * SCALE
    lost = sum(v * (SCALE if k in scaled else 1) for k, v in badput.items())
    fixed = sum(v for k, v in badput.items() if k not in scaled)
    hang = badput.get("hang", 0.0) * SCALE
    return {"goodput": round(productive / (productive + lost), 4),
            "without_retraining": round(productive / (productive + fixed + hang), 4),
            "supervisor_only": round(productive / (productive + fixed), 4),
            "step_s": round(step_s * SCALE, 1)}


def _table(results: dict[str, Any], step_s: float) -> str:
    rows = ["| run | wall | steps kept | steps trained | goodput | ended |",
            "| --- | ---: | ---: | ---: | ---: | --- |"]
    for name in ("ceiling", "supervised"):
        row = results[name]
        good = row["goodput"]
        rows.append(f"| oom-supervisor, {'no accident' if name == 'ceiling' else 'five accidents'}"
                    f" | {row['wall_s']:.0f} s | {good['steps']['kept']} | "
                    f"{good['steps']['trained']} | {100 * good['goodput']:.1f} % | "
                    f"{row['status']} |")
    for name in ("shell loop", "resume loop", "torchrun restart"):
        if name in results:
            row = results[name]
            rows.append(f"| {name} | {row['night_s']:.0f} s | {row['kept']} | - | "
                        f"{100 * row['goodput']:.1f} % | {row['ended']} "
                        f"({row['returned_after_s']:.0f} s) |")
    sup = results["supervised"]
    ceiling = results["ceiling"]
    lines_log = ["", ("From the trainer's own step log (each attempt's progress bar: the steps it "
                      "completed and when, on the trainer's clock), apart from report.json:"), "",
                 ("| run | goodput, report | goodput, trainer's log | difference | steps trained "
                  "(report / log) | steps trained twice (log) |"),
                 "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, label in (("ceiling", "no accident"), ("supervised", "five accidents")):
        row, log = results[name], results[name]["trainer_log"]
        lines_log.append(
            f"| {label} | {100 * log['report_goodput']:.1f} % | {100 * log['goodput']:.1f} % | "
            f"{log['difference_points']:+.1f} points | {row['goodput']['steps']['trained']} / "
            f"{log['steps_trained']} | {log['trained_twice']} |")
    words = {"oom": "ran out of memory", "hang": "hung", "transient": "failed (transient)",
             "timed": "was ended for the speed comparison", "lost": "was lost",
             "fatal": "failed", "interrupted": "was interrupted"}
    lines_log += ["", "Steps trained twice by each accident (trainer's log):"] + [
        f"- attempt {a['attempt']} {words.get(a['verdict'], a['verdict'])} after step "
        f"{a['reached']}; the next attempt went on from step {a['next_resumed']}: "
        f"{a['trained_twice']} step(s) trained twice"
        for a in sup["trainer_log"]["accidents"]]
    share = sup["goodput"]["goodput"] / max(1e-9, ceiling["goodput"]["goodput"])
    lines_log += ["", (f"Against the same command with no accident: "
                       f"{100 * sup['goodput']['goodput']:.1f} % of the night kept, "
                       f"{100 * ceiling['goodput']['goodput']:.1f} % with no accident: "
                       f"{100 * share:.1f} % of the ceiling.")]
    badput = ", ".join(f"{k} {v:.0f} s" for k, v in sorted(
        sup["goodput"]["badput_s"].items(), key=lambda kv: -kv[1]))
    proj = results["projection"]
    lines = ["\n".join(rows), "",
             f"Badput of the supervised night by cause: {badput}.",
             (f"Largest retraining beyond the steps since the newest checkpoint: "
             f"{sup['worst_extra']} steps."),
             (f"Step time at 1/{SCALE}: {step_s:.2f} s. Projected to a real night "
              f"({proj['step_s']:.0f} s steps): goodput {100 * proj['goodput']:.1f} %; "
              f"{100 * proj['without_retraining']:.1f} % leaving out the steps lost since the "
              f"last checkpoint (bounded by the command's checkpoint interval); "
              f"{100 * proj['supervisor_only']:.1f} % counting only what the supervisor itself "
              "costs (start-up, failure tails, backoff, its own time and downtime)."),
             "", "Accidents named in report.md:"] + [f"- {a}" for a in sup["accidents"]]
    return "\n".join(lines + lines_log)


if __name__ == "__main__":
    main()
