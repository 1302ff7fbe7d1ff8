"""The run folder is never written through a link: every file the supervisor opens there is
refused in one line when it is a link, a FIFO or a device, and a planted target outside the
folder keeps its content and its time."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from supervisor import _wrap
from supervisor.console import JsonTee
from supervisor.events import JournalError
from supervisor.files import (
    NotRegularFileError,
    make_dir,
    open_new,
    read_tail,
    touch,
    write_file,
    writing,
)
from supervisor.journal import Journal, holder
from supervisor.loop import last_alive
from supervisor.rundir import RunDirError, check_run_folder, prepare_run_dir


class Planted:
    """A user's file outside the run folder, and a way to tell it was never touched."""

    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "outside" / "notes.txt"
        self.path.parent.mkdir()
        self.path.write_text("line one\nline two\n", encoding="utf-8")
        os.utime(self.path, (1_000_000_000, 1_000_000_000))

    def untouched(self) -> bool:
        """Same bytes, same modification time."""
        info = self.path.stat()
        return (self.path.read_text(encoding="utf-8") == "line one\nline two\n"
                and info.st_mtime == 1_000_000_000)


@pytest.fixture
def planted(tmp_path: Path) -> Planted:
    return Planted(tmp_path)


def _run_dir(tmp_path: Path) -> Path:
    run_dir = tmp_path / "runs" / "nightly"
    run_dir.mkdir(parents=True)
    return run_dir


@pytest.mark.parametrize("name", [".lock", "journal.jsonl", "heartbeat", "supervisor.jsonl"])
def test_a_link_where_a_run_file_belongs_is_refused_by_the_journal(
        tmp_path: Path, planted: Planted, name: str) -> None:
    """Opening the run's journal (run and resume both do) names the link and writes nothing."""
    run_dir = _run_dir(tmp_path)
    (run_dir / name).symlink_to(planted.path)
    with pytest.raises(JournalError, match=r"is a symbolic link \(to .*notes.txt\)"):
        Journal(run_dir)
    assert planted.untouched()


def test_a_link_in_an_attempt_folder_is_refused_before_anything_runs(
        tmp_path: Path, planted: Planted) -> None:
    """A reused run folder whose attempts/01/stdout.log points elsewhere: refused, by name."""
    run_dir = _run_dir(tmp_path)
    (run_dir / "attempts" / "01").mkdir(parents=True)
    (run_dir / "attempts" / "01" / "stdout.log").symlink_to(planted.path)
    with pytest.raises(RunDirError, match=r"attempts/01/stdout.log is a symbolic link"):
        prepare_run_dir(tmp_path / "runs", "nightly")
    assert planted.untouched()


def test_a_linked_attempt_folder_is_refused(tmp_path: Path, planted: Planted) -> None:
    """attempts/02 -> a folder elsewhere: mkdir + lstat refuse it; nothing lands there."""
    run_dir = _run_dir(tmp_path)
    (run_dir / "attempts").mkdir()
    (run_dir / "attempts" / "02").symlink_to(planted.path.parent, target_is_directory=True)
    with pytest.raises(NotRegularFileError, match="symbolic link"):
        check_run_folder(run_dir)
    with pytest.raises(NotRegularFileError, match="symbolic link"):
        make_dir(run_dir / "attempts" / "02", below=run_dir)
    assert sorted(p.name for p in planted.path.parent.iterdir()) == ["notes.txt"]


def test_a_linked_run_folder_is_refused(tmp_path: Path, planted: Planted) -> None:
    """`--run-id nightly` where runs/nightly is a link to another folder."""
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "nightly").symlink_to(planted.path.parent, target_is_directory=True)
    with pytest.raises(RunDirError, match="symbolic link"):
        prepare_run_dir(tmp_path / "runs", "nightly")
    assert sorted(p.name for p in planted.path.parent.iterdir()) == ["notes.txt"]


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can make a folder another user owns")
def test_a_reused_run_folder_of_another_user_is_refused(tmp_path: Path) -> None:
    """Someone else's runs/nightly (a shared runs directory): never written into."""
    run_dir = _run_dir(tmp_path)
    os.chown(run_dir, 54321, 54321)
    with pytest.raises(RunDirError, match=r"belongs to another user \(uid 54321\)"):
        prepare_run_dir(tmp_path / "runs", "nightly")
    assert list(run_dir.iterdir()) == []


def test_a_fifo_or_device_where_a_log_belongs_is_refused(tmp_path: Path) -> None:
    """The same one line as a FIFO journal: what it is, nothing read or written."""
    run_dir = _run_dir(tmp_path)
    os.mkfifo(run_dir / "heartbeat")
    with pytest.raises(NotRegularFileError, match=r"heartbeat is a FIFO \(named pipe\)"):
        check_run_folder(run_dir)
    (run_dir / "heartbeat").unlink()
    (run_dir / "supervisor.jsonl").symlink_to("/dev/null")
    with pytest.raises(NotRegularFileError, match="symbolic link"):
        check_run_folder(run_dir)


