"""The liveness judgment replayed from samples recorded on real runs (tests/data/liveness/),
the frozen-bar rule of the progress tracker, the injection decision, the [liveness] table,
the growth of a recurring hang's limit, and GPU activity over a fake NVML."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from supervisor import gpu, liveness
from supervisor.liveness import Judge, Sample, Stack, State
from supervisor.policy import PolicyError, parse
from supervisor.trainer_output import Tracker
from tests.fakes_gpu import FakeGpu, FakeNvml, usage

DATA = Path(__file__).resolve().parents[1] / "data" / "liveness"


def _replay(name: str) -> list[tuple[dict[str, Any], liveness.Reading]]:
    judge = Judge()
    out = []
    for line in (DATA / name).read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        out.append((record, judge.observe(Sample.from_record(record), record["limit_s"])))
    return out


@pytest.mark.parametrize("name", sorted(p.name for p in DATA.glob("*.jsonl")))
def test_the_judgment_replays_as_it_was_made(name: str) -> None:
    """Each recorded sample, replayed through a fresh Judge, gets the state the run gave it."""
    for record, reading in _replay(name):
        assert str(reading.state) == record["state"], (record, reading)


@pytest.mark.parametrize(("name", "said", "stuck"), [
    ("sleep_hang.jsonl", "no CPU", "`on_step_end` (reference_trainer.py:"),
    ("frozen_bar.jsonl", "no CPU", "reference_trainer.py:"),
    ("collective_hang.jsonl", "every moving part waits in a collective", "`all_reduce`"),
    ("collective_hang_loaded.jsonl", ("waits in a collective for a process that stopped in "
                                      "`<module>` (job.py:16): time.sleep(10**7)"),
     "`all_reduce`"),
])
def test_a_recorded_hang_names_its_evidence_and_frame(name: str, said: str, stuck: str) -> None:
    """The last sample of a real hang is judged hung, and says why and where."""
    record, reading = _replay(name)[-1]
    assert reading.is_hung
    assert record["at"] - record["progress_at"] > record["limit_s"]
    assert said in reading.hang_reason()
    assert reading.stuck_in is not None
    assert stuck in reading.stuck_in


def test_a_recorded_evaluation_is_working_and_says_so() -> None:
    """The HF Trainer evaluating with the bar off, past its limit: working, evaluating, CPU."""
    working = [r for _, r in _replay("eval_working.jsonl") if r.state is State.WORKING]
    assert working
    sentence = working[-1].sentence()
    assert sentence.startswith("evaluating: no output for ")
    assert "CPU busy" in sentence


def test_cpu_of_a_rank_spinning_in_a_collective_is_not_work() -> None:
    """The recorded collective hang with its CPU made busy (NCCL spins while it waits): still
    hung, and the CPU is not given as evidence."""
    judge = Judge()
    reading = None
    for line in (DATA / "collective_hang.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        record["cpu_s"] = 2.0 * 1.9  # two ranks each spinning a core for a 2 s sample
        reading = judge.observe(Sample.from_record(record), record["limit_s"])
    assert reading is not None
    assert reading.is_hung
    assert not any(c.startswith("CPU") for c in reading.evidence)


def test_a_file_written_during_a_recorded_hang_keeps_it_working() -> None:
    """The recorded sleep hang with a file growing in its last sample: working, not hung."""
    lines = (DATA / "sleep_hang.jsonl").read_text(encoding="utf-8").splitlines()
    judge = Judge()
    reading = None
    for number, line in enumerate(lines):
        record = json.loads(line)
        if number == len(lines) - 1:
            record.update(files_changed=True, files_where="checkpoint-6/global_step6")
        reading = judge.observe(Sample.from_record(record), record["limit_s"])
    assert reading is not None
    assert reading.state is State.WORKING
    assert "files being written in checkpoint-6/global_step6" in reading.sentence()


# --- a redrawn frame is not progress -----------------------------------------------------------

def test_a_frozen_bar_recorded_from_a_real_run_is_silence() -> None:
    """The reference trainer's frozen@5 fault, as recorded (stderr.log): the first frame of 5/8
    moves, every redraw after it does not."""
    raw = (DATA / "frozen_bar_stderr.txt").read_bytes()
    tracker = Tracker(clock=lambda: 0.0)
    frames = [b"\r" + f for f in raw.split(b"\r") if f]
    moved = [tracker.feed(f) for f in frames]
    redraws = [m for f, m in zip(frames, moved, strict=True) if b"5/8 [" in f]
    assert len(redraws) >= 5
    assert redraws[0] is True
    assert not any(redraws[1:])
    assert tracker.step == 5


def test_each_step_of_a_real_hf_bar_is_progress_and_its_redraw_is_not() -> None:
    """A real HF Trainer run's stderr (recorded): the first frame of each training step moves;
    the same frame drawn again after the bar was cleared for a log line does not."""
    raw = (Path(__file__).resolve().parents[1] / "data" / "tails"
           / "hf_trainer_progress_stderr.txt").read_bytes()
    tracker = Tracker(clock=lambda: 0.0)
    seen: set[bytes] = set()
    frames = 0
    for piece in raw.split(b"\r"):
        counter = re.match(rb" *\d+%\|[^|]*\| *(\d+)/(\d+) \[", piece)  # the training bar
        moved = tracker.feed(b"\r" + piece)
        if counter is None:
            continue
        frames += 1
        assert moved is (counter.group(0) not in seen), piece
        seen.add(counter.group(0))
    assert frames >= 3


# --- which attempts get the sampler -----------------------------------------------------------

@pytest.mark.parametrize(("argv", "expected"), [
    ((sys.executable, "train.py"), True),
    (("python3.11", "-m", "supervisor.reference_trainer"), True),
    (("env", "A=1", "torchrun", "--nproc_per_node", "2", "train.py"), True),
    (("accelerate", "launch", "train.py"), True),
    (("uv", "run", "python", "train.py"), True),
    (("sh", "flaky.sh"), False),
    (("bash", "-c", "echo hi"), False),
    (("./train",), False),
])
def test_the_sampler_goes_only_into_python_commands(argv: tuple[str, ...],
                                                    expected: bool) -> None:  # noqa: FBT001
    """Python, a Python launcher, or a prefix before one; never a shell or a binary."""
    assert liveness.inject_decision(argv, {"PATH": "/nonexistent"}, enabled=True) is expected
    assert liveness.inject_decision(argv, {"PATH": "/nonexistent"}, enabled=False) is False


def test_a_console_script_is_python_by_its_shebang(tmp_path: Path) -> None:
    """An entry point such as `llamafactory-cli` is found on PATH and read."""
    script = tmp_path / "my-trainer"
    script.write_text(f"#!{sys.executable}\nprint('hi')\n", encoding="utf-8")
    script.chmod(0o755)
    binary = tmp_path / "other"
    binary.write_text("#!/bin/sh\necho hi\n", encoding="utf-8")
    binary.chmod(0o755)
    assert liveness.is_python_command(("my-trainer",), path=str(tmp_path))
    assert not liveness.is_python_command(("other",), path=str(tmp_path))


def test_the_sampler_writes_where_the_main_thread_is_and_nothing_to_the_output(
        tmp_path: Path) -> None:
    """A real Python process with the sampler injected: its stack file names the function it
    sleeps in; its stdout and stderr carry only its own words."""
    env = liveness.sampler_env({**os.environ, "PYTHONPATH": ""}, str(tmp_path / "stacks"),
                               interval_s=0.2)
    script = tmp_path / "job.py"
    script.write_text("import time\ndef parked_here():\n    time.sleep(3)  # a comment\n"
                      "print('mine')\nparked_here()\n", encoding="utf-8")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,  # noqa: S603
                          timeout=60, check=True)
    assert done.stdout == b"mine\n"
    assert done.stderr == b""
    [written] = list((tmp_path / "stacks").glob("*.json"))
    stack = Stack.from_record(json.loads(written.read_text(encoding="utf-8")))
    assert stack is not None
    assert stack.innermost is not None
    assert stack.innermost.func == "parked_here"
    assert stack.innermost.code == "time.sleep(3)"
    assert time.time() - stack.moved_at < 60


# --- the policy table and the growth of a recurring hang ---------------------------------------

RUNG = [{"action": "enable", "knob": "gradient_checkpointing"}]


def test_the_liveness_table_parses_and_checks_its_values() -> None:
    """[liveness] keys become the ladder's; a bad value is one clear line."""
    ladder = parse({"liveness": {"evidence": False, "stacks": False, "stack_interval_s": 5,
                                 "cpu_busy": 0.25, "repeat_factor": 3}, "rung": RUNG})
    assert (ladder.liveness_evidence, ladder.liveness_stacks, ladder.stack_interval_s,
            ladder.cpu_busy, ladder.repeat_factor) == (False, False, 5.0, 0.25, 3.0)
    with pytest.raises(PolicyError, match=r"\[liveness\] repeat_factor must be a number from 1"):
        parse({"liveness": {"repeat_factor": 0.5}, "rung": RUNG})
    with pytest.raises(PolicyError, match=r"\[liveness\]: unknown key 'stack_depth'; valid: "):
        parse({"liveness": {"stack_depth": 3}, "rung": RUNG})


