"""A signal arriving while the supervisor holds a lock its handler's work needs.

The CI once saw the supervisor hang for good on a SIGTERM: the handler journaled and logged
from inside the main thread, which the signal had interrupted while it held the log's lock.
Each case runs in a child (a hang there fails the case instead of the suite): the main thread
holds the lock the listener takes, signals itself, and only then lets go.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent("""
    import os, signal, sys, threading, time
    from pathlib import Path
    from supervisor.cli import _install_early_handlers, _install_signal_handlers
    from supervisor.loop import Signals
    from supervisor.program import ProbeInterrupted
    from supervisor.runner import StopRequest

    held = threading.Lock()          # stands for the journal's or the log's lock
    seen = []
    stop, signals = StopRequest(), Signals()

    def listener(event):
        with held:
            seen.append(event.KIND)

    signals.listen(listener)
    early = sys.argv[1] == "early"
    if early:
        _install_early_handlers(stop, signals)
    else:
        _install_signal_handlers(stop, signals, Path("."))
    interrupted = False
    with held:                        # the main thread is inside a write when the signal comes
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100):      # bytecodes run here: the handler has run by now
                pass
        except ProbeInterrupted:
            interrupted = True
    assert stop.graceful.wait(10), "the stop never arrived"
    print(seen, interrupted, stop.immediate.is_set())
""")


@pytest.mark.parametrize("stage", ["early", "run"])
def test_a_signal_during_a_held_lock_neither_hangs_nor_is_lost(stage: str) -> None:
    done = subprocess.run([sys.executable, "-c", CHILD, stage], capture_output=True,  # noqa: S603
                          text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    # Journaled once, the stop set (graceful only: one signal), and before the run the main
    # thread is interrupted at once.
    assert done.stdout.split("\n")[0] == f"['signal.received'] {stage == 'early'} False"
