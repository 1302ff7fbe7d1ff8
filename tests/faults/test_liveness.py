"""Alive or hung, judged from evidence, on real processes: a healthy silence (silent Python
work, a save into a subfolder, an evaluation with the bar off) is never ended; a real hang
(asleep, behind a frozen bar, parked in a collective) is caught within its limit and a few
seconds, named with its evidence and the frame it is stuck in, and retried from the newest
checkpoint; a hang that recurs at the same step gets a longer limit, journaled.

The two 150 s tests run under the SHIPPED policy (its 120 s floor); they are marked `long`
(minutes of wall time, mostly waiting) and carry no xdist group, so that `--dist loadgroup`
spreads them over the workers beside each other.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from supervisor.loop import ExitCode
from supervisor.policy import Ladder, resolve
from tests.faults.conftest import attempt_processes, supervise_here
from tests.faults.test_goodput import TRAINER, scaled_default

pytestmark = pytest.mark.process

SILENT_S = 150
# 20 steps of 1 s, each shown as a tqdm frame; after step 15 a silent phase of SILENT_S: busy
# Python work (`work`) or a save that grows a DeepSpeed-style shard in
# out/checkpoint-15/global_step15/ (`save`, idle CPU: only the file moves).
JOB = """\
import os, sys, time
from pathlib import Path
if "--help" in sys.argv:
    sys.exit(print("usage: job.py [--per_device_train_batch_size N] [--output_dir DIR]"))
TOTAL, SILENT_AT = 20, 15
def frame(i):
    sys.stderr.write(f"\\r{{100 * i // TOTAL:3d}}%|{{'#' * (i // 2):<10}}| {{i}}/{{TOTAL}} "
                     f"[00:{{i:02d}}<00:20,  1.00it/s]")
    sys.stderr.flush()
for i in range(1, TOTAL + 1):
    time.sleep(1)
    frame(i)
    if i != SILENT_AT:
        continue
    end = time.monotonic() + {silent_s}
    if "{phase}" == "work":
        x = 0
        while time.monotonic() < end:  # silent Python work: a re-tokenisation, a recompile
            x = (x * 31 + 7) % 1000003
    else:
        shard = Path("out", f"checkpoint-{{i}}", f"global_step{{i}}")
        shard.mkdir(parents=True, exist_ok=True)
        with open(shard / "mp_rank_00_model_states.pt", "wb") as out:
            while time.monotonic() < end:  # a slow save over a network file system
                out.write(os.urandom(65536))
                out.flush()
                time.sleep(1)
