"""The supervisor's own cost per run: what `python -m supervisor` imports, and the pictures
drawn in a child that the exit code does not wait for. (The seconds themselves are measured
by `benchmarks/run.py fixed`, not asserted here.)"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from supervisor import plot, report
from supervisor.journal import load

ROOT = Path(__file__).resolve().parents[2]
RUNS = Path(__file__).parent.parent / "data" / "runs"
HEAVY = ("asyncio", "rich", "matplotlib", "torch", "transformers", "ssl")


def _imported(code: str) -> list[str]:
    done = subprocess.run(  # noqa: S603 - this interpreter
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
        timeout=120)
    names: list[str] = json.loads(done.stdout.strip().splitlines()[-1])
    return names


def test_the_cli_as_run_imports_no_asyncio_rich_or_pictures() -> None:
    """As `python -m supervisor` imports it (structlog through _lean): none of the heavy
    modules a run off a terminal does not use."""
    loaded = _imported(
        "import json, sys\n"
        "from supervisor._lean import import_structlog\n"
        "import_structlog()\n"
        "import supervisor.cli\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))))")
    assert loaded == []


def test_what_structlog_did_not_import_is_there_when_asked_for() -> None:
    """asyncio comes on first use (structlog's async methods would work); rich imports as
    usual afterwards (the live console on a terminal)."""
    loaded = _imported(
        "import json, sys\n"
        "from supervisor._lean import import_structlog\n"
        "import_structlog()\n"
        "import structlog.stdlib, structlog.dev\n"
        "assert structlog.stdlib.asyncio.get_running_loop is not None\n"
        "import asyncio, rich.text\n"
        "assert asyncio.get_running_loop is structlog.stdlib.asyncio.get_running_loop\n"
        "assert structlog.dev.rich is None\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'asyncio', 'rich'})))")
    assert loaded == ["asyncio", "rich"]


def test_report_without_pictures_names_them_and_the_child_draws_them(tmp_path: Path) -> None:
    """report.write(pictures=False) writes report.md naming memory.png at once; the child
    started by draw_later draws both pictures from report.json, without the caller waiting."""
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    shutil.copytree(RUNS / "demo-70", run)
    for picture in ("memory.png", "goodput.png"):
        (run / picture).unlink(missing_ok=True)
    data = report.write(run, load(run)[0], pictures=False)
    assert data["plot"] == "memory.png"
    assert "![memory per attempt](memory.png)" in (run / "report.md").read_text()
    assert not (run / "memory.png").exists()
    child = plot.draw_later(run)
    assert child is not None
    assert child.wait(timeout=300) == 0
    assert (run / "memory.png").stat().st_size > 1000
    deadline = time.monotonic() + 5
    while data.get("time_plot") and not (run / "goodput.png").exists():
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_the_picture_child_is_reaped_without_the_caller_waiting(tmp_path: Path) -> None:
    """The CLI drops draw_later's Popen: its exit status is still collected (no zombie, and no
    Popen left un-waited for the garbage collector to warn about)."""
    child = plot.draw_later(tmp_path / "no-such-run")
    assert child is not None
    deadline = time.monotonic() + 240
    while child.returncode is None:  # never poll() or wait() here: the reaper must do it
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert child.returncode != 0  # no report.json: the child said so and ended
