"""The runner against hostile output and dead wrappers: nothing lies, nothing hangs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from supervisor.classify import VerdictKind, classify
from supervisor.device_memory import device_memory_env
from supervisor.runner import STATUS_FILE, AttemptSpec, Spawned, StopRequest, adopt, run
from tests.faults.conftest import quiet_env

pytestmark = pytest.mark.process

# Floods stdout, then a real training step runs out of memory under the injected limit.
FLOOD = """\
import runpy, sys
block = b"".join(b"flood %06d: the chatter of a noisy trainer ....\\n" % i for i in range(20000))
for _ in range(int(sys.argv[1])):
    sys.stdout.buffer.write(block)
sys.stdout.buffer.flush()
sys.argv = ["reference_trainer", *sys.argv[2:]]
runpy.run_module("supervisor.reference_trainer", run_name="__main__")
"""
TRAINER_OOM = ("--model_name_or_path", "tiny", "--finetuning_type", "full",
               "--per_device_train_batch_size", "4", "--cutoff_len", "1024", "--max_steps", "1",
               "--output_dir", "out")


def test_flood_then_oom_is_seen_logs_capped_head_and_tail_kept(tmp_path: Path) -> None:
    """~10 MiB of output then a real OOM under a 1 MiB cap: verdict oom, log <= cap + note."""
    (tmp_path / "flood.py").write_text(FLOOD, encoding="utf-8")
    threads_before = threading.active_count()
    outcome = run(AttemptSpec(
        argv=(sys.executable, "flood.py", "10", *TRAINER_OOM), cwd=str(tmp_path),
        env=device_memory_env(quiet_env(), 70), log_dir=tmp_path / "logs", echo=False,
        log_cap_bytes=1024 * 1024))
    verdict = classify(outcome)
    assert verdict.kind is VerdictKind.OOM, verdict
    out = (tmp_path / "logs" / "stdout.log").read_bytes()
    assert len(out) <= 1024 * 1024 + 200
    assert out.startswith(b"flood 000000:")  # the head
    assert b"bytes of this log were dropped here" in out
    assert b"flood 019999" in out  # the tail
    assert not list((tmp_path / "logs").glob("*.tail*"))
    status = json.loads((tmp_path / "logs" / STATUS_FILE).read_text())
    assert status["log_bytes"][0] > 9 * 1024 * 1024
    assert status["dropped_bytes"][0] > 0
    # The followers ended with the attempt.
    assert threading.active_count() == threads_before


def test_command_killed_by_sigkill_leaves_no_wrapper_traceback(tmp_path: Path) -> None:
    """SIGKILL (the kernel OOM killer's way): status says so, the shim says nothing."""
    outcome = run(AttemptSpec(argv=("sh", "-c", "echo started; kill -9 $$"), env=quiet_env(),
                              log_dir=tmp_path / "logs", echo=False))
    assert outcome.exit_code == -signal.SIGKILL
    status = json.loads((tmp_path / "logs" / STATUS_FILE).read_text())
    assert status["signal"] == "SIGKILL"
    err = (tmp_path / "logs" / "stderr.log").read_text()
    assert "Traceback" not in err
    assert err == ""


def _spawn_wrapper(log_dir: Path, *argv: str) -> subprocess.Popen[bytes]:
    log_dir.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(  # noqa: S603 - the shim, as the runner starts it
        [sys.executable, "-m", "supervisor._wrap", str(log_dir / STATUS_FILE), "--", *argv],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=quiet_env(),
        start_new_session=True)


def test_adopt_reports_a_wrapper_that_died_without_status(tmp_path: Path) -> None:
    """kill -9 of the whole attempt group: adopt returns at once, exit_code None, evidence."""
    proc = _spawn_wrapper(tmp_path / "logs", "sleep", "300")
    spawned = Spawned(pid=proc.pid, create_time=psutil.Process(proc.pid).create_time())
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    started = time.monotonic()
    outcome = adopt(AttemptSpec(argv=("sleep", "300"), env=quiet_env(),
                                log_dir=tmp_path / "logs", echo=False), spawned)
    assert time.monotonic() - started < 30
    assert outcome.exit_code is None
    assert outcome.wrapper_died
    verdict = classify(outcome)
    assert verdict.evidence == "the attempt's wrapper died without writing its exit status"


def test_adopt_ends_its_wait_on_a_stop_request(tmp_path: Path) -> None:
    """SIGTERM/SIGINT during resume: the adopted attempt is ended and adopt returns."""
    proc = _spawn_wrapper(tmp_path / "logs", "sleep", "300")
    spawned = Spawned(pid=proc.pid, create_time=psutil.Process(proc.pid).create_time())
    stop = StopRequest()
    threading.Timer(1.0, stop.request).start()
    outcome = adopt(AttemptSpec(argv=("sleep", "300"), env=quiet_env(), stop=stop,
                                log_dir=tmp_path / "logs", echo=False, grace_s=2.0), spawned)
    proc.wait(timeout=30)
    assert outcome.interrupted
    assert classify(outcome).kind is VerdictKind.INTERRUPTED
