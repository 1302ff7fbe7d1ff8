"""Run folders that turn hostile under the supervisor, as a user would meet them.

A trainer that wipes the run folder; a `.lock` or `journal.jsonl` replaced by a FIFO; links
planted in a shared runs folder; a folder of another user; a trainer whose output holds numbers
no trainer prints, malformed marker lines, a 200 MB line, a caught OOM, or that writes into the
journal (tests/data/programs/hostile_trainer.py). Each: the exit code, one clear line, never a
traceback, no file outside the run folder touched, the journal still readable by `report`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.fits import FitStore
from tests.faults.conftest import quiet_env

pytestmark = pytest.mark.process

WIPE = """\
import argparse, os, shutil
from pathlib import Path
p = argparse.ArgumentParser()
p.add_argument("--per_device_train_batch_size", type=int, default=8)
p.parse_args()
shutil.rmtree(Path(os.environ["OOM_SUPERVISOR_ATTEMPT"]).parent.parent)
"""
FITS = """\
import argparse
p = argparse.ArgumentParser()
p.add_argument("--per_device_train_batch_size", type=int, default=8)
p.parse_args()
"""


def _cli(cwd: Path, *words: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "supervisor", *words], cwd=cwd,  # noqa: S603
                          env=quiet_env(), capture_output=True, text=True, timeout=timeout_s,
                          check=False)


def _run(tmp_path: Path, run_id: str, script: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / f"{run_id}.py").write_text(script, encoding="utf-8")
    return _cli(tmp_path, "run", "--quiet", "--no-estimate", "--runs-dir", str(tmp_path / "runs"),
                "--run-id", run_id, "--", sys.executable, f"{run_id}.py",
                "--per_device_train_batch_size", "4")


def test_a_trainer_that_wipes_the_run_folder_gets_one_line(tmp_path: Path) -> None:
    """The report and plot cannot be written: one line naming the path, no traceback."""
    done = _run(tmp_path, "wipe", WIPE)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, done.stderr
    assert "its folder is gone" in errors[0]
    assert str(tmp_path / "runs" / "wipe") in errors[0]


def test_a_fifo_lock_neither_hangs_status_nor_resume(tmp_path: Path) -> None:
    """`status` shows the run at once; `resume` refuses the lock in one line."""
    assert _run(tmp_path, "fifo", FITS).returncode == 0
    run_dir = tmp_path / "runs" / "fifo"
    (run_dir / ".lock").unlink()
    os.mkfifo(run_dir / ".lock")
    status = _cli(tmp_path, "status", str(run_dir), timeout_s=60)
    assert status.returncode == 0, status.stderr
    assert "fitted" in status.stdout
    resumed = _cli(tmp_path, "resume", str(run_dir), timeout_s=60)
    assert resumed.returncode == 2
    assert "Traceback" not in resumed.stderr
    assert "is a FIFO (named pipe), not a regular file" in resumed.stderr


def test_a_fifo_journal_is_named_for_what_it_is(tmp_path: Path) -> None:
    """Not "missing": a FIFO where the journal should be, said in one line, never read."""
    run_dir = tmp_path / "runs" / "x"
    run_dir.mkdir(parents=True)
    os.mkfifo(run_dir / "journal.jsonl")
    for verb in ("status", "report", "resume"):
        done = _cli(tmp_path, verb, str(run_dir), timeout_s=60)
        assert done.returncode == 2, (verb, done.stderr)
        assert "is a FIFO (named pipe), not a regular file" in done.stderr, verb
        assert "Traceback" not in done.stderr


# --- the run folder, the stores and the trainer's output as hostile ground -------------------

HOSTILE = Path(__file__).resolve().parents[1] / "data" / "programs" / "hostile_trainer.py"
FITS_SMALL = ("--per_device_train_batch_size", "1", "--cutoff_len", "32", "--max_steps", "2",
              "--device-memory", "200")
"""A config that fits the trainer's own 200 MiB live-bytes budget."""
OOMS = ("--per_device_train_batch_size", "4", "--cutoff_len", "1024", "--max_steps", "1",
        "--device-memory", "70")
