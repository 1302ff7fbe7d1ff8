"""The console as a person sees it: the demo under a real pseudo-terminal, and redirected."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.process

DEMO = [sys.executable, "-m", "supervisor", "demo", "--walk", "--device-memory", "150MiB"]
"""150 MiB: three real OOMs (batch 4, 2, 1), then gradient checkpointing fits (~1-2 min)."""

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


def _under_pty(argv: list[str], cwd: Path, timeout_s: float = 600) -> tuple[int, str]:
    """Run argv with stdin/stdout/stderr on a pty of 160 columns; return (exit code, output)."""
    main, child = pty.openpty()
    import fcntl  # noqa: PLC0415
    import struct  # noqa: PLC0415
    import termios  # noqa: PLC0415

    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "160"}
    proc = subprocess.Popen(argv, stdin=child, stdout=child, stderr=child, cwd=cwd,  # noqa: S603
                            env=env, close_fds=True)
    os.close(child)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout_s
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
    code = proc.wait(timeout=30)
    return code, b"".join(chunks).decode("utf-8", errors="replace")


def test_demo_on_a_terminal_shows_live_and_settled_lines_and_the_summary(tmp_path: Path) -> None:
    """Live 'attempt N of at most 32' lines, one settled line per attempt, a summary, no JSON."""
    code, raw = _under_pty([*DEMO, "--run-id", "pty"], tmp_path)
    assert code == 0, raw[-3000:]
    text = _ANSI.sub("", raw)
    # the live line: number against the budget, config in words, elapsed time
    assert re.search(r"attempt 1 of at most 32 \(as given\): full fine-tuning, batch 4, "
                     r"cutoff 1024, checkpointing off · \d", text), text[-3000:]
    # settled lines: verdict, OOM figures against the device, seconds
    assert re.search(r"✗ attempt 1 out of memory after [\d.]+ s · as given: full b4x1 cut 1024 "
                     r"· tried [\d.]+ MiB, allocated [\d.]+ MiB, capacity 150 MiB "
                     r"\(device 150 MiB\)", text)
    # checkpointing restores batch 4 and searches down again (issue 19): b4, b2, then b1 fits
    assert re.search(r"✓ attempt 6 fits after .* peak [\d.]+ MiB of 150 MiB \(\d+%\)", text)
    # the summary: what was given up, where the model goes, the total time
    assert re.search(r"fitted after 6 attempts \(5 out of memory\) in \d", text)
    assert "given up: speed: per_device_batch 4 -> 1; speed: gradient_checkpointing off -> on" \
        in text
    assert f"the model will be written to: {tmp_path / 'runs' / 'pty' / 'trainer-output'}" in text
    # people's lines only: no JSON, no reprs, no 'None', no UTC microsecond stamps
    assert not re.search(r"^\s*\{\"", text, re.MULTILINE)
    assert "note=None" not in text
    assert not re.search(r"\d{2}:\d{2}:\d{2}\.\d{6}Z", text)
    # the structured log still goes to the run folder, as JSON
    logged = [json.loads(line) for line in
              (tmp_path / "runs" / "pty" / "supervisor.jsonl").read_text().splitlines()]
    assert [e["event"] for e in logged if e["event"] == "attempt.finished"] == [
        "attempt.finished"] * 6
    # Only the user's words, on the terminal and in report.md: no internal names or markers.
    report_md = (tmp_path / "runs" / "pty" / "report.md").read_text(encoding="utf-8")
    assert not_the_users_words(text) == []
    assert not_the_users_words(report_md) == []


def not_the_users_words(text: str) -> list[str]:
    """What a user reading `text` should never see: words from inside the project (the seed
    article, shared/, issue numbers), event names, the supervisor's marker lines, 'fake'."""
    from supervisor.console import _SENTENCES  # noqa: PLC0415 - the log-only event names
    from supervisor.events import EVENT_TYPES  # noqa: PLC0415

    found = [m.group(0) for m in re.finditer(
        r"(?i)\bseed\b|shared/|\bissue \d+|oom-supervisor\.(inject|peak)\b|\bfake\b", text)]
    names = set(EVENT_TYPES) | set(_SENTENCES) | {"run.stopped", "oom.detected"}
    found += [name for name in sorted(names) if re.search(rf"(?<![\w/.]){re.escape(name)}\b",
                                                          text)]
    return found


def test_plan_of_the_demo_speaks_the_users_words(tmp_path: Path) -> None:
    """The plan of the demo's command: the rule of thumb cited as LLaMA-Factory's, no internal
    words, the same margin as run."""
    from supervisor.cli import demo_command  # noqa: PLC0415

    done = subprocess.run([sys.executable, "-m", "supervisor", "plan", "--method", "analytic",  # noqa: S603
                           "--device-memory", "150MiB", "--", *demo_command().argv],
                          cwd=tmp_path, capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode in (0, 3), done.stderr
    assert "LLaMA-Factory's community rule" in done.stdout
    assert not_the_users_words(done.stdout + done.stderr) == []


def test_redirected_output_is_plain_timestamped_lines_never_json(tmp_path: Path) -> None:
    """stdout and stderr to files (nohup, tee): local-time lines, and JSON only in the folder."""
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with out.open("w") as o, err.open("w") as e:
        code = subprocess.run([*DEMO, "--run-id", "plain", "--max-attempts", "2"],  # noqa: S603
                              stdout=o, stderr=e, cwd=tmp_path, check=False,
                              timeout=600).returncode
    assert code == 3  # the budget of 2 attempts is spent, both OOM
    lines = (out.read_text() + err.read_text()).splitlines()
    assert lines
    assert not [line for line in lines if line.lstrip().startswith("{")]
    events = [line for line in err.read_text().splitlines() if re.match(r"\d\d:\d\d:\d\d ", line)]
    assert any("attempt 2 of at most 2 (smaller-batch)" in line for line in events)
    assert any("✗ attempt 2 out of memory" in line for line in events)
    assert "ladder exhausted after 2 attempts" in err.read_text()
    # --log-format json after the subcommand is honoured (accepted anywhere)
    assert (tmp_path / "runs" / "plain" / "supervisor.jsonl").read_text().startswith("{")


def test_log_format_json_is_accepted_after_the_subcommand(tmp_path: Path) -> None:
    """`status --log-format json` parses; a bad format is one line and exit 2."""
    bad = subprocess.run([sys.executable, "-m", "supervisor", "status", "--log-format",  # noqa: S603
                          "yaml", "--runs-dir", str(tmp_path)], capture_output=True, text=True,
                         check=False, timeout=60)
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1
    assert "invalid choice: 'yaml'" in bad.stderr
