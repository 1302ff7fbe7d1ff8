"""Remembered fits: the config that fitted, keyed by what decides memory, kept in SQLite.

The second run of the same command on the same card starts where the first one ended. The store
is one SQLite file (the standard library's sqlite3, WAL mode, a busy timeout), so several
supervisors may read and write it at once. See docs/fits.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import sqlite3
import textwrap
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from supervisor._compat import Self
from supervisor.bounds import MAX_MIB, sane_mib

SCHEMA_VERSION = 1
"""`PRAGMA user_version` of the store this code writes."""

KEY_VERSION = 1
"""Part of every key: a change to what a key covers must not match keys made before it."""

BUSY_TIMEOUT_S = 30.0
"""How long a write waits for another process's write before giving up."""

_COLUMNS = ("key", "knobs", "run_id", "summary", "created_at", "updated_at")
_SELECT = "SELECT key, knobs, run_id, summary, created_at, updated_at FROM fits"
_RUN_WIDTH = 22
_SCHEMA = """
CREATE TABLE IF NOT EXISTS fits (
    key TEXT PRIMARY KEY,
    knobs TEXT NOT NULL,
    run_id TEXT NOT NULL,
    summary TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
)
"""
_TRACES = """
CREATE TABLE IF NOT EXISTS traces (
    key TEXT PRIMARY KEY,
    prediction TEXT NOT NULL,
    created_at REAL NOT NULL
)
"""
"""Memory predictions of traced configs, reused across runs (estimate.TraceStore)."""
_HEX = re.compile(r"[0-9a-f]+")


