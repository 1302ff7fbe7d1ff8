"""A launcher's word that one of its tasks ended, and that task's own last words.

When one rank of a multi-process step ends (an uncaught C++/NCCL error aborts it, a segfault,
the OOM killer's SIGKILL, an exception), its peers wait in the next collective until their own
timeout. The launcher says which task ended and how; the supervisor ends the step after a short
grace and builds the verdict from the ended task's own lines, never from a peer it ended itself.

- srun (SchedMD/slurm src/srun/step_launch.c / launch.c, `_task_finish`): one line per task that
  ended badly while its step goes on, `srun: error: HOST: task N: Exited with exit code K`, or
  the signal's `strsignal` text (`Aborted`, `Segmentation fault`, `Killed`, `Terminated`, ...)
  with ` (core dumped)` when it dumped core. Recorded from Slurm 22.05's srun in
  tests/data/tails/srun_task1_*.txt. With `--label` (or `SLURM_LABELIO`) each line of a task's
  output carries its task id (`1: `); without it the task's lines are the ones just before
  srun's line, and with `--output`/`--error` naming `%t` each task writes a file of its own.
- torchrun (torch/distributed/elastic): it ends the other workers itself and names the first
  failure in its `Root Cause` block (`rank : 1 (local_rank: 1)`, `exitcode : -6`); a worker's
  lines carry `[rankN]: ` (an uncaught exception, torch.distributed's excepthook) or
  `[defaultN]:` (`--tee`).

Pure: the runner feeds lines and files in.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# strsignal(3) texts of the signals a task dies of (glibc), and srun's exit-code form.
_HOW = (r"Exited with exit code [1-9]\d*|Aborted|Segmentation fault|Killed|Terminated"
        r"(?: by signal \d+)?|Bus error|Floating point exception|Illegal instruction|"
        r"Trace/breakpoint trap|Bad system call|Hangup|Interrupt|Quit|User defined signal [12]|"
        r"Unknown signal \d+|CPU time limit exceeded|File size limit exceeded")
TASK_END = re.compile(r"srun: error: (?P<host>\S+): tasks? (?P<tasks>[\d,\-\[\]]+): "
                      rf"(?P<how>{_HOW})(?P<core> \(core dumped\))?")
"""srun's line for tasks that ended badly while their step goes on."""

_SRUN_LABEL = re.compile(r"^(?:P\d+ )? *(\d+): ")
"""`srun --label`'s prefix: the task id, right-aligned (src/common/write_labelled_message.c)."""
_TORCHRUN_LABEL = re.compile(r"^\[(?:rank|default)(\d+)\]: ?")
_LAUNCHER_OWN = re.compile(r"^(?:srun|slurmstepd(?:-\S+)?|salloc|sbatch): |"
                           r"^[WEIF]\d{4} [\d:.]+ +\d+ torch/distributed/")
"""Lines the launcher writes itself: never a task's own words."""

