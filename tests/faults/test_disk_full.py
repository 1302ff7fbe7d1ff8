"""A full disk ends the run with one line that says what to do, and doing it works (issue 16).

The runs folder is a small tmpfs. At start the disk is full before the lock's pid can be
written; mid-run the trainer itself fills it (then fails with a transient network error, so
that the supervisor has an attempt folder, argv.json and journal lines to write). Either way:
exit 2, one `oom-supervisor: error:` line naming a path under the run folder and what to do,
no traceback; then, space freed, the command it names (run again, `resume`, or `report`) ends
fitted. Skipped with the reason where a tmpfs cannot be mounted (not root, no CAP_SYS_ADMIN).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.conftest import quiet_env

pytestmark = pytest.mark.process

TRAIN = """\
import argparse, os, sys
p = argparse.ArgumentParser()
p.add_argument("--per_device_train_batch_size", type=int, default=8)
p.add_argument("--fill", default=None)
a = p.parse_args()
print("training", flush=True)
if a.fill and not os.path.exists(a.fill + ".done"):
    open(a.fill + ".done", "w").close()
    fd = os.open(a.fill, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\\0" * 65536)
    except OSError:
        pass
    print("torch.distributed.DistNetworkError: Connection reset by peer", flush=True)
    sys.exit(1)
"""


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs, unmounted afterwards; skipped when this machine cannot mount one."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],  # noqa: S603, S607
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}); "
                    "the disk-full tests need root or CAP_SYS_ADMIN")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)  # noqa: S603, S607


def _fill(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError:
        pass
    finally:
        os.close(fd)


def _oom_supervisor(cwd: Path, *words: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "supervisor", *words], cwd=cwd,  # noqa: S603
                          env=quiet_env(), capture_output=True, text=True, timeout=300,
                          check=False)


def _run(cwd: Path, runs: Path, run_id: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return _oom_supervisor(cwd, "run", "--quiet", "--no-estimate", "--runs-dir", str(runs),
                           "--run-id", run_id, "--", sys.executable, "train.py",
                           "--per_device_train_batch_size", "4", *extra)


def _one_line(done: subprocess.CompletedProcess[str], run_dir: Path) -> str:
    """The single error line; it names a path in the run folder and says to free space."""
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, done.stderr
    line = errors[0]
    assert line.startswith("oom-supervisor: error: cannot write")
    assert str(run_dir) in line
    assert "the disk is full" in line
    assert "free space" in line
    return line


def test_a_full_disk_at_start_is_one_line_and_a_rerun_fits(tmp_path: Path,
                                                          small_disk: Path) -> None:
    """The lock's pid cannot be written: one line (run again); space freed, the same run id
    runs and fits."""
    (tmp_path / "train.py").write_text(TRAIN, encoding="utf-8")
    runs = small_disk / "runs"
    _fill(small_disk / "filler")
    done = _run(tmp_path, runs, "start")
    line = _one_line(done, runs / "start")
    assert ".lock" in line
    assert "run the command again" in line
    assert not (runs / "start" / "journal.jsonl").exists()
    (small_disk / "filler").unlink()
    again = _run(tmp_path, runs, "start")
    assert again.returncode == 0, again.stderr
    assert (runs / "start" / "report.md").is_file()


def test_a_disk_that_fills_mid_run_is_one_line_and_resume_fits(tmp_path: Path,
                                                               small_disk: Path) -> None:
    """The trainer fills the disk: the next write of the run fails in one line; space freed,
    the command the line names (resume, or report) finishes the run, fitted."""
    (tmp_path / "train.py").write_text(TRAIN, encoding="utf-8")
    runs = small_disk / "runs"
    filler = small_disk / "filler"
    done = _run(tmp_path, runs, "mid", "--fill", str(filler))
    run_dir = runs / "mid"
    line = _one_line(done, run_dir)
    assert not list(run_dir.rglob("*.tmp*")), "a half-written temp file was left behind"
    filler.unlink()
    advice = re.search(r"`oom-supervisor (resume|report) ([^`]+)`", line)
    assert advice is not None, line
    after = _oom_supervisor(tmp_path, advice.group(1), advice.group(2))
    assert after.returncode == 0, after.stderr
    assert "Traceback" not in after.stderr
    report = (run_dir / "report.md").read_text(encoding="utf-8")
    assert "fitted" in report