print("done", flush=True)
"""


def _job(tmp_path: Path, phase: str) -> tuple[str, ...]:
    (tmp_path / "job.py").write_text(JOB.format(silent_s=SILENT_S, phase=phase),
                                     encoding="utf-8")
    return (sys.executable, "job.py", "--per_device_train_batch_size", "1",
            "--output_dir", "out")


def _finished(journal: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in journal if e["event"] == "attempt.finished"]


def _samples(tmp_path: Path, attempt: int = 1) -> list[dict[str, Any]]:
    path = tmp_path / "run" / "attempts" / f"{attempt:02d}" / "liveness-samples.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.long
@pytest.mark.parametrize(("phase", "evidence"), [("work", "CPU busy"),
                                                 ("save", ("files being written in "
                                                           "checkpoint-15/global_step15"))])
def test_a_silent_phase_with_evidence_of_work_is_not_a_hang(
        tmp_path: Path, phase: str, evidence: str) -> None:
    """1 s steps, then 150 s without output under the shipped policy (a 120 s floor): CPU-busy
    Python work, or a save growing a file two folders down: one attempt, exit 0."""
    result, _, journal = supervise_here(tmp_path, _job(tmp_path, phase), resolve("default"))
    assert result.exit_code is ExitCode.FITTED
    assert [e["verdict"] for e in _finished(journal)] == ["fits"]
    samples = _samples(tmp_path)
    # The silence really passed the limit, and the evidence kept the attempt.
    working = [s for s in samples if s["state"] == "working"]
    assert working, samples[-3:]
    assert max(s["at"] - s["progress_at"] for s in working) > 120
    status = json.loads((tmp_path / "run" / "attempts" / "01" / "liveness.json").read_text())
    assert status["state"] == "alive"  # output moved again after the silence
    said = (tmp_path / "run" / "attempts" / "01" / "liveness-samples.jsonl").read_text()
    assert phase == "work" or '"files_changed": true' in said
    assert _working_sentence(tmp_path, working[-1], evidence)


def _working_sentence(tmp_path: Path, sample: dict[str, Any], evidence: str) -> bool:
    """The judgment replayed from the recorded samples says what the console said."""
    from supervisor.liveness import Judge, Sample  # noqa: PLC0415 - only for this check

    judge = Judge()
    reading = None
    for record in _samples(tmp_path):
        reading = judge.observe(Sample.from_record(record), record["limit_s"])
        if record == sample:
            break
    return reading is not None and evidence in reading.sentence()


_STALLED = re.compile(r"printed nothing for (\d+) s \(stalled; the limit was (\d+) s")


def _caught_within(evidence: str, seconds: float) -> None:
    """The hang was ended within its limit plus `seconds`."""
    found = _STALLED.search(evidence)
    assert found, evidence
    silent, limit = int(found[1]), int(found[2])
    assert limit <= silent <= limit + seconds, evidence


def _reference(tmp_path: Path, ladder: Ladder, *flags: str,
               **env: str) -> tuple[ExitCode, list[dict[str, Any]]]:
    argv = (*TRAINER, "--per_device_train_batch_size", "1", "--cutoff_len", "32", *flags,
            "--output_dir", "out")
    result, _, journal = supervise_here(tmp_path, argv, ladder, **env)
    assert attempt_processes(tmp_path / "run") == []
    return result.exit_code, journal


def test_an_evaluation_with_the_bar_off_is_not_a_hang(tmp_path: Path) -> None:
    """The HF Trainer with tqdm off evaluates for 20 s of real CPU work after 1 s steps (the
    time-scaled policy's learnt limit is ~10 s): one attempt, exit 0, judged evaluating."""
    code, journal = _reference(tmp_path, scaled_default(), "--max_steps", "8", "--eval_steps",
                               "4", "--disable_tqdm", "true", "--save_steps", "4",
                               REFERENCE_TRAINER_STEP_S="1", REFERENCE_TRAINER_EVAL_S="20")
    assert code is ExitCode.FITTED
    assert [e["verdict"] for e in _finished(journal)] == ["fits"]
    samples = _samples(tmp_path)
    working = [s for s in samples if s["state"] == "working"]
    assert working, samples[-3:]
    assert max(s["at"] - s["progress_at"] - s["limit_s"] for s in working) > 3
    from supervisor.liveness import Sample  # noqa: PLC0415

    stacks = [st for s in working for st in Sample.from_record(s).stacks]
    assert any(st.phase() == "evaluating" for st in stacks), stacks[-1:]


@pytest.mark.parametrize("fault", ["hang@5", "frozen@5"])
def test_a_real_hang_is_caught_named_and_retried(tmp_path: Path, fault: str) -> None:
    """Asleep after step 5 (no output, no CPU), or stuck behind a display thread that redraws
    the same `5/8 [` frame twice a second: caught within the limit and a few seconds, the
    evidence and the frame said, retried from checkpoint-4, exit 0."""
    code, journal = _reference(tmp_path, scaled_default(), "--max_steps", "8", "--save_steps",
                               "2", REFERENCE_TRAINER_FAULTS=fault,
                               REFERENCE_TRAINER_STEP_S="1")
    assert code is ExitCode.FITTED
    finished = _finished(journal)
    assert [e["verdict"] for e in finished] == ["hang", "fits"]
    evidence = str(finished[0]["evidence"])
    _caught_within(evidence, 6)
    assert "no CPU" in evidence
    assert "stuck in `" in evidence
    assert "reference_trainer.py" in evidence
    resumed = next(e for e in journal if e["event"] == "checkpoint.resumed")
    assert resumed["step"] == 4
    report = (tmp_path / "run" / "report.md").read_text(encoding="utf-8")
    assert "stuck in" in report


COLLECTIVE = """\
import os, sys, time
from pathlib import Path
if "--help" in sys.argv:
    sys.exit(print("usage: job.py [--per_device_train_batch_size N]"))
import torch
import torch.distributed as dist
dist.init_process_group("gloo")
rank = dist.get_rank()
first = not Path("fired").exists()
dist.barrier()
if rank == 0 and first:
    Path("fired").write_text("x")
TOTAL = 12
for i in range(1, TOTAL + 1):
    if first and rank == 1 and i == 6:
        time.sleep(10**7)  # this rank stops; its peer waits in the collective
    total = torch.ones(4)
    dist.all_reduce(total)
    time.sleep(0.5)
    if rank == 0:
        sys.stderr.write(f"\\r{100 * i // TOTAL:3d}%|####      | {i}/{TOTAL} [00:01<00:05]")
        sys.stderr.flush()
dist.destroy_process_group()
print("done", flush=True)
"""


def test_a_hung_collective_is_caught_with_its_frame(tmp_path: Path) -> None:
    """2 ranks under torchrun (gloo); rank 1 stops before step 6, rank 0 waits in all_reduce:
    caught in seconds, the verdict names the collective it waits in; the retry fits."""
    (tmp_path / "job.py").write_text(COLLECTIVE, encoding="utf-8")
    argv = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            "2", "job.py", "--per_device_train_batch_size", "1")
    result, _, journal = supervise_here(tmp_path, argv, scaled_default())
    assert result.exit_code is ExitCode.FITTED
    finished = _finished(journal)
    assert [e["verdict"] for e in finished] == ["hang", "fits"]
    evidence = str(finished[0]["evidence"])
    _caught_within(evidence, 8)
    assert "waits in a collective" in evidence
    assert "stuck in `all_reduce`" in evidence
    assert attempt_processes(tmp_path / "run") == []


