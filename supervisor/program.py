"""Ask the program itself: run its `--help` once and read which flags it accepts, and defaults.

argparse and HfArgumentParser list every option with its spellings, whether it takes a value
(`--bs BS`, HF booleans `--gradient_checkpointing [GRADIENT_CHECKPOINTING]`, bare switches) and,
for HfArgumentParser, its default ("(default: False)"). What the program says outranks what is
known by its file name: a `train_bash.py` may be LLaMA-Factory's or a Hugging Face script.

`parse_help` is pure (unit tests feed help texts recorded from real programs, tests/data/help/).
`run_help` is the edge: the program with `--help`, without its launcher, in the same
interpreter and environment, run like an attempt (its own session, a marker in its environment
naming the supervisor, its whole tree ended whatever happens). A program that prints nothing
yet is starting up (importing torch on a loaded node takes minutes): it is waited for up to a
start-up allowance, and the console says so after 3 s. It ignores `--help` only on evidence of
training (`judge_probe`): a training step's line, checkpoint folders, GPU memory, worker
processes, or output that is not a usage text; then it is ended at once, the command is read
by its family's known defaults, and the run says so. A probe whose supervisor was killed is
ended by the next run or resume (`end_dead_probes`).
What was parsed (flags and defaults, redacted; never the raw output) is cached by the script's
content hash, the interpreter and what decides its imports (PYTHONPATH, the venv) in a 0600
JSON file in a 0700 folder under the user cache dir (`$XDG_CACHE_HOME/oom-supervisor/help.json`):
a second run of the same script does not ask it again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePath

import psutil
import structlog

from supervisor.command import Command, CommandError, Invocation, environment, locate_command
from supervisor.gpu import NvmlProbe
from supervisor.secrets import Redactor, is_secret_name, is_secret_value, placeholder

log = structlog.get_logger(__name__)

HELP_TIMEOUT_S = 300.0
"""The start-up allowance: the longest wait for a program's `--help` that prints nothing yet.
Importing torch and transformers from a network filesystem on a loaded node takes minutes of
wall time, and silence is not training."""
MARKER_ENV = "OOM_SUPERVISOR_ATTEMPT"
"""The attempts' marker (supervisor.runner): the probe carries one of its own, `probe:...`."""

_CACHE_VERSION = 4
_OPTION_LINE = re.compile(r"^ {1,4}(-{1,2}[A-Za-z0-9].*)$")
_DEFAULT = re.compile(r"\(default:\s*(.*?)\)\s*$")
_USAGE = re.compile(r"^usage:", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True, slots=True, kw_only=True)
class Option:
    """One option the program's parser accepts, as its help lists it."""

    names: tuple[str, ...]
    takes: str
    """"none" (a switch), "optional" (`--flag [X]`: HF booleans) or "required" (`--flag X`)."""
    default: str | None = None
    """The default as printed ("(default: False)"), None when the help does not say."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ProgramHelp:
    """What a program's `--help` says it accepts."""

    options: tuple[Option, ...]
    prints_defaults: bool = False
    """The parser prints every default (HfArgumentParser, ArgumentDefaultsHelpFormatter)."""

    def option(self, name: str) -> Option | None:
        """The option spelled `name` (`--per_device_train_batch_size`), if the program has one."""
        return next((o for o in self.options if name in o.names), None)

    def accepts(self, name: str) -> bool:
        """True when the program's parser takes the flag `name`."""
        return self.option(name) is not None

    def describe(self) -> str:
        """A few words for the journal: how many flags, and whether defaults were printed."""
        kind = "defaults printed" if self.prints_defaults else "no defaults printed"
        return f"its --help lists {len(self.options)} options ({kind})"


@dataclass(frozen=True, slots=True, kw_only=True)
class Program:
    """The command's training program, found once and handed down: where it sits behind its
    launchers, the command that prints its help, and the environment it runs with. The
    dialect's reading, the probe and the import checks read this one value, never locate the
    program again on their own."""

    command: Command
    invocation: Invocation | None
    """Where the program sits (None: no program found; `error` says why)."""
    error: str | None = None
    help_argv: tuple[str, ...] | None = None
    """Its interpreter, the script or `-m` module, `--help` (None: not a Python program)."""
    env: Mapping[str, str] = field(default_factory=dict)
    """Ours, plus what the command adds, plus its own `VAR=value` words."""


