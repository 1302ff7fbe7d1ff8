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


def limit_line(data: Mapping[str, Any]) -> tuple[float, str] | None:
    """The run's known memory limit and what it is: the simulated device (`--device-memory`),
    the GPU's capacity, or the host cap the command sets (`prlimit --as`); None: none known."""
    device = data.get("device_mib")
    source = str(data.get("device_source") or "")
    if device:
        if source == "--device-memory":
            return float(device), f"simulated device {device:g} MiB (--device-memory)"
        if source == "nvml":
            return float(device), f"GPU capacity {device:g} MiB"
        return float(device), f"device {device:g} MiB ({source or 'as given'})"
    cap = data.get("host_cap_mib")
    if cap:
        return float(cap), f"host cap {cap:.0f} MiB (prlimit --as, address space)"
    # What the attempts ran under, as the runner read it from their processes.
    seen = [(float(a["host_cap_mib"]), str(a.get("host_cap_source")))
            for a in data.get("attempts", []) if a.get("host_cap_mib")]
    if seen:
        mib, source = min(seen)
        what = "address space" if source == "RLIMIT_AS" else "resident memory"
        return mib, f"host cap {mib:.0f} MiB ({source}, {what})"
    return None


def _dominates(small: Mapping[str, Any], big: Mapping[str, Any]) -> bool:
    """`small` needs no more memory than `big` by construction: every memory knob the same or
    lower (batch, cutoff, rank; checkpointing, quantisation, ZeRO the same or more)."""
    def at_most(key: str) -> bool:
        a, b = small.get(key), big.get(key)
        return a == b or (a is not None and b is not None and a <= b)

    def at_least(key: str) -> bool:
        return bool(small.get(key) or 0) >= bool(big.get(key) or 0) if isinstance(
            small.get(key), bool) else (small.get(key) or 0) >= (big.get(key) or 0)

    method_small, method_big = small.get("finetuning_type"), big.get("finetuning_type")
    same_method = method_big in (method_small, "full")
    bits_small, bits_big = small.get("quantization_bit"), big.get("quantization_bit")
    bits_ok = bits_small == bits_big or (bits_small is not None
                                         and (bits_big is None or bits_small <= bits_big))
    return (same_method and bits_ok and at_most("per_device_batch") and at_most("cutoff_len")
            and (method_small != "lora" or method_big != "lora" or at_most("lora_rank"))
            and at_least("gradient_checkpointing") and at_least("deepspeed_stage")
            and at_least("deepspeed_offload") and small.get("precision") == big.get("precision")
            and small.get("model") == big.get("model"))


def oom_bar(row: Mapping[str, Any], attempts: list[Mapping[str, Any]],
            limit: tuple[float, str] | None) -> tuple[float, str]:
    """An OOM's bar: (height, what it is). Its own figure (at least this much) unless a config
    that needs no more memory fitted higher: then its prediction, else the limit, else that
    fit's peak, each said (an OOM is never drawn below a smaller config that fitted)."""
    own = bar_height(row)
    knobs = row.get("knobs") or {}
    fits = [(float(a.get("peak_mib") or a.get("host_peak_mib") or 0.0), int(a["attempt"]))
            for a in attempts if a.get("verdict") == "fits" and a is not row
            and _dominates(a.get("knobs") or {}, knobs)]
    floor, by = max(fits, default=(0.0, 0))
    if own >= floor:
        return own, "its own figure"
    predicted = float(row.get("predicted_mib") or 0.0)
    if predicted > floor:
        return predicted, "predicted"
    if limit is not None and limit[0] > floor:
        return limit[0], "the limit"
    return floor, f"as attempt {by}, a smaller config that fitted"


