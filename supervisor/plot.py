"""memory.png: each attempt's memory against the device, drawn from report.build's data.

matplotlib is optional (`pip install 'oom-supervisor[plot]'`): without it no picture is drawn
and the report says nothing of one. It is imported here only, and only when drawing.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from supervisor.files import writing

VERDICT_COLOURS: Mapping[str, str] = {
    "fits": "#2e7d32", "oom": "#c62828", "fatal": "#6a1b9a", "transient": "#ef6c00",
    "hang": "#ef6c00", "interrupted": "#757575", "running": "#1565c0",
}
"""Bar colour per verdict."""


def available() -> bool:
    """True when matplotlib can be imported (the `[plot]` extra is installed)."""
    return importlib.util.find_spec("matplotlib") is not None


def bar_height(row: Mapping[str, Any]) -> float:
    """An attempt's bar: its measured peak, or for an OOM the least it proved it needed."""
    if row.get("verdict") == "oom":
        return float(row.get("need_mib") or row.get("peak_mib") or 0.0)
    return float(row.get("peak_mib") or 0.0)


def figure(data: Mapping[str, Any]) -> Any:  # noqa: ANN401 - a matplotlib Figure (optional)
    """The figure: one bar per attempt, predicted peaks as markers, the device as a line."""
    import matplotlib as mpl  # noqa: PLC0415

    mpl.use("Agg")  # never a window: this runs unattended
    from matplotlib.figure import Figure  # noqa: PLC0415
    from matplotlib.lines import Line2D  # noqa: PLC0415
    from matplotlib.patches import Patch  # noqa: PLC0415

    attempts = list(data.get("attempts", []))
    fig = Figure(figsize=(max(6.0, 0.7 * len(attempts) + 3), 4.5), dpi=100)
    ax = fig.add_subplot()
    xs = list(range(len(attempts)))
    heights = [bar_height(a) for a in attempts]
    colours = [VERDICT_COLOURS.get(str(a.get("verdict")), "#9e9e9e") for a in attempts]
    ax.bar(xs, heights, color=colours, gid="attempts")
    predicted = [(x, a["predicted_mib"]) for x, a in zip(xs, attempts, strict=True)
                 if a.get("predicted_mib")]
    if predicted:
        ax.plot([p[0] for p in predicted], [p[1] for p in predicted], linestyle="none",
                marker="_", markersize=22, markeredgewidth=2.5, color="black", gid="predicted")
    device = data.get("device_mib")
    if device:
        ax.axhline(device, color="black", linestyle="--", linewidth=1, gid="device")
    ax.set_xticks(xs, [f"{a['attempt']}\n{a.get('rung') or 'as given'}" for a in attempts],
                  fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("MiB (peak; an OOM: at least)")
    ax.set_title(f"run {data.get('run_id')}: memory per attempt", fontsize=10)
    seen = []
    for a in attempts:
        verdict = str(a.get("verdict"))
        if verdict not in seen:
            seen.append(verdict)
    handles: list[Any] = [Patch(color=VERDICT_COLOURS.get(v, "#9e9e9e"), label=v) for v in seen]
    if predicted:
        handles.append(Line2D([], [], linestyle="none", marker="_", markersize=12,
                              markeredgewidth=2.5, color="black", label="predicted"))
    if device:
        handles.append(Line2D([], [], color="black", linestyle="--",
                              label=f"device {device:g} MiB"))
    ax.legend(handles=handles, fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig


def write(path: Path, data: Mapping[str, Any]) -> Path | None:
    """Save memory.png (atomically); None when matplotlib is missing or nothing ran yet."""
    if not data.get("attempts") or not available():
        return None
    fig = figure(data)
    again = f"then `oom-supervisor report {path.parent}` draws it again"
    with writing(path, then=again) as tmp:  # full disk, vanished folder: one line
        fig.savefig(tmp)
    return path
