"""memory.png: the figure's artists, checked before it is saved (never pixels)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from supervisor import plot, report
from supervisor.journal import load

RUNS = Path(__file__).parent.parent / "data" / "runs"

pytest.importorskip("matplotlib")


def test_one_bar_per_attempt_and_the_device_line() -> None:
    """The demo's 10 attempts: 10 bars by verdict, OOMs at their proven need, the device."""
    data = report.build(load(RUNS / "demo-70")[0])
    fig = plot.figure(data)
    ax = fig.axes[0]
    bars = ax.containers[0]
    assert len(bars) == len(data["attempts"]) == 10
    heights = [b.get_height() for b in bars]
    assert heights[-1] == pytest.approx(47.94)  # the fit's measured peak
    assert all(h > 70 for h in heights[:-1])  # each OOM proved it needed more than the device
    colours = {tuple(round(c, 3) for c in b.get_facecolor()) for b in bars}
    assert len(colours) == 2  # oom and fits
    device = [line for line in ax.get_lines() if line.get_gid() == "device"]
    assert len(device) == 1
    assert device[0].get_ydata()[0] == 70
    labels = [t.get_text() for t in ax.get_xticklabels()]
    # Each label names the config, so four "smaller-batch" rungs are told apart.
    assert labels[0] == "1 as given\nfull b4x1 cut 1024"
    assert labels[6].startswith("7 lora\nLoRA r8 ")
    assert len(set(labels)) == len(labels)
    # An OOM's figure is a lower bound: hatched and marked ">=", the fit is a plain bar.
    assert [b.get_hatch() for b in bars] == ["///"] * 9 + [None]
    marks = [t.get_text() for t in ax.texts if t.get_gid() == "at-least"]
    assert len(marks) == 9
    assert all(m.startswith(">=") for m in marks)


def test_predicted_peaks_are_drawn_where_there_are_some() -> None:
    """A prediction adds one marker per predicted attempt."""
    data = report.build(load(RUNS / "demo-150")[0])
    data["attempts"][0]["predicted_mib"] = 160.0
    data["attempts"][3]["predicted_mib"] = 90.0
    ax = plot.figure(data).axes[0]
    predicted = [line for line in ax.get_lines() if line.get_gid() == "predicted"]
    assert list(predicted[0].get_ydata()) == [160.0, 90.0]


def test_write_skips_a_run_without_attempts(tmp_path: Path) -> None:
    """Nothing ran yet: no picture."""
    assert plot.write(tmp_path / "memory.png", {"attempts": []}) is None
    assert not (tmp_path / "memory.png").exists()


def test_every_bar_has_its_value_and_the_limit_is_named() -> None:
    """demo-70: each bar carries its figure (a fit its peak, an OOM ">=" its least), and the
    line says what it is: the simulated device of --device-memory; the legend is beside the
    bars, not over them."""
    data = report.build(load(RUNS / "demo-70")[0])
    ax = plot.figure(data).axes[0]
    bars = ax.containers[0]
    values = [t.get_text() for t in ax.texts if t.get_gid() in ("value", "at-least")]
    assert len(values) == len(bars)
    assert values[-1] == "47.9"
    assert all(v.startswith(">=") for v in values[:-1])
    line = next(line for line in ax.get_lines() if line.get_gid() == "device")
    assert line.get_label() == "simulated device 70 MiB (--device-memory)"
    legend = ax.get_legend()
    assert legend is not None
    assert "simulated device 70 MiB (--device-memory)" in [t.get_text() for t in legend.texts]
    assert legend.get_bbox_to_anchor().x0 > ax.get_window_extent().x1 - 1  # right of the axes
    arrows = [t for t in ax.texts if t.get_gid() == "open-ended"]
    assert len(arrows) == 9  # each OOM is open-ended: at least


def _oom_and_fit(cap_mib: float | None, predicted: float | None) -> dict[str, object]:
    """A run's data as report.build gives it (the shape, not a run): an OOM at b4 whose own
    figure is below what b2 then used when it fitted."""
    big = {"per_device_batch": 4, "grad_accum": 1, "cutoff_len": 1024,
           "gradient_checkpointing": False, "finetuning_type": "full", "precision": "fp32"}
    small = {**big, "per_device_batch": 2, "grad_accum": 2}
    return {"run_id": "t", "device_mib": None, "device_source": None,
            "host_cap_mib": cap_mib, "attempts": [
                {"attempt": 1, "rung": None, "knobs": big, "verdict": "oom", "need_mib": None,
                 "numbers": {"tried_mib": 16.0}, "host_peak_mib": 1029.0,
                 "predicted_mib": predicted},
                {"attempt": 2, "rung": "smaller-batch", "knobs": small, "verdict": "fits",
                 "host_peak_mib": 1130.0}]}