@pytest.mark.parametrize(("hangs", "expected"), [
    ([(7, 11.0)], None),                      # once: a hang, retried as one
    ([(7, 11.0), (7, 11.0)], (44.0, 7)),      # again at the same step: 4x the limit
    ([(7, 12.0), (7, 8.0)], (48.0, 7)),       # the larger of the two limits
    ([(5, 11.0), (7, 11.0)], None),           # a different step: two hangs
    ([(7, 11.0), (7, 44.0)], (176.0, 7)),     # and again: it keeps growing
    ([(7, 0.1), (7, 0.1)], (8.0, 7)),         # never under 4x the floor
    ([(None, 11.0), (None, 11.0)], None),     # no step known: nothing to compare
])
def test_a_hang_recurring_at_the_same_step_grows_the_limit(
        hangs: list[tuple[int | None, float]], expected: tuple[float, int] | None) -> None:
    """The next attempt's limit: factor x the last limit, only when the step repeats."""
    assert liveness.grown_limit(2.0, hangs, factor=4.0) == expected


# --- GPU activity --------------------------------------------------------------------------------

def test_gpu_activity_is_a_no_op_without_a_gpu() -> None:
    """No probe (no GPU visible): nothing measured, never busy."""
    assert gpu.activity(None, [1, 2], {}) == (None, {})


