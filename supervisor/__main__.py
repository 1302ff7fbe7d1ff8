"""`python -m supervisor` is `oom-supervisor`.

SIGTERM (a Slurm cancel), SIGINT and SIGHUP are caught before anything else is imported
(importing the CLI takes a second or more on a busy machine): a signal that arrives then is
handed to the CLI, which ends cleanly (exit 130, one line) instead of dying with exit 143.
"""

import signal
import sys

_EARLY: list[int] = []


def _noted(signum: int, _frame: object) -> None:
    _EARLY.append(signum)


def run() -> int:
    """The console script's entry point: signals caught first, then the CLI."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _noted)
    from supervisor._lean import import_structlog  # noqa: PLC0415 - after the handlers

    import_structlog()  # without rich's tracebacks and asyncio: a run needs neither
    from supervisor.cli import main  # noqa: PLC0415 - after the handlers, on purpose

    return main(early_signals=_EARLY)


if __name__ == "__main__":
    sys.exit(run())
