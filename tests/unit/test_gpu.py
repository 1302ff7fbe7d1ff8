"""gpu.py against fake probes: visibility, degrading without a driver, sampling, release."""

from __future__ import annotations

import time

import pytest

from supervisor.gpu import (
    NvmlProbe,
    Sampler,
    smallest_device_mib,
    visible_indices,
    wait_for_release,
)
from tests.fakes_gpu import FakeGpu, FakeNvml, usage

UUIDS = ("GPU-aaaa-1111", "GPU-bbbb-2222", "GPU-cccc-3333")


@pytest.mark.parametrize(("value", "expected"), [
    (None, (0, 1, 2)),
    ("", ()),
    ("1", (1,)),
    ("2,0", (2, 0)),
    ("0,7,1", (0,)),          # CUDA stops at the first entry that names no device
    ("-1", ()),
    ("GPU-bbbb", (1,)),       # a UUID prefix
    ("GPU-cccc-3333,0", (2, 0)),
    ("GPU-", ()),             # ambiguous prefix: names no single device
    ("1,1", (1,)),
])
def test_visible_indices_follow_cuda_visible_devices(value: str | None,
                                                     expected: tuple[int, ...]) -> None:
    """Indices, UUID prefixes, and CUDA's stop-at-the-first-bad-entry rule."""
    assert visible_indices(value, UUIDS) == expected


def test_no_driver_says_so_once_and_answers_nothing() -> None:
    """Without a driver the probe reports why and has no devices or processes."""
    probe = NvmlProbe(env={}, nvml=FakeNvml(fail="NVML Shared Library Not Found"))
    assert probe.unavailable is not None
    assert "NVML Shared Library Not Found" in probe.unavailable
    assert probe.devices() == ()
    assert probe.processes() == ()
    assert smallest_device_mib(probe) is None
    probe.close()


def test_nvml_probe_reads_only_the_visible_devices() -> None:
    """CUDA_VISIBLE_DEVICES=2,0: devices 2 and 0, and only their processes."""
    nvml = FakeNvml(UUIDS, running={0: [(10, 2 * 2**30)], 1: [(11, 2**30)],
                                    2: [(12, None)]})
    probe = NvmlProbe(env={"CUDA_VISIBLE_DEVICES": "2,0"}, nvml=nvml)
    assert probe.unavailable is None
    assert [(d.index, d.name, d.total_mib) for d in probe.devices()] == [
        (2, "Fake GPU 2", 81920), (0, "Fake GPU 0", 81920)]
    assert set(probe.processes()) == {usage(12, 0, device=2), usage(10, 2048, device=0)}
    probe.close()
    assert nvml.shut_down


def test_no_visible_device_is_said() -> None:
    """CUDA_VISIBLE_DEVICES='' hides every device: the probe says so."""
    probe = NvmlProbe(env={"CUDA_VISIBLE_DEVICES": ""}, nvml=FakeNvml(UUIDS))
    assert probe.unavailable is not None
    assert "CUDA_VISIBLE_DEVICES" in probe.unavailable
    assert probe.devices() == ()


def test_sampler_keeps_the_peak_of_the_tree_only() -> None:
    """Our pids summed per sample, per device too; a foreign process never counts."""
    gpu = FakeGpu(script=[
        (usage(100, 500), usage(999, 30_000)),
        (usage(100, 900), usage(101, 700, device=1)),  # launcher started a worker
        (usage(100, 300),),
    ])
    pids = {100, 101}
    sampler = Sampler(gpu, lambda: pids)
    assert [sampler.sample() for _ in range(3)] == [500, 1600, 300]
    peak = sampler.peak
    assert (peak.peak_mib, dict(peak.per_device_mib), peak.samples) == (1600, {0: 900, 1: 700}, 3)
    assert peak.to_dict()["per_device_mib"] == {"0": 900, "1": 700}


def test_sampler_thread_samples_until_stopped() -> None:
    """start() samples in the background; stop() returns the peak."""
    gpu = FakeGpu(script=[(usage(7, 64),)])
    sampler = Sampler(gpu, lambda: [7], interval_s=0.01)
    sampler.start()
    deadline = time.monotonic() + 5
    while gpu.calls < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    peak = sampler.stop()
    assert peak.peak_mib == 64
    assert peak.samples >= 3


def test_release_waits_until_our_processes_let_go() -> None:
    """Two polls still held, then released; the waits went through the injected sleep."""
    gpu = FakeGpu(script=[(usage(5, 900),), (usage(5, 100),), (usage(77, 40),)])
    sleeps: list[float] = []
    clock = iter(range(100)).__next__
    result = wait_for_release(gpu, {5}, timeout_s=30, sleep=sleeps.append,
                              clock=lambda: float(clock()), own_pid=1)
    assert result.released
    assert sleeps == [0.5, 0.5]
    assert result.foreign == (usage(77, 40),)
    assert "pid 77" in result.describe()


def test_release_times_out_naming_ours_and_foreign() -> None:
    """Held past the timeout: the result names our pid and the foreign one."""
    gpu = FakeGpu(script=[(usage(5, 900), usage(6, 10), usage(1, 5))])
    ticks = iter([0.0, 1.0, 2.0, 3.5])
    result = wait_for_release(gpu, [5], timeout_s=3, sleep=lambda _: None,
                              clock=lambda: next(ticks), own_pid=1)
    assert not result.released
    assert result.ours == (usage(5, 900),)
    assert result.foreign == (usage(6, 10),)   # pid 1 is the supervisor itself
    assert result.describe() == ("still held after 3.5 s by pid 5 (900 MiB on GPU 0); "
                                 "other processes hold memory: pid 6 (10 MiB on GPU 0)")
    assert result.to_dict()["ours"] == [{"pid": 5, "device": 0, "used_mib": 900}]
