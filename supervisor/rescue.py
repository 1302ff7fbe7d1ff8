"""The rescue checkpoint, seen from the supervisor: arm the injected hook, read what it did.

In Hugging Face Trainer programs the injected hook (`_inject/rescue.py`, loaded by the injected
sitecustomize) saves a checkpoint at the last completed optimizer step when the step dies of an
out-of-memory error, and saves then stops at the next step end when the supervisor asks for a
polite stop (it creates the attempt's `rescue.request` file). This module builds the hook's
environment, reads its `oom-supervisor.rescue {json}` lines out of an attempt's output, and says
how long a polite stop may take in this run: the time a save took here, plus one step.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from supervisor.device_memory import with_inject_path

ENV_VAR = "OOM_SUPERVISOR_RESCUE"
"""What the injected hook reads: `{"oom": bool, "error": bool, "stop_file": path or null}`
(JSON)."""
MARK = "oom-supervisor.rescue"
"""Start of each line the hook writes to stderr."""
STOP_FILE = "rescue.request"
"""Created in the attempt's folder to ask its trainer to save at the next step end and stop."""
STOPPED_EXIT = 143
"""The hook's exit status after a save the supervisor asked for (128 + SIGTERM)."""
UNMEASURED_GRACE_S = 120.0
"""A polite stop's wait before any save of this run was measured ([rescue] stop_grace_s)."""
MARGIN = 1.5
"""The measured save and step are stretched by this much, plus MARGIN_S: a loaded machine."""
MARGIN_S = 10.0
MAX_GRACE_S = 1800.0
"""The longest a polite stop waits for a save, whatever was measured (a folder rewritten long
after its save would say hours; a trainer that never reaches its step end must not hold the
stop that long: a second Ctrl-C cuts any wait short)."""
JIT_WAIT_S = 3.0
"""transformers' just-in-time checkpointing waits this long after SIGTERM before it asks for the
save (trainer_jit_checkpoint.CheckpointManager's kill_wait)."""
JIT_KEY = "enable_jit_checkpoint"
_TRUE = frozenset({"true", "1", "yes", "y", "on"})
_CONFIG_SUFFIXES = (".yaml", ".yml", ".json")

_CHECKPOINT = re.compile(r"^checkpoint-[1-9]\d*$")
_LINE = re.compile(re.escape(MARK) + r" (\{[^{}]*\})")


def inject(env: Mapping[str, str], *, oom: bool, stop_file: Path | None,
           error: bool = False) -> dict[str, str]:
    """`env` with the injected sitecustomize on PYTHONPATH and the hook armed as asked."""
    out = with_inject_path(env)
    out[ENV_VAR] = json.dumps({"oom": oom, "error": error,
                               "stop_file": str(stop_file) if stop_file else None})
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class Saved:
    """One rescue the hook made (or tried): why, at which step, how long it took."""

    why: str
    """`oom` (the step died of an out-of-memory error), `error` (another error at a step
    boundary) or `stop` (a polite stop)."""
    step: int
    seconds: float | None = None
    checkpoint: str | None = None
    error: str | None = None
    """Why the save failed (then no folder was left), None when it was saved."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Report:
    """What the hook said in one attempt's output."""

    armed: bool = False
    """A Trainer's train() ran with the hook in place (world size 1)."""
    off: str | None = None
    """Why the hook stayed off in a process (several ranks), if it did."""
    saved: tuple[Saved, ...] = ()
    failed: tuple[Saved, ...] = ()
    skipped: tuple[str, ...] = ()
    """Rescues not needed or not possible, in words (a checkpoint already at that step)."""


def read(lines: Iterable[str]) -> Report:
    """The hook's lines in an attempt's output (any launcher prefix allowed)."""
    armed = False
    off: str | None = None
    saved: list[Saved] = []
    failed: list[Saved] = []
    skipped: list[str] = []
    for line in lines:
        if MARK not in line:
            continue
        for payload in _LINE.findall(line):
            try:
                data = json.loads(payload)
            except ValueError:
                continue  # a torn line says nothing reliable
            if not isinstance(data, dict):
                continue
            event = data.get("event")
            if event == "armed":
                armed = True
            elif event == "off":
                off = str(data.get("reason") or "the hook could not be armed")
            elif event in ("saved", "failed"):
                record = _saved(data)
                if record is not None:
                    (saved if event == "saved" else failed).append(record)
            elif event == "skipped":
                skipped.append(f"step {data.get('step')}: {data.get('reason')}")
    return Report(armed=armed, off=off, saved=tuple(saved), failed=tuple(failed),
                  skipped=tuple(skipped))