def test_the_heartbeat_never_touches_through_a_link(tmp_path: Path, planted: Planted) -> None:
    """A link planted mid-run: the beat fails (quietly, in its thread), the target keeps its
    time, and the last-alive time is the link's own, not the target's."""
    run_dir = _run_dir(tmp_path)
    (run_dir / "heartbeat").symlink_to(planted.path)
    with pytest.raises(OSError, match="symbolic link"):
        touch(run_dir / "heartbeat")
    assert planted.untouched()
    assert last_alive(run_dir) != planted.path.stat().st_mtime


def test_the_json_log_is_not_written_through_a_link(tmp_path: Path, planted: Planted) -> None:
    """supervisor.jsonl planted as a link: the log is not written anywhere (best effort)."""
    run_dir = _run_dir(tmp_path)
    (run_dir / "supervisor.jsonl").symlink_to(planted.path)
    for fresh in (False, True):
        tee = JsonTee()
        tee.fresh = fresh
        tee(None, "info", {"event": "run.started"})
        tee.open(run_dir)
        tee(None, "info", {"event": "attempt.started"})
        tee.close()
    assert planted.untouched()


def test_a_new_runs_json_log_starts_afresh_and_a_resumed_one_appends(tmp_path: Path) -> None:
    """A reused run folder does not keep the old log's head; resume adds to its own."""
    run_dir = _run_dir(tmp_path)
    (run_dir / "supervisor.jsonl").write_text('{"event": "old"}\n', encoding="utf-8")
    tee = JsonTee()
    tee.fresh = True
    tee.open(run_dir)
    tee(None, "info", {"event": "new"})
    tee.close()
    again = JsonTee()
    again.open(run_dir)
    again(None, "info", {"event": "resumed"})
    again.close()
    text = (run_dir / "supervisor.jsonl").read_text(encoding="utf-8")
    assert "old" not in text
    assert text.index('"new"') < text.index('"resumed"')


def test_the_shims_logs_are_new_files_never_links(tmp_path: Path, planted: Planted) -> None:
    """An old stdout.log is replaced (its head not kept); a link there is refused."""
    log = tmp_path / "stdout.log"
    log.write_bytes(b"OLD HEAD of a previous run\n")
    capped = _wrap._CappedLog(log, 0)  # noqa: SLF001 - the shim's log, unit by unit
    capped.write(b"new line\n")
    capped.close()
    assert log.read_bytes() == b"new line\n"
    log.unlink()
    log.symlink_to(planted.path)
    with pytest.raises(NotRegularFileError, match="symbolic link"):
        _wrap._CappedLog(log, 0)  # noqa: SLF001
    assert planted.untouched()


def test_the_shim_refuses_a_linked_log_in_one_line_and_runs_nothing(
        tmp_path: Path, planted: Planted, capsys: pytest.CaptureFixture[str]) -> None:
    """A link raced into the attempt folder after the check: exit 126, the command not run."""
    (tmp_path / "stderr.log").symlink_to(planted.path)
    marker = tmp_path / "ran"
    code = _wrap.main([str(tmp_path / "exit_status.json"), "--", sys.executable, "-c",
                       f"open({str(marker)!r}, 'w')"])
    assert code == 126
    assert not marker.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "stderr.log is a symbolic link" in err[0]
    assert planted.untouched()


def test_written_files_replace_a_link_never_write_through_it(
        tmp_path: Path, planted: Planted) -> None:
    """report.md as a link, or a link planted at the temp name: the link is replaced by the
    new file (rename), the target is never written."""
    run_dir = _run_dir(tmp_path)
    (run_dir / "report.md").symlink_to(planted.path)
    (run_dir / f".memory.png.{os.getpid()}.tmp.png").symlink_to(planted.path)
    (run_dir / f".final.sh.{os.getpid()}.tmp").symlink_to(planted.path)
    write_file(run_dir / "report.md", "# report\n")
    write_file(run_dir / "final.sh", "echo\n")
    with writing(run_dir / "memory.png") as tmp:
        tmp.write_bytes(b"png")
    for name in ("report.md", "final.sh", "memory.png"):
        assert stat.S_ISREG((run_dir / name).lstat().st_mode), name
    assert (run_dir / "report.md").read_text(encoding="utf-8") == "# report\n"
    assert planted.untouched()


def test_readers_do_not_follow_links(tmp_path: Path, planted: Planted) -> None:
    """`status` and the live line read logs and the lock: a link is not read through."""
    run_dir = _run_dir(tmp_path)
    (run_dir / "stdout.log").symlink_to(planted.path)
    with pytest.raises(OSError, match="symbolic link"):
        read_tail(run_dir / "stdout.log", 100)
    (run_dir / ".lock").symlink_to(planted.path)
    assert holder(run_dir) is None


def test_a_new_file_is_created_exclusively(tmp_path: Path, planted: Planted) -> None:
    """open_new: a regular leftover is replaced, a link is refused."""
    target = tmp_path / "new.txt"
    target.write_text("left over", encoding="utf-8")
    os.close(open_new(target))
    assert target.read_text(encoding="utf-8") == ""
    target.unlink()
    target.symlink_to(planted.path)
    with pytest.raises(NotRegularFileError):
        open_new(target)
    assert planted.untouched()