class FitStoreError(Exception):
    """The fit store cannot be opened, read or written; the message says which file and why."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Fit:
    """One remembered fit: the knobs that fitted under a key, and which run found them."""

    key: str
    knobs: Mapping[str, object] = field(default_factory=dict)
    run_id: str
    summary: Mapping[str, object] = field(default_factory=dict)
    created_at: float
    """Unix seconds when this key was first remembered."""
    updated_at: float
    """Unix seconds of the last `remember` under this key."""

    def about(self, name: str) -> str | None:
        """What the summary says of the run that found it (`model`, `program`, `cwd`,
        `run_dir`); None for a fit remembered before these were kept."""
        value = self.summary.get(name)
        return value if isinstance(value, str) and value else None


def default_path() -> Path:
    """$XDG_DATA_HOME (or ~/.local/share)/oom-supervisor/fits.sqlite3."""
    base = os.environ.get("XDG_DATA_HOME") or ""
    root = Path(base) if Path(base).is_absolute() else Path.home() / ".local" / "share"
    return root / "oom-supervisor" / "fits.sqlite3"


def fit_key(*, model_config: Mapping[str, object] | None, model: str | None,  # noqa: PLR0913
            device_name: str | None, device_total_mib: float | None, dialect: str,
            start_knobs: Mapping[str, object], policy: str) -> str:
    """A stable sha256 (hex) of everything that decides whether a config fits.

    Args:
        model_config: the model's config.json; preferred over `model` (a path or hub name
            says less: the same weights live under many paths). Keys starting with `_`
            (`_name_or_path`, `_commit_hash`) are left out: they name, they do not size.
        model: the model's name or path, used only when there is no config.
        device_name: the card's name (NVML's), or None for a simulated device.
        device_total_mib: its total memory (or the simulated size), rounded to whole MiB.
        dialect: the dialect that read the command.
        start_knobs: the knobs as the command gave them, before any rung changed them.
        policy: the policy's identity; pass a digest of its content so an edit changes it.
    """
    if model_config is not None:
        model_part: object = {"config": {k: v for k, v in model_config.items()
                                         if not str(k).startswith("_")}}
    else:
        model_part = {"name": model}
    total = None if device_total_mib is None else round(device_total_mib)
    document = {"v": KEY_VERSION, "model": model_part,
                "device": {"name": device_name, "total_mib": total},
                "dialect": dialect, "start": dict(start_knobs), "policy": policy}
    return hashlib.sha256(_canonical(document).encode("utf-8")).hexdigest()


def trace_problem(value: object) -> str | None:
    """What is wrong with a kept prediction (`peak_mib`, `raw_peak_mib`, the breakdown's
    numbers), in words; None when every number in it is sane."""
    if not isinstance(value, dict):
        return "not a JSON object"
    if set(value) == {"failed"} and isinstance(value["failed"], str):
        return None  # a trace that failed, kept so that it is not tried again
    peak = value.get("peak_mib")
    if sane_mib(peak) is None:
        return f"not a usable number of MiB (peak {str(peak)[:40]})"
    raw = value.get("raw_peak_mib")
    if raw is not None and sane_mib(raw) is None:
        return f"not a usable number of MiB (uncalibrated peak {str(raw)[:40]})"
    breakdown = value.get("breakdown")
    if breakdown is not None and not isinstance(breakdown, dict):
        return "holding a breakdown that is not a JSON object"
    for part, number in (breakdown or {}).items():
        if isinstance(number, float) and not (math.isfinite(number) and abs(number) < MAX_MIB):
            return f"holding no usable number for {str(part)[:40]} ({number})"
    if not isinstance(value.get("method"), str):
        return "holding no method"
    return None


def _canonical(value: object) -> str:
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                          allow_nan=False)
    except (TypeError, ValueError) as exc:
        msg = f"a fit key must be plain JSON data (str, number, bool, None, list, dict): {exc}"
        raise ValueError(msg) from None


class FitStore:
    """The SQLite file of remembered fits; open with `FitStore.open(path)`, close when done."""

    def __init__(self, path: Path, connection: sqlite3.Connection,
                 clock: Callable[[], float]) -> None:
        self.path = path
        self._db = connection
        self._clock = clock
        self.on_dropped: Callable[[str], None] | None = None
        """Told, in one line, of each kept prediction dropped for holding no sane number."""

    @classmethod
    def open_for_reading(cls, path: Path | str) -> Self:
        """Open the store to read it; one that cannot be written (a read-only mount, a file
        of another user) is read as it is, without locking or creating anything."""
        try:
            return cls.open(path)
        except FitStoreError as exc:
            path = Path(path).expanduser()
            if not path.is_file():
                raise
            try:
                db = sqlite3.connect(f"{path.resolve().as_uri()}?immutable=1", uri=True,
                                     isolation_level=None)
            except sqlite3.Error:
                raise exc from None
            store = cls(path, db, time.time)
            try:
                with store._guard():
                    store._check_columns()
            except FitStoreError:
                db.close()
                raise exc from None
            return store

    @classmethod
    def open(cls, path: Path | str, *, clock: Callable[[], float] = time.time) -> Self:
        """Open (creating it and its folder if needed) the store at `path`."""
        path = Path(path).expanduser()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            msg = (f"cannot create the folder of the fit store {path}: {exc.strerror or exc}; "
                   f"pass --fits-db with a writable path, or --fresh to run without it")
            raise FitStoreError(msg) from None
        if path.is_dir():
            msg = f"the fit store {path} is a folder; pass --fits-db with a file path"
            raise FitStoreError(msg)
        try:
            db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        except sqlite3.Error as exc:
            raise _error(path, exc) from None
        store = cls(path, db, clock)
        try:
            store._prepare()
        except FitStoreError:
            db.close()
            raise
        return store

    def _prepare(self) -> None:
        with self._guard():
            self._db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                msg = (f"the fit store {self.path} cannot use SQLite's WAL mode (got {mode!r}); "
                       f"concurrent runs could not share it. Put it on a local disk with "
                       f"--fits-db, or use --fresh")
                raise FitStoreError(msg)
            self._db.execute("PRAGMA synchronous = NORMAL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                msg = (f"the fit store {self.path} was written by a newer oom-supervisor "
                       f"(schema {version}, this one knows {SCHEMA_VERSION}); upgrade, or pass "
                       f"--fits-db with another file")
                raise FitStoreError(msg)
            with self._write():
                self._db.execute(_SCHEMA)
                self._db.execute(_TRACES)
                if version < SCHEMA_VERSION:
                    self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self._check_columns()

    def _check_columns(self) -> None:
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(fits)")}
        if not set(_COLUMNS) <= columns:
            msg = (f"{self.path} has a `fits` table that is not oom-supervisor's (columns "
                   f"{sorted(columns)}); pass --fits-db with another file")
            raise FitStoreError(msg)

    def close(self) -> None:
        """Close the connection (the WAL is checkpointed by SQLite as it sees fit)."""
        self._db.close()

    def __enter__(self) -> Self:
        """The store itself, closed on leaving the block."""
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        """Close the store."""
        self.close()

    def lookup(self, key: str) -> Fit | None:
        """The fit remembered under `key`, or None."""
        with self._guard():
            row = self._db.execute(f"{_SELECT} WHERE key = ?", (key,)).fetchone()
        return None if row is None else self._fit(row)

    def remember(self, key: str, *, knobs: Mapping[str, object], run_id: str,
                 summary: Mapping[str, object]) -> Fit:
        """Record (or replace) the fit under `key`; returns it as stored."""
        now = self._clock()
        knobs_json, summary_json = _canonical(dict(knobs)), _canonical(dict(summary))
        with self._guard(), self._write():
            self._db.execute(
                "INSERT INTO fits (key, knobs, run_id, summary, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(key) DO UPDATE SET "
                "knobs = excluded.knobs, run_id = excluded.run_id, summary = excluded.summary, "
                "updated_at = excluded.updated_at",
                (key, knobs_json, run_id, summary_json, now, now))
            row = self._db.execute(f"{_SELECT} WHERE key = ?", (key,)).fetchone()
        return self._fit(row)

    def trace(self, key: str) -> Mapping[str, Any] | None:
        """A prediction kept under `key` by an earlier run (estimate.trace_key), or None."""
        with self._guard():
            row = self._db.execute("SELECT prediction FROM traces WHERE key = ?",
                                   (key,)).fetchone()
        if row is None:
            return None
        try:
            value = json.loads(row[0])
        except ValueError:
            value = None
        problem = trace_problem(value)
        if problem is None:
            return value if isinstance(value, dict) else None
        # Trusted, a NaN or a negative peak skips the command's own config (or passes a hopeless
        # one) on every later run: the row goes, the config is traced again.
        with contextlib.suppress(FitStoreError, sqlite3.Error), self._guard(), self._write():
            self._db.execute("DELETE FROM traces WHERE key = ?", (key,))
        if self.on_dropped is not None:
            self.on_dropped(f"a kept memory prediction in the fit store {self.path} was "
                            f"{problem}; it was dropped and the config is predicted again")
        return None

    def keep_trace(self, key: str, prediction: Mapping[str, object]) -> None:
        """Keep a prediction under `key` for later runs."""
        with self._guard(), self._write():
            self._db.execute("INSERT OR REPLACE INTO traces (key, prediction, created_at) "
                             "VALUES (?, ?, ?)", (key, _canonical(dict(prediction)),
                                                  self._clock()))

    def entries(self) -> list[Fit]:
        """Every remembered fit, the most recently updated first."""
        with self._guard():
            rows = self._db.execute(f"{_SELECT} ORDER BY updated_at DESC, key").fetchall()
        return [self._fit(row) for row in rows]

    def matching(self, key_prefix: str) -> list[Fit]:
        """The fits whose key starts with `key_prefix` (hex digits), newest first."""
        prefix = key_prefix.strip().lower()
        if not _HEX.fullmatch(prefix):
            msg = (f"a key is one or more hex digits (as `oom-supervisor fits list` shows "
                   f"them), not {key_prefix[:40]!r}")
            raise ValueError(msg)
        with self._guard():
            rows = self._db.execute(f"{_SELECT} WHERE substr(key, 1, ?) = ? "
                                    "ORDER BY updated_at DESC, key",
                                    (len(prefix), prefix)).fetchall()
        return [self._fit(row) for row in rows]

    def forget(self, key_prefix: str) -> int:
        """Delete the fits whose key starts with `key_prefix` (hex); returns how many."""
        prefix = key_prefix.strip().lower()
        if not _HEX.fullmatch(prefix):
            msg = (f"a key prefix is one or more hex digits (as `oom-supervisor fits list` "
                   f"shows them), not {key_prefix!r}; use `forget --all` to forget everything")
            raise ValueError(msg)
        with self._guard(), self._write():
            cursor = self._db.execute("DELETE FROM fits WHERE substr(key, 1, ?) = ?",
                                      (len(prefix), prefix))
        return cursor.rowcount

    def forget_all(self) -> int:
        """Delete every remembered fit; returns how many there were."""
        with self._guard(), self._write():
            cursor = self._db.execute("DELETE FROM fits")
        return cursor.rowcount

    def integrity_ok(self) -> bool:
        """True when SQLite's own `PRAGMA integrity_check` finds nothing wrong."""
        with self._guard():
            rows = self._db.execute("PRAGMA integrity_check").fetchall()
        return [tuple(r) for r in rows] == [("ok",)]

    def _fit(self, row: tuple[Any, ...]) -> Fit:
        key, knobs, run_id, summary, created_at, updated_at = row
        try:
            knobs_value, summary_value = json.loads(knobs), json.loads(summary)
        except ValueError as exc:
            msg = (f"the fit store {self.path} holds a damaged entry {str(key)[:12]} ({exc}); "
                   f"remove it with `oom-supervisor fits forget {str(key)[:12]}`")
            raise FitStoreError(msg) from None
        if not isinstance(knobs_value, dict) or not isinstance(summary_value, dict):
            msg = (f"the fit store {self.path} holds a damaged entry {str(key)[:12]} (knobs or "
                   f"summary is not a JSON object); remove it with `oom-supervisor fits forget "
                   f"{str(key)[:12]}`")
            raise FitStoreError(msg)
        return Fit(key=str(key), knobs=knobs_value, run_id=str(run_id), summary=summary_value,
                   created_at=float(created_at), updated_at=float(updated_at))

    @contextmanager
    def _write(self) -> Iterator[None]:
        """One write transaction, taken at once (BEGIN IMMEDIATE) so it waits, not deadlocks."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    @contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise _error(self.path, exc) from None


def _error(path: Path, exc: sqlite3.Error) -> FitStoreError:
    reason = str(exc) or type(exc).__name__
    if "not a database" in reason or "malformed" in reason:
        advice = "it is damaged or not a fit store: move it aside (a new one is made)"
    elif "locked" in reason or "busy" in reason:
        advice = (f"another process held it for over {BUSY_TIMEOUT_S:g} s; try again, or "
                  f"pass --fits-db with another file")
    else:
        advice = "check the path and its permissions"
    return FitStoreError(f"fit store {path}: {reason}; {advice}, or run with --fresh")


def format_age(seconds: float) -> str:
    """A short age: 45s, 12m, 3h, 9d."""
    if not math.isfinite(seconds) or seconds < 0:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def render_entries(fits: list[Fit], *, now: float, width: int = 100,
                   project: str | None = None, every: bool = True) -> str:
    """The `fits list` table: key, age, run, model and program on one line, then every knob
    (wrapped, never cut). With `project` (a working directory): its fits first, then those
    whose project was not recorded, then (when `every`) the other projects' by project."""
    if not fits:
        return "no remembered fits"
    if project is None:
        return "\n".join(_table(fits, now=now, width=width))
    mine = [f for f in fits if f.about("cwd") == project]
    unknown = [f for f in fits if f.about("cwd") is None]
    others: dict[str, list[Fit]] = {}
    for fit in fits:
        where = fit.about("cwd")
        if where is not None and where != project:
            others.setdefault(where, []).append(fit)
    out = [f"this project ({project}):"]
    out += _table(mine, now=now, width=width) if mine else ["  no remembered fits"]
    if unknown:
        out += ["", "project not recorded (remembered by an older oom-supervisor):",
                *_table(unknown, now=now, width=width)]
    if others and every:
        for where, group in others.items():
            out += ["", f"project {where}:", *_table(group, now=now, width=width)]
    elif others:
        count = sum(len(g) for g in others.values())
        out += ["", (f"{count} more fit{'' if count == 1 else 's'} of "
                     f"{len(others)} other project{'' if len(others) == 1 else 's'}: "
                     "`oom-supervisor fits list --all` shows them")]
    return "\n".join(out)


