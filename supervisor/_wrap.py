"""Attempt shim: run the command, then write its exit status to a file.

The supervisor spawns `python -m supervisor._wrap STATUS -- ARGV...` rather than ARGV itself, so
that an attempt outlives a supervisor killed with -9 and a resumed supervisor can still learn
how it ended (a process that is not our child gives us no exit status). Stays import-light.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def main(argv: list[str]) -> int:
    """Run argv after `--`, forward signals to it, record its exit status, exit the same way."""
    if len(argv) < 3 or argv[1] != "--":  # noqa: PLR2004 - STATUS -- ARGV
        print("usage: python -m supervisor._wrap STATUS_FILE -- COMMAND...", file=sys.stderr)  # noqa: T201
        return 2
    status = Path(argv[0])
    command = argv[2:]
    try:
        child = subprocess.Popen(command)  # noqa: S603 - the user's command
    except OSError as exc:
        print(f"oom-supervisor: cannot start {command[0]!r}: {exc.strerror or exc}",  # noqa: T201
              file=sys.stderr)
        _record(status, 127, None)
        return 127

    def forward(signum: int, _frame: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    for signum in _FORWARDED:
        signal.signal(signum, forward)
    code = child.wait()
    _record(status, code, child.pid)
    if code < 0:  # die of the same signal, so our parent sees what the command saw
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


def _record(status: Path, code: int, pid: int | None) -> None:
    tmp = status.with_name(status.name + ".tmp")
    tmp.write_text(json.dumps({"exit_code": code, "pid": pid, "ended": time.time()}) + "\n",
                   encoding="utf-8")
    tmp.replace(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
