"""Ask the program itself: run its `--help` once and read which flags it accepts, and defaults.

argparse and HfArgumentParser list every option with its spellings, whether it takes a value
(`--bs BS`, HF booleans `--gradient_checkpointing [GRADIENT_CHECKPOINTING]`, bare switches) and,
for HfArgumentParser, its default ("(default: False)"). What the program says outranks what is
known by its file name: a `train_bash.py` may be LLaMA-Factory's or a Hugging Face script.

`parse_help` is pure (unit tests feed help texts recorded from real programs, tests/data/help/).
`run_help` is the edge: the program with `--help`, without its launcher, in the same
interpreter and environment, run like an attempt (its own session, a marker of its own in its
environment, its whole tree ended whatever happens), 20 s at most. A program that ignores
`--help` and starts training (no usage printed while it prints or forks for 3 s, or nothing at
all while it burns 5 s of CPU) is ended at once and read by its family's known defaults, and
the run says so.
What was parsed (flags and defaults, redacted; never the raw output) is cached by script path,
mtime and what decides its imports (PYTHONPATH, the venv) in a 0600 JSON file in a 0700 folder
under the user cache dir (`$XDG_CACHE_HOME/oom-supervisor/help.json`).
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePath

import psutil
import structlog

from supervisor.command import Command, CommandError, Invocation, environment, locate
from supervisor.secrets import Redactor, is_secret_name, is_secret_value, placeholder

log = structlog.get_logger(__name__)

HELP_TIMEOUT_S = 20.0
"""Longest wait for a program's `--help` (HfArgumentParser scripts import torch first; a loaded
machine stretches that wall time, not its CPU time)."""
MARKER_ENV = "OOM_SUPERVISOR_ATTEMPT"
"""The attempts' marker (supervisor.runner): the probe carries one of its own, `probe:...`."""

_CACHE_VERSION = 3
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


HelpProbe = Callable[[Command], str | None]
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
        try:
            invocation = locate(command.argv)
        except CommandError:
            return None
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
    argv = help_argv(command)
    return None if argv is None else _known_help(command, argv)[1]


def _known_help(command: Command, argv: tuple[str, ...],
                ) -> tuple[bool, str | None, str | None, dict[str, str]]:
    """What this process already has for `argv`: (known, text, cache key, probe env).

    Known: recorded (resume), memoised, or not cacheable (the script cannot be read); else
    the key and environment to look further with (the cache file, then the probe)."""
    if (argv, command.cwd) in _RECORDED:
        return True, _RECORDED[(argv, command.cwd)], None, {}
    env = _probe_env(command)
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


def run_help(command: Command, *, timeout_s: float = HELP_TIMEOUT_S) -> str | None:
    """The program's `--help`, parsed and redacted, asked once per script version (None: no help).

    The text returned (and cached) is rebuilt from what was parsed, flags and defaults only:
    nothing else the program printed is kept.
    """
    argv = help_argv(command)
    if argv is None:
        return None
    known, text, key, env = _known_help(command, argv)
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
        log.warning("program.help_ignored", program=argv[-2], note=probed.note)
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


def _probe_env(command: Command) -> dict[str, str]:
    env = environment(command)
    with contextlib.suppress(CommandError):
        env.update(locate(command.argv).env_assignments)
    return env


# The probe: the program with --help, in its own session and marked like an attempt, so that
# whatever it starts (a training loop that ignores --help, a forked child, a daemon holding the
# pipe) is found and ended, whatever happens to the supervisor.
PROBE_QUIET_S = 3.0
"""After this long without printing `usage:` while it prints or forks, the program is training."""
PROBE_SILENT_CPU_S = 5.0
"""CPU seconds a silent program may burn without printing a usage line (importing torch and
transformers takes 1-2 s of CPU, however long a loaded machine makes it in wall time)."""
PROBE_MAX_BYTES = 1024 * 1024
"""Most bytes of its output read into memory (a help text is a few KiB)."""
_PROBE_TICK_S = 0.05
_PROBE_GRACE_S = 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Probed:
    """What a probe saw: its exit code (None: ended by us), stdout, and why it was ended."""

    exit_code: int | None
    stdout: str
    note: str | None = None
    seconds: float = 0.0


def _probe(argv: tuple[str, ...], *, cwd: str | None, env: dict[str, str],
           timeout_s: float) -> Probed:
    """Run `argv` (the program with --help) as a marked session; end its whole tree always."""
    marker = f"probe:{os.getpid()}:{secrets.token_hex(6)}"
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
        note = _read_probe(proc, out, known, started=started, timeout_s=timeout_s)
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


