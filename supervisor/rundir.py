"""The run folder: a run id that names one folder inside the runs directory, and nothing else.

A run id becomes a path component, a line in final-command.sh's comments and a word in logs,
so it is checked before anything is created: no separators, no `.`/`..`, no control
characters or newlines, at most 200 characters. The runs directory is checked as a place to
write, and every failure is one line that says what to do.

A run folder that already exists (a reused `--run-id`, a `resume`) must be this user's and a
real folder, and the files the supervisor writes there must not be links, FIFOs or devices
(`check_run_folder`): someone who can write into a shared runs directory cannot make the next
run write through a planted link.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path

from supervisor.files import NotRegularFileError, check_owner, open_new, refuse_unsafe

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
        reused = os.path.lexists(run_dir)
        run_dir.mkdir(exist_ok=True)
        # A folder made just now is ours whatever the file system says of its owner (NFS
        # root_squash); one that was there must be this user's.
        check_run_folder(run_dir, owner=reused)
        probe = run_dir / ".write-test"
        os.close(open_new(probe))
        probe.unlink()
    except NotRegularFileError as exc:
        raise RunDirError(str(exc)) from None
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


RUN_FILES = (".lock", "journal.jsonl", "heartbeat", "supervisor.jsonl", "supervisor.log",
             ".write-test")
"""The files the supervisor opens in a run folder by name (reports are written by rename)."""
ATTEMPT_FILES = ("stdout.log", "stderr.log", "stdout.log.tail0", "stdout.log.tail1",
                 "stderr.log.tail0", "stderr.log.tail1", "exit_status.json",
                 "exit_status.json.tmp")
"""The files the attempt shim opens in each `attempts/NN/` folder."""


def check_run_folder(run_dir: Path, *, owner: bool = False) -> None:
    """NotRegularFileError (one line) when a run folder is a link, holds a link, FIFO or
    device where the supervisor writes (its lock, journal, heartbeat, logs, attempt folders and
    their logs), or (`owner`) is not this user's."""
    info = run_dir.lstat()
    if not stat.S_ISDIR(info.st_mode):
        refuse_unsafe([run_dir])
    if owner:
        check_owner(run_dir)
    refuse_unsafe([run_dir / name for name in RUN_FILES])
    attempts = run_dir / "attempts"
    try:
        found = attempts.lstat().st_mode
    except OSError:
        return
    if not stat.S_ISDIR(found):
        refuse_unsafe([attempts])
        return
    for folder in sorted(attempts.iterdir()):
        if not stat.S_ISDIR(folder.lstat().st_mode):
            refuse_unsafe([folder])
            continue
        refuse_unsafe([folder / name for name in ATTEMPT_FILES])


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
