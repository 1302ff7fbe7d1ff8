"""`oom-supervisor status`: a running or finished run, seen from another terminal.

Everything shown comes from the run's journal (replayed into the RunState that report and
resume read), the lock on its folder (is a supervisor alive on it), and the running attempt's
own log files.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from supervisor import report
from supervisor.files import read_tail
from supervisor.journal import JOURNAL, holder, load
from supervisor.text import plural, printable


class StatusError(ValueError):
    """No run to show; the message says where it looked."""


def newest_run(runs_dir: Path) -> Path:
    """The run folder under `runs_dir` whose journal changed last."""
    try:
        runs = [p for p in runs_dir.iterdir() if (p / JOURNAL).is_file()]
    except OSError:
        msg = f"{runs_dir} is not a folder of runs; give a RUN_DIR or --runs-dir DIR"
        raise StatusError(msg) from None
    if not runs:
        msg = f"no run under {runs_dir}; give a RUN_DIR or --runs-dir DIR"
        raise StatusError(msg)
    return max(runs, key=lambda p: (p / JOURNAL).stat().st_mtime)


def tail_lines(path: Path, count: int, *, chars: int = 16384) -> list[str]:
    """The last `count` non-empty lines of a log file (a tqdm redraw shows its last frame)."""
    try:
        text = read_tail(path, chars).decode("utf-8", errors="replace")  # never via a link
    except OSError:
        return []
    lines = [raw.rsplit("\r", 1)[-1].rstrip() for raw in text.splitlines()]
    return [line for line in lines if line.strip()][-count:]


def render(run_dir: Path, *, lines: int = 5, now: Callable[[], float] = time.time) -> str:
    """The run as text: where it stands, each attempt, and the running one's last lines."""
    state, torn = load(run_dir)
    data = report.build(state)
    alive = holder(run_dir)
    config = state.config
    pending = state.pending if state.finished is None else None
    if state.finished is not None:
        where = f"{data['summary']} (exit code {data['exit_code']})"
    elif pending is not None:
        where = f"running attempt {pending.number} of at most {config.max_attempts}"
    else:
        where = f"running, between attempts ({state.done} of at most {config.max_attempts} done)"
    if alive:
        who = f"supervisor alive ({alive})"
    elif state.finished is not None:
        who = "supervisor ended"
    else:
        who = (f"NO supervisor is running on it (it died); carry on with: "
               f"oom-supervisor resume {run_dir}")
    device = (f"{config.device_mib:g} MiB ({config.device_source})" if config.device_mib
              else "unknown")
    out = [f"run {config.run_id}: {where}",
           f"  folder {run_dir}",
           f"  {who}",
           (f"  started {report.local_time(state.started_at)}, "
            f"{report.human_duration(now() - state.started_at)} ago; "
            f"device {device}; policy {config.policy_name}")]
    out += [f"  {line}" for line in report.live_goodput(state, now())]
    if config.remembered is not None:
        out.append(f"  attempt 1 ran the fit remembered from run {config.remembered_from or '?'}"
                   " (--fresh starts at the command's own config)")
    if state.resumes:
        out.append(f"  resumed {plural(len(state.resumes), 'time')}, last at "
                   f"{report.local_time(state.resumes[-1].ts)}")
    compared = report.speed_line(data.get("speed"))
    if compared:
        out.append(f"  {compared}")
    if data["attempts"]:
        out += ["", report.render_table(data)]
    if pending is not None:
        elapsed = report.human_duration(now() - pending.started.ts)
        out += ["", (f"attempt {pending.number} ({pending.started.rung or 'as given'}) running "
                     f"for {elapsed}: {report.describe_knobs(pending.knobs.to_dict())}")]
        for name in ("stdout.log", "stderr.log"):
            path = run_dir / pending.started.log_dir / name
            got = tail_lines(path, lines)
            if got:
                out.append(f"  last lines of {pending.started.log_dir}/{name}:")
                out += [f"  | {line}" for line in got]
    if state.finished is not None:
        if data.get("reason"):
            out += ["", f"reason: {data['reason']}"]
        if data.get("final_knobs"):
            out += ["", f"working config: {report.describe_knobs(data['final_knobs'])}",
                    f"report: {run_dir / 'report.md'}"]
    if torn is not None:
        out += ["", "note: the journal's last line is torn (the supervisor died mid-write)"]
    if state.foreign_lines:
        out += ["", f"note: {report.foreign_note(state.foreign_lines)}"]
    return printable("\n".join(out))  # the trainer's lines: no escape reaches the terminal


def watch(run_dir: Path, *, every_s: float = 2.0, lines: int = 5,
          sleep: Callable[[float], None] = time.sleep) -> None:
    """Redraw the status every `every_s` seconds until the run has ended."""
    from rich.console import Console  # noqa: PLC0415
    from rich.live import Live  # noqa: PLC0415
    from rich.text import Text  # noqa: PLC0415

    console = Console(highlight=False)
    with Live(Text(render(run_dir, lines=lines)), console=console, auto_refresh=False) as live:
        while True:
            state, _ = load(run_dir)
            live.update(Text(render(run_dir, lines=lines)), refresh=True)
            if state.finished is not None:
                return
            sleep(max(0.2, every_s))