def test_gpu_memory_that_moves_is_activity() -> None:
    """The tree's device memory changing between samples counts; steady memory does not."""
    fake = FakeGpu(script=[(usage(10, 500),), (usage(10, 500),), (usage(10, 900),),
                           (usage(99, 100), usage(10, 900))])
    busy, held = gpu.activity(fake, [10], {})
    assert busy is False
    busy, held = gpu.activity(fake, [10], held)
    assert busy is False
    busy, held = gpu.activity(fake, [10], held)
    assert busy is True
    busy, held = gpu.activity(fake, [10], held)  # another process's memory is not ours
    assert busy is False
    assert held == {10: 900}


class _UtilNvml(FakeNvml):
    """FakeNvml with per-process SM utilisation samples."""

    def __init__(self, shares: dict[int, int]) -> None:
        super().__init__(("GPU-0",), running={0: [(pid, 2**30) for pid in shares]})
        self.shares = shares

    def nvmlDeviceGetProcessUtilization(self, handle: int, since: int) -> list[Any]:  # noqa: N802, ARG002
        """One sample per scripted pid."""
        return [SimpleNamespace(pid=pid, smUtil=share) for pid, share in self.shares.items()]


def test_sm_utilisation_of_the_tree_is_activity() -> None:
    """NVML's per-process utilisation: a share above 0 for one of ours is busy."""
    probe = gpu.NvmlProbe(env={}, nvml=_UtilNvml({10: 0, 11: 37}))
    assert probe.utilization() == {10: 0, 11: 37}
    assert gpu.activity(probe, [11], {11: 1024})[0] is True
    assert gpu.activity(probe, [10], {10: 1024})[0] is False


