"""The run folder: a run id that names one folder inside the runs directory, and nothing else.

A run id becomes a path component, a line in final-command.sh's comments and a word in logs,
so it is checked before anything is created: no separators, no `.`/`..`, no control
characters or newlines, at most 200 characters. The runs directory is checked as a place to
write, and every failure is one line that says what to do.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

MAX_RUN_ID = 200
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+@=-]*")


class RunDirError(ValueError):
    """A run id or runs directory that cannot hold a run; the message says what to change."""


def validate_run_id(text: str) -> str:
    """`text` if it can name one folder in the runs directory; RunDirError otherwise."""
    if not text:
        msg = "--run-id is empty; give a name such as `llama-sft-1`, or leave it out"
        raise RunDirError(msg)
    if len(text) > MAX_RUN_ID:
        msg = (f"--run-id is {len(text)} characters long; at most {MAX_RUN_ID} are allowed "
               "(it names a folder)")
        raise RunDirError(msg)
    if text in (".", ".."):
        msg = f"--run-id {text!r} names no folder of its own; give a name such as `llama-sft-1`"
        raise RunDirError(msg)
    if not _RUN_ID.fullmatch(text):
        bad = next((c for c in text if not re.fullmatch(r"[A-Za-z0-9._+@=-]", c)), text[:1])
        msg = (f"--run-id {text[:60]!r} contains {bad!r}; use letters, digits and . _ + @ = - "
               "only, starting with a letter or digit (it names one folder in --runs-dir)")
        raise RunDirError(msg)
    return text


def prepare_run_dir(runs_dir: Path, run_id: str) -> Path:
    """Create `runs_dir/run_id` (parents too) and return it resolved; one-line RunDirError if not.

    Refuses a run id that is not one plain name, a runs directory that is a file, lies under a
    file, is read-only or cannot be created, and a run folder that already holds a run.
    """
    validate_run_id(run_id)
    runs = Path(os.path.abspath(runs_dir))  # noqa: PTH100 - no symlink resolution yet
    for parent in (runs, *runs.parents):
        if parent.exists() and not parent.is_dir():
            where = "is" if parent == runs else f"lies under {parent}, which is"
            msg = f"--runs-dir {runs_dir} {where} a file, not a folder; give a folder"
            raise RunDirError(msg)
        if parent.exists():
            break
    run_dir = runs / run_id
    try:
        runs.mkdir(parents=True, exist_ok=True)
        run_dir.mkdir(exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise RunDirError(_why(runs_dir, exc)) from None
    resolved = run_dir.resolve()
    if resolved.parent != runs.resolve():
        msg = f"--run-id {run_id!r} does not name a folder inside {runs_dir}; choose another"
        raise RunDirError(msg)
    if (resolved / "journal.jsonl").exists():
        msg = f"{resolved} already holds a run; choose another --run-id or --runs-dir"
        raise RunDirError(msg)
    return resolved


def _why(runs_dir: Path, exc: OSError) -> str:
    reason = {
        errno.EACCES: "is not writable by this user",
        errno.EPERM: "is not writable by this user",
        errno.EROFS: "is on a read-only file system",
        errno.ENOSPC: "is on a full disk",
        errno.ENOTDIR: "lies under a file, not a folder",
        errno.EEXIST: "is a file, not a folder",
        errno.ENAMETOOLONG: "makes a path too long",
    }.get(exc.errno or 0, f"cannot be written ({exc.strerror or exc})")
    return f"--runs-dir {runs_dir} {reason}; give a folder you can write to"


# --- writes that can fail ------------------------------------------------------------------------

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class WriteFailedError(OSError):
    """A file of the run could not be written (full disk, vanished folder); says what to do."""


def write_failed(path: Path, exc: OSError, *, run_dir: Path | None = None) -> WriteFailedError:
    """The one line for a failed write of `path`: what happened, then what to do.

    With `run_dir` (the run's journal is whole), the way on is `resume`; without, run again.
    """
    if exc.errno in _NO_SPACE:
        why, fix = "the disk is full", "free space on it"
    elif exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ESTALE):
        why, fix = "its folder is gone", "restore the run folder (or its disk)"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why, fix = "it is not writable", "make the folder writable"
    else:
        why, fix = exc.strerror or str(exc), "fix the disk"
    then = (f"then `oom-supervisor resume {run_dir}`" if run_dir is not None
            else "then run the command again")
    return WriteFailedError(f"cannot write {path} ({why}); {fix}, {then}")


def write_file(path: Path, data: bytes | str, *, run_dir: Path | None = None,
               mode: int = 0o644) -> Path:
    """Write `path` whole or not at all (a temp file beside it, fsynced, then os.replace).

    A failure (full disk, vanished folder) leaves the old file as it was, no temp file behind,
    and raises WriteFailedError naming the path and what to do.
    """
    raw = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        try:
            view = memoryview(raw)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise write_failed(path, exc, run_dir=run_dir) from None
    return path


@contextlib.contextmanager
def writing(path: Path, *, run_dir: Path | None = None) -> Iterator[Path]:
    """A temp path for a writer that wants a file name (matplotlib); moved to `path` on success."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise write_failed(path, exc, run_dir=run_dir) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def file_kind(mode: int) -> str:
    """What a file that is not a regular file is, in words (`a FIFO (named pipe)`)."""
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


class NotRegularFileError(OSError):
    """A run file (journal, lock) that is a FIFO, a directory or a device; never opened for I/O."""


def open_regular(path: Path, flags: int, mode: int = 0o644) -> int:
    """`os.open` that never blocks on a FIFO and refuses anything but a regular file."""
    fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    try:
        found = os.fstat(fd).st_mode
        if not stat.S_ISREG(found):
            msg = (f"{path} is {file_kind(found)}, not a regular file; move it out of the way "
                   "(nothing was read from or written to it)")
            raise NotRegularFileError(msg)
        os.set_blocking(fd, True)
    except OSError:
        os.close(fd)
        raise
    return fd