def _table(fits: list[Fit], *, now: float, width: int) -> list[str]:
    lines = [f"{'KEY':<12}  {'AGE':>4}  {'RUN':<{_RUN_WIDTH}}  MODEL, PROGRAM"]
    for fit in fits:
        run = (fit.run_id if len(fit.run_id) <= _RUN_WIDTH
               else fit.run_id[:_RUN_WIDTH - 1] + "~")
        age = format_age(now - fit.updated_at)
        what = ", ".join(x for x in (fit.about("model"), fit.about("program")) if x) or "-"
        lines.append(f"{fit.key[:12]:<12}  {age:>4}  {run:<{_RUN_WIDTH}}  {what}")
        knobs = " ".join(f"{k}={_short(v)}" for k, v in _ordered(fit.knobs)) or "(no knobs)"
        lines += textwrap.wrap(knobs, width=max(40, width), initial_indent="    ",
                               subsequent_indent="    ", break_long_words=False,
                               break_on_hyphens=False)
    return lines


def render_fit(fit: Fit, *, now: float) -> str:
    """`fits show KEY`: one fit whole, with the run it came from."""
    out = [f"key      {fit.key}",
           f"model    {fit.about('model') or 'not recorded'}",
           f"program  {fit.about('program') or 'not recorded'}",
           f"project  {fit.about('cwd') or 'not recorded'}",
           f"from run {fit.run_id}" + (f" ({fit.about('run_dir')})" if fit.about("run_dir")
                                       else ""),
           (f"found    {_when(fit.created_at)}, last remembered {_when(fit.updated_at)} "
            f"({format_age(now - fit.updated_at)} ago)")]
    out += [f"{name.replace('_', ' '):<8} {fit.summary[name]}"
            for name in ("attempts", "effective_batch") if fit.summary.get(name) is not None]
    out += ["", "the config that fitted:"]
    out += [f"  {k} = {_short(v)}" for k, v in sorted(fit.knobs.items(),
                                                     key=lambda kv: (_rank(kv[0]), kv[0]))]
    return "\n".join(out)


def _when(ts: float) -> str:
    if not math.isfinite(ts):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def _rank(name: str) -> int:
    return _FIRST.index(name) if name in _FIRST else len(_FIRST)


_FIRST = ("finetuning_type", "per_device_batch", "grad_accum", "cutoff_len",
          "gradient_checkpointing", "lora_rank", "lora_target", "quantization_bit", "optimizer",
          "freeze_trainable_layers", "precision", "world_size")
_LEFT_OUT = frozenset({"output_dir", "model", "resume_from_checkpoint"})


def _ordered(knobs: Mapping[str, object]) -> list[tuple[str, object]]:
    """What decides memory first (method, batch, accumulation, cutoff), unset knobs left out."""
    rank = {name: i for i, name in enumerate(_FIRST)}
    return sorted(((k, v) for k, v in knobs.items() if v is not None and k not in _LEFT_OUT),
                  key=lambda kv: (rank.get(kv[0], len(rank)), kv[0]))


def _short(value: object) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    return str(value)