def test_a_hang_that_recurs_at_the_same_step_gets_a_longer_limit(tmp_path: Path) -> None:
    """A 30 s pause with no sign of work after step 7, at every attempt (a slow phase the
    evidence cannot see): hung at the same step twice, then the next attempt's limit grows 4x (the
    journal says so) and the run fits: the slow phase costs retries, not the night."""
    ladder = scaled_default(max_delay_s=300)
    code, journal = _reference(tmp_path, ladder, "--max_steps", "9", "--save_steps", "4",
                               REFERENCE_TRAINER_FAULTS="pause@7", REFERENCE_TRAINER_PAUSE_S="30",
                               REFERENCE_TRAINER_STEP_S="1")
    assert code is ExitCode.FITTED
    finished = _finished(journal)
    assert [e["verdict"] for e in finished] == ["hang", "hang", "fits"]
    # The bar's last frame before the pause (the Trainer's bar is drawn after the callbacks
    # of a step, so it may still say 6).
    steps = [e["progress"]["step"] for e in finished[:2]]
    assert steps[0] == steps[1]
    assert steps[0] in (6, 7)
    extended = [e for e in journal if e["event"] == "watchdog.extended"]
    assert [(e["attempt"], e["step"]) for e in extended] == [(3, steps[0])]
    assert extended[0]["limit_s"] > 30
    report = (tmp_path / "run" / "report.md").read_text(encoding="utf-8")
    assert "hung at step" in report


