"""memory.png: each attempt's memory against the device, drawn from report.build's data.

matplotlib is optional (`pip install 'oom-supervisor[plot]'`): without it no picture is drawn
and the report says nothing of one. It is imported here only, and only when drawing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from supervisor.files import writing

VERDICT_COLOURS: Mapping[str, str] = {
    "fits": "#2e7d32", "oom": "#c62828", "fatal": "#6a1b9a", "transient": "#ef6c00",
    "hang": "#ef6c00", "interrupted": "#757575", "running": "#1565c0", "timed": "#00838f",
}
"""Bar colour per verdict."""


_WARMING: list[threading.Thread] = []


def warm() -> None:
    """Import matplotlib in a daemon thread, once: drawing at the end of a run then costs the
    drawing only (the import is ~1 s of the supervisor's fixed cost per run). Idle work: an
    attempt is running meanwhile; the import lock makes a later import wait for this one."""
    if _WARMING or not available():
        return
    thread = threading.Thread(target=_import, name="oom-supervisor-plot-warm", daemon=True)
    _WARMING.append(thread)
    thread.start()


def _import() -> None:
    with contextlib.suppress(Exception):
        import matplotlib as mpl  # noqa: PLC0415

        mpl.use("Agg")
        import matplotlib.figure  # noqa: PLC0415
        import matplotlib.lines  # noqa: PLC0415
        import matplotlib.patches  # noqa: F401, PLC0415


def available() -> bool:
    """True when matplotlib can be imported (the `[plot]` extra is installed)."""
    return importlib.util.find_spec("matplotlib") is not None


def bar_height(row: Mapping[str, Any]) -> float:
    """An attempt's bar: its measured peak, or for an OOM the least it proved it needed; with
    no device figure at all, the host memory its processes held (resident peak)."""
    if row.get("verdict") == "oom":
        height = row.get("need_mib") or row.get("peak_mib")
    else:
        height = row.get("peak_mib")
    return float(height or row.get("host_peak_mib") or 0.0)


def host_only(data: Mapping[str, Any]) -> bool:
    """No attempt reported a device figure: the bars are host memory."""
    return not any(a.get("peak_mib") or a.get("need_mib") for a in data.get("attempts", []))


def why_not(data: Mapping[str, Any]) -> str | None:
    """Why memory.png is not drawn (None when it is, or when nothing ran yet)."""
    if not data.get("attempts"):
        return None
    if not available():
        return ("matplotlib is not installed (install the `plot` extra: "
                "pip install 'oom-supervisor[plot]')")
    if not any(bar_height(a) for a in data["attempts"]):
        return "no attempt reported a memory figure (device, OOM message or host memory)"
    return None


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
    bars = ax.bar(xs, heights, color=colours, gid="attempts")
    for bar, a, height in zip(bars, attempts, heights, strict=True):
        if a.get("verdict") == "oom" and height:
            # An OOM's figure is a lower bound (what was held plus the allocation that failed),
            # not a peak: hatched, marked ">=", so it never reads as a measured height.
            bar.set_hatch("///")
            bar.set_edgecolor("white")
            ax.annotate(f">={height:.0f}", (bar.get_x() + bar.get_width() / 2, height),
                        ha="center", va="bottom", fontsize=6, gid="at-least")
    predicted = [(x, a["predicted_mib"]) for x, a in zip(xs, attempts, strict=True)
                 if a.get("predicted_mib")]
    if predicted:
        ax.plot([p[0] for p in predicted], [p[1] for p in predicted], linestyle="none",
                marker="_", markersize=22, markeredgewidth=2.5, color="black", gid="predicted")
    device = data.get("device_mib")
    if device:
        ax.axhline(device, color="black", linestyle="--", linewidth=1, gid="device")
    ax.set_xticks(xs, [_label(a) for a in attempts], fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("MiB host memory, resident peak" if host_only(data)
                  else "MiB (peak; an OOM, hatched: at least)")
    ax.set_title(f"run {data.get('run_id')}: memory per attempt", fontsize=10)
    seen = []
    for a in attempts:
        verdict = str(a.get("verdict"))
        if verdict not in seen:
            seen.append(verdict)
    handles: list[Any] = [
        Patch(facecolor=VERDICT_COLOURS.get(v, "#9e9e9e"), edgecolor="white",
              hatch="///" if v == "oom" else None,
              label="oom (at least)" if v == "oom" else v) for v in seen]
    if predicted:
        handles.append(Line2D([], [], linestyle="none", marker="_", markersize=12,
                              markeredgewidth=2.5, color="black", label="predicted"))
    if device:
        handles.append(Line2D([], [], color="black", linestyle="--",
                              label=f"device {device:g} MiB"))
    ax.legend(handles=handles, fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig


def _label(attempt: Mapping[str, Any]) -> str:
    """An x label: the attempt, its rung and the config it ran (four "smaller-batch" rungs
    differ only there)."""
    head = f"{attempt['attempt']} {attempt.get('rung') or 'as given'}"
    config = attempt.get("config")
    return f"{head}\n{config}" if config else head


def write(path: Path, data: Mapping[str, Any]) -> Path | None:
    """Save memory.png (atomically); None when matplotlib is missing, nothing ran yet, or no
    attempt has a figure to draw (why_not says which)."""
    if not data.get("attempts") or not available():
        return None
    if not any(bar_height(a) for a in data["attempts"]):
        return None
    return _save(figure(data), path)


def _save(fig: Any, path: Path) -> Path:  # noqa: ANN401 - a matplotlib Figure (optional)
    """Write the picture whole or not at all; a full disk or a vanished folder is one line."""
    again = f"then `oom-supervisor report {path.parent}` draws it again"
    with writing(path, then=again) as tmp:
        fig.savefig(tmp)
    return path


TIME_COLOURS: Mapping[str, str] = {
    "kept": "#2e7d32", "startup": "#90a4ae", "oom": "#c62828", "retrained": "#f9a825",
    "hang": "#ef6c00", "failed": "#6a1b9a", "backoff": "#8d6e63", "gpu_wait": "#0277bd",
    "down": "#212121", "prediction": "#7e57c2", "interrupted": "#757575",
    "supervisor": "#bdbdbd", "running": "#1565c0", "compared": "#00838f",
}
"""Segment colour per cause in goodput.png."""


def time_figure(data: Mapping[str, Any]) -> Any:  # noqa: ANN401 - a matplotlib Figure (optional)
    """goodput.png: the run's wall time as one bar, training kept first, then badput by cause."""
    import matplotlib as mpl  # noqa: PLC0415

    mpl.use("Agg")
    from matplotlib.figure import Figure  # noqa: PLC0415

    good = data["goodput"]
    parts = [("kept", "training kept", float(good["productive_s"]))]
    labels = dict(good.get("labels") or {})
    parts += [(cause, labels.get(cause, cause), float(seconds))
              for cause, seconds in good["badput_s"].items() if seconds > 0]
    wall = float(good["wall_s"]) or 1.0
    fig = Figure(figsize=(8, 3.2), dpi=100)
    ax = fig.add_subplot()
    left = 0.0
    for cause, label, seconds in parts:
        share = 100 * seconds / wall
        ax.barh([0], [share], left=left, color=TIME_COLOURS.get(cause, "#9e9e9e"),
                label=f"{label} ({share:.1f} %)", gid=cause)
        left += share
    ax.set_xlim(0, 100)
    ax.set_yticks([])
    ax.set_xlabel("% of the run's wall time")
    ax.set_title(f"run {data.get('run_id')}: goodput {100 * float(good['goodput']):.1f} %",
                 fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=3)
    fig.subplots_adjust(left=0.03, right=0.97, top=0.88, bottom=0.5)
    return fig


def write_time(path: Path, data: Mapping[str, Any]) -> Path | None:
    """Save goodput.png (atomically); None without matplotlib or with no time to show."""
    good = data.get("goodput")
    if not good or not good.get("wall_s") or not available():
        return None
    return _save(time_figure(data), path)


def drawable(data: Mapping[str, Any]) -> tuple[bool, bool]:
    """Whether write and write_time would draw memory.png and goodput.png for `data`."""
    memory = bool(data.get("attempts")) and available() and any(
        bar_height(a) for a in data["attempts"])
    good = data.get("goodput")
    return memory, bool(good and good.get("wall_s") and available())


def draw_later(run_dir: Path) -> subprocess.Popen[bytes] | None:
    """Draw the run's pictures from its report.json in a child of its own session, not waited
    for: the run's exit code does not wait on matplotlib (about 1 s of import and drawing).
    None where the child cannot start (the pictures are then missing, said by `report`)."""
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    try:
        return subprocess.Popen(  # noqa: S603 - our own module, this interpreter
            [sys.executable, "-m", "supervisor.plot", str(run_dir)], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
            start_new_session=True)
    except OSError:
        return None


def main(argv: list[str]) -> int:
    """`python -m supervisor.plot RUN_DIR`: memory.png and goodput.png from report.json."""
    if len(argv) != 1:
        print("usage: python -m supervisor.plot RUN_DIR", file=sys.stderr)  # noqa: T201
        return 2
    run_dir = Path(argv[0])
    try:
        data = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        print(f"cannot read {run_dir / 'report.json'}: {error}", file=sys.stderr)  # noqa: T201
        return 1
    write(run_dir / "memory.png", data)
    write_time(run_dir / "goodput.png", data)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
