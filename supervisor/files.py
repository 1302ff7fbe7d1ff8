"""Writes that can fail, and files that must be regular: one line for each, never a traceback.

Every file the supervisor writes into a run folder (argv.json, config copies, reports, the
plot, the final files) goes through `write_file`/`writing`: a temp file beside the target,
fsynced, then `os.replace`, so a full disk or a vanished folder leaves the last good file (or
none), never half of one, and raises `WriteFailedError` naming the path and what to do (free
space, then `resume`). Run files that are read (journal, lock) are opened with `open_regular`:
never blocking on a FIFO, refusing a directory or a device by name.

Nothing in a run folder is opened through a link: anyone who can write into a shared `runs/`
could otherwise plant `.lock -> ~/notes.txt` and have the next run overwrite it. Every open
carries `O_NOFOLLOW` (and `O_EXCL` where the file is new), folders are made with `mkdir` and
checked with `lstat`, and a link, FIFO or device where a run file belongs is refused in one line.
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
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()  # a stale temp file (or a planted link) is never written through
        # O_EXCL | O_NOFOLLOW: a link raced into the temp name is refused, never followed; the
        # rename below replaces a link at `path` itself, never the file it points to.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     mode)
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
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()  # the writer opens the name itself: leave no planted link there
        yield tmp
        if not stat.S_ISREG(tmp.lstat().st_mode):  # a link raced in: its target was written
            raise OSError(errno.ELOOP, "a link took the temp file's place")  # noqa: TRY301
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


class NotRegularFileError(WriteFailedError):
    """A run file (journal, lock, log) that is a link, a FIFO, a directory or a device; never
    opened for I/O."""


def _refused(path: Path, mode: int) -> NotRegularFileError:
    if stat.S_ISLNK(mode):
        try:
            target = str(path.readlink())
        except OSError:
            target = "?"
        msg = (f"{path} is a symbolic link (to {target[:200]}); files in a run folder are never "
               "opened through links: remove the link (nothing was read from or written "
               "through it)")
    else:
        msg = (f"{path} is {file_kind(mode)}, not a regular file; move it out of the way "
               "(nothing was read from or written to it)")
    return NotRegularFileError(msg)


def _open_nofollow(path: Path, flags: int, mode: int) -> int:
    try:
        return os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EEXIST, errno.EISDIR, errno.ENXIO):
            with contextlib.suppress(OSError):
                found = path.lstat().st_mode
                if not stat.S_ISREG(found):
                    raise _refused(path, found) from None
        raise


def open_regular(path: Path, flags: int, mode: int = 0o644) -> int:
    """`os.open` that never follows a link, never blocks on a FIFO, and refuses anything but a
    regular file (NotRegularFileError, one line naming what it found)."""
    fd = _open_nofollow(path, flags, mode)
    try:
        found = os.fstat(fd).st_mode
        if not stat.S_ISREG(found):
            raise _refused(path, found)
        os.set_blocking(fd, True)
    except OSError:
        os.close(fd)
        raise
    return fd


def open_new(path: Path, flags: int = os.O_WRONLY, mode: int = 0o644) -> int:
    """Create `path` afresh and open it (`O_CREAT | O_EXCL | O_NOFOLLOW`): a regular file left
    there is removed first; a link, FIFO or device there is refused, never followed."""
    with contextlib.suppress(FileNotFoundError):
        found = path.lstat().st_mode
        if not stat.S_ISREG(found):
            raise _refused(path, found)
        path.unlink()
    return open_regular(path, flags | os.O_CREAT | os.O_EXCL, mode)


def read_regular(path: Path, limit: int = -1, *, offset: int = 0) -> bytes:
    """Up to `limit` bytes of a regular file from `offset` (all with -1); never through a link.

    Raises OSError (NotRegularFileError for a link, FIFO or device): readers that show what a
    file holds suppress it and show nothing.
    """
    fd = open_regular(path, os.O_RDONLY)
    with os.fdopen(fd, "rb") as handle:
        if offset:
            handle.seek(offset)
        return handle.read(limit)


def make_dir(path: Path, *, below: Path | None = None) -> Path:
    """`mkdir` each folder from `below` down to `path` (or just `path`) and check each with
    `lstat`: a link or a file where a run folder's folder belongs is refused in one line."""
    chain = [path]
    if below is not None:
        chain = [p for p in reversed(path.parents) if below in (p, *p.parents)] + [path]
    for folder in chain:
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=0o755)
        found = folder.lstat().st_mode
        if not stat.S_ISDIR(found):
            raise _refused(folder, found)
    return path


def refuse_unsafe(paths: list[Path]) -> None:
    """NotRegularFileError for the first of `paths` that exists and is a link, a FIFO or a
    device (folders are fine where a folder belongs: callers pass files)."""
    for path in paths:
        try:
            found = path.lstat().st_mode
        except OSError:
            continue
        if not stat.S_ISREG(found):
            raise _refused(path, found)


def check_owner(path: Path, what: str = "run folder") -> None:
    """NotRegularFileError unless `path` (not followed) belongs to this user."""
    info = path.lstat()
    if info.st_uid != os.geteuid():
        msg = (f"the {what} {path} belongs to another user (uid {info.st_uid}); a run never "
               "writes into a folder it does not own: choose another --run-id or --runs-dir")
        raise NotRegularFileError(msg)


def touch(path: Path) -> None:
    """Create `path` or set its time to now, never through a link (OSError otherwise)."""
    fd = open_regular(path, os.O_WRONLY | os.O_CREAT)
    try:
        os.utime(fd)
    finally:
        os.close(fd)


def read_tail(path: Path, chars: int) -> bytes:
    """The last `chars` bytes of a regular file, never through a link (OSError otherwise)."""
    fd = open_regular(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        return os.pread(fd, chars, max(0, size - chars))
    finally:
        os.close(fd)
