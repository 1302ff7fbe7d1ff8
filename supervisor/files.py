"""Writes that can fail, and files that must be regular: one line for each, never a traceback.

Every file the supervisor writes into a run folder (argv.json, config copies, reports, the
plot, the final files) goes through `write_file`/`writing`: a temp file beside the target,
fsynced, then `os.replace`, so a full disk or a vanished folder leaves the last good file (or
none), never half of one, and raises `WriteFailedError` naming the path and what to do (free
space, then `resume`). Run files that are read (journal, lock) are opened with `open_regular`:
never blocking on a FIFO, refusing a directory or a device by name.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class WriteFailedError(OSError):
    """A file of the run could not be written (full disk, vanished folder); says what to do."""


def write_failed(path: Path, exc: OSError, *, run_dir: Path | None = None,
                 then: str | None = None) -> WriteFailedError:
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
    run_dir = run_dir or _run_dir_of(path)
    if then is None:
        then = (f"then `oom-supervisor resume {run_dir}`" if run_dir is not None
                else "then run the command again")
    return WriteFailedError(f"cannot write {path} ({why}); {fix}, {then}")


def _run_dir_of(path: Path) -> Path | None:
    """The run folder a path lies in (the one holding journal.jsonl, or above attempts/)."""
    for parent in path.parents:
        if parent.name == "attempts":
            return parent.parent
        with contextlib.suppress(OSError):
            if (parent / "journal.jsonl").is_file():
                return parent
    return None


def write_file(path: Path, data: bytes | str, *, run_dir: Path | None = None,  # noqa: PLR0913
               mode: int = 0o644, parents: bool = False, then: str | None = None) -> Path:
    """Write `path` whole or not at all (a temp file beside it, fsynced, then os.replace).

    A failure (full disk, vanished folder) leaves the old file as it was, no temp file behind,
    and raises WriteFailedError naming the path and what to do.
    """
    raw = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if parents:
            path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        try:
            view = memoryview(raw)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise write_failed(path, exc, run_dir=run_dir, then=then) from None
    return path


@contextlib.contextmanager
def writing(path: Path, *, run_dir: Path | None = None,
            then: str | None = None) -> Iterator[Path]:
    """A temp path for a writer that wants a file name (matplotlib); moved to `path` on success."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        tmp.replace(path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise write_failed(path, exc, run_dir=run_dir, then=then) from None
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
