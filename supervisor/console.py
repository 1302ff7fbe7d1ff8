"""What a person sees while a run goes: a live line for the running attempt, one line per event.

The loop logs each journaled event through structlog (`attempt.started`, `attempt.finished`,
...). `Console` is the last processor of that chain for people: on a terminal it keeps a live
line for the running attempt (its number against the budget, its config in words, elapsed time,
the last line of its output) and prints one settled line per finished attempt above it; when
not on a terminal it prints the same settled lines, each with the local time. What it shows
comes from the run's journal (`journal.load`: the RunState that report and status read too),
never from the log event's own keys, so a line cannot say more or less than the record.
`JsonTee` keeps the structured log as JSON lines in `<run>/supervisor.jsonl`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import structlog

from supervisor import liveness, progress, report
from supervisor.classify import FINISHED_THEN_HUNG
from supervisor.events import AttemptRecord, JournalError, RunState
from supervisor.files import open_new, open_regular, read_tail
from supervisor.journal import load
from supervisor.text import plural, printable

if TYPE_CHECKING:  # rich is imported where the live line is drawn: on a terminal only
    from rich.console import Console as RichConsole
    from rich.live import Live
    from rich.text import Text

_SILENT = frozenset({"attempt.spawned", "final.written", "run.finished", "oom.detected",
                     "run.stopped", "liveness.hung"})
"""Events the console leaves out: the next line, or the summary, says the same."""

_STYLE = {"fits": "green", "oom": "red", "fatal": "magenta", "transient": "yellow",
          "no_data": "yellow",
          "hang": "yellow", "interrupted": "bright_black", "timed": "cyan"}
_MARK = {"fits": "✓", "oom": "✗"}
_QUIET_KEYS = frozenset({"event", "level", "timestamp", "run_id", "log_dir"})


def clock_time(ts: float | None = None) -> str:
    """Local wall-clock time to the second: `21:08:51`."""
    return time.strftime("%H:%M:%S", time.localtime(ts))


class JsonTee:
    """A structlog processor that also appends each event as JSON to `<run>/supervisor.jsonl`.

    Events before the run folder is known are kept (a few) and written when it is.
    """

    def __init__(self) -> None:
        self._file: IO[str] | None = None
        self._early: list[str] = []
        self._lock = threading.Lock()
        self.fresh = False
        """A new run: a supervisor.jsonl left in a reused run folder is started afresh."""

    def open(self, run_dir: Path) -> None:
        """Start writing into `run_dir` (appending: a resumed run adds to the same file)."""
        with self._lock:
            if self._file is not None:
                return
            # Never creates the folder: `resume` of a mistyped path must leave nothing behind.
            with contextlib.suppress(OSError):
                self._file = _open_log(run_dir / "supervisor.jsonl", fresh=self.fresh)
                for line in self._early:
                    self._file.write(line)
                self._file.flush()
            self._early.clear()

    def close(self) -> None:
        """Stop writing."""
        with self._lock:
            if self._file is not None:
                with contextlib.suppress(OSError):
                    self._file.close()
            self._file = None

    def __call__(self, _logger: object, _method: str,
                 event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        """Write the event; pass it on unchanged."""
        line = json.dumps(dict(event_dict), default=str, ensure_ascii=False) + "\n"
        with self._lock:
            if self._file is None:
                if len(self._early) < 200:  # noqa: PLR2004 - a bound, not a tuning
                    self._early.append(line)
            else:
                with contextlib.suppress(OSError, ValueError):
                    self._file.write(line)
                    self._file.flush()
        return event_dict


def _open_log(path: Path, *, fresh: bool) -> IO[str]:
    """supervisor.jsonl for appending (resume) or afresh (run), never through a link."""
    fd = open_new(path) if fresh else open_regular(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    return os.fdopen(fd, "a", encoding="utf-8")


class Console:
    """The renderer for people: settled lines, and on a terminal a live line for the attempt."""

    def __init__(self, stream: IO[str] | None = None, *, live: bool | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.stream = stream if stream is not None else sys.stderr
        # TERM=dumb cannot redraw a line: settled lines only. NO_COLOR: no colours, no styles.
        self.live = (_is_tty(self.stream) and not _is_dumb()) if live is None else live
        self.plain = _no_color() or _is_dumb()
        self._clock = clock
        self.run_dir: Path | None = None
        self._state: RunState | None = None
        self._current: AttemptRecord | None = None
        self._since = 0.0
        self._rich: RichConsole | None = None
        self._live: Live | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._saved: tuple[Any, Any] | None = None
        self._lost = False
        self._said: set[str] = set()  # skip reasons already shown: each is said once a run
        self._skips: list[Mapping[str, Any]] = []  # rung.skipped in a row: said as one line

    # --- wiring -------------------------------------------------------------------------------

    def attach(self, run_dir: Path) -> None:
        """The run folder is known: read its journal from now on (and start the live line)."""
        self.run_dir = run_dir
        if self.live and self._live is None and not self._lost:
            from rich.console import Console as RichConsole  # noqa: PLC0415 - a terminal's
            from rich.live import Live  # noqa: PLC0415

            self._rich = RichConsole(file=self.stream, highlight=False, soft_wrap=False,
                                     no_color=self.plain or None,
                                     color_system=None if self.plain else "auto")
            self._live = Live(console=self._rich, auto_refresh=False, transient=True,
                              redirect_stdout=False, redirect_stderr=False)
            self._live.start()
            self._route_echo()
            self._stop.clear()
            self._thread = threading.Thread(target=self._tick, name="console-live", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """End the live line and give the streams back (before the summary is printed)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None
        if self._live is not None and not self._lost:
            with contextlib.suppress(Exception):
                self._live.stop()
        self._live = None
        if self._saved is not None:
            sys.stdout, sys.stderr = self._saved
            self._saved = None

    def print(self, text: str) -> None:
        """A line outside the event stream (the summary), in the console's own manner."""
        if self._rich is not None and not self._lost:
            from rich.text import Text  # noqa: PLC0415 - imported with the live line

            self._rich.print(Text(text))
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    # --- the structlog renderer ---------------------------------------------------------------

    def __call__(self, _logger: object, method: str, event_dict: MutableMapping[str, Any]) -> str:
        """Render one event: a settled line (returned, or printed above the live line)."""
        name = str(event_dict.get("event", ""))
        if name == "terminal.lost":
            self._lost = True  # the terminal is gone: plain lines into the run folder from here
        line = self.line(name, event_dict, method)
        if line is None:
            raise structlog.DropEvent
        if self.live and self._rich is not None and self._live is not None and not self._lost:
            from rich.text import Text  # noqa: PLC0415 - imported with the live line

            self._rich.print(Text(line, style="" if self.plain else _style_of(name, event_dict)))
            self._refresh()
            raise structlog.DropEvent
        return f"{clock_time(self._clock())} {line}"

    def line(self, name: str, event: Mapping[str, Any], method: str = "info") -> str | None:
        """The settled line for one event, or None when the console leaves it out.

        Configs skipped on their predictions come in a row (26 on a small device): they are
        said as one line, before the next event's (report.md lists each)."""
        if name == "rung.skipped":
            self._skips.append(dict(event))
            return None
        skips = self._skipped_line()
        line = None if name in _SILENT else self._line(name, event, method)
        if skips is None:
            return line
        return skips if line is None else f"{skips}\n{line}"

    def _skipped_line(self) -> str | None:
        skips, self._skips = self._skips, []
        if not skips:
            return None
        if len(skips) == 1:
            return (f"skipped {skips[0].get('rung') or 'the command as given'} without running "
                    f"it: {skips[0].get('reason')}")
        peaks = [float(s["predicted_mib"]) for s in skips if s.get("predicted_mib")]
        span = f" ({min(peaks):.0f}-{max(peaks):.0f} MiB)" if peaks else ""
        return (f"skipped {len(skips)} configs without running them, each predicted over the "
                f"device{span}: {skips[0].get('rung') or 'the command as given'} ... "
                f"{skips[-1].get('rung')}; report.md lists each")

    def _line(self, name: str, event: Mapping[str, Any], method: str) -> str | None:
        if name in ("run.started", "run.resumed", "attempt.started", "attempt.finished",
                    "ladder.stepped"):
            self._reload()
        state = self._state
        if name in ("run.started", "run.resumed") and state is not None:
            return _run_line(name, state, self.run_dir)
        if name == "attempt.started" and state is not None:
            record = state.attempt(int(event.get("attempt", 0)))
            if record is not None:
                self._current, self._since = record, self._clock()
                self._refresh()
                return (None if self.live and not self._lost
                        else _started_line(record, state.config.max_attempts,
                                           state.config.remembered_from
                                           if state.config.remembered else None))
        if name == "attempt.finished" and state is not None:
            record = state.attempt(int(event.get("attempt", 0)))
            self._current = None
            self._refresh()
            if record is not None and record.finished is not None:
                return _finished_line(record, state)
        if name == "ladder.stepped":
            fresh = [s for s in event.get("skipped") or [] if s not in self._said]
            self._said.update(fresh)
            return _step_line({**event, "skipped": fresh})
        if name == "attempt.silent":
            return silent_line(event)
        if name in ("checkpoint.rescued", "checkpoint.rescue_failed"):
            return report.rescue_line({**event, "event": name}).removeprefix("- ")
        if name == "rescue.requested":
            return (f"asked the trainer to save at its next step end and stop (waiting up to "
                    f"{float(event.get('grace_s') or 0):.0f} s)")
        if name in ("speed.compared", "speed.skipped"):
            shown = report.speed_line({**event, "compared": name == "speed.compared"})
            if shown:
                return shown
        if name == "checkpoint.passed_over":
            return f"  passing over {event.get('checkpoint')}: {event.get('reason')}"
        return _generic(name, event, method)

    # --- the live line ------------------------------------------------------------------------

    def _reload(self) -> None:
        if self.run_dir is None:
            return
        with contextlib.suppress(JournalError, OSError):
            self._state, _ = load(self.run_dir)

    def live_text(self) -> Text | None:
        """The live line of the running attempt, or None between attempts."""
        from rich.text import Text  # noqa: PLC0415 - imported with the live line

        record, state = self._current, self._state
        if record is None or state is None:
            return None
        elapsed = report.human_duration(self._clock() - self._since)
        head = (f"attempt {record.number} of at most {state.config.max_attempts} "
                f"({record.started.rung or 'as given'}): "
                f"{report.describe_knobs(record.knobs.to_dict())} · {elapsed}")
        text = Text(head, style="" if self.plain else "bold")
        attempt_dir = self.run_dir / record.started.log_dir if self.run_dir else None
        doing = liveness_line(attempt_dir, now=self._clock()) if attempt_dir else None
        last = doing or (last_output_line(attempt_dir) if attempt_dir else None)
        if last:
            text.append(f" · {last}", style="" if self.plain else "dim")
        text.no_wrap = True
        text.overflow = "ellipsis"
        return text

    def _refresh(self) -> None:
        if self._live is None or self._lost:
            return
        from rich.text import Text  # noqa: PLC0415 - imported with the live line

        with contextlib.suppress(Exception):
            self._live.update(self.live_text() or Text(""), refresh=True)

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            if self._lost:
                return
            self._refresh()

    def _route_echo(self) -> None:
        """The command's echoed output goes above the live line, not through it."""
        if self._rich is None:
            return
        self._saved = (sys.stdout, sys.stderr)
        rich = self._rich
        if _is_tty(sys.stdout):
            sys.stdout = _Above(rich, sys.stdout)
        sys.stderr = _Above(rich, sys.stderr)