"""A config whose first step runs out of the trainer's own 70 MiB budget (a real OOM)."""


class Planted:
    """A user's notes outside the run folder; untouched means the same bytes and time."""

    def __init__(self, root: Path) -> None:
        self.path = root / "home" / "notes.txt"
        self.path.parent.mkdir(parents=True)
        self.path.write_text("my notes\nline two\n", encoding="utf-8")
        os.utime(self.path, (1_000_000_000, 1_000_000_000))

    def untouched(self) -> bool:
        """Same content, same modification time."""
        return (self.path.read_text(encoding="utf-8") == "my notes\nline two\n"
                and self.path.stat().st_mtime == 1_000_000_000)


def _errors(done: subprocess.CompletedProcess[str]) -> list[str]:
    assert "Traceback" not in done.stderr + done.stdout, done.stderr[-3000:]
    return [line for line in done.stderr.splitlines() if "error:" in line]


def _hostile(tmp_path: Path, run_id: str, shape: str, *args: str,
             extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return _cli(tmp_path, "run", "--quiet", "--no-estimate", "--fresh", *extra, "--runs-dir",
                str(tmp_path / "runs"), "--run-id", run_id, "--", sys.executable, str(HOSTILE),
                shape, *args, "--output_dir", f"out-{run_id}", timeout_s=600)


def _report_reads(tmp_path: Path, run_dir: Path) -> subprocess.CompletedProcess[str]:
    done = _cli(tmp_path, "report", str(run_dir), timeout_s=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    return done


@pytest.mark.parametrize("name", [".lock", "journal.jsonl", "heartbeat", "supervisor.jsonl",
                                  "attempts/01/stdout.log"])
def test_run_into_a_reused_folder_with_a_planted_link_is_refused(tmp_path: Path,
                                                                 name: str) -> None:
    """`--run-id nightly` in a shared runs folder where someone planted a link to the user's
    notes: exit 2, one line naming the link, the notes untouched, nothing run."""
    planted = Planted(tmp_path)
    link = tmp_path / "runs" / "nightly" / name
    link.parent.mkdir(parents=True)
    link.symlink_to(planted.path)
    (tmp_path / "fits.py").write_text(FITS, encoding="utf-8")
    done = _cli(tmp_path, "run", "--quiet", "--no-estimate", "--fresh", "--runs-dir",
                str(tmp_path / "runs"), "--run-id", "nightly", "--", sys.executable, "fits.py")
    assert done.returncode == 2, done.stderr
    errors = _errors(done)
    assert len(errors) == 1, done.stderr
    assert f"{name} is a symbolic link" in errors[0]
    assert planted.untouched()
    assert link.is_symlink()


@pytest.mark.parametrize("name", [".lock", "heartbeat", "supervisor.jsonl"])
def test_resume_with_a_planted_link_is_refused_and_the_journal_still_reads(
        tmp_path: Path, name: str) -> None:
    """A link planted in a finished run's folder: `resume` refuses it in one line and writes
    nothing through it; `report` still reads the journal."""
    planted = Planted(tmp_path)
    assert _run(tmp_path, "done", FITS).returncode == 0
    run_dir = tmp_path / "runs" / "done"
    (run_dir / name).unlink(missing_ok=True)
    (run_dir / name).symlink_to(planted.path)
    journal = (run_dir / "journal.jsonl").read_bytes()
    done = _cli(tmp_path, "resume", str(run_dir), timeout_s=120)
    assert done.returncode == 2, done.stderr
    errors = _errors(done)
    assert len(errors) == 1, done.stderr
    assert f"{name} is a symbolic link" in errors[0]
    assert planted.untouched()
    assert (run_dir / "journal.jsonl").read_bytes() == journal  # nothing of the record lost
    _report_reads(tmp_path, run_dir)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can make a folder another user owns")
def test_a_reused_run_folder_of_another_user_is_refused(tmp_path: Path) -> None:
    """A run folder someone else owns (a shared runs directory): exit 2, one line."""
    (tmp_path / "runs" / "theirs").mkdir(parents=True)
    os.chown(tmp_path / "runs" / "theirs", 54321, 54321)
    (tmp_path / "fits.py").write_text(FITS, encoding="utf-8")
    done = _cli(tmp_path, "run", "--quiet", "--no-estimate", "--fresh", "--runs-dir",
                str(tmp_path / "runs"), "--run-id", "theirs", "--", sys.executable, "fits.py")
    assert done.returncode == 2
    errors = _errors(done)
    assert len(errors) == 1
    assert "belongs to another user (uid 54321)" in errors[0]
    assert list((tmp_path / "runs" / "theirs").iterdir()) == []


def test_a_reused_run_folder_does_not_keep_the_old_logs_head(tmp_path: Path) -> None:
    """A folder left without a journal: the new run's logs start afresh."""
    run_dir = tmp_path / "runs" / "again"
    (run_dir / "attempts" / "01").mkdir(parents=True)
    (run_dir / "attempts" / "01" / "stderr.log").write_text("OLD HEAD\n", encoding="utf-8")
    (run_dir / "attempts" / "01" / "stdout.log").write_text("OLD HEAD\n", encoding="utf-8")
    (run_dir / "supervisor.jsonl").write_text('{"event": "OLD HEAD"}\n', encoding="utf-8")
    assert _run(tmp_path, "again", FITS).returncode == 0
    for name in ("attempts/01/stderr.log", "attempts/01/stdout.log", "supervisor.jsonl"):
        assert "OLD HEAD" not in (run_dir / name).read_text(encoding="utf-8"), name


@pytest.mark.parametrize("shape", ["metrics-inf", "step-huge", "bad-markers"])
def test_insane_numbers_in_the_trainers_output_are_ignored(tmp_path: Path, shape: str) -> None:
    """`train_runtime: 1e999`, a 400-digit step, malformed marker lines: the run fits, its
    report and final command are written, and `report` and `status` read it again."""
    planted = Planted(tmp_path)
    done = _hostile(tmp_path, shape, shape, *FITS_SMALL)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _errors(done) == []
    run_dir = tmp_path / "runs" / shape
    assert (run_dir / "final-command.sh").is_file()
    assert "fitted" in _report_reads(tmp_path, run_dir).stdout
    status = _cli(tmp_path, "status", str(run_dir), timeout_s=120)
    assert status.returncode == 0
    assert "Traceback" not in status.stderr
    resumed = _cli(tmp_path, "resume", str(run_dir), timeout_s=120)
    assert "Traceback" not in resumed.stderr + resumed.stdout
    assert planted.untouched()


def test_a_trainer_writing_into_the_journal_is_skipped_and_counted(tmp_path: Path) -> None:
    """Garbage appended to journal.jsonl by the trainer: the run fits, `report` and `status`
    read the journal and say how many lines were skipped; every event of ours is kept."""
    done = _hostile(tmp_path, "garbage", "journal-garbage", *FITS_SMALL)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "runs" / "garbage"
    shown = _report_reads(tmp_path, run_dir)
    assert "journal.jsonl holds 3 lines the supervisor did not write" in shown.stderr
    assert "3 lines the supervisor did not write" in (run_dir / "report.md").read_text()
    status = _cli(tmp_path, "status", str(run_dir), timeout_s=120)
    assert status.returncode == 0, status.stderr
    assert "3 lines the supervisor did not write" in status.stdout
    kinds = [json.loads(line)["event"] for line in
             (run_dir / "journal.jsonl").read_text().splitlines()
             if line.startswith('{"v"')]
    assert kinds[0] == "run.started"
    assert kinds[-1] == "run.finished"


def test_a_program_that_catches_its_oom_and_exits_0_fits(tmp_path: Path) -> None:
    """A real OOM, caught by the program, which exits 0: one attempt, a fit, and the report
    says the program recovered by itself."""
    done = _hostile(tmp_path, "handled", "handled-oom", *OOMS)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "runs" / "handled"
    finished = [json.loads(line) for line in (run_dir / "journal.jsonl").read_text().splitlines()
                if '"attempt.finished"' in line]
    assert [f["verdict"] for f in finished] == ["fits"]
    assert "recovered by itself" in (run_dir / "report.md").read_text()


def test_an_oom_at_the_end_of_a_200_mb_line_is_recognised(tmp_path: Path) -> None:
    """200 MB on stderr with no newline, then the real OOM's message at the end of that line:
    verdict oom (not fatal), exit 3 with one attempt allowed."""
    done = _hostile(tmp_path, "long", "long-line", *OOMS, extra=("--max-attempts", "1"))
    assert done.returncode == 3, done.stderr[-3000:]
    run_dir = tmp_path / "runs" / "long"
    finished = [json.loads(line) for line in (run_dir / "journal.jsonl").read_text().splitlines()
                if '"attempt.finished"' in line]
    assert finished[0]["verdict"] == "oom"
    assert "OutOfMemoryError" in finished[0]["evidence"]
    _report_reads(tmp_path, run_dir)


@pytest.mark.parametrize(("words", "said"), [
    (("--device-memory", "99999999999999999999999TiB"), "is over 1 EiB"),
    (("--knobs", "map.toml"), "program must be one string"),
])
def test_sizes_and_maps_out_of_bounds_are_one_line(tmp_path: Path, words: tuple[str, ...],
                                                   said: str) -> None:
    """A device over 1 EiB, a knob map whose program is a list: exit 2, one line, no run."""
    (tmp_path / "map.toml").write_text('program = ["a", "b"]\n[knobs.per_device_batch]\n'
                                       'flag = "--per_device_train_batch_size"\n',
                                       encoding="utf-8")
    (tmp_path / "fits.py").write_text(FITS, encoding="utf-8")
    done = _cli(tmp_path, "run", "--quiet", "--no-estimate", *words, "--runs-dir",
                str(tmp_path / "runs"), "--", sys.executable, "fits.py")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len([line for line in lines if said in line]) == 1, done.stderr
    assert not (tmp_path / "runs").exists()


@pytest.fixture
def read_only_mount(tmp_path: Path) -> Iterator[Path]:
    """A small tmpfs, remounted read-only by the test; skipped where none can be mounted."""
    mount = tmp_path / "ro"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],  # noqa: S603, S607
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}); "
                    "needs root or CAP_SYS_ADMIN")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)  # noqa: S603, S607


def test_fits_list_reads_a_store_on_a_read_only_mount(tmp_path: Path,
                                                      read_only_mount: Path) -> None:
    """`fits list` and `fits show` on a store they cannot write: listed as it is."""
    db = read_only_mount / "fits.sqlite3"
    with FitStore.open(db) as store:
        store.remember("ab" * 32, knobs={"per_device_batch": 2}, run_id="run-a",
                       summary={"cwd": str(tmp_path), "model": "tiny"})
    remount = subprocess.run(["mount", "-o", "remount,ro", str(read_only_mount)],  # noqa: S603, S607
                             capture_output=True, text=True, check=False)
    assert remount.returncode == 0, remount.stderr
    listed = _cli(tmp_path, "fits", "--fits-db", str(db), "list", timeout_s=60)
    assert listed.returncode == 0, listed.stderr
    assert "abababababab" in listed.stdout
    assert "per_device_batch=2" in listed.stdout
    shown = _cli(tmp_path, "fits", "--fits-db", str(db), "show", "abab", timeout_s=60)
    assert shown.returncode == 0, shown.stderr
    assert "from run run-a" in shown.stdout
