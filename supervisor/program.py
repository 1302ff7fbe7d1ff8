"""Ask the program itself: run its `--help` once and read which flags it accepts, and defaults.

argparse and HfArgumentParser list every option with its spellings, whether it takes a value
(`--bs BS`, HF booleans `--gradient_checkpointing [GRADIENT_CHECKPOINTING]`, bare switches) and,
for HfArgumentParser, its default ("(default: False)"). What the program says outranks what is
known by its file name: a `train_bash.py` may be LLaMA-Factory's or a Hugging Face script.

`parse_help` is pure (unit tests feed help texts recorded from real programs, tests/data/help/).
`run_help` is the edge: the program with `--help`, without its launcher, in the same
interpreter and environment, 20 s at most, cached by script path, mtime and what decides its
imports (PYTHONPATH, the venv) in a small JSON file under the user cache dir
(`$XDG_CACHE_HOME/oom-supervisor/help.json`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePath

from supervisor.command import Command, CommandError, Invocation, environment, locate

HELP_TIMEOUT_S = 20.0
"""Longest wait for a program's `--help` (a script that trains on `--help` is cut off here)."""

_CACHE_VERSION = 2
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
    """The JSON file holding help texts by script path and mtime."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "oom-supervisor" / "help.json"


_MEMO: dict[str, str | None] = {}


def run_help(command: Command, *, timeout_s: float = HELP_TIMEOUT_S) -> str | None:
    """The program's `--help` text, asked once per script version (None: it cannot be asked)."""
    argv = help_argv(command)
    if argv is None:
        return None
    env = environment(command)
    with contextlib.suppress(CommandError):
        env.update(locate(command.argv).env_assignments)
    key = _cache_key(command, argv, env)
    if key in _MEMO:
        return _MEMO[key]
    cached = _load_cache().get(key)
    if isinstance(cached, str):
        _MEMO[key] = cached
        return cached
    env["COLUMNS"] = "200"  # fewer wrapped lines; the parser reads the help either way
    try:
        done = subprocess.run(argv, cwd=command.cwd, env=env, capture_output=True, text=True,  # noqa: S603 - the user's own program
                              check=False, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        _MEMO[key] = None
        return None
    text = done.stdout if done.returncode == 0 and parse_help(done.stdout) is not None else None
    _MEMO[key] = text
    if text is not None and not key.startswith("module:"):
        _store_cache(key, text)
    return text


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
    try:
        data = json.loads(cache_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION:
        return {}
    entries = data.get("help")
    return entries if isinstance(entries, dict) else {}


def _store_cache(key: str, text: str) -> None:
    entries = _load_cache()
    entries[key] = text
    path = cache_path()
    with contextlib.suppress(OSError):  # a cache that cannot be written is only slower
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": _CACHE_VERSION, "help": entries}),
                       encoding="utf-8")
        tmp.replace(path)


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
