"""After an attempt, GPU memory its processes still hold is named, and the policy can stop."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import psutil
import pytest

from supervisor.command import Command
from supervisor.dialects.argv import ArgvDialect
from supervisor.gpu import Device, ProcessUsage
from supervisor.journal import read
from supervisor.loop import ExitCode, Memory, supervise
from supervisor.policy import parse

pytestmark = pytest.mark.process


class StuckGpu:
    """A probe on which our attempt's shim holds 2 GiB and never lets go (a leaked context)."""

    unavailable = None

    def __init__(self) -> None:
        self.seen: set[int] = set()

    def devices(self) -> tuple[Device, ...]:
        return (Device(index=0, name="Fake", uuid="GPU-0", total_mib=8192, free_mib=6144),)

    def processes(self) -> tuple[ProcessUsage, ...]:
        me = psutil.Process(os.getpid())
        for child in me.children():
            try:
                if "supervisor._wrap" in " ".join(child.cmdline()):
                    self.seen.add(child.pid)
            except psutil.Error:
                continue
        # The driver keeps charging the pid after it died: memory that never came back.
        return tuple(ProcessUsage(pid=pid, device=0, used_mib=2048) for pid in self.seen)


def test_memory_still_held_is_named_and_stops_the_run_when_the_policy_says(
        tmp_path: Path) -> None:
    """The attempt OOMs; its memory is still held after the wait; `on_held_memory = stop`."""
    (tmp_path / "job.py").write_text(
        "import time\ntime.sleep(0.5)\nraise MemoryError\n", encoding="utf-8")
    ladder = parse({"name": "strict", "gpu": {"release_wait_s": 1, "on_held_memory": "stop"},
                    "rung": [{"action": "enable", "knob": "gradient_checkpointing"}]})
    result = supervise(Command(argv=(sys.executable, "job.py",
                                     "--per_device_train_batch_size", "1"), cwd=str(tmp_path)),
                       dialect=ArgvDialect(), ladder=ladder, run_dir=tmp_path / "run",
                       echo=False, env=dict(os.environ),
                       memory=Memory(gpu=StuckGpu()))
    assert result.exit_code is ExitCode.FATAL
    finished = [e for e in read(tmp_path / "run" / "journal.jsonl").records
                if e["event"] == "attempt.finished"]
    assert finished[0]["verdict"] == "oom"
    assert finished[0]["gpu_peak_mib"] == 2048
    assert finished[0]["gpu_release"]["released"] is False
    assert "(2048 MiB on GPU 0)" in finished[0]["gpu_release"]["describe"]
    assert "not released" in (tmp_path / "run" / "report.md").read_text()