def figure(data: Mapping[str, Any]) -> Any:  # noqa: ANN401 - a matplotlib Figure (optional)
    """The figure: one bar per attempt (an OOM hatched and open-ended: at least), each with its
    value, predicted peaks as markers, the run's known limit as a labelled line."""
    import matplotlib as mpl  # noqa: PLC0415

    mpl.use("Agg")  # never a window: this runs unattended
    from matplotlib.figure import Figure  # noqa: PLC0415
    from matplotlib.lines import Line2D  # noqa: PLC0415
    from matplotlib.patches import Patch  # noqa: PLC0415

    attempts = list(data.get("attempts", []))
    limit = limit_line(data)
    fig = Figure(figsize=(max(7.0, 0.8 * len(attempts) + 4.5), 4.8), dpi=100)
    ax = fig.add_subplot()
    xs = list(range(len(attempts)))
    drawn = [oom_bar(a, attempts, limit) if a.get("verdict") == "oom"
             else (bar_height(a), "measured") for a in attempts]
    heights = [h for h, _ in drawn]
    colours = [VERDICT_COLOURS.get(str(a.get("verdict")), "#9e9e9e") for a in attempts]
    bars = ax.bar(xs, heights, color=colours, gid="attempts")
    for bar, a, (height, what) in zip(bars, attempts, drawn, strict=True):
        x = bar.get_x() + bar.get_width() / 2
        if a.get("verdict") == "oom" and height:
            # At least: hatched, an arrow up from its top, the value marked ">=".
            bar.set_hatch("///")
            bar.set_edgecolor("white")
            ax.annotate("", xy=(x, height * 1.12), xytext=(x, height), gid="open-ended",
                        arrowprops={"arrowstyle": "->", "color": VERDICT_COLOURS["oom"]})
            said = "" if what == "its own figure" else f"\n({what})"
            ax.annotate(f">={height:.0f}{said}", (x, height * 1.12), ha="center",
                        va="bottom", fontsize=6, gid="at-least")
        elif height:
            ax.annotate(f"{height:.1f}", (x, height), ha="center", va="bottom", fontsize=7,
                        gid="value")
    predicted = [(x, a["predicted_mib"]) for x, a in zip(xs, attempts, strict=True)
                 if a.get("predicted_mib")]
    if predicted:
        ax.plot([p[0] for p in predicted], [p[1] for p in predicted], linestyle="none",
                marker="_", markersize=22, markeredgewidth=2.5, color="black", gid="predicted")
    if limit is not None:
        ax.axhline(limit[0], color="black", linestyle="--", linewidth=1, gid="device",
                   label=limit[1])
    top = max([*heights, limit[0] if limit else 0.0, *(p[1] for p in predicted), 1.0])
    ax.set_ylim(0, top * 1.3)
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
    if limit is not None:
        handles.append(Line2D([], [], color="black", linestyle="--", label=limit[1]))
    else:
        handles.append(Line2D([], [], color="none", label="no known memory limit"))
    # Beside the plot, never over a bar.
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              borderaxespad=0.0)
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
    "kept": "#2e7d32", "startup": "#4dd0e1", "oom": "#c62828", "retrained": "#f9a825",
    "hang": "#ef6c00", "failed": "#6a1b9a", "backoff": "#8d6e63", "gpu_wait": "#0277bd",
    "down": "#212121", "prediction": "#7e57c2", "interrupted": "#757575",
    "supervisor": "#ffb74d", "running": "#1565c0", "compared": "#00838f",
}
"""Segment colour per cause in goodput.png (start-up and the supervisor's time told apart)."""

_ORDER = ("startup", "kept", "retrained", "compared", "oom", "failed", "hang", "interrupted",
          "running", "gpu_wait")
"""Within an attempt's lane: start-up first, then training, then how it ended."""