def test_a_hang_adopted_by_resume_is_caught_by_the_runs_cadence(tmp_path: Path) -> None:
    """The supervisor is SIGKILLed while its attempt hangs in step 5, then `resume` adopts
    it. The adopted attempt's earlier output has no times, so it cannot learn a cadence; it
    had begun training, so its silence is judged by the floor (the shipped default scaled),
    not by the 30-minute start-up allowance: caught, retried from checkpoint-4, exit 0."""
    import signal  # noqa: PLC0415
    import subprocess  # noqa: PLC0415

    from tests.faults.conftest import events, quiet_env, wait_for  # noqa: PLC0415

    policy = tmp_path / "scaled.toml"
    shipped = (Path(__file__).resolve().parents[2] / "policies" / "default.toml").read_text(
        encoding="utf-8")
    policy.write_text(re.sub(r"(?m)^stall_floor_s = 120", "stall_floor_s = 20", shipped),
                      encoding="utf-8")
    env = {**quiet_env(), "REFERENCE_TRAINER_FAULTS": "hang@5", "REFERENCE_TRAINER_STEP_S": "1"}
    run_dir = tmp_path / "run"
    first = subprocess.Popen(  # noqa: S603 - our own CLI
        [sys.executable, "-m", "supervisor", "--log-format", "json", "run", "--quiet",
         "--no-estimate", "--policy", str(policy), "--runs-dir", str(tmp_path), "--run-id",
         "run", "--", *TRAINER, "--per_device_train_batch_size", "1", "--cutoff_len", "32",
         "--max_steps", "8", "--save_steps", "2", "--output_dir", "out"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=tmp_path,
        start_new_session=True)
    stderr_log = run_dir / "attempts" / "01" / "stderr.log"
    wait_for(lambda: stderr_log.is_file() and b"4/8" in stderr_log.read_bytes(), 180)
    first.send_signal(signal.SIGKILL)  # in the hang (step 5 is never drawn), before its 20 s
    first.wait()
    second = subprocess.run(  # noqa: S603 - our own CLI
        [sys.executable, "-m", "supervisor", "--log-format", "json", "resume", str(run_dir),
         "--quiet"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
        check=False)
    assert second.returncode == 0, second.stderr[-2000:]
    journal = events(run_dir)
    finished = [e for e in journal if e["event"] == "attempt.finished"]
    assert [e["verdict"] for e in finished] == ["hang", "fits"]
    assert "training had begun before the supervisor was lost" in str(finished[0]["evidence"])
    assert next(e for e in journal if e["event"] == "checkpoint.resumed")["step"] == 4
    assert attempt_processes(run_dir) == []


def test_a_trainer_that_finished_and_hangs_on_its_way_out_is_ended_as_a_fit(
        tmp_path: Path) -> None:
    """The HF Trainer trains its 4 steps, prints its final metrics and its result, then never
    exits (idle in a wait: a process group's teardown that hangs, at every attempt). Nothing
    shows work, so the silence after the last step is judged by the run's cadence, not the
    30-minute allowance, and the training is done: one attempt, a fit that says it did not
    exit, no retry that would train it all again, nothing left running."""
    code, journal = _reference(tmp_path, scaled_default(), "--max_steps", "4", "--save_steps",
                               "2", REFERENCE_TRAINER_FAULTS="stuck@0",
                               REFERENCE_TRAINER_STEP_S="1")
    assert code is ExitCode.FITTED
    finished = _finished(journal)
    assert [e["verdict"] for e in finished] == ["fits"]
    evidence = str(finished[0]["evidence"])
    assert evidence.startswith("it trained to the end and printed its final metrics, then did "
                               "not exit"), evidence
    _caught_within(evidence, 8)
    assert "after the last training step" in evidence
    assert "no CPU" in evidence
    assert finished[0]["progress"]["step"] == 4
    report = (tmp_path / "run" / "report.md").read_text(encoding="utf-8")
    assert "then did not exit" in report
    # The wait for the watchdog is the hang's in the night's account, not start-up or save.
    assert "attempt 1 trained to the end, then did not exit: cost" in report
    assert re.search(r"\| hang detection \| [^|]+ \| [1-9]", report), report
