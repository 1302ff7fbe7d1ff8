"""The supervisor's own console lines: best effort, whole lines, never blocking (echo.py)."""

from __future__ import annotations

import os
import threading
import time

from supervisor import echo


def test_a_console_nobody_reads_never_blocks_the_writer() -> None:
    """5 MB of log lines into a pipe nobody reads: every write returns at once (dropped and
    counted beyond the queue), where a plain write would block at 64 KiB."""
    read_end, write_end = os.pipe()
    try:
        with os.fdopen(write_end, "w", encoding="utf-8") as real:
            stream = echo.BestEffortStream(real)
            done = threading.Event()

            def flood() -> None:
                for i in range(50_000):
                    stream.write(f"supervisor line {i:06d} " + "x" * 80 + "\n")
                stream.flush()
                done.set()

            writer = threading.Thread(target=flood, daemon=True)
            writer.start()
            assert done.wait(timeout=60), "a write blocked on a console nobody reads"
            console = echo.console_for(real)
            assert isinstance(console, echo.ConsoleWriter)
            assert console.dropped_total > 0
    finally:
        os.close(read_end)


def test_lines_reach_a_console_that_reads_whole_and_in_order() -> None:
    read_end, write_end = os.pipe()
    with os.fdopen(write_end, "w", encoding="utf-8") as real:
        stream = echo.BestEffortStream(real)
        for i in range(100):
            stream.write(f"line {i}")  # a line written in pieces, as print() does
            stream.write("\n")
        stream.write("a live redraw without a newline")
        stream.flush()
        console = echo.console_for(real)
        assert isinstance(console, echo.ConsoleWriter)
        assert console.flush(patience_s=5.0, max_s=10.0)  # the pipe holds it all (64 KiB)
        got = _drain(read_end)
    os.close(read_end)
    lines = got.split("\n")
    assert lines[:100] == [f"line {i}" for i in range(100)]
    assert lines[100] == "a live redraw without a newline"


def _drain(fd: int) -> str:
    os.set_blocking(fd, False)
    chunks: list[bytes] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            if chunks and b"a live redraw" in b"".join(chunks):
                break
            time.sleep(0.05)
            continue
        chunks.append(chunk)
    return b"".join(chunks).decode()
