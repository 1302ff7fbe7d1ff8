"""`--notify COMMAND`: tell the user's own command that a run ended (mail, curl, a chat hook).

The command runs through the shell after the run, with the run's result in its environment
(`OOM_SUPERVISOR_EXIT_CODE`, `OOM_SUPERVISOR_RUN_DIR`, `OOM_SUPERVISOR_SUMMARY`) and the
summary on its standard input, so that `--notify 'curl --data-binary @- https://...'` and
`--notify 'mail -s "run ended" me@example.com'` both work. Whatever it does, the run's exit
code stays the run's: a notify command that fails or hangs is recorded, never raised.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path

from supervisor.events import Notified
from supervisor.secrets import Redactor
from supervisor.text import printable

_ERROR_CHARS = 300


def environment(*, exit_code: int, run_dir: Path, summary: str,
                base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The notify command's environment: this process's plus the run's result."""
    env = dict(os.environ if base is None else base)
    env.update({"OOM_SUPERVISOR_EXIT_CODE": str(exit_code),
                "OOM_SUPERVISOR_RUN_DIR": str(run_dir),
                "OOM_SUPERVISOR_SUMMARY": summary.splitlines()[0] if summary else ""})
    return env


def run(command: str, *, exit_code: int, run_dir: Path, summary: str,  # noqa: PLR0913
        timeout_s: float = 60, cwd: Path | None = None) -> Notified:
    """Run `command` through the shell with the result in its env and the summary on stdin,
    in `cwd`: the directory oom-supervisor was started from (a relative path in the command
    means what it meant there), not the run folder."""
    env = environment(exit_code=exit_code, run_dir=run_dir, summary=summary)
    log = _open_log(run_dir)
    start = os.lseek(log, 0, os.SEEK_END) if log is not None else 0
    try:
        proc = subprocess.Popen(  # noqa: S602 - the user's own shell command, by design
            command, shell=True, stdin=subprocess.PIPE,
            stdout=log if log is not None else subprocess.DEVNULL,
            stderr=log if log is not None else subprocess.PIPE, env=env,
            cwd=str(cwd or Path.cwd()), start_new_session=True)
    except OSError as exc:
        _close(log)
        return Notified(command=command, exit_code=None,
                        error=f"could not start it ({exc.strerror or exc})")
    try:
        _, err = proc.communicate((summary.rstrip("\n") + "\n").encode(), timeout=timeout_s)
    except subprocess.TimeoutExpired:
        # Its own session: end the shell and whatever it started, so nothing holds the pipe.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return Notified(command=command, exit_code=None,
                        error=f"still running after {timeout_s:g} s; it was ended",
                        output=_tail(log, start))
    output = _tail(log, start) if log is not None else tuple(
        (err or b"").decode("utf-8", errors="replace").splitlines()[-OUTPUT_LINES:])
    error = None
    if proc.returncode != 0:
        said = " ".join(" ".join(output).split())[-_ERROR_CHARS:]
        error = f"exited {proc.returncode}" + (f": {said}" if said else "")
    return Notified(command=command, exit_code=proc.returncode, error=error, output=output)


OUTPUT_LINES = 5
"""Lines of the notify command's output kept in the journal (and shown in the report)."""
LOG = "notify.log"
"""Where the notify command's stdout and stderr go, in the run folder (appended per notify)."""


def _open_log(run_dir: Path) -> int | None:
    """`<run>/notify.log` for appending, never through a link; None when it cannot be opened."""
    try:
        return os.open(run_dir / LOG, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
                       | os.O_CLOEXEC, 0o600)
    except OSError:
        return None


def _tail(log: int | None, start: int) -> tuple[str, ...]:
    """The last lines this notify wrote into the log (redacted, printable), and close it."""
    if log is None:
        return ()
    try:
        end = os.lseek(log, 0, os.SEEK_END)
        begin = max(start, end - 8192)
        data = os.pread(log, end - begin, begin) if end > begin else b""
    except OSError:
        data = b""
    finally:
        _close(log)
    redactor = Redactor()
    lines = [printable(redactor.text(line)).rstrip()
             for line in data.decode("utf-8", errors="replace").splitlines()]
    return tuple(line[:_ERROR_CHARS] for line in lines if line.strip())[-OUTPUT_LINES:]


def _close(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)