# --- what the console says ---------------------------------------------------------------------

def test_the_console_says_a_working_silence_in_a_sentence(tmp_path: Path) -> None:
    """A silence past the limit, judged working: one line in words; the live line reads the
    runner's liveness.json while it is fresh, and not for a short pause between steps."""
    from supervisor.console import Console, liveness_line  # noqa: PLC0415

    sentence = ("evaluating: no output for 3 min, CPU busy (97 % of a core), stack moving in "
                "`evaluation_loop` (trainer.py:4570)")
    line = Console(live=False).line("attempt.silent", {"sentence": sentence,
                                                       "judged": "working"})
    assert line == f"  {sentence}: working, not a hang"
    status = tmp_path / liveness.STATUS_FILE
    now = time.time()
    status.write_text(json.dumps({"state": "working", "at": now, "sentence": sentence,
                                  "silent_s": 180.0}), encoding="utf-8")
    assert liveness_line(tmp_path, now=now + 1) == sentence
    assert liveness_line(tmp_path, now=now + 60) is None  # stale: the runner moved on
    status.write_text(json.dumps({"state": "alive", "at": now, "sentence": "no output for 4 s",
                                  "silent_s": 4.0}), encoding="utf-8")
    assert liveness_line(tmp_path, now=now + 1) is None


