"""memory.png: the figure's artists, checked before it is saved (never pixels)."""

from __future__ import annotations

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
