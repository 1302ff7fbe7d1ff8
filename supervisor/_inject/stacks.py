"""Where a Python trainer's main thread is: sampled by a small daemon thread, for the watchdog.

Loaded by the injected sitecustomize when OOM_SUPERVISOR_STACKS names a folder. Every
OOM_SUPERVISOR_STACKS_S seconds (2 by default) it reads the main thread's innermost frames
(`sys._current_frames()`); when they are somewhere they have not been in the last few samples,
it writes them to `<folder>/<pid>.json` (atomically: a temporary file renamed). So the file's
`moved_at` says when the thread last went somewhere new: a loop that runs is seen moving, a
thread parked in a collective, a lock or a read is seen staying. Nothing is ever written to the
program's stdout or stderr, and nothing here imports beyond the standard library.
"""

from __future__ import annotations

import json
import linecache
import os
import sys
import threading
import time
from collections import deque

FOLDER_ENV = "OOM_SUPERVISOR_STACKS"
INTERVAL_ENV = "OOM_SUPERVISOR_STACKS_S"
_DEPTH = 8
"""Innermost frames kept: enough to name the phase (evaluation_loop) above the call it is in."""
_RECENT = 32
"""A position among the last this many new ones is not a move: a loop that cycles through a
few lines (a monitor polling, a display redrawing) stays where it is; a model's forward, a
tokeniser, an evaluation goes through far more."""


def _frames(frame: object, depth: int) -> list[list[object]]:
    out: list[list[object]] = []
    while frame is not None and len(out) < depth:
        code = frame.f_code  # type: ignore[attr-defined]
        line = frame.f_lineno  # type: ignore[attr-defined]
        out.append([code.co_filename, line, code.co_name])
        frame = frame.f_back  # type: ignore[attr-defined]
    out.reverse()  # innermost last
    return out


def _sample_forever(folder: str, interval_s: float) -> None:
    main = threading.main_thread().ident
    pid = os.getpid()
    path = os.path.join(folder, f"{pid}.json")  # noqa: PTH118 - os.path is cheap at start-up
    recent: deque[tuple[object, ...]] = deque(maxlen=_RECENT)
    frame = None
    written: tuple[object, ...] | None = None
    moved_at = time.time()
    time.sleep(interval_s)
    if sys.argv and sys.argv[0].endswith("_wrap.py"):
        return  # the supervisor's own shim: it carries the environment, not the training
    while True:
        try:
            frame = sys._current_frames().get(main or 0)  # noqa: SLF001 - the documented way
            if frame is None:
                return  # the main thread has ended
            frames = _frames(frame, _DEPTH)
            frame = None  # never keep a frame (and all it references) alive between samples
            where = tuple((f[0], f[1]) for f in frames)
            now = time.time()
            if where != written:
                # Somewhere new moves `moved_at`; back to a recent place (a collective the
                # loop went through before, where it now stays) only rewrites where it is.
                if where not in recent:
                    recent.append(where)
                    moved_at = now
                written = where
                innermost = frames[-1] if frames else None
                if innermost is not None:
                    text = linecache.getline(str(innermost[0]), int(innermost[1]))  # type: ignore[call-overload]
                    innermost.append(text.split("  #", 1)[0].strip()[:200])
                record = {"pid": pid, "moved_at": moved_at, "sampled_at": now, "frames": frames,
                          "argv0": (sys.argv[0] if sys.argv else "")[-200:]}
                temporary = f"{path}.tmp"
                with open(temporary, "w", encoding="utf-8") as handle:  # noqa: PTH123
                    json.dump(record, handle)
                os.replace(temporary, path)  # noqa: PTH105
        except Exception:  # noqa: BLE001 - never disturb the program being watched
            frame = None
        time.sleep(interval_s)


def start() -> None:
    """Start the sampler thread when the environment asks for it (once per process)."""
    folder = os.environ.get(FOLDER_ENV)
    if not folder:
        return
    try:
        interval_s = max(0.2, float(os.environ.get(INTERVAL_ENV, "2") or 2))
        os.makedirs(folder, exist_ok=True)  # noqa: PTH103
    except (ValueError, OSError):
        return
    thread = threading.Thread(target=_sample_forever, args=(folder, interval_s),
                              name="oom-supervisor-stacks", daemon=True)
    thread.start()
