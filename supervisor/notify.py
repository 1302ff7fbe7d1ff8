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
    try:
        proc = subprocess.Popen(  # noqa: S602 - the user's own shell command, by design
            command, shell=True, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, env=env, cwd=str(cwd or Path.cwd()), start_new_session=True)
    except OSError as exc:
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
                        error=f"still running after {timeout_s:g} s; it was ended")
    error = None
    if proc.returncode != 0:
        said = " ".join(err.decode("utf-8", errors="replace").split())[-_ERROR_CHARS:]
        error = f"exited {proc.returncode}" + (f": {said}" if said else "")
    return Notified(command=command, exit_code=proc.returncode, error=error)
