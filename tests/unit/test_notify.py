"""--notify: the user's command gets the run's result; its failure is recorded, never raised."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from supervisor import notify
from supervisor.journal import load


def test_command_gets_the_result_in_env_and_the_summary_on_stdin(tmp_path: Path) -> None:
    """Exit code, run folder and first summary line in env; the whole summary on stdin."""
    got = notify.run('cat > stdin.txt; printf "%s|%s|%s" "$OOM_SUPERVISOR_EXIT_CODE" '
                     '"$OOM_SUPERVISOR_RUN_DIR" "$OOM_SUPERVISOR_SUMMARY" > env.txt',
                     exit_code=3, run_dir=tmp_path / "run",
                     summary="ladder exhausted\n  why: spent", cwd=tmp_path)
    assert (got.exit_code, got.error) == (0, None)
    assert (tmp_path / "env.txt").read_text() == f"3|{tmp_path / 'run'}|ladder exhausted"
    assert (tmp_path / "stdin.txt").read_text() == "ladder exhausted\n  why: spent\n"


def test_a_failing_command_is_recorded_with_what_it_said(tmp_path: Path) -> None:
    """A non-zero exit comes back as an error naming the code and the command's stderr."""
    got = notify.run("echo no route to host >&2; exit 7", exit_code=0, run_dir=tmp_path,
                     cwd=tmp_path,
                     summary="fitted")
    assert got.exit_code == 7
    assert got.error == "exited 7: no route to host"


def test_a_hanging_command_is_ended_with_its_children(tmp_path: Path) -> None:
    """Past its timeout the whole group ends (a child holding the pipe included)."""
    started = time.monotonic()
    got = notify.run("sleep 30 & sleep 30", exit_code=0, run_dir=tmp_path, summary="fitted",
                     timeout_s=1)
    assert got.exit_code is None
    assert got.error == "still running after 1 s; it was ended"
    assert time.monotonic() - started < 20


@pytest.mark.process
def test_cli_notify_is_journaled_and_never_changes_the_exit_code(tmp_path: Path) -> None:
    """A demo that exhausts its budget (exit 3) with a failing notify: still 3, journaled."""
    proc = subprocess.run(  # noqa: S603 - our own CLI, the real reference trainer
        [sys.executable, "-m", "supervisor", "demo", "--walk", "--device-memory", "150MiB",
         "--max-attempts", "1", "--runs-dir", str(tmp_path), "--run-id", "n",
         "--notify", "cat > got.txt; echo $OOM_SUPERVISOR_EXIT_CODE >> got.txt; exit 9"],
        capture_output=True, text=True, check=False, timeout=600, cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr[-2000:]
    # It ran where oom-supervisor was started: a relative path lands there, not in the run folder.
    assert not (tmp_path / "n" / "got.txt").exists()
    got = (tmp_path / "got.txt").read_text()
    assert got.startswith("oom-supervisor: ladder exhausted after 1 attempt ")
    assert got.endswith("\n3\n")
    assert "--notify exited 9 (the run's exit code is unchanged: 3)" in proc.stderr
    state, _ = load(tmp_path / "n")
    notified = [e for e in state.events if e.KIND == "notify.finished"]
    assert len(notified) == 1
    assert notified[0].exit_code == 9  # type: ignore[attr-defined]
    assert "Notified with `cat > got.txt" in (tmp_path / "n" / "report.md").read_text()


def test_its_output_goes_to_notify_log_and_its_last_lines_to_the_journal(tmp_path: Path) -> None:
    """A user debugging a mail hook sees what it said: all of it in <run>/notify.log, the last
    lines in the event (and so in report.md); a second notify appends."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    got = notify.run("for i in 1 2 3 4 5 6 7; do echo line $i; done; echo oops >&2; exit 2",
                     exit_code=0, run_dir=run_dir, summary="fitted", cwd=tmp_path)
    assert got.exit_code == 2
    assert got.output == ("line 4", "line 5", "line 6", "line 7", "oops")
    assert got.error == "exited 2: line 4 line 5 line 6 line 7 oops"
    log = run_dir / "notify.log"
    assert log.read_text().splitlines() == [*(f"line {i}" for i in range(1, 8)), "oops"]
    again = notify.run("echo second", exit_code=0, run_dir=run_dir, summary="fitted",
                       cwd=tmp_path)
    assert again.output == ("second",)
    assert log.read_text().endswith("oops\nsecond\n")


def test_the_report_shows_the_notify_commands_last_lines() -> None:
    """report.md: the command, its result, its last lines, where the rest is."""
    from supervisor.report import render_markdown  # noqa: PLC0415

    data_dir = Path(__file__).resolve().parents[1] / "data" / "runs" / "demo-150"
    from supervisor.events import (  # noqa: PLC0415
        Notified,
        from_record,
        replay_events,
    )
    from supervisor.journal import read  # noqa: PLC0415
    from supervisor.report import build  # noqa: PLC0415

    events = [from_record(r) for r in read(data_dir / "journal.jsonl").records]
    events.append(Notified(command="mail me", exit_code=1, error="exited 1: no route",
                           output=("connecting", "no route")))
    text = render_markdown(build(replay_events(events)))
    assert "Notified with `mail me`: exit code 1." in text
    assert "```text\nconnecting\nno route\n```" in text
    assert "notify.log" in text
