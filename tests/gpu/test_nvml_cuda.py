"""gpu.py and --device-memory on a real NVIDIA GPU (skipped where NVML sees none)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from supervisor.classify import OomKind, Outcome, classify
from supervisor.device_memory import device_memory_env
from supervisor.gpu import NvmlProbe, Sampler, wait_for_release

_PROBE = NvmlProbe()
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(_PROBE.unavailable is not None,
                                 reason=_PROBE.unavailable or "no GPU")]

HOLD = """\
import sys, time, torch
x = torch.empty(int(sys.argv[1]) * 2**20, dtype=torch.uint8, device="cuda")
torch.cuda.synchronize()
print("holding", flush=True)
time.sleep(float(sys.argv[2]))
"""

TRAIN = """\
import torch
model = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.ReLU(),
                            torch.nn.Linear(4096, 1024)).cuda()
optimizer = torch.optim.AdamW(model.parameters())
x = torch.randn(256, 1024, device="cuda")
for _ in range(2):
    model(x).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()
print("trained", flush=True)
"""


def test_the_probe_lists_the_visible_devices() -> None:
    """At least one device with a name and a plausible size."""
    devices = _PROBE.devices()
    assert devices
    assert all(d.total_mib > 1024 and d.name for d in devices)


def test_sampler_sees_a_process_holding_memory_and_release_follows(tmp_path: Path) -> None:
    """A child holding 1 GiB is sampled at >= 1 GiB; after it exits its memory is released."""
    script = tmp_path / "hold.py"
    script.write_text(HOLD, encoding="utf-8")
    proc = subprocess.Popen([sys.executable, str(script), "1024", "4"],  # noqa: S603
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "holding"
    sampler = Sampler(_PROBE, lambda: [proc.pid], interval_s=0.2)
    sampler.start()
    time.sleep(1.5)
    peak = sampler.stop()
    seen = [u for u in _PROBE.processes() if u.pid == proc.pid]
    proc.wait(timeout=60)
    # Where NVML reports pids of another namespace (a container), nothing matches: say so.
    assert seen, f"NVML lists no process with pid {proc.pid}: {_PROBE.processes()}"
    assert peak.peak_mib >= 1024
    result = wait_for_release(_PROBE, [proc.pid], timeout_s=30)
    assert result.released, result.describe()


def test_device_memory_gives_an_unmodified_script_a_real_cuda_oom(tmp_path: Path) -> None:
    """64 MiB: a CUDA out-of-memory error from the caching allocator; 2 GiB: it trains."""
    script = tmp_path / "train.py"
    script.write_text(TRAIN, encoding="utf-8")
    env = dict(os.environ)

    def run(mib: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(script)], capture_output=True, text=True,  # noqa: S603
                              env=device_memory_env(env, mib), check=False, timeout=300)

    small = run(64)
    assert small.returncode == 1, small.stderr[-2000:]
    verdict = classify(Outcome(exit_code=small.returncode, duration_s=0.0,
                               tail=tuple(small.stderr.splitlines())))
    assert verdict.oom_kind is OomKind.CUDA, small.stderr[-2000:]
    assert verdict.numbers is not None
    assert verdict.numbers.capacity_mib == 64.0
    large = run(2048)
    assert large.returncode == 0, large.stderr[-2000:]
    assert large.stdout.strip() == "trained"