def silent_line(event: Mapping[str, Any]) -> str:
    """A silence past the limit, in a sentence: working (not a hang) or judged hung."""
    sentence = str(event.get("sentence") or "silent")
    if event.get("judged") == "working":
        return f"  {sentence}: working, not a hang"
    return f"  {sentence}"


def liveness_line(attempt_dir: Path, *, now: float) -> str | None:
    """What a silent attempt seems to be doing (the runner's liveness.json), while fresh."""
    try:
        data = json.loads((attempt_dir / liveness.STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not data.get("sentence"):
        return None
    silent_s = data.get("silent_s")
    if data.get("state") == "alive" and not (isinstance(silent_s, int | float)
                                             and silent_s >= 30):  # noqa: PLR2004
        return None  # a pause between steps: the last output line says more
    at = data.get("at")
    if not isinstance(at, int | float) or now - at > 15:  # noqa: PLR2004 - a few samples
        return None
    return str(data["sentence"])


def last_output_line(attempt_dir: Path, *, chars: int = 4096) -> str | None:
    """The last non-empty line the attempt wrote (stdout.log or stderr.log, newest first)."""
    logs = [p for p in (attempt_dir / "stdout.log", attempt_dir / "stderr.log") if p.is_file()]
    logs.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for path in logs:
        try:
            tail = read_tail(path, chars).decode("utf-8", errors="replace")  # never via a link
        except OSError:
            continue
        for raw in reversed(tail.splitlines()):
            line = raw.rsplit("\r", 1)[-1].strip()
            # The injected code's own lines (limit, peak, rescue) are not the trainer's words.
            if line and not line.startswith("oom-supervisor."):
                return line
    return None


class _Above(io.TextIOBase):
    """A stream whose text (and bytes, for the runner's echo) prints above the live line."""

    def __init__(self, rich: RichConsole, real: IO[str]) -> None:
        self._rich, self._real, self._partial = rich, real, ""
        self.buffer = _AboveBytes(self)

    def write(self, text: str) -> int:
        lines = (self._partial + text.replace("\r\n", "\n")).split("\n")
        self._partial = lines.pop()
        from rich.text import Text  # noqa: PLC0415 - imported with the live line

        for line in lines:
            self._rich.print(Text(line.rsplit("\r", 1)[-1]), soft_wrap=True)
        return len(text)

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._real.flush()

    def isatty(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._real.fileno()


class _AboveBytes:
    def __init__(self, text: _Above) -> None:
        self._text = text

    def write(self, data: bytes) -> int:
        self._text.write(data.decode("utf-8", errors="replace"))
        return len(data)

    def flush(self) -> None:
        self._text.flush()


# --- the lines ----------------------------------------------------------------------------------

def _run_line(name: str, state: RunState, run_dir: Path | None) -> str:
    config = state.config
    device = (f"a {config.device_mib:g} MiB device ({config.device_source})"
              if config.device_mib else "a device of unknown size")
    verb = "resumed" if name == "run.resumed" else "started"
    where = f"; record in {run_dir}" if run_dir else ""
    assumed = [k for k, v in config.start_sources.items() if v == "assumed"
               and k in ("per_device_batch", "grad_accum", "cutoff_len", "gradient_checkpointing",
                         "finetuning_type", "precision")]
    start = report.describe_knobs(config.start.to_dict())
    if name == "run.resumed" and state.attempts:
        last = state.attempts[-1]
        start = (f"at attempt {last.number} ({report.describe_knobs(last.knobs.to_dict())})"
                 f" after {state.done} finished")
    elif config.remembered is not None:
        start = (f"{report.describe_knobs(config.remembered.to_dict())}, remembered from run "
                 f"{config.remembered_from or '?'} (the command's own: {start}; --fresh "
                 "starts there)")
        if config.remembered_ignored:
            start += (f"; that run's command differed only where memory does not depend on "
                      f"it: {config.remembered_ignored}")
    line = (f"run {config.run_id} {verb}: {start}, on {device}, at most "
            f"{config.max_attempts} attempts{where}")
    if assumed:
        line += f" (assumed: {', '.join(assumed)})"
    note = report.deepspeed_note(config)
    if note is not None:
        line += f"; {note}"
    return line


def _started_line(record: AttemptRecord, budget: int, remembered: str | None = None) -> str:
    how = record.started.rung or (f"remembered from run {remembered}"
                                  if remembered and record.number == 1 else "as given")
    return (f"attempt {record.number} of at most {budget} ({how}): "
            f"{report.describe_knobs(record.knobs.to_dict())}")


def _finished_line(record: AttemptRecord, state: RunState) -> str:
    done = record.finished
    assert done is not None  # noqa: S101 - checked by the caller
    device = state.config.device_mib
    row: dict[str, Any] = {"verdict": done.verdict, "numbers": dict(done.numbers or {}),
                           "peak_mib": done.peak_mib, "host_peak_mib": done.host_peak_mib}
    mark = _MARK.get(done.verdict, "!")
    took = report.human_duration(done.duration_s)
    config = report.describe_knobs(record.knobs.to_dict(), short=True)
    what = f"{record.started.rung or 'as given'}: {config}"
    if done.verdict == "oom":
        memory = report.memory_words(row, device)
        of = f" (device {device:g} MiB)" if device else ""
        line = f"{mark} attempt {record.number} out of memory after {took} · {what} · {memory}{of}"
    elif done.verdict == "fits":
        line = (f"{mark} attempt {record.number} fits after {took} · {what} · "
                f"{report.memory_words(row, device)}")
        if (done.evidence or "").startswith(FINISHED_THEN_HUNG):
            line += " · it then did not exit: the watchdog ended it"
    elif done.verdict == "checkpoint_unusable":
        line = (f"{mark} attempt {record.number} could not load its checkpoint after {took} · "
                f"{what} · {done.evidence} · it goes on from the one before")
    elif done.verdict == "no_data":
        line = (f"{mark} attempt {record.number} left the trainer no data after {took} · "
                f"{what} · {done.evidence} · that rung is spent, the ladder walks on")
    else:
        line = (f"{mark} attempt {record.number} {done.verdict} after {took} · {what} · "
                f"{done.evidence or f'exit code {done.exit_code}'}")
    if done.predicted_mib:
        line += f" · predicted {done.predicted_mib:g} MiB"
    return line


def _step_line(event: Mapping[str, Any]) -> str | None:
    parts = []
    restored = event.get("restored") or []
    if restored:
        parts.append("restores " + ", ".join(f"{k} {report.cell(b)} -> {report.cell(a)}"
                                             for k, b, a in restored))
    if event.get("note"):
        parts.append(str(event["note"]))
    # A rung passed over is said first, as its own clause: read after the next rung's name it
    # reads as if that rung did the skipping.
    passed = [f"not taking {s}" for s in event.get("skipped") or []]
    if not parts and not passed:
        return None  # the next attempt's line names its rung
    step = f"next: {event.get('rung')}" + (f" {'; '.join(parts)}" if parts else "")
    return "  " + "; ".join([*passed, step])


def _generic(name: str, event: Mapping[str, Any], method: str) -> str:
    return sentence(name, event, method)


def _plain(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return ",".join(_plain(v) for v in value)
    return str(value)


def _style_of(name: str, event: Mapping[str, Any]) -> str:
    if name == "attempt.finished":
        return _STYLE.get(str(event.get("verdict")), "")
    return "dim" if name == "ladder.stepped" else ""


def _no_color() -> bool:
    """NO_COLOR (https://no-color.org): set and not empty, whatever its value."""
    return bool(os.environ.get("NO_COLOR"))


def _is_dumb() -> bool:
    """A terminal that cannot move its cursor or show colours (TERM=dumb, as Emacs' shell)."""
    return os.environ.get("TERM", "") in ("dumb", "unknown")


def _is_tty(stream: object) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except (OSError, ValueError):
        return False


# --- the session's outputs ----------------------------------------------------------------------

class Output:
    """Where the log goes: to people (lines; JSON with `json`) and as JSON to the run folder."""

    def __init__(self, fmt: str = "auto", stream: IO[str] | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.fmt = fmt
        self.tee = JsonTee()
        self.console: Console | None = None
        if fmt != "json":
            live = None if fmt == "auto" else fmt == "console"
            self.console = Console(self.stream, live=live)

    def processors(self) -> list[Any]:
        """The structlog chain: level, time, the run folder's JSON copy, then the renderer."""
        chain: list[Any] = [structlog.processors.add_log_level,
                            structlog.processors.TimeStamper(fmt="iso", utc=True), self.tee]
        if self.console is None:
            chain.append(structlog.processors.JSONRenderer())
        else:  # lines for a terminal: what a trainer printed (an OOM line) loses its escapes
            chain += [_printable_values, self.console]
        return chain

    def attach(self, run_dir: Path, *, fresh: bool = False) -> None:
        """The run folder is known: its supervisor.jsonl (afresh for a new run) and (on a
        terminal) the live line."""
        self.tee.fresh = fresh
        self.tee.open(run_dir)
        if self.console is not None:
            self.console.attach(run_dir)

    def close(self) -> None:
        """End the live line and the run folder's log."""
        if self.console is not None:
            self.console.close()
        self.tee.close()

    def print(self, text: str) -> None:
        """Lines for people after the run (the summary)."""
        self.stream.write(printable(text) + "\n")
        self.stream.flush()


def _printable_values(_logger: object, _name: str, event: MutableMapping[str, Any]
                      ) -> MutableMapping[str, Any]:
    """structlog processor: string values without terminal control sequences."""
    for key, value in event.items():
        if isinstance(value, str):
            event[key] = printable(value)
    return event


PREDICTION_SHARE = 0.10
"""The summary's first line names the prediction's seconds when they are over this share."""


def _prediction_share(data: Mapping[str, Any]) -> str:
    """', 5.2 s of it predicting memory' where the prediction took over 10 % of the run."""
    predicted, took = data.get("estimate_s") or 0.0, data.get("duration_s") or 0.0
    if not took or predicted <= PREDICTION_SHARE * took:
        return ""
    return f", {report.human_duration(predicted)} of it predicting memory"


def summary(data: Mapping[str, Any], run_dir: Path) -> list[str]:
    """The closing lines: how it ended, in how long, the working config, what it cost, where."""
    attempts = data.get("attempts", [])
    ooms = data.get("oom_verdicts", 0)
    took = report.human_duration(data.get("duration_s"))
    status = str(data.get("status"))
    head = {"fitted": "fitted", "exhausted": "ladder exhausted", "fatal": "stopped (fatal)",
            "transient": "stopped (transient failures)", "hang": "stopped (hung)",
            "interrupted": "interrupted"}.get(status, status)
    lines = [(f"oom-supervisor: {head} after {plural(len(attempts), 'attempt')} "
              f"({ooms} out of memory) in {took}{_prediction_share(data)}")]
    if data.get("reason"):
        lines.append(f"  why: {data['reason']}")
    good = data.get("goodput")
    if good and good.get("wall_s") and good["steps"]["trained"]:
        worst = max(good["badput_s"].items(), key=lambda kv: kv[1], default=None)
        lost = (f"; most lost to {progress.CAUSES.get(worst[0], worst[0])} "
                f"({report.human_duration(worst[1])})" if worst else "")
        lines.append(f"  goodput {progress.describe_share(good['goodput'])}: "
                     f"{good['steps']['kept']} step{'' if good['steps']['kept'] == 1 else 's'}"
                     f" kept{lost}")
    final = data.get("final_knobs")
    if final:
        eb = data.get("effective_batch", {})
        kept = "kept" if eb.get("start") == eb.get("final") else f"was {eb.get('start')}"
        lines.append(f"  working config: {report.describe_knobs(final)} "
                     f"(effective batch {kept})")
        given = [f"{c['cost']}: {c['knob']} {report.cell(c['from'])} -> {report.cell(c['to'])}"
                 for c in data.get("costs", []) if c.get("cost") in ("quality", "speed")]
        lines.append("  given up: " + ("; ".join(given) if given else "nothing"))
        compared = report.speed_line(data.get("speed"))
        if compared:
            lines.append(f"  {compared}")
        if data.get("output_dir"):
            lines.append(f"  the model will be written to: {data['output_dir']}")
        lines += [f"  note: {n}" for n in data.get("other_changes", [])[:1]]
        lines.append(f"  run it again as is: sh {run_dir / 'final-command.sh'}")
    lines.append(f"  report: {run_dir / 'report.md'}")
    return [printable(line) for line in lines]


# --- events in sentences ------------------------------------------------------------------------
# The JSON log keeps each event's dotted name and keys; a person reads what happened.

def _help_ignored(event: Mapping[str, Any]) -> str:
    return f"{event.get('program')} did not answer --help as a parser would: {event.get('note')}"


def _signal(event: Mapping[str, Any]) -> str:
    how = str(event.get("how") or "")
    if how.startswith("gracefully"):
        tail = ("; send it again to stop at once" if "again" in how else "")
        return (f"{event.get('signal')} received: stopping gracefully (the attempt saves what "
                f"it can){tail}")
    return f"{event.get('signal')} received: stopping {how or 'now'}"


def _retrying(event: Mapping[str, Any]) -> str:
    why = {"hang": "hung", "lost": "was lost"}.get(str(event.get("verdict")), "failed")
    where = (f" from {event.get('checkpoint')} (step {event.get('step')})"
             if event.get("checkpoint") else "")
    return (f"attempt {event.get('attempt')} {why}: the same config runs again in "
            f"{report.human_duration(event.get('delay_s'))}{where}")


_SENTENCES: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "program.help_waiting": lambda e: f"reading {e.get('program')} --help (imports take a while)",
    "program.help_ignored": _help_ignored,
    "probe.leftovers_ended": lambda e: (
        f"ended {plural(len(e.get('pids') or []), 'process', 'processes')} a killed "
        "supervisor's --help probe had left running"),
    "estimate.interpreter": lambda e: f"predicting memory {e.get('how')}",
    "estimate.unavailable": lambda e: f"no memory prediction for this run: {e.get('reason')}",
    "estimate.traces_not_kept": lambda e: f"predictions are not kept for later runs: "
                                          f"{e.get('reason')}",
    "estimate.predicting": lambda e: (
        f"predicting the memory of {plural(e.get('configs'), 'config')}"
        + (f", {e.get('how')}" if e.get("how") else "")),
    "estimate.predicted": lambda e: (
        f"predicted {plural(e.get('configs'), 'config')}"
        + (f" of {e.get('of')}" if e.get("of") is not None else "")),
    "estimate.distrusted": lambda e: f"predictions stop deciding for this run: {e.get('reason')}",
    "estimate.checking": lambda e: f"every config left is predicted over the device; the one "
                                   f"predicted smallest runs once for real ({e.get('reason')})",
    "fits.unavailable": lambda e: f"remembered fits cannot be read: {e.get('reason')}",
    "fits.unreadable": lambda e: f"a remembered fit was passed over: {e.get('reason')}",
    "fits.not_stored": lambda e: f"this fit was not remembered: {e.get('reason')}",
    "gpu.sample_failed": lambda e: f"GPU memory could not be sampled: {e.get('reason') or ''}",
    "speed.timed": lambda e: f"timed {plural(e.get('steps'), 'step')}; ending the timed attempt",
    "task.failed": lambda e: f"a task of the attempt failed, ending the rest: {e.get('line')}",
    "slurm.cancel_unavailable": lambda e: f"scancel is not on the attempt's PATH; only this "
                                          f"node's tasks were ended ({e.get('steps')})",
    "slurm.cancel_failed": lambda e: f"scancel failed for {e.get('steps')}: {e.get('error')}",
    "slurm.step_cancelled": lambda e: f"cancelled the Slurm step {e.get('steps')}",
    "slurm.step_lingers": lambda e: f"the Slurm step {e.get('steps')} is still there after "
                                    f"{report.human_duration(e.get('waited_s'))}",
    "transient.retrying": _retrying,
    "checkpoint.resumed": lambda e: f"attempt {e.get('attempt')} continues from "
                                    f"{e.get('checkpoint')} (step {e.get('step')})",
    "checkpoint.skipped": lambda e: f"attempt {e.get('attempt')} starts fresh: "
                                    f"{e.get('checkpoint')} cannot be loaded ({e.get('reason')})",
    "gpu.held": lambda e: f"after attempt {e.get('attempt')} GPU memory is still held: "
                          f"{e.get('detail')}",
    "terminal.lost": lambda e: f"the terminal went away; the run goes on, its output into "
                               f"{e.get('output_to')}",
    "signal.received": _signal,
    "ladder.exhausted": lambda e: f"the ladder is spent: {e.get('reason')}",
    "notify.finished": lambda e: (f"--notify ran (exit code {e.get('exit_code')})"
                                  + (f": {e.get('error')}" if e.get("error") else "")),
}
"""What the console says for each event that has no line of its own above."""


def sentence(name: str, event: Mapping[str, Any], method: str = "info") -> str:
    """The console's words for an event: its sentence, or (an event without one) its words
    with its values; never the dotted event name itself."""
    prefix = "" if method in ("info", "debug") else f"{method}: "
    say = _SENTENCES.get(name)
    if say is not None:
        with contextlib.suppress(Exception):
            return prefix + say(event)
    words = name.replace(".", " ").replace("_", " ")
    fields = ", ".join(f"{k.replace('_', ' ')} {_plain(v)}" for k, v in event.items()
                       if k not in _QUIET_KEYS and v not in (None, "", [], {}, ()))
    return prefix + words + (f": {fields}" if fields else "")
