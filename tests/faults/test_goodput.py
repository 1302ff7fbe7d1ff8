"""Progress is the unit of work, on real processes: a retry resumes from the newest checkpoint,
the retry budget runs from the failures, and the watchdog counts from the last output, also
across `resume`."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from supervisor._compat import tomllib
from supervisor.loop import ExitCode
from supervisor.policy import Ladder, parse
from tests.faults.conftest import attempt_processes, events, quiet_env, supervise_here, wait_for

pytestmark = pytest.mark.process

DEFAULT = Path(__file__).resolve().parents[2] / "policies" / "default.toml"
TRAINER = (sys.executable, "-m", "supervisor.reference_trainer")


def scaled_default(factor: float = 60.0, **transient: int) -> Ladder:
    """The shipped default policy with every time constant that a step's time sets divided by
    `factor` (a time-scaled night keeps the shipped ratio of watchdog to retry window); the
    start-up allowance is a model's load time, which a time scale does not shorten."""
    data: dict[str, Any] = tomllib.loads(DEFAULT.read_text(encoding="utf-8"))
    watchdog = data["watchdog"]
    watchdog["stall_floor_s"] = watchdog["stall_floor_s"] / factor
    data["transient"]["max_delay_s"] = round(data["transient"]["max_delay_s"] / factor)
    data["transient"].update(transient)
    return parse(data, source=f"default.toml / {factor:g}")


# Prints a line a second for 30 s, then fails once with torchelastic's own
# RendezvousConnectionError; the second time it prints two lines and exits 0.
LATE_TRANSIENT = """\
import sys, time
from pathlib import Path
if "--help" in sys.argv:
    sys.exit(print("usage: job.py [--per_device_train_batch_size N]"))
first = not Path("fired").exists()
for i in range(30 if first else 2):
    print(f"step {i}", flush=True)
    time.sleep(1)
if first:
    Path("fired").write_text("x")
    from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError
    raise RendezvousConnectionError("The connection to the C10d store has failed.")
"""


def test_a_transient_failure_late_in_an_attempt_is_retried(tmp_path: Path) -> None:
    """30 s into the attempt, under a 20 s retry window: the window runs from the failure, so
    the failure is retried (counted from the config's start it never was: exit 5)."""
    (tmp_path / "job.py").write_text(LATE_TRANSIENT, encoding="utf-8")
    data: dict[str, Any] = tomllib.loads(DEFAULT.read_text(encoding="utf-8"))
    data["transient"]["max_delay_s"] = 20
    result, sleeps, journal = supervise_here(tmp_path, (sys.executable, "job.py",
                                             "--per_device_train_batch_size", "1"), parse(data))
    assert result.exit_code is ExitCode.FITTED
    finished = [e for e in journal if e["event"] == "attempt.finished"]
    assert [e["verdict"] for e in finished] == ["transient", "fits"]
    assert finished[0]["duration_s"] > 20
    assert "RendezvousConnectionError" in str(finished[0]["evidence"])
    retry = next(e for e in journal if e["event"] == "transient.retrying")
    assert retry["retry"] == 1
    assert retry["verdict"] == "transient"
    assert sleeps == [retry["delay_s"]]


def test_a_hang_is_retried_from_the_newest_checkpoint(tmp_path: Path) -> None:
    """The reference trainer falls silent after its second checkpoint (step 4 of 8): under the
    shipped default policy (time-scaled), the learnt watchdog ends it, and the retry continues
    from checkpoint-4, not from the start or an older checkpoint."""
    argv = (*TRAINER, "--per_device_train_batch_size", "1", "--cutoff_len", "32",
            "--max_steps", "8", "--save_steps", "2", "--output_dir", "out")
    result, _, journal = supervise_here(tmp_path, argv, scaled_default(),
                             REFERENCE_TRAINER_FAULTS="hang@5", REFERENCE_TRAINER_STEP_S="1")
    assert result.exit_code is ExitCode.FITTED
    finished = [e for e in journal if e["event"] == "attempt.finished"]
    assert [e["verdict"] for e in finished] == ["hang", "fits"]
    assert "longest gap" in str(finished[0]["evidence"])  # the learnt limit, not a fixed one
    assert [step for _, step in finished[0]["checkpoints"]] == [2, 4]
    resumed = next(e for e in journal if e["event"] == "checkpoint.resumed")
    assert resumed["attempt"] == 2
    assert resumed["step"] == 4
    retry = next(e for e in journal if e["event"] == "transient.retrying")
    assert retry["verdict"] == "hang"
    assert str(retry["checkpoint"]).endswith("checkpoint-4")
    started = [e for e in journal if e["event"] == "attempt.started"]
    assert str(started[1]["knobs"]["resume_from_checkpoint"]).endswith("checkpoint-4")
    assert finished[1]["trained_steps"]["resumed_from_step"] == 4  # the trainer's own word
    report = (tmp_path / "run" / "report.md").read_text(encoding="utf-8")
    assert "## Where the time went" in report
    assert "hung at step" in report
    assert "from checkpoint-4" in report


SILENT_ONCE = """\
import sys, time
from pathlib import Path
if "--help" in sys.argv:
    sys.exit(print("usage: job.py [--per_device_train_batch_size N]"))
print("loading", flush=True)
if not Path("fired").exists():
    Path("fired").write_text("x")
    time.sleep(3600)
"""


def test_the_watchdog_after_resume_counts_from_the_last_output(tmp_path: Path) -> None:
    """The supervisor dies 8 s into a silence under a 10 s stall limit; resume adopts the
    attempt and ends it about 10 s after its last output, not 10 s after the adoption."""
    (tmp_path / "job.py").write_text(SILENT_ONCE, encoding="utf-8")
    policy = tmp_path / "policy.toml"
    policy.write_text(DEFAULT.read_text(encoding="utf-8").replace(
        "stall_timeout_s = 0 ", "stall_timeout_s = 10 "), encoding="utf-8")
    run_dir = tmp_path / "r"
    argv = [sys.executable, "-m", "supervisor", "--log-format", "json", "run", "--quiet",
            "--no-estimate", "--runs-dir", str(tmp_path), "--run-id", "r", "--policy",
            str(policy), "--", sys.executable, "job.py", "--per_device_train_batch_size", "1"]
    with (tmp_path / "first.log").open("ab") as sink:
        first = subprocess.Popen(argv, stdout=sink, stderr=sink, env=quiet_env(),  # noqa: S603
                                 cwd=tmp_path, start_new_session=True)
    log = run_dir / "attempts" / "01" / "stdout.log"
    wait_for(lambda: log.is_file() and b"loading" in log.read_bytes())
    said = time.time()
    time.sleep(8)
    first.send_signal(signal.SIGKILL)
    first.wait()
    second = subprocess.run(  # noqa: S603 - our own CLI
        [sys.executable, "-m", "supervisor", "--log-format", "json", "resume", str(run_dir),
         "--quiet"], capture_output=True, text=True, env=quiet_env(), cwd=tmp_path,
        timeout=300, check=False)
    assert second.returncode == 0, second.stderr[-3000:]
    journal = events(run_dir)
    finished = [e for e in journal if e["event"] == "attempt.finished"]
    assert [e["verdict"] for e in finished] == ["hang", "fits"]
    assert finished[0]["adopted"] is True
    silence = finished[0]["ended_at"] - said
    assert silence < 15
    # Its duration counts from its own start, not from the adoption.
    spawned = next(e for e in journal if e["event"] == "attempt.spawned")
    assert finished[0]["duration_s"] >= finished[0]["ended_at"] - spawned["create_time"] - 1
    assert attempt_processes(run_dir) == []