def _saved(data: Mapping[str, object]) -> Saved | None:
    step, seconds = data.get("step"), data.get("seconds")
    if not isinstance(step, int) or isinstance(step, bool):
        return None
    return Saved(why=str(data.get("why") or "oom"), step=step,
                 seconds=float(seconds) if isinstance(seconds, int | float) else None,
                 checkpoint=str(data["checkpoint"]) if data.get("checkpoint") else None,
                 error=str(data["error"]) if data.get("error") else None)


def is_armed_line(chunk: bytes) -> bool:
    """A chunk of output holds the hook's `armed` line (cheap: the runner asks of every chunk)."""
    return MARK.encode() in chunk and b'"armed"' in chunk


def save_seconds(folders: Iterable[Path]) -> float | None:
    """How long the slowest of these checkpoint folders took to write, from its files' times.

    The Trainer writes a checkpoint's files one after the other (config, weights, optimizer,
    scheduler, RNG, `trainer_state.json` last): the span of their modification times is the
    save, give or take the first file's own write. None: no folder with two files.
    """
    worst: float | None = None
    for folder in folders:
        times: list[float] = []
        with contextlib.suppress(OSError):
            for item in folder.iterdir():
                with contextlib.suppress(OSError):
                    if item.is_file():
                        times.append(item.stat().st_mtime)
        if len(times) >= 2:  # noqa: PLR2004 - two writes make one span
            span = max(times) - min(times)
            worst = span if worst is None else max(worst, span)
    return worst


def recent_save_seconds(output_dir: Path | None, since: float) -> float | None:
    """save_seconds of the `checkpoint-N` folders in `output_dir` written since `since` (the
    attempt's own saves, before the journal credits them)."""
    if output_dir is None:
        return None
    recent: list[Path] = []
    with contextlib.suppress(OSError):
        for entry in output_dir.iterdir():
            with contextlib.suppress(OSError):
                if (_CHECKPOINT.match(entry.name) and entry.is_dir()
                        and entry.stat().st_mtime >= since):
                    recent.append(entry)
    return save_seconds(recent)


def stop_grace_s(save_s: float | None, step_s: float | None, *,
                 unmeasured_s: float = UNMEASURED_GRACE_S) -> float:
    """How long a trainer asked to save and stop may take: a save of this run plus one step.

    Both stretched by MARGIN (+ MARGIN_S); a save never measured in this run waits
    `unmeasured_s` (the wait ends as soon as the trainer exits, so a long one costs nothing
    when the trainer does as asked).
    """
    if save_s is None:
        return unmeasured_s
    return min(MAX_GRACE_S, MARGIN * (save_s + (step_s or 0.0)) + MARGIN_S)


def step_seconds(samples: Sequence[Sequence[float]] | None) -> float | None:
    """Seconds per step from the trainer's own progress samples [[step, wall time], ...]."""
    if not samples or len(samples) < 2:  # noqa: PLR2004 - two points make one interval
        return None
    (s0, t0), (s1, t1) = samples[0][:2], samples[-1][:2]
    if s1 <= s0 or t1 <= t0:
        return None
    return (t1 - t0) / (s1 - s0)


def jit_enabled(argv: Sequence[str], cwd: str | None) -> bool:
    """The command turns on transformers' just-in-time checkpointing (`--enable_jit_checkpoint`,
    a `key=value` override, or the key in a YAML/JSON config file it names): on SIGTERM such a
    trainer saves at its next step boundary, after JIT_WAIT_S."""
    for index, word in enumerate(argv):
        name, eq, value = word.partition("=")
        if name.lstrip("-").replace("-", "_") != JIT_KEY or not (eq or name.startswith("--")):
            continue
        if not eq:
            following = argv[index + 1] if index + 1 < len(argv) else ""
            value = following if following and not following.startswith("-") else "true"
        return value.strip().lower() in _TRUE
    return any(_config_says_jit(word, cwd) for word in argv if word.endswith(_CONFIG_SUFFIXES))


def _config_says_jit(word: str, cwd: str | None) -> bool:
    path = Path(word)
    if not path.is_absolute() and cwd:
        path = Path(cwd) / path
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    if JIT_KEY not in text:
        return False  # the cheap answer for nearly every config
    data: object = None
    with contextlib.suppress(Exception):  # a config the program itself will complain about
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            from ruamel.yaml import YAML  # noqa: PLC0415 - only configs that name the key

            data = YAML(typ="safe").load(text)
    if not isinstance(data, Mapping):
        return False
    value = data.get(JIT_KEY)
    return value is True or str(value).strip().lower() in _TRUE