def _read_probe(proc: subprocess.Popen[bytes], out: bytearray, known: dict[int, psutil.Process],
                *, started: float, timeout_s: float) -> str | None:
    """Read the probe's output until it exits (a daemon may hold the pipe: not waited for)."""
    streams = {s.fileno(): s for s in (proc.stdout, proc.stderr) if s is not None}
    stdout_fd = proc.stdout.fileno() if proc.stdout is not None else -1
    for fd in streams:
        os.set_blocking(fd, False)
    other = 0
    exited_at: float | None = None
    while True:
        if _STOP is not None and _STOP.is_set():
            raise ProbeInterrupted
        ready: list[int] = []
        if streams:
            ready, _, _ = select.select(list(streams), [], [], _PROBE_TICK_S)
        else:  # it closed its output and may still run: the clock below still applies
            time.sleep(_PROBE_TICK_S)
        for fd in ready:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                del streams[fd]
            elif fd == stdout_fd:
                if len(out) < PROBE_MAX_BYTES:
                    out.extend(chunk[:PROBE_MAX_BYTES - len(out)])
            else:
                other += len(chunk)
        now = time.monotonic()
        if proc.poll() is not None:
            # Whatever its children do, the program has answered: read what is already
            # written, never wait on a pipe a daemon keeps open.
            exited_at = exited_at or now
            if not streams or now - exited_at > _PROBE_TICK_S * 4:
                return None
            continue
        with contextlib.suppress(psutil.Error):
            leader = psutil.Process(proc.pid)
            for child in leader.children(recursive=True):
                known.setdefault(child.pid, child)
        elapsed = now - started
        usage = _USAGE.search(bytes(out[:65536]).decode("utf-8", errors="replace")) is not None
        if not usage and elapsed > PROBE_QUIET_S and (out.strip() or known):
            what = "printed other output" if out.strip() else "started other processes"
            return (f"its --help printed no usage and it {what} for {elapsed:.0f} s: it "
                    "ignores --help and started training; ended it, and read the command by "
                    "its family's known defaults")
        if not usage and elapsed > PROBE_QUIET_S and _cpu_s(proc.pid, known) > PROBE_SILENT_CPU_S:
            return (f"its --help printed no usage and used {PROBE_SILENT_CPU_S:g} s of CPU in "
                    f"{elapsed:.0f} s: taken for training and ended; read the command by its "
                    "family's known defaults")
        if elapsed > timeout_s:
            return (f"its --help did not finish in {timeout_s:g} s; ended it, and read the "
                    "command by its family's known defaults")


def _cpu_s(pid: int, known: dict[int, psutil.Process]) -> float:
    """CPU seconds (user and system) the probe's process and its descendants have used."""
    total = 0.0
    for found in (pid, *known):
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(found).cpu_times() if found == pid else known[found].cpu_times()
            total += times.user + times.system
    return total


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
    if argv[1] == "-m":  # a module: no file to stamp; asked once per supervisor process
        return f"module:{argv[0]}:{argv[2]}:{command.cwd}"
    stat = Path(argv[1]).stat()
    where = "\0".join(f"{name}={env.get(name, '')}" for name in _KEY_ENV)
    digest = hashlib.sha256(f"{argv[0]}\0{argv[1]}\0{where}".encode()).hexdigest()[:16]
    return f"script:{digest}:{stat.st_mtime_ns}:{stat.st_size}"


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


def read_help(command: Command, probe: HelpProbe | None) -> ProgramHelp | None:
    """The parsed help of the command's program through `probe` (None: not asked or unreadable)."""
    if probe is None:
        return None
    text = probe(command)
    return parse_help(text) if text else None


# --- does the program's Python have a module (bitsandbytes)? ------------------------------------

IMPORT_TIMEOUT_S = 60.0
"""Longest wait for `python -c "import MODULE"` (bitsandbytes loads its CUDA library)."""

_IMPORTS: dict[tuple[str, str], bool] = {}


def interpreter(command: Command) -> str:
    """The Python that runs the command's program: its own `python`, a launcher's sibling, a
    console script's shebang (`llamafactory-cli`, `trl`), else this one."""
    try:
        invocation = locate(command.argv)
    except CommandError:
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
    """True when the command's own Python imports `module`; asked once per interpreter."""
    python = interpreter(command)
    key = (python, module)
    if key not in _IMPORTS:
        env = environment(command)
        with contextlib.suppress(CommandError):
            env.update(locate(command.argv).env_assignments)
        try:
            done = subprocess.run((python, "-c", f"import {module}"), cwd=command.cwd, env=env,  # noqa: S603 - the user's own interpreter
                                  capture_output=True, check=False, timeout=timeout_s,
                                  stdin=subprocess.DEVNULL)
            _IMPORTS[key] = done.returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            _IMPORTS[key] = False
    return _IMPORTS[key]


ModuleProbe = Callable[[Command, str], bool]
"""The edge that says whether the command's Python can import a module (can_import)."""