@pytest.mark.parametrize(("cap", "predicted", "height", "said"), [
    (1907.3, None, 1907.3, "the limit"),
    (1907.3, 2400.0, 2400.0, "predicted"),
    (None, None, 1130.0, "as attempt 2, a smaller config that fitted"),
])
def test_an_oom_is_never_drawn_below_a_smaller_config_that_fitted(
        cap: float | None, predicted: float | None, height: float, said: str) -> None:
    """The issue's prlimit run: b4 OOMs at a host peak of 1029 MiB, b2 fits at 1130: the OOM is
    drawn at its prediction, else the cap, else the fit's peak, and says which."""
    data = _oom_and_fit(cap, predicted)
    ax = plot.figure(data).axes[0]
    oom, fit = ax.containers[0]
    assert fit.get_height() == pytest.approx(1130.0)
    assert oom.get_height() == pytest.approx(height)
    assert oom.get_height() >= fit.get_height()
    mark = next(t.get_text() for t in ax.texts if t.get_gid() == "at-least")
    assert f"({said})" in mark
    limit = [line for line in ax.get_lines() if line.get_gid() == "device"]
    if cap is not None:
        assert [line.get_label() for line in limit] == [
            "host cap 1907 MiB (prlimit --as, address space)"]
        assert limit[0].get_ydata()[0] == pytest.approx(cap)
    else:
        assert limit == []


def test_goodput_is_drawn_in_time_order_one_lane_per_attempt() -> None:
    """night-small: each attempt on its own lane, segments in time order, the time between
    attempts on a lane of its own, start-up and the supervisor in colours told apart."""
    data = report.build(load(RUNS / "night-small")[0])
    segments = plot.time_segments(data)
    lanes = [lane for lane, _, _, _ in segments]
    assert {"attempt 1", "attempt 2", "attempt 3"} <= set(lanes)
    starts = [start for _, start, _, _ in segments]
    assert starts == sorted(starts)  # time order, whatever the lane
    for lane in set(lanes):
        mine = [(s, d) for ln, s, d, _ in segments if ln == lane]
        # no overlap within a lane
        assert all(a[0] + a[1] <= b[0] + 1e-6 for a, b in itertools.pairwise(mine))
    wall = float(data["goodput"]["wall_s"])
    assert sum(d for _, _, d, _ in segments) == pytest.approx(wall, abs=1.0)
    fig = plot.time_figure(data)
    ax = fig.axes[0]
    drawn = [p.get_gid() for p in ax.patches]
    assert any(g.startswith("between:") for g in drawn)
    ticks = [t.get_text() for t in ax.get_yticklabels()]  # bottom to top
    assert ticks[::-1][:4] == ["between attempts", "attempt 1", "attempt 2", "attempt 3"]
    assert plot.TIME_COLOURS["startup"] != plot.TIME_COLOURS["supervisor"]
    assert len(set(plot.TIME_COLOURS.values())) == len(plot.TIME_COLOURS)


def test_a_prlimit_run_is_drawn_with_its_cap_and_no_oom_below_the_fit() -> None:
    """prlimit-2g (a real run under `prlimit --as=2000000000`, no device): the cap the command
    sets is the line, named as what it is; each OOM bar stands at least as high as the fit of
    the smaller config, hatched and marked ">="; every bar has its value."""
    data = report.build(load(RUNS / "prlimit-2g")[0])
    assert data["host_cap_mib"] == pytest.approx(1907.3)
    ax = plot.figure(data).axes[0]
    line = next(line for line in ax.get_lines() if line.get_gid() == "device")
    assert line.get_ydata()[0] == pytest.approx(1907.3)
    assert line.get_label() == "host cap 1907 MiB (prlimit --as, address space)"
    oom1, oom2, fit = ax.containers[0]
    assert [b.get_hatch() for b in (oom1, oom2, fit)] == ["///", "///", None]
    assert min(oom1.get_height(), oom2.get_height()) >= fit.get_height()
    texts = [t.get_text() for t in ax.texts if t.get_gid() in ("value", "at-least")]
    assert texts == [">=1391", ">=1397", "617.5"]


def test_a_cap_read_from_the_attempts_is_the_line() -> None:
    """No prlimit in the command, but the attempts ran under a cgroup limit (read from their
    processes): that is the line, named as resident memory."""
    data = _oom_and_fit(None, None)
    for row in data["attempts"]:  # type: ignore[attr-defined]
        row.update({"host_cap_mib": 1800.0, "host_cap_source": "cgroup memory.max"})
    assert plot.limit_line(data) == (1800.0, ("host cap 1800 MiB (cgroup memory.max, "
                                             "resident memory)"))
    ax = plot.figure(data).axes[0]
    oom, _fit = ax.containers[0]
    assert oom.get_height() == pytest.approx(1800.0)  # the limit: above the fit's 1130