def time_segments(data: Mapping[str, Any]) -> list[tuple[str, float, float, str]]:
    """goodput.png's segments in time order: (lane, start s, seconds, cause). One lane per
    attempt ("attempt N"); the time between attempts on a lane of its own ("between")."""
    good = data["goodput"]
    out: list[tuple[str, float, float, str]] = []
    previous_end = 0.0
    for a in good.get("attempts") or ():
        start, end = float(a["start_s"]), float(a["end_s"])
        if start - previous_end > 0.05:  # noqa: PLR2004 - below that nothing shows
            gap = "prediction" if previous_end == 0.0 and float(
                good["badput_s"].get("prediction", 0.0)) > 0 else "supervisor"
            out.append(("between", previous_end, start - previous_end, gap))
        lane = f"attempt {a['attempt']}"
        parts = {"kept": float(a.get("productive_s") or 0.0),
                 **{k: float(v) for k, v in (a.get("badput_s") or {}).items()}}
        at = start
        for cause in sorted(parts, key=lambda c: _ORDER.index(c) if c in _ORDER else 99):
            seconds = parts[cause]
            if seconds > 0:
                out.append((lane, at, seconds, cause))
                at += seconds
        previous_end = max(previous_end, end)
    wall = float(good.get("wall_s") or 0.0)
    if wall - previous_end > 0.05:  # noqa: PLR2004
        out.append(("between", previous_end, wall - previous_end, "supervisor"))
    return out


def time_figure(data: Mapping[str, Any]) -> Any:  # noqa: ANN401 - a matplotlib Figure (optional)
    """goodput.png: the run's wall time in time order, one lane per attempt (start-up, training
    kept, lost, how it ended) and a lane for the time between attempts, each cause named."""
    import matplotlib as mpl  # noqa: PLC0415

    mpl.use("Agg")
    from matplotlib.figure import Figure  # noqa: PLC0415
    from matplotlib.patches import Patch  # noqa: PLC0415

    good = data["goodput"]
    labels = {**dict(good.get("labels") or {}), "kept": "training kept",
              "supervisor": "between attempts (the supervisor)"}
    segments = time_segments(data)
    lanes = list(dict.fromkeys(lane for lane, _, _, _ in segments))
    lanes = [*(lane for lane in lanes if lane == "between"),
             *(lane for lane in lanes if lane != "between")]
    fig = Figure(figsize=(9, max(2.8, 0.42 * len(lanes) + 1.9)), dpi=100)
    ax = fig.add_subplot()
    totals: dict[str, float] = {}
    for lane, start, seconds, cause in segments:
        y = len(lanes) - 1 - lanes.index(lane)
        ax.barh([y], [seconds], left=start, color=TIME_COLOURS.get(cause, "#9e9e9e"),
                edgecolor="white", linewidth=0.5, gid=f"{lane}:{cause}")
        totals[cause] = totals.get(cause, 0.0) + seconds
    ax.set_yticks(range(len(lanes)), [lane.replace("between", "between attempts")
                                      for lane in reversed(lanes)], fontsize=7)
    ax.set_xlim(0, max(float(good.get("wall_s") or 0.0), 1.0))
    ax.set_xlabel("seconds from the run's start")
    ax.set_title(f"run {data.get('run_id')}: goodput {100 * float(good['goodput']):.1f} % "
                 "(in time order)", fontsize=10)
    wall = float(good.get("wall_s") or 0.0) or 1.0
    handles = [Patch(facecolor=TIME_COLOURS.get(c, "#9e9e9e"),
                     label=f"{labels.get(c, c)} ({100 * s / wall:.1f} %)")
               for c, s in sorted(totals.items(), key=lambda kv: -kv[1])]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              borderaxespad=0.0)
    fig.tight_layout()
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
    None where the child cannot start (the pictures are then missing, said by `report`).

    A daemon thread waits on the child, so a caller that drops the Popen (the CLI does) leaves
    no zombie and no un-waited Popen behind, and the exit still does not wait for it."""
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    try:
        child = subprocess.Popen(  # noqa: S603 - our own module, this interpreter
            [sys.executable, "-m", "supervisor.plot", str(run_dir)], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
            start_new_session=True)
    except OSError:
        return None
    threading.Thread(target=child.wait, daemon=True, name="plot-reaper").start()
    return child


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