def test_the_frame_named_is_the_one_that_stopped_last_not_the_launcher() -> None:
    """The recorded collective hang without the rank in all_reduce: torchrun's agent has sat in
    its polling sleep since the start; the rank that stopped the run is the one named."""
    judge = Judge()
    reading = None
    for line in (DATA / "collective_hang.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        record["stacks"] = [s for s in record["stacks"] if s["frames"][-1][2] != "all_reduce"]
        reading = judge.observe(Sample.from_record(record), record["limit_s"])
    assert reading is not None
    assert reading.is_hung
    assert reading.stuck_in is not None
    assert "job.py:16): time.sleep(10**7)" in reading.stuck_in


def test_an_evaluation_is_its_own_allowance_not_the_steps_cadence() -> None:
    """The HF Trainer's own lines with the bar off (recorded stdout), each at the time it says
    it took (a step 1 s, an evaluation its `eval_runtime`): the steps' cadence stays 1 s, the
    evaluation is its own phase; after an evaluation's line the phase's allowance applies,
    after the next step the steps' limit again."""
    from supervisor.trainer_output import Watchdog  # noqa: PLC0415

    lines = (DATA / "eval_bar_off_stdout.txt").read_text(encoding="utf-8").splitlines()
    tracker = Tracker()
    now = 0.0
    for line in lines[:10]:
        took = re.search(r"'eval_runtime': '([\d.]+)'", line)
        now += float(took[1]) if took else 1.0
        tracker.feed(line.encode() + b"\n", at=now)
    assert tracker.longest_gap_s == pytest.approx(1.0)
    assert tracker.longest_phase_s == pytest.approx(20.3)
    watchdog = Watchdog(floor_s=2.0)
    after_eval = watchdog.limit(tracker)
    assert after_eval is not None
    assert after_eval[0] == pytest.approx(203.0)
    assert "longest gap so far around an evaluation or a save" in after_eval[1]
    tracker.feed(lines[5].encode() + b"\n", at=now + 1.0)  # a step's line again
    assert watchdog.limit(tracker) == (10.0, "10 s, 10x the longest gap so far (1.0 s)")


def test_the_first_sample_of_a_silence_past_the_limit_is_not_a_hang() -> None:
    """A limit shorter than the sampling interval: the first sample of a silence is already
    past it, and has measured nothing (CPU, I/O and files are counted between two samples).
    It is not judged hung on that; the next sample, with an interval of no work, is."""
    judge = Judge()
    first = Sample(at=102.3, progress_at=100.0, step=4, cpu_s=0.0, io_bytes=0,
                   files_changed=False)
    reading = judge.observe(first, 2.0)
    assert reading.state is not State.HUNG
    second = Sample(at=104.3, progress_at=100.0, step=4, cpu_s=0.0, io_bytes=0,
                    files_changed=False)
    reading = judge.observe(second, 2.0)
    assert reading.state is State.HUNG
    assert reading.evidence == ("no CPU", "no file written", "no disk I/O")


PARKS_WHERE_IT_WAS = """\
import sys, time
from supervisor._inject import stacks
stacks.start()
def wait(t):
    time.sleep(t)
def other():
    time.sleep(0.3)
for i in range(100):
    if i == 8:
        print(time.time(), flush=True)
    wait(3600 if i == 8 else 0.3)
    other()
"""


def test_the_sampler_shows_a_thread_parked_where_its_loop_went_before(tmp_path: Path) -> None:
    """A loop that went through `wait` many times, then stays in it (a rank's all_reduce once
    its peer stopped): the stacks file shows it in `wait`, and `moved_at` is not moved (it went
    nowhere new), so the judge sees it parked where it is."""
    env = {**os.environ, "OOM_SUPERVISOR_STACKS": str(tmp_path),
           "OOM_SUPERVISOR_STACKS_S": "0.2",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    with subprocess.Popen([sys.executable, "-c", PARKS_WHERE_IT_WAS], env=env,  # noqa: S603
                          stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            parked_at = float(proc.stdout.readline())
            path = tmp_path / f"{proc.pid}.json"
            record: dict[str, Any] = {}
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                record = json.loads(path.read_text(encoding="utf-8"))
                # Several samples after it parked (a file is rewritten only when it moved).
                if time.time() > parked_at + 2 and record["frames"][-1][2] == "wait":
                    break
                time.sleep(0.2)
            stack = Stack.from_record(record)
            assert stack is not None
            assert stack.innermost is not None
            assert stack.innermost.func == "wait", record
            assert stack.moved_at < parked_at, record
        finally:
            proc.kill()


def test_an_adopted_attempt_is_judged_by_the_runs_cadence_not_the_start_up_allowance() -> None:
    """Output read back after `resume` (untimed) shows training had begun: the limit is the
    factor times the longest gap an earlier attempt showed, or the floor when none did; an
    attempt whose output shows no training yet keeps the start-up allowance."""
    from supervisor.trainer_output import Watchdog  # noqa: PLC0415

    began = Tracker()
    for step in (1, 2, 3):
        began.feed(f"\r{12 * step:3d}%|#   | {step}/8 [00:0{step}<00:05,  1.02s/it]".encode(),
                   timed=False)
    assert not began.cadence_known
    loading = Tracker()
    loading.feed(b"Loading checkpoint shards\n", timed=False)
    dog = Watchdog(startup_s=1800.0, factor=10.0, floor_s=120.0)
    assert dog.limit(began) == (1800.0, "1800 s before the trainer showed its cadence")
    limit = Watchdog(startup_s=1800.0, factor=10.0, floor_s=120.0, adopted_gap_s=30.0)
    assert limit.limit(began)[0] == 300.0  # type: ignore[index]
    assert "an earlier attempt of this run" in limit.limit(began)[1]  # type: ignore[index]
    floor = Watchdog(startup_s=1800.0, factor=10.0, floor_s=120.0, adopted_gap_s=0.0)
    assert floor.limit(began)[0] == 120.0  # type: ignore[index]
    assert floor.limit(loading)[0] == 1800.0  # type: ignore[index]
