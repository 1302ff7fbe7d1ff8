"""NO_COLOR and TERM=dumb on a real pseudo-terminal: no colour (or no escape at all) reaches it,
where the same run on an ordinary terminal is coloured."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.process

SCRIPT = """\
import argparse, time
p = argparse.ArgumentParser()
p.add_argument("--per_device_train_batch_size", type=int, default=8)
p.parse_args()
for step in range(3):
    print(f"step {step}", flush=True)
    time.sleep(0.7)
"""
_SGR = re.compile(r"\x1b\[[0-9;]*m")


def _under_pty(tmp_path: Path, run_id: str, env: dict[str, str]) -> tuple[int, str]:
    (tmp_path / "train.py").write_text(SCRIPT, encoding="utf-8")
    argv = [sys.executable, "-m", "supervisor", "run", "--no-estimate", "--fresh", "--runs-dir",
            str(tmp_path / "runs"), "--run-id", run_id, "--", sys.executable, "train.py"]
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
    proc = subprocess.Popen(argv, stdin=child, stdout=child, stderr=child, cwd=tmp_path,  # noqa: S603
                            env={**os.environ, "COLUMNS": "160", **env}, close_fds=True)
    os.close(child)
    chunks: list[bytes] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        ready, _, _ = select.select([main], [], [], 1.0)
        if ready:
            try:
                data = os.read(main, 65536)
            except OSError:  # EIO: the child side closed
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(main)
    return proc.wait(timeout=30), b"".join(chunks).decode("utf-8", errors="replace")


@pytest.fixture
def plain_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    return env


def test_no_color_and_term_dumb_are_honoured_on_a_terminal(
        tmp_path: Path, plain_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """xterm: coloured settled lines. NO_COLOR=1: not one colour or style sequence, the live
    line still drawn. TERM=dumb: no escape sequence at all (no live line, no colour)."""
    monkeypatch.delenv("NO_COLOR", raising=False)
    code, coloured = _under_pty(tmp_path, "xterm", {**plain_env, "TERM": "xterm-256color"})
    assert code == 0, coloured[-2000:]
    assert _SGR.search(coloured), "the ordinary terminal shows colour: the test can fail"
    code, no_color = _under_pty(tmp_path, "nocolor", {**plain_env, "TERM": "xterm-256color",
                                                      "NO_COLOR": "1"})
    assert code == 0, no_color[-2000:]
    assert not _SGR.search(no_color), no_color[-2000:]
    assert "attempt 1" in no_color
    code, dumb = _under_pty(tmp_path, "dumb", {**plain_env, "TERM": "dumb"})
    assert code == 0, dumb[-2000:]
    assert "\x1b" not in dumb, dumb[-2000:]
    assert "fitted after 1 attempt" in dumb