def find_program(command: Command) -> Program:
    """Locate the command's program (its launchers read as they read their environment and
    directory) and how to ask it: the one value the rest is read from."""
    env = environment(command)
    try:
        invocation = locate_command(command)
    except CommandError as exc:
        return Program(command=command, invocation=None, error=str(exc), env=env)
    env.update(invocation.env_assignments)
    return Program(command=command, invocation=invocation,
                   help_argv=_help_argv(command, invocation), env=env)


HelpProbe = Callable[[Program], str | None]
"""The edge that returns a program's `--help` text (None: it cannot be asked)."""


def parse_help(text: str) -> ProgramHelp | None:
    """The options an argparse / HfArgumentParser help text lists; None if it is not one."""
    if not _USAGE.search(text):
        return None
    options: list[Option] = []
    current: tuple[tuple[str, ...], str] | None = None
    help_lines: list[str] = []

    def close() -> None:
        if current is not None:
            joined = " ".join(" ".join(help_lines).split())
            found = _DEFAULT.search(joined)
            options.append(Option(names=current[0], takes=current[1],
                                  default=found.group(1) if found else None))

    for line in text.splitlines():
        match = _OPTION_LINE.match(line)
        if match is not None:
            close()
            invocation, _, rest = match.group(1).partition("  ")
            current = _invocation(invocation.strip())
            help_lines = [rest.strip()]
        elif current is not None and line.startswith(" " * 5) and line.strip():
            help_lines.append(line.strip())
        elif current is not None and not line.strip():
            continue
        elif current is not None:  # a section title ("options:", "ModelArguments:")
            close()
            current, help_lines = None, []
    close()
    if not options:
        return None
    with_default = sum(o.default is not None for o in options if "--help" not in o.names)
    return ProgramHelp(options=tuple(options),
                       prints_defaults=with_default >= max(1, (len(options) - 1) // 2))


def _invocation(text: str) -> tuple[tuple[str, ...], str]:
    """Spellings and value kind of `--a A, --b A`, `-h, --help`, `--x [X]` (3.13: `--a, --b A`)."""
    names: list[str] = []
    takes = "none"
    for part in text.split(", "):
        name, _, metavar = part.strip().partition(" ")
        if not name.startswith("-"):
            continue
        names.append(name.partition("=")[0])
        metavar = metavar.strip()
        if metavar.startswith("["):
            takes = "optional"
        elif metavar:
            takes = "required"
    return tuple(names), takes


# --- the edge ----------------------------------------------------------------------------------


def help_argv(command: Command, invocation: Invocation | None = None) -> tuple[str, ...] | None:
    """The command that prints the program's help: its interpreter, the script or -m, `--help`.

    None for programs that are not Python scripts or modules run by a Python interpreter.
    """
    if invocation is None:
        return find_program(command).help_argv
    return _help_argv(command, invocation)


def _help_argv(command: Command, invocation: Invocation) -> tuple[str, ...] | None:
    argv = command.argv
    program = invocation.program
    is_module = invocation.args_start >= 2 and argv[invocation.args_start - 2] == "-m"  # noqa: PLR2004
    if is_module:
        return (_interpreter(command, invocation), "-m", program, "--help")
    if not program.endswith(".py"):
        return None
    script = _resolve(command, program)
    if not script.is_file():
        return None
    return (_interpreter(command, invocation), str(script), "--help")


def _interpreter(command: Command, invocation: Invocation) -> str:
    """The Python that runs the program: the command's own `python`, else its launcher's."""
    argv = command.argv
    before = argv[:invocation.args_start]
    for token in reversed(before):
        if re.match(r"^python(\d+(\.\d+)?)?$", PurePath(token).name):
            return token
    for token in before:  # torchrun / deepspeed / accelerate: the Python beside the launcher
        found = shutil.which(token, path=environment(command).get("PATH"))
        if found and PurePath(token).name in ("torchrun", "deepspeed", "accelerate"):
            sibling = Path(found).parent / "python"
            if sibling.exists():
                return str(sibling)
    return sys.executable


def _resolve(command: Command, text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_absolute() and command.cwd:
        path = Path(command.cwd) / path
    return path


def cache_path() -> Path:
    """The JSON file holding what was parsed from help texts, by script path and mtime."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "oom-supervisor" / "help.json"


_MEMO: dict[str, str | None] = {}
_RECORDED: dict[tuple[tuple[str, ...], str | None], str | None] = {}
"""Answers given for a help argv without asking (resume: what the first run's probe found)."""
_NOTES: dict[tuple[tuple[str, ...], str | None], str] = {}
"""Why a probe gave no help, by help argv (journaled with the run's config)."""
_STOP: threading.Event | None = None
_PROBING = threading.Event()


def is_probing() -> bool:
    """True while a probe runs (a signal handler then lets it end its own tree first)."""
    return _PROBING.is_set()


class ProbeInterrupted(BaseException):
    """SIGTERM/SIGINT arrived while the program was asked for its --help (its tree is ended)."""


def stop_probes_on(event: threading.Event | None) -> None:
    """A probe in progress (or about to start) ends its tree and raises when `event` is set."""
    global _STOP  # noqa: PLW0603 - set once by the CLI, before the first probe
    _STOP = event


def record_help(command: Command, text: str | None) -> None:
    """Answer later probes of `command` with `text` and never run it (resume: the journaled one)."""
    argv = help_argv(command)
    if argv is not None:
        _RECORDED[(argv, command.cwd)] = text


def recorded_help(command: Command) -> str | None:
    """What the probe of `command` found this process (parsed, redacted), without asking."""
    program = find_program(command)
    return None if program.help_argv is None else _known_help(program, program.help_argv)[1]


def _known_help(program: Program, argv: tuple[str, ...],
                ) -> tuple[bool, str | None, str | None, dict[str, str]]:
    """What this process already has for `argv`: (known, text, cache key, probe env).

    Known: recorded (resume), memoised, or not cacheable (the script cannot be read); else
    the key and environment to look further with (the cache file, then the probe)."""
    command = program.command
    if (argv, command.cwd) in _RECORDED:
        return True, _RECORDED[(argv, command.cwd)], None, {}
    env = dict(program.env)
    try:
        key = _cache_key(command, argv, env)
    except OSError:
        return True, None, None, env
    if key in _MEMO:
        return True, _MEMO[key], key, env
    return False, None, key, env


def probe_note(command: Command) -> str | None:
    """Why the program's --help was not believed (it trained instead, timed out), if it was not."""
    argv = help_argv(command)
    return _NOTES.get((argv, command.cwd)) if argv is not None else None


def run_help(program: Program | Command, *, timeout_s: float = HELP_TIMEOUT_S) -> str | None:
    """The program's `--help`, parsed and redacted, asked once per script version (None: no help).

    The text returned (and cached) is rebuilt from what was parsed, flags and defaults only:
    nothing else the program printed is kept.
    """
    if isinstance(program, Command):
        program = find_program(program)
    command, argv = program.command, program.help_argv
    if argv is None:
        return None
    known, text, key, env = _known_help(program, argv)
    if known or key is None:
        return text
    cached = _load_cache().get(key)
    if isinstance(cached, str) and parse_help(cached) is not None:
        _MEMO[key] = cached
        return cached
    env["COLUMNS"] = "200"  # fewer wrapped lines; the parser reads the help either way
    probed = _probe(argv, cwd=command.cwd, env=env, timeout_s=timeout_s)
    parsed = parse_help(probed.stdout) if probed.exit_code == 0 and probed.note is None else None
    text = None
    if parsed is not None:
        redactor = Redactor.for_run(command.argv, env, cwd=command.cwd)
        text = render_help(parsed, redactor)
    elif probed.note is not None:
        _NOTES[(argv, command.cwd)] = probed.note
        log.warning("program.help_ignored", program=PurePath(argv[-2]).name, note=probed.note)
    _MEMO[key] = text
    if text is not None and not key.startswith("module:"):
        _store_cache(key, text)
    return text


def render_help(parsed: ProgramHelp, redactor: Redactor | None = None) -> str:
    """A help text holding only what was parsed (spellings, value kinds, defaults), redacted.

    `parse_help(render_help(h)) == h` for what it keeps; secret-named options' defaults and any
    secret value or shape are replaced by placeholders.
    """
    redactor = redactor or Redactor()
    lines = ["usage: (the options oom-supervisor read from the program's --help)", "",
             "options:"]
    for option in parsed.options:
        names = [*option.names]
        metavar = {"none": "", "optional": " [X]", "required": " X"}[option.takes]
        invocation = ", ".join([*names[:-1], names[-1] + metavar]) if names else ""
        default = option.default
        if default is not None:
            if any(is_secret_name(n) for n in option.names) and is_secret_value(default):
                default = placeholder(max(option.names, key=len))
            default = redactor.text(default)
            line = f"  {invocation}  (default: {default})"
        else:
            line = f"  {invocation}"
        lines.append(line)
    return "\n".join(lines) + "\n"


# The probe: the program with --help, in its own session and marked like an attempt, so that
# whatever it starts (a training loop that ignores --help, a forked child, a daemon holding the
# pipe) is found and ended, whatever happens to the supervisor.
PROBE_QUIET_S = 3.0
"""Output that is not a usage text for this long (or a child process alive this long) means
the program ignores --help; the console also says the probe is waiting after this long."""
PROBE_MAX_BYTES = 1024 * 1024
"""Most bytes of its output read into memory (a help text is a few KiB)."""
_PROBE_TICK_S = 0.05
_PROBE_GRACE_S = 1.0
_LOOK_EVERY_S = 1.0
_TRAINING_LINE = re.compile(
    r"(\{'loss'|\{\"loss\"|\bloss[=:]\s*\d|\bstep\s+\d+\b.*\bloss\b|\d+/\d+ \[\d+:\d+)",
    re.IGNORECASE)
"""A training step's line: the Trainer's metrics dict, `loss=`/`loss:`, `step N ... loss`, a
tqdm bar with its timer (`3/100 [00:05<...`)."""
_CHECKPOINT = re.compile(r"^(checkpoint|global_step)[-_]?\d+$")
HELP_WAITING = "program.help_waiting"
"""Logged once when the probe has waited PROBE_QUIET_S for a program that is still starting."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Probed:
    """What a probe saw: its exit code (None: ended by us), stdout, and why it was ended."""

    exit_code: int | None
    stdout: str
    note: str | None = None
    seconds: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeSeen:
    """What the probe has seen of the program so far: the evidence `judge_probe` weighs."""

    elapsed_s: float
    stdout: str = ""
    """The start of what it printed on stdout (where argparse prints its help)."""
    first_output_s: float | None = None
    """When it first printed something on stdout (seconds from the start)."""
    training_line: str | None = None
    """A line on stdout or stderr that reads as a training step, if one came."""
    lasting_children: int = 0
    """Child processes alive for PROBE_QUIET_S or more (workers, not an import's one-off)."""
    checkpoints: tuple[str, ...] = ()
    """Checkpoint folders that appeared under its working directory."""
    gpu_mib: int = 0
    """GPU memory its processes hold (NVML; 0 where there is none)."""


def judge_probe(seen: ProbeSeen, *, startup_s: float = HELP_TIMEOUT_S) -> str | None:
    """Why the program is taken to ignore --help (it trains), or None: wait on.

    A program that prints nothing yet is starting up (importing), however long a loaded node
    makes that, up to `startup_s`. It ignores --help only on evidence of training: a step's
    line, checkpoint folders, GPU memory, worker processes, or output that is not a usage text.
    """
    usage = _USAGE.search(seen.stdout) is not None
    if usage:
        return None
    said = None
    if seen.training_line is not None:
        said = f"printed a training step ({seen.training_line[:80]!r})"
    elif seen.checkpoints:
        said = f"wrote checkpoint folders ({', '.join(seen.checkpoints[:3])})"
    elif seen.gpu_mib > 0:
        said = f"took {seen.gpu_mib} MiB of GPU memory"
    elif (seen.first_output_s is not None and seen.stdout.strip()
          and seen.elapsed_s - seen.first_output_s > PROBE_QUIET_S):
        said = f"printed other output for {seen.elapsed_s - seen.first_output_s:.0f} s"
    elif seen.lasting_children:
        said = "started other processes"
    if said is not None:
        return (f"its --help printed no usage and it {said}: it ignores --help and started "
                "training; ended it, and read the command by its family's known defaults")
    if seen.elapsed_s > startup_s:
        return (f"its --help printed nothing in {startup_s:g} s; ended it, and read the command "
                "by its family's known defaults")
    return None


def _probe(argv: tuple[str, ...], *, cwd: str | None, env: dict[str, str],
           timeout_s: float) -> Probed:
    """Run `argv` (the program with --help) as a marked session; end its whole tree always."""
    marker = probe_marker()
    env = {**env, MARKER_ENV: marker}
    env.setdefault("PYTHONUNBUFFERED", "1")
    started = time.monotonic()
    if _STOP is not None and _STOP.is_set():
        raise ProbeInterrupted
    _PROBING.set()
    try:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,  # noqa: S603 - the user's own program
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
    except OSError:
        _PROBING.clear()
        return Probed(exit_code=None, stdout="", note=None)
    out = bytearray()
    note: str | None = None
    known: dict[int, psutil.Process] = {}
    try:
        note = _read_probe(proc, out, known, started=started, timeout_s=timeout_s,
                           watch=_Watch(cwd, argv))
    finally:
        _end_tree(proc, marker, known)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        _PROBING.clear()
    text = bytes(out).decode("utf-8", errors="replace")
    seconds = round(time.monotonic() - started, 1)
    return Probed(exit_code=None if note else proc.returncode, stdout=text, note=note,
                  seconds=seconds)


class _Watch:
    """The slower evidence, looked at once a second: checkpoint folders, GPU memory."""

    def __init__(self, cwd: str | None, argv: tuple[str, ...]) -> None:
        self.root = Path(cwd or Path.cwd())
        self.before = self._checkpoints()
        self.program = PurePath(argv[2] if len(argv) > 3 and argv[1] == "-m" else argv[1]).name  # noqa: PLR2004
        self._gpu: NvmlProbe | None = None
        self._said = False

    def _checkpoints(self) -> frozenset[str]:
        """Checkpoint-like folders under the working directory, two levels deep."""
        found: set[str] = set()
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.root):
                if not entry.is_dir(follow_symlinks=False):
                    continue
                if _CHECKPOINT.match(entry.name):
                    found.add(entry.name)
                    continue
                with contextlib.suppress(OSError):
                    found.update(f"{entry.name}/{inner.name}" for inner in os.scandir(entry.path)
                                 if inner.is_dir(follow_symlinks=False)
                                 and _CHECKPOINT.match(inner.name))
        return frozenset(found)

    def new_checkpoints(self) -> tuple[str, ...]:
        """Checkpoint folders that were not there when the probe started."""
        return tuple(sorted(self._checkpoints() - self.before))

    def gpu_mib(self, pids: set[int]) -> int:
        """GPU memory the probe's processes hold, by NVML (0 without a GPU)."""
        if self._gpu is None:
            self._gpu = NvmlProbe()
        probe = self._gpu
        if probe.unavailable is not None:
            return 0
        return sum(u.used_mib or 1 for u in probe.processes() if u.pid in pids)

    def say_waiting(self) -> None:
        """Once: the console says what it waits for (`reading train.py --help ...`)."""
        if not self._said:
            self._said = True
            log.info(HELP_WAITING, program=self.program)

    def close(self) -> None:
        """Shut NVML down if it was started."""
        if self._gpu is not None:
            self._gpu.close()


def _read_probe(proc: subprocess.Popen[bytes], out: bytearray,  # noqa: PLR0913
                known: dict[int, psutil.Process], *, started: float, timeout_s: float,
                watch: _Watch) -> str | None:
    """Read the probe's output until it exits (a daemon may hold the pipe: not waited for)."""
    try:
        return _follow_probe(proc, out, known, started=started, timeout_s=timeout_s,
                             watch=watch)
    finally:
        watch.close()


def _follow_probe(proc: subprocess.Popen[bytes], out: bytearray,  # noqa: PLR0913
                  known: dict[int, psutil.Process], *, started: float, timeout_s: float,
                  watch: _Watch) -> str | None:
    streams = {s.fileno(): s for s in (proc.stdout, proc.stderr) if s is not None}
    stdout_fd = proc.stdout.fileno() if proc.stdout is not None else -1
    for fd in streams:
        os.set_blocking(fd, False)
    err_tail = ""
    training: str | None = None
    first_output: float | None = None
    exited_at: float | None = None
    looked_at = 0.0
    checkpoints: tuple[str, ...] = ()
    gpu_mib = 0
    while True:
        if _STOP is not None and _STOP.is_set():
            raise ProbeInterrupted
        ready: list[int] = []
        if streams:
            ready, _, _ = select.select(list(streams), [], [], _PROBE_TICK_S)
        else:  # it closed its output and may still run: the clock below still applies
            time.sleep(_PROBE_TICK_S)
        now = time.monotonic()
        for fd in ready:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                del streams[fd]
                continue
            text = chunk.decode("utf-8", errors="replace")
            if fd == stdout_fd:
                if len(out) < PROBE_MAX_BYTES:
                    out.extend(chunk[:PROBE_MAX_BYTES - len(out)])
                if first_output is None and text.strip():
                    first_output = now - started
            else:
                err_tail = (err_tail + text)[-4096:]
            if training is None:
                found = _TRAINING_LINE.search(text)
                if found is not None:
                    line_start = text.rfind("\n", 0, found.start()) + 1
                    line_end = text.find("\n", found.end())
                    training = text[line_start:line_end if line_end >= 0 else None].strip()
        if proc.poll() is not None:
            # Whatever its children do, the program has answered: read what is already
            # written, never wait on a pipe a daemon keeps open.
            exited_at = exited_at or now
            if not streams or now - exited_at > _PROBE_TICK_S * 4:
                return None
            continue
        lasting = 0
        with contextlib.suppress(psutil.Error):
            leader = psutil.Process(proc.pid)
            for child in leader.children(recursive=True):
                known.setdefault(child.pid, child)
                with contextlib.suppress(psutil.Error):
                    if time.time() - child.create_time() >= PROBE_QUIET_S and _alive(child):
                        lasting += 1
        elapsed = now - started
        if now - looked_at >= _LOOK_EVERY_S:
            looked_at = now
            checkpoints = watch.new_checkpoints()
            gpu_mib = watch.gpu_mib({proc.pid, *known})
        seen = ProbeSeen(elapsed_s=elapsed,
                         stdout=bytes(out[:65536]).decode("utf-8", errors="replace"),
                         first_output_s=first_output, training_line=training,
                         lasting_children=lasting, checkpoints=checkpoints, gpu_mib=gpu_mib)
        note = judge_probe(seen, startup_s=timeout_s)
        if note is not None:
            return note
        if elapsed > PROBE_QUIET_S and not seen.stdout.strip():
            watch.say_waiting()


def probe_marker() -> str:
    """The probe's marker: `probe:<supervisor pid>:<its start time>:<random>:<home>` (a probe
    whose supervisor is gone is found by it, and ended by the next run of the same home:
    end_dead_probes)."""
    try:
        created = f"{psutil.Process().create_time():.2f}"
    except psutil.Error:
        created = "0"
    return f"{_PROBE_PREFIX}{os.getpid()}:{created}:{secrets.token_hex(6)}:{_home()}"


def _home() -> str:
    """Which supervisor home started a probe: a short digest of its cache folder. A run ends
    only the leftover probes of its own home, never those of a supervisor with another home
    (a container's, a test's, another checkout's with its own XDG_CACHE_HOME)."""
    return hashlib.sha256(str(cache_path().parent).encode()).hexdigest()[:12]


_PROBE_PREFIX = "probe:"


def _supervisor_alive(marker: str) -> bool:
    """Whether the supervisor that started the probe marked `marker` still runs."""
    parts = marker.removeprefix(_PROBE_PREFIX).split(":")
    if len(parts) < 3 or not parts[0].isdigit():  # noqa: PLR2004 - pid, start time, token
        return True  # not a marker this version wrote: never ours to end
    try:
        owner = psutil.Process(int(parts[0]))
        return parts[1] == "0" or f"{owner.create_time():.2f}" == parts[1]
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True


def end_dead_probes() -> tuple[int, ...]:
    """End every probe tree of this user and this supervisor home whose supervisor is gone
    (killed during the probe); the pids ended, for the journal. A live supervisor's probe, and
    a probe of another home, are never touched."""
    me = os.getpid()
    home = _home()
    found: dict[str, list[psutil.Process]] = {}
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        with contextlib.suppress(psutil.Error):
            marker = proc.environ().get(MARKER_ENV, "")
            if marker.startswith(_PROBE_PREFIX) and marker.split(":")[4:5] == [home]:
                found.setdefault(marker, []).append(proc)
    ended: list[int] = []
    for marker, procs in found.items():
        if _supervisor_alive(marker):
            continue
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        _gone, alive = psutil.wait_procs(procs, timeout=_PROBE_GRACE_S)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=_PROBE_GRACE_S)
        ended += [p.pid for p in procs]
    return tuple(sorted(ended))


def _end_tree(proc: subprocess.Popen[bytes], marker: str,
              known: dict[int, psutil.Process]) -> None:
    """SIGTERM, then SIGKILL, the probe's session, each descendant seen and each marked process."""
    with contextlib.suppress(psutil.Error):
        leader = psutil.Process(proc.pid)
        for child in leader.children(recursive=True):
            known.setdefault(child.pid, child)
    me = os.getpid()
    for found in psutil.process_iter():
        if found.pid == me or found.pid in known:
            continue
        with contextlib.suppress(psutil.Error):
            if found.environ().get(MARKER_ENV) == marker:
                known[found.pid] = found
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: the group id is its pid
    procs = [p for p in known.values() if _alive(p)]
    for found in procs:
        with contextlib.suppress(psutil.Error):
            found.terminate()
    deadline = time.monotonic() + _PROBE_GRACE_S
    while time.monotonic() < deadline and (proc.poll() is None or any(map(_alive, procs))):
        time.sleep(_PROBE_TICK_S)
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    for found in procs:
        with contextlib.suppress(psutil.Error):
            if _alive(found):
                found.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5.0)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# What decides which code a script imports, and so which flags its --help lists.
_KEY_ENV = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "CONDA_PREFIX")


def _cache_key(command: Command, argv: tuple[str, ...], env: dict[str, str]) -> str:
    if argv[1] == "-m":
        found = _module_file(argv[0], argv[2], command.cwd, env)
        if found is None:  # no file to stamp: asked once per supervisor process
            return f"module:{argv[0]}:{argv[2]}:{command.cwd}"
        script = found
    else:
        script = Path(argv[1])
    content = hashlib.sha256(_read_script(script)).hexdigest()[:24]
    where = "\0".join(f"{name}={env.get(name, '')}" for name in _KEY_ENV)
    digest = hashlib.sha256(f"{_interpreter_id(argv[0])}\0{where}".encode()).hexdigest()[:16]
    return f"script:{content}:{digest}"


_SCRIPT_MAX_BYTES = 64 * 1024 * 1024


def _module_file(python: str, module: str, cwd: str | None, env: dict[str, str]) -> Path | None:
    """The file `python -m module` runs, found without importing anything, when the command's
    Python is this one with this one's PYTHONPATH (the same search path, the command's folder
    first as `-m` puts it); None otherwise (then the module is asked once per process)."""
    if (_interpreter_id(python) != _interpreter_id(sys.executable)
            or env.get("PYTHONPATH", "") != os.environ.get("PYTHONPATH", "")):
        return None
    from importlib.machinery import PathFinder  # noqa: PLC0415 - only for `-m` commands

    search: list[str] | None = [cwd or str(Path.cwd()), *sys.path[1:]]
    spec = None
    parts = module.split(".")
    for depth in range(len(parts)):
        spec = PathFinder.find_spec(".".join(parts[: depth + 1]), search)
        if spec is None:
            return None
        search = list(spec.submodule_search_locations or []) or None
        if search is None and depth < len(parts) - 1:
            return None  # a module, not a package, named as one
    if spec is None or not spec.has_location or not spec.origin:
        return None
    if spec.submodule_search_locations:  # a package: `-m` runs its __main__
        main = Path(spec.origin).parent / "__main__.py"
        return main if main.is_file() else None
    return Path(spec.origin) if spec.origin.endswith(".py") else None


def _read_script(path: Path) -> bytes:
    """The script's bytes (a regular file only, bounded: OSError otherwise)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            msg = f"{path} is not a regular file"
            raise OSError(msg)
        return handle.read(_SCRIPT_MAX_BYTES)


def _interpreter_id(python: str) -> str:
    """The interpreter as a path that names it (a venv's `python` differs from the system's)."""
    return os.path.abspath(shutil.which(python) or python)  # noqa: PTH100 - a venv's link, kept


def _load_cache() -> dict[str, object]:
    path = cache_path()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return {}
    try:
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                return {}
            data = json.loads(handle.read(_CACHE_MAX_BYTES).decode("utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION:
        return {}
    entries = data.get("help")
    return entries if isinstance(entries, dict) else {}


_CACHE_MAX_BYTES = 16 * 1024 * 1024


def _store_cache(key: str, text: str) -> None:
    """Add one parsed help to the cache: 0600 in a 0700 folder, replaced whole (never torn)."""
    entries = _load_cache()
    entries[key] = text
    path = cache_path()
    with contextlib.suppress(OSError):  # a cache that cannot be written is only slower
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.parent.chmod(0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(json.dumps({"version": _CACHE_VERSION, "help": entries}))
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)


def read_help(program: Program, probe: HelpProbe | None) -> ProgramHelp | None:
    """The parsed help of the command's program through `probe` (None: not asked or unreadable)."""
    if probe is None:
        return None
    text = probe(program)
    return parse_help(text) if text else None


# --- does the program's Python have a module (bitsandbytes)? ------------------------------------

IMPORT_TIMEOUT_S = 60.0
"""Longest wait for `python -c "import MODULE"` (bitsandbytes loads its CUDA library)."""

_IMPORTS: dict[tuple[str, str], bool] = {}


def interpreter(command: Command) -> str:
    """The Python that runs the command's program: its own `python`, a launcher's sibling, a
    console script's shebang (`llamafactory-cli`, `trl`), else this one."""
    invocation = find_program(command).invocation
    if invocation is None:
        return sys.executable
    program = invocation.program
    is_module = invocation.args_start >= 2 and command.argv[invocation.args_start - 2] == "-m"  # noqa: PLR2004
    if is_module or program.endswith(".py"):
        return _interpreter(command, invocation)
    found = shutil.which(program, path=environment(command).get("PATH"))
    if found is not None:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            with Path(found).open(encoding="utf-8") as handle:
                first = handle.readline(400)
            if first.startswith("#!") and "python" in first:
                parts = first[2:].split()
                if parts and PurePath(parts[0]).name == "env" and len(parts) > 1:
                    return shutil.which(parts[1]) or sys.executable
                if parts:
                    return parts[0]
    return _interpreter(command, invocation)


def can_import(command: Command, module: str, *, timeout_s: float = IMPORT_TIMEOUT_S) -> bool:
    """True when the command's own Python imports `module`; asked once per interpreter (and
    answered at once when `prefetch_import` asked it already, in the background)."""
    python = interpreter(command)
    key = (python, module)
    asked = _ASKING.get(key)
    if asked is not None:
        asked.join(timeout_s + 1.0)
    if key not in _IMPORTS:
        _IMPORTS[key] = _imports(python, command, module, timeout_s)
    return _IMPORTS[key]


def prefetch_import(command: Command, module: str) -> None:
    """Start asking whether the command's Python imports `module`, on a thread of its own: the
    answer (an interpreter started, `module` and all it imports, torch included for
    bitsandbytes: seconds on a GPU machine) is ready by the time the ladder needs it, instead
    of delaying the first attempt."""
    try:
        python = interpreter(command)
    except (OSError, ValueError):
        return
    key = (python, module)
    if key in _IMPORTS or key in _ASKING:
        return

    def ask() -> None:
        _IMPORTS[key] = _imports(python, command, module, IMPORT_TIMEOUT_S)

    _ASKING[key] = thread = threading.Thread(target=ask, name=f"import-{module}", daemon=True)
    thread.start()


def _imports(python: str, command: Command, module: str, timeout_s: float) -> bool:
    env = dict(find_program(command).env)
    try:
        done = subprocess.run((python, "-c", f"import {module}"), cwd=command.cwd, env=env,  # noqa: S603 - the user's own interpreter
                              capture_output=True, check=False, timeout=timeout_s,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


_ASKING: dict[tuple[str, str], threading.Thread] = {}


ModuleProbe = Callable[[Command, str], bool]
"""The edge that says whether the command's Python can import a module (can_import)."""