TASKS_KEPT = 256
"""Most task ids read from one srun line."""
LINES_KEPT = 20
"""Own lines kept for the ended task."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskEnd:
    """One launcher line saying tasks ended, and how."""

    line: str
    tasks: tuple[int, ...]
    how: str
    host: str
    who: str = "task"
    """What the launcher calls them: srun's tasks, torchrun's ranks."""

    @property
    def by_signal(self) -> bool:
        """True when a signal ended the task (not an exit code)."""
        return not self.how.startswith("Exited")

    @property
    def signal_name(self) -> str | None:
        """`SIGABRT` for `Aborted`, ... (None for an exit code or an unknown text)."""
        return _SIGNAL_OF.get(self.how.removesuffix(" (core dumped)"))

    def describe(self) -> str:
        """`task 1 on vm ended: Aborted (SIGABRT)`."""
        who = self.who if len(self.tasks) == 1 else f"{self.who}s"
        ids = ",".join(str(t) for t in self.tasks)
        name = f" ({self.signal_name})" if self.signal_name else ""
        return f"{who} {ids} on {self.host} ended: {self.how}{name}"


_SIGNAL_OF = {"Aborted": "SIGABRT", "Segmentation fault": "SIGSEGV", "Killed": "SIGKILL",
              "Terminated": "SIGTERM", "Bus error": "SIGBUS",
              "Floating point exception": "SIGFPE", "Illegal instruction": "SIGILL",
              "Trace/breakpoint trap": "SIGTRAP", "Bad system call": "SIGSYS",
              "Hangup": "SIGHUP", "Interrupt": "SIGINT", "Quit": "SIGQUIT"}


def task_end(line: str) -> TaskEnd | None:
    """The tasks srun says ended badly on this line (None: not such a line)."""
    found = TASK_END.search(line)
    if found is None:
        return None
    tasks = parse_tasks(found.group("tasks"))
    if not tasks:
        return None
    how = found.group("how") + (found.group("core") or "")
    how = _by_number(how)
    return TaskEnd(line=line[found.start():].strip(), tasks=tasks, how=how,
                   host=found.group("host"))


def _by_number(how: str) -> str:
    """`Terminated by signal 6` reads `Aborted` like the other texts."""
    match = re.fullmatch(r"Terminated by signal (\d+)(.*)", how)
    if match is None:
        return how
    number = int(match.group(1))
    try:
        name = signal.Signals(number).name
    except ValueError:
        return how
    text = next((t for t, n in _SIGNAL_OF.items() if n == name), None)
    return f"{text}{match.group(2)}" if text else how


def parse_tasks(text: str) -> tuple[int, ...]:
    """`1`, `0-3`, `[0-2,5]` (srun's hostlist-style ranges) as task ids; () if not one."""
    ids: list[int] = []
    for part in text.strip("[]").split(","):
        first, sep, last = part.partition("-")
        if not first.isdigit() or (sep and not last.isdigit()):
            return ()
        ids += range(int(first), int(last) + 1) if sep else [int(first)]
    return tuple(sorted(set(ids)))[:TASKS_KEPT]


def task_of(line: str) -> tuple[int | None, str]:
    """The task a labelled line came from (srun `--label`, torchrun `[rankN]:`/`[defaultN]:`)
    and the line without the label; (None, line) for an unlabelled line."""
    for label in (_SRUN_LABEL, _TORCHRUN_LABEL):
        match = label.match(line)
        if match is not None:
            return int(match.group(1)), line[match.end():]
    return None, line


def is_launcher_line(line: str) -> bool:
    """A line srun/slurmstepd wrote itself (also under a task's label), not a task's words."""
    _, text = task_of(line.lstrip())
    return bool(_LAUNCHER_OWN.match(text.lstrip()))


def own_lines(end: TaskEnd, before: Sequence[str],
              files: Mapping[int, Sequence[str]] | None = None,
              later: Sequence[str] = ()) -> tuple[tuple[str, ...], str]:
    """The ended task's own last lines, and where they came from.

    `before`: the output up to srun's line; `later`: the output's last lines at the end (the
    task's stdout and srun's stderr are two pipes, so its last labelled lines may come after
    srun's). In order: the task's own output file (srun `--output`/`--error` naming `%t`), its
    labelled lines, else the unlabelled lines just before srun's line (the task's words when
    the peers were quiet; said as such, since without labels srun does not tell the tasks
    apart).
    """
    for task in end.tasks:
        found = [line for line in (files or {}).get(task, ()) if line.strip()]
        if found:
            return tuple(found[-LINES_KEPT:]), f"task {task}'s own output file"
    words = [line for line in before if line.strip() and not is_launcher_line(line)]
    for task in end.tasks:
        for lines in (later, words):
            found = [line for line in lines if task_of(line.lstrip())[0] == task
                     and line.strip() and not is_launcher_line(line)]
            if found:
                return tuple(found[-LINES_KEPT:]), f"task {task}'s own lines"
    unlabelled = [line for line in words if task_of(line.lstrip())[0] is None]
    if unlabelled:
        said = ("the output just before srun's line (without srun --label the tasks' lines "
                "are not told apart)")
        return tuple(unlabelled[-LINES_KEPT:]), said
    return (), "no output of its own"


def read_ended_task(lines: Sequence[str], files: Mapping[int, Sequence[str]] | None = None,
                    ) -> tuple[TaskEnd, tuple[str, ...], str] | None:
    """The first task end srun reports in `lines`, with that task's own last lines and where
    they came from (what the runner gathers as the output streams past)."""
    for i, line in enumerate(lines):
        end = task_end(line)
        if end is not None:
            own, source = own_lines(end, lines[:i], files)
            return end, own, source
    return None


def evidence(end: TaskEnd, lines: Sequence[str], source: str) -> str:
    """`task 1 on vm ended: Aborted (SIGABRT); its last line (task 1's own lines): "..."`."""
    last = next((line.strip() for line in reversed(lines) if line.strip()), None)
    if last is None:
        return f"{end.describe()}; it printed nothing before it ended"
    return f"{end.describe()}; its last line ({source}): {last}"


def per_task_files(argv: Sequence[str]) -> tuple[str, ...]:
    """srun's `--output`/`--error` patterns that name the task (`%t`), in argv order."""
    patterns: list[str] = []
    words = list(argv)
    for i, word in enumerate(words):
        value = None
        for flag in ("--output", "--error", "-o", "-e"):
            if word == flag and i + 1 < len(words):
                value = words[i + 1]
            elif word.startswith(f"{flag}=") and flag.startswith("--"):
                value = word.partition("=")[2]
            elif flag in ("-o", "-e") and word.startswith(flag) and word != flag:
                value = word[len(flag):]
            if value is not None:
                break
        if value is not None and re.search(r"%\d*t", value):
            patterns.append(value)
    return tuple(patterns)


def expand(pattern: str, *, task: int, job: str | None, step: str | None,
           host: str | None) -> str:
    """srun's filename pattern for one task (`%t` task, `%j` job, `%s` step, `%N` host,
    `%%`); letters it does not know stay as they are."""
    values = {"t": str(task), "j": job, "s": step, "N": host, "%": "%",
              "J": f"{job}.{step}" if job and step else None}

    def one(match: re.Match[str]) -> str:
        width, letter = match.group(1), match.group(2)
        value = values.get(letter)
        if value is None:
            return match.group(0)
        return value.zfill(int(width)) if width and value.isdigit() else value

    return re.sub(r"%(\d*)([a-zA-Z%])", one, pattern)


# torchrun's failure summary (torch/distributed/elastic/multiprocessing/errors/__init__.py,
# ChildFailedError.format_msg): "Root Cause (first observed failure):", then "rank      : 1
# (local_rank: 1)", "host : ...", "exitcode  : -6 (pid: N)"; recorded in
# tests/data/tails/torchrun_rank1_abort.txt. Its own first line about the failure is the
# agent's "Sending process N closing signal" or "failed (exitcode: -6) local_rank: 1".
_ROOT_CAUSE = "Root Cause (first observed failure)"
_RC_FIELD = re.compile(r"^\s*(rank|host|exitcode)\s*:\s*(.*)$")
_RC_RANK = re.compile(r"(\d+) \(local_rank: (\d+)\)")
_AGENT_ENDS = re.compile(r"closing signal SIG|failed \(exitcode: -?\d+\) local_rank:")


def torchrun_ended_rank(lines: Sequence[str]) -> tuple[TaskEnd, tuple[str, ...], str] | None:
    """The rank torchrun names as the root cause when a signal ended it, with that rank's own
    last lines and where they came from (None: no such summary, or it exited with a code)."""
    at = next((i for i, line in enumerate(lines) if _ROOT_CAUSE in line), None)
    if at is None:
        return None
    fields: dict[str, str] = {}
    for line in lines[at + 1:at + 12]:
        found = _RC_FIELD.match(line)
        if found is not None:
            fields.setdefault(found.group(1), found.group(2).strip())
    rank = _RC_RANK.match(fields.get("rank", ""))
    code = re.match(r"-(\d+)\b", fields.get("exitcode", ""))
    if rank is None or code is None:
        return None
    try:
        name = signal.Signals(int(code.group(1))).name
    except ValueError:
        return None
    how = next((text for text, sig in _SIGNAL_OF.items() if sig == name), name)
    tasks = tuple(sorted({int(rank.group(1)), int(rank.group(2))}))
    end = TaskEnd(line=f"exitcode: {fields['exitcode']}", tasks=tasks[:1], how=how,
                  host=fields.get("host", "?"), who="rank")
    # A labelled line is the rank's wherever it stands (torchrun's tee prints the ranks' lines
    # on its stdout, its own on stderr: they interleave); an unlabelled one only before
    # torchrun's first line about the failure.
    for task in tasks:
        own = [line for line in lines if task_of(line.lstrip())[0] == task
               and line.strip() and not is_launcher_line(line)]
        if own:
            return end, tuple(own[-LINES_KEPT:]), f"rank {task}'s own lines"
    agent = next((i for i, line in enumerate(lines) if _AGENT_ENDS.search(line)), at)
    words = [line for line in lines[:agent] if line.strip() and not is_launcher_line(line)]
    unlabelled = [line for line in words if task_of(line.lstrip())[0] is None]
    if unlabelled:
        said = ("the output just before torchrun saw it end (torchrun --tee 3 labels each "
                "rank's lines)")
        return end, tuple(unlabelled[-LINES_KEPT:]), said
    return end, (), "no output of its own"
