"""Command line: argv -> supervise(); the only place that configures structlog."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import logging
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import NoReturn, TextIO, cast

import structlog

from supervisor import __version__, echo, notify, program, remember
from supervisor._compat import tomllib
from supervisor.command import Command, CommandError, environment, locate
from supervisor.console import Output, summary
from supervisor.device_memory import device_memory_env
from supervisor.dialects import Dialect, detect, knobmap
from supervisor.dialects import names as dialect_names
from supervisor.dialects import prefetch as prefetch_reading
from supervisor.estimate import (
    Estimator,
    ModelSpec,
    ModelSpecError,
    Prediction,
    model_argument,
    model_name,
    pick_python,
)
from supervisor.events import JournalError, RunConfig
from supervisor.files import WriteFailedError, open_regular
from supervisor.fits import FitStore, FitStoreError, render_fit
from supervisor.fits import default_path as default_fits_path
from supervisor.fits import render_entries as render_fits
from supervisor.gpu import NvmlProbe, smallest_device_mib
from supervisor.journal import Journal, JournalWriteError, RunFolderBusyError
from supervisor.journal import load as load_journal
from supervisor.knobs import Knobs
from supervisor.loop import (
    ExitCode,
    Memory,
    Rebuilt,
    ResumeError,
    RunResult,
    Signals,
    new_run_id,
    process_start_time,
    resume,
    supervise,
)
from supervisor.plan import build as build_plan
from supervisor.plan import describe_reading, next_runnable, parse_size_mib
from supervisor.plan import render as render_plan
from supervisor.plan import walk as walk_plan
from supervisor.plot import draw_later
from supervisor.policy import CanSet, Ladder, PolicyError, check_knobs, resolve
from supervisor.policy import parse as parse_policy
from supervisor.program import ProbeInterrupted
from supervisor.report import foreign_note, human_duration
from supervisor.report import write as write_report
from supervisor.rundir import RunDirError, prepare_run_dir, validate_run_id
from supervisor.runner import StopRequest
from supervisor.secrets import remove_private_copies
from supervisor.status import StatusError, newest_run
from supervisor.status import render as render_status
from supervisor.status import watch as watch_status
from supervisor.text import plural, printable
from supervisor.tracer import WarmTracer

log = structlog.get_logger("supervisor")

EXIT_CODES_HELP = """exit codes:
  0    fitted: the command finished with the final config
  2    usage error: bad arguments, policy file or command
  3    ladder exhausted: every rung (or the attempt budget) spent, still out of memory
  4    fatal: the command failed for a reason other than memory
  5    transient failures outlasted their retries
  130  interrupted (SIGINT/SIGTERM)
"""

PLAN_EXIT_CODES_HELP = """exit codes:
  0    the plan was printed and some config is predicted to fit
  2    usage error: bad arguments, policy file, command, or no device size to plan for
  3    the plan was printed and no config of the ladder is predicted to fit
"""

STATUS_EXIT_CODES_HELP = """exit codes:
  0    the run was shown
  2    usage error: no such run folder, or no run under --runs-dir
"""

REPORT_EXIT_CODES_HELP = """exit codes:
  0    report.md and report.json were written into the run folder
  2    usage error: no such run folder, a damaged journal, or a folder it cannot write
"""

FITS_EXIT_CODES_HELP = """exit codes:
  0    the fits were listed, or forgotten
  2    usage error: bad arguments, or a store that cannot be opened
"""

DEMO_DEVICE_MIB = 70
"""Budget of the demo's simulated device: full b4x1024 needs ~9x that; LoRA+gc at 512 fits."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line, no usage dump: what was wrong and where to look."""
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The CLI: run, demo, report."""
    parser = _Parser(prog="oom-supervisor", description=(
        "Run a fine-tuning command; on out-of-memory, step its config down a ladder "
        "(smaller batch, shorter cutoff, gradient checkpointing, LoRA, freeze) and retry "
        "until it fits."), epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default="auto",
                        help="auto: a live console on a terminal, plain timestamped lines "
                             "otherwise; json: JSON lines (anywhere on the command line; the "
                             "run folder's supervisor.jsonl is JSON either way)")
    sub = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="supervise a training command",
                         epilog=EXIT_CODES_HELP,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_run_options(run)
    _add_command_options(run)
    run.add_argument("--device-memory", type=_size, default=None, metavar="SIZE",
                     help="run as if the device had only SIZE (24GiB, 512MiB): a real memory "
                          "limit injected into any Python command; also what predictions "
                          "are checked against (default: the visible GPU's)")
    run.add_argument("--no-estimate", dest="estimate", action="store_false",
                     help="never skip a config on its predicted memory, nor on what an "
                          "earlier out-of-memory error showed the device holds: every "
                          "config runs")
    run.add_argument("--share-output-dir", action="store_true",
                     help="let another run train into the same output folder at the same time "
                          "(by default the second is refused); checkpoints this run did not "
                          "write are never resumed either way")
    run.add_argument("command", nargs=argparse.REMAINDER,
                     help="the training command, after `--`")

    plan = sub.add_parser("plan", help="predict the memory of every config on the ladder",
                          epilog=PLAN_EXIT_CODES_HELP,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    plan.add_argument("--policy", default=None, metavar="NAME|FILE",
                      help="ladder to plan (default: `default`; `multi-gpu` for a DeepSpeed "
                      "command)")
    plan.add_argument("--device-memory", type=_size, default=None, metavar="SIZE",
                      help="device size to plan for (default: the visible GPU's)")
    plan.add_argument("--dialect", choices=dialect_names(), default=None,
                      help="how to read the command (default: detected)")
    plan.add_argument("--knobs", type=Path, default=None, metavar="FILE",
                      help="a TOML knob map for a script no dialect reads (docs/dialects.md)")
    plan.add_argument("--method", choices=("auto", "fake", "analytic"), default="auto",
                      help="FakeTensor (exact, runs torch in a child) or analytic (default: auto)")
    plan.add_argument("command", nargs=argparse.REMAINDER, help="the training command, after `--`")

    demo = sub.add_parser("demo", help="the bundled tiny model on a small simulated device "
                                       "(CPU, no GPU): predicted to fit at once, or --walk",
                          description=DEMO_HELP, epilog=EXIT_CODES_HELP,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_run_options(demo, demo=True)
    demo.add_argument("--device-memory", type=_size, default=DEMO_DEVICE_MIB, metavar="SIZE",
                      help=f"simulated device size (default {DEMO_DEVICE_MIB}MiB)")
    demo.add_argument("--echo", dest="quiet", action="store_false",
                      help="show the trainer's own output (tracebacks included)")
    demo.add_argument("--walk", action="store_true",
                      help="act 2: the supervisor is not told the device's size, and walks "
                           "the ladder for real, one real OOM after another")
    # The demo never echoes unless asked, and never uses the fit store: it starts over every
    # time (act 1 predicts, act 2 walks).
    demo.set_defaults(quiet=True, fits_db=None, fresh=False, estimate=True)

    res = sub.add_parser("resume", help="carry on a run whose supervisor died",
                         epilog=EXIT_CODES_HELP,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    res.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                     help="the run folder to carry on (runs/<run-id>)")
    res.add_argument("--orphan", choices=("adopt", "end"), default="adopt",
                     help="an attempt still running from the dead supervisor: follow it to its "
                          "end (adopt, default) or end it and run that config again (end)")
    res.add_argument("--quiet", action="store_true", help="do not echo the command's output")
    _add_notify(res)

    rep = sub.add_parser("report", help="rebuild report.md/json from a run's journal",
                         epilog=REPORT_EXIT_CODES_HELP,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    rep.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                     help="the run folder whose report to write again from its journal")
    _add_status_parser(sub)

    _add_fits_parser(sub)
    return parser


def _add_run_options(p: argparse.ArgumentParser, *, demo: bool = False) -> None:
    p.add_argument("--policy", default=None, metavar="NAME|FILE",
                   help="ladder to walk: a shipped name (default, quality-first, multi-gpu) or "
                   "a .toml file (default: `default`; `multi-gpu` for a DeepSpeed command)")
    p.add_argument("--runs-dir", type=Path, default=Path("runs"), metavar="DIR",
                   help="where run folders go (default ./runs)")
    p.add_argument("--run-id", type=_run_id, default=None,
                   help="name of the run folder (default: time-based)")
    p.add_argument("--max-attempts", type=_positive, default=None, metavar="N",
                   help="stop after N attempts (default: the policy's max_attempts)")
    # The demo is quiet unless --echo; its --quiet is still taken (scripts use it), unlisted.
    p.add_argument("--quiet", action="store_true",
                   help=argparse.SUPPRESS if demo else "do not echo the command's output")
    _add_notify(p)
    if not demo:
        p.add_argument("--fits-db", type=Path, default=None, metavar="PATH",
                       help="the remembered-fit store to use (default: "
                            "$XDG_DATA_HOME/oom-supervisor/fits.sqlite3; docs/fits.md)")
        p.add_argument("--fresh", action="store_true",
                       help="ignore remembered fits: start from the command's own config")
    p.add_argument("--keep-quality", action="store_true",
                   help="stop (exit 3) before the first rung that costs quality (a shorter "
                        "cutoff, LoRA, QLoRA, freeze) and say which it would take")


def _add_command_options(p: argparse.ArgumentParser) -> None:
    """How to read a user's command (run, plan); the demo's command is known."""
    p.add_argument("--dialect", choices=dialect_names(), default=None,
                   help="how to read the command (default: detected)")
    p.add_argument("--knobs", type=Path, default=None, metavar="FILE",
                   help="a TOML knob map for a script no dialect reads (docs/dialects.md)")


def _add_notify(p: argparse.ArgumentParser) -> None:
    p.add_argument("--notify", default=None, metavar="COMMAND",
                   help="after the run, run COMMAND through the shell with "
                        "OOM_SUPERVISOR_EXIT_CODE, OOM_SUPERVISOR_RUN_DIR and "
                        "OOM_SUPERVISOR_SUMMARY set and the summary on stdin, in the directory "
                        "oom-supervisor was started from (docs/console.md); its failure never "
                        "changes the run's exit code")


def _add_status_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    status = sub.add_parser("status", help="show a running or finished run (another terminal)",
                            epilog=STATUS_EXIT_CODES_HELP,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    status.add_argument("run_dir", type=Path, nargs="?", default=None, metavar="RUN_DIR",
                        help="a run folder (default: the newest run under --runs-dir)")
    status.add_argument("--runs-dir", type=Path, default=Path("runs"), metavar="DIR",
                        help="where run folders are (default ./runs)")
    status.add_argument("--watch", nargs="?", type=_seconds, const=WATCH_DEFAULT_S, default=None,
                        metavar="SECONDS",
                        help="refresh every SECONDS (default 2) until the run ends or Ctrl-C")
    status.add_argument("--lines", type=_positive, default=5, metavar="N",
                        help="last lines of the running attempt's logs to show (default 5)")


def _add_fits_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    fits = sub.add_parser("fits", help="list or forget remembered fits (docs/fits.md)",
                          epilog=FITS_EXIT_CODES_HELP,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    fits.add_argument("--fits-db", type=Path, default=None, metavar="PATH",
                      help="the store (default: $XDG_DATA_HOME/oom-supervisor/fits.sqlite3)")
    actions = fits.add_subparsers(dest="fits_action", parser_class=_Parser)
    listing = actions.add_parser("list", help="the remembered fits of this project (the "
                                 "working directory), newest first (the default)")
    listing.add_argument("--all", dest="every_project", action="store_true",
                         help="every project's fits, grouped by project")
    show = actions.add_parser("show", help="one fit whole, with the run it came from")
    show.add_argument("key", metavar="KEY", help="hex digits from the KEY column of `fits list`")
    forget = actions.add_parser("forget", help="forget the fits whose key starts with a prefix")
    forget.add_argument("key_prefix", nargs="?", default=None, metavar="KEY_PREFIX",
                        help="hex digits from the KEY column of `fits list`")
    forget.add_argument("--all", dest="forget_all", action="store_true",
                        help="forget every remembered fit")


def _run_id(text: str) -> str:
    try:
        return validate_run_id(text)
    except RunDirError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _size(text: str) -> int:
    if text.strip().startswith("-"):
        msg = f"{text!r} is negative; give a device size such as 24GiB"
        raise argparse.ArgumentTypeError(msg)
    try:
        return parse_size_mib(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        msg = f"{text!r} is not a number of seconds"
        raise argparse.ArgumentTypeError(msg) from None
    if not 0.2 <= value <= 3600:  # noqa: PLR2004 - also refuses nan and inf
        msg = f"give between 0.2 and 3600 seconds, not {text}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        msg = f"{text!r} is not a whole number"
        raise argparse.ArgumentTypeError(msg) from None
    if value < 1:
        msg = f"must be at least 1, not {value}"
        raise argparse.ArgumentTypeError(msg)
    return value


LOG_FORMATS = ("auto", "console", "plain", "json")
"""auto: a live console on a terminal, plain timestamped lines otherwise; json: JSON lines."""


def configure_logging(fmt: str = "auto") -> Output:
    """Lines for people on stderr (JSON only with `json`); a JSON copy goes to the run folder.

    Every console write is best effort (`echo.BestEffortStream`: the echo's bounded, dropping
    writer): a console nobody reads never holds the run; supervisor.jsonl has every event."""
    console = cast("TextIO", echo.BestEffortStream(sys.stderr))
    output = Output(fmt, console)
    structlog.configure(
        processors=output.processors(),
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(console),
        cache_logger_on_first_use=False,
    )
    return output


def split_log_format(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """`--log-format F` wherever it stands before `--` (before or after the subcommand)."""
    words, fmt, rest = list(argv), None, []
    i = 0
    while i < len(words):
        word = words[i]
        if word == "--":
            rest += words[i:]
            break
        if word == "--log-format" and i + 1 < len(words):
            fmt, i = words[i + 1], i + 2
            continue
        if word.startswith("--log-format="):
            fmt, i = word.split("=", 1)[1], i + 1
            continue
        rest.append(word)
        i += 1
    return fmt, rest


def attach_values(argv: Sequence[str]) -> list[str]:
    """Before `--`, each of our numeric options joined to a value argparse would misread.

    `status --watch runs/x`: the folder is the run, not the refresh interval (`--watch=2`);
    `--device-memory -5GiB`: a (negative) value, refused for what it is, not taken by argparse
    for an unknown option.
    """
    words, rest = list(argv), list[str]()
    i = 0
    while i < len(words):
        word = words[i]
        if word == "--":
            return rest + words[i:]
        following = words[i + 1] if i + 1 < len(words) else None
        if word == "--watch" and (following is None or not _is_number(following)):
            rest.append(f"--watch={WATCH_DEFAULT_S:g}")
            i += 1
        elif word in _VALUED and following is not None and re.match(r"-\.?\d", following):
            rest.append(f"{word}={following}")
            i += 2
        else:
            rest.append(word)
            i += 1
    return rest


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


WATCH_DEFAULT_S = 2.0
"""`status --watch` with no number: refresh every 2 s."""

_VALUED = frozenset({"--device-memory", "--max-attempts", "--lines", "--watch"})
"""Our options that take a number, whose value may be typed negative by mistake."""


def main(argv: Sequence[str] | None = None, *, early_signals: Sequence[int] = ()) -> int:
    """Entry point of the `oom-supervisor` console script.

    `early_signals`: signals caught (by supervisor.__main__) before this module was imported.
    """
    _guard_std_streams()
    # From the first instant: a SIGTERM (Slurm cancel) or Ctrl-C while the program is asked
    # for its --help ends the probe's tree and the supervisor cleanly (exit 130, one line).
    stop, signals = StopRequest(), Signals()
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP,
                                                 signal.SIGUSR1)}
    _install_early_handlers(stop, signals)
    try:
        if early_signals:
            for signum in early_signals:
                stop.request()
                signals.stopping(signal.Signals(signum).name, "before the run started")
            raise ProbeInterrupted  # noqa: TRY301 - handled as any stop before the run
        return _main(argv, stop, signals)
    except ProbeInterrupted:
        print("oom-supervisor: interrupted before the run started (SIGTERM/SIGINT); nothing "  # noqa: T201
              "of it is left running", file=sys.stderr)
        return ExitCode.INTERRUPTED
    finally:
        program.stop_probes_on(None)
        for signum, handler in before.items():  # main() called in-process (tests) leaves none
            if handler is not None:
                signal.signal(signum, handler)


def _main(argv: Sequence[str] | None, stop: StopRequest, signals: Signals) -> int:
    parser = build_parser()
    fmt, words = split_log_format(sys.argv[1:] if argv is None else argv)
    words = attach_values(words)
    if fmt is not None and fmt not in LOG_FORMATS:
        parser.error(f"argument --log-format: invalid choice: {fmt!r} (choose from "
                     f"{', '.join(LOG_FORMATS)})")
    args = parser.parse_args(words)
    if args.verb not in ("run", "demo", "resume"):
        # Read-only verbs and plan: Ctrl-C is KeyboardInterrupt (status --watch ends on it).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        program.stop_probes_on(None)
    args.stop, args.signals = stop, signals
    args.output = configure_logging(fmt or "auto")
    attempt_left_running = False
    try:
        if args.verb in ("report", "status", "fits"):
            return _read_only(parser, args)
        if args.verb == "resume":
            return _resume(args)
        if args.verb == "plan":
            command = _command_from(parser, args)
            prefetch_reading(command)
            args.policy = policy_name(args, command)
            return _plan(args, command)
        command = demo_command() if args.verb == "demo" else _command_from(parser, args)
        prefetch_reading(command)  # beside the --help probe, not after it
        args.policy = policy_name(args, command)
        return _run(args, command)
    except (PolicyError, CommandError, ResumeError, ModelSpecError, JournalError,
            RunFolderBusyError, JournalWriteError, RunDirError, StatusError,
            WriteFailedError) as exc:
        # A journal that cannot be written leaves the attempt running (resume adopts it): the
        # private config copies it may still read stay until that run ends.
        attempt_left_running = isinstance(exc, JournalWriteError)
        print(f"oom-supervisor: error: {printable(str(exc))}", file=sys.stderr)  # noqa: T201
        return ExitCode.USAGE
    except (ProbeInterrupted, KeyboardInterrupt):
        print("oom-supervisor: interrupted before the run started (SIGTERM/SIGINT); nothing "  # noqa: T201
              "of it is left running", file=sys.stderr)
        return ExitCode.INTERRUPTED
    finally:
        if not attempt_left_running:
            remove_private_copies()


def _install_early_handlers(stop: StopRequest, signals: Signals) -> None:
    """SIGINT/SIGTERM/SIGHUP ask for a stop before any run folder exists (probe included)."""
    def stopping(signum: int) -> None:
        signals.stopping(signal.Signals(signum).name, "before the run started")
        stop.request()

    def handler(signum: int, _frame: FrameType | None) -> None:
        signals.from_handler(lambda: stopping(signum))  # never a lock here: see loop.Signals
        if not program.is_probing():  # a probe ends its own tree first, then raises this
            raise ProbeInterrupted

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, handler)
    program.stop_probes_on(stop.graceful)


def _before_run(stop: StopRequest) -> None:
    """A stop asked for while the run was being prepared ends it before anything is created."""
    if stop.graceful.is_set():
        raise ProbeInterrupted


def _read_only(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """report, status, fits: a reader that goes away (`status | head`) ends them quietly."""
    try:
        if args.verb == "report":
            return _report(args.run_dir)
        if args.verb == "status":
            return _status(args)
        return _fits(parser, args)
    except BrokenPipeError:
        # Python would print a traceback when it flushes stdout at exit: point it at /dev/null.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitCode.FITTED


def _guard_std_streams() -> None:
    """Closed stdin/stdout/stderr (`2>&-`) become /dev/null, so that no file we open later takes
    their place (a journal on fd 2 would get the children's error output) and nothing dies
    writing to them; the exit status still says how the run ended."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            opened = os.open(os.devnull, os.O_RDWR)
            if opened != fd:  # the lowest free descriptor is this one, unless raced
                os.dup2(opened, fd)
                os.close(opened)
    for name, fd in (("stdout", 1), ("stderr", 2)):
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, "w", encoding="utf-8", closefd=False))  # noqa: SIM115


def _fits(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """`oom-supervisor fits [list | forget KEY_PREFIX | forget --all]`."""
    action = args.fits_action or "list"
    if action == "forget" and (args.key_prefix is None) == (not args.forget_all):
        parser.error("fits forget takes a KEY_PREFIX or --all (one of them)")
    try:
        path = args.fits_db or default_fits_path()
        # Reading needs no write access: a store on a read-only mount is listed as it is.
        with (FitStore.open_for_reading(path) if action in ("list", "show")
              else FitStore.open(path)) as store:
            if action == "list":
                width = max(60, shutil.get_terminal_size((100, 24)).columns)
                print(render_fits(store.entries(), now=time.time(), width=width,  # noqa: T201
                                  project=str(Path.cwd()),
                                  every=getattr(args, "every_project", False)))
            elif action == "show":
                found = store.matching(args.key)
                if len(found) != 1:
                    msg = (f"no remembered fit has a key starting with {args.key[:40]}; "
                           "`oom-supervisor fits list --all` shows the keys" if not found else
                           f"{len(found)} fits have keys starting with {args.key[:40]}; "
                           "give more of the key")
                    raise ValueError(msg)  # noqa: TRY301 - said as every other bad input
                print(render_fit(found[0], now=time.time()))  # noqa: T201
            else:
                count = (store.forget_all() if args.forget_all
                         else store.forget(args.key_prefix))
                print(f"forgot {count} fit{'' if count == 1 else 's'} in {store.path}")  # noqa: T201
    except (FitStoreError, ValueError) as exc:
        print(f"oom-supervisor: error: {exc}", file=sys.stderr)  # noqa: T201
        return ExitCode.USAGE
    return ExitCode.FITTED


def _command_from(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Command:
    words = list(args.command)
    if words and words[0] == "--":
        words = words[1:]
    if not words:
        parser.error(f"no command to {'plan' if args.verb == 'plan' else 'supervise'}; put it "
                     "after `--`, e.g. `oom-supervisor run -- python train.py "
                     "--per_device_train_batch_size 8`")
    return Command(argv=tuple(words), cwd=str(Path.cwd()))


def policy_name(args: argparse.Namespace, command: Command) -> str:
    """The `--policy` given; else `multi-gpu` for a command that runs DeepSpeed from a JSON the
    ZeRO rungs can rewrite (sharding and offload cost only speed: they come before any cut),
    else `default`. Console and report say which (report.deepspeed_note)."""
    if getattr(args, "policy", None) is not None:
        return str(args.policy)
    reading = _dialect(args, command).read_sourced(command)
    if reading.knobs.deepspeed_stage is not None and reading.can_set("deepspeed_stage"):
        return "multi-gpu"
    return "default"


def _dialect(args: argparse.Namespace, command: Command) -> Dialect:
    knobs_file = getattr(args, "knobs", None)
    if knobs_file is not None and getattr(args, "dialect", None) is not None:
        msg = ("--dialect and --knobs both say how to read the command; give one (--knobs "
               "FILE for a script no dialect reads)")
        raise CommandError(msg)
    return (knobmap.load(knobs_file.resolve()) if knobs_file is not None
            else detect(command, forced=getattr(args, "dialect", None)))


def _device_mib(args: argparse.Namespace, probe: NvmlProbe | None) -> int | None:
    size: int | None = getattr(args, "device_memory", None)
    if size is None and probe is not None:
        size = smallest_device_mib(probe)
    return size


def _plan(args: argparse.Namespace, command: Command) -> int:
    ladder = resolve(args.policy)
    dialect = _dialect(args, command)
    reading = dialect.read_sourced(command)
    start = reading.knobs
    probe = NvmlProbe() if args.device_memory is None else None
    device_mib = _device_mib(args, probe)
    if device_mib is None:
        msg = ("no NVIDIA GPU is visible to take the device size from; give one, e.g. "
               "--device-memory 24GiB")
        raise CommandError(msg)
    spec = _model_spec(command, start)
    if args.method == "analytic":
        python, how = None, "counted analytically (--method analytic)"
    else:
        print(f"plan: looking for torch and transformers in {command.argv[0]}'s interpreter",  # noqa: T201
              file=sys.stderr, flush=True)
        python, how = pick_python(command.argv, env=environment(command), cwd=command.cwd)
    progress = _Progress("plan", spec.name, python)
    # auto: the analytic count ranks, traces confirm the config `run` would start with and
    # its neighbour across the device line; fake: every config traced.
    ranked = args.method == "auto"
    tracer = WarmTracer(python) if ranked and python is not None else None
    try:
        estimator = Estimator(spec, method=args.method, device=_estimate_device(probe),
                              python=python, progress=progress, ranked=ranked, tracer=tracer,
                              notice=progress.say)
        # The walk `run` would take for this program: the same skip predicate
        # (Reading.can_set, as RunConfig.can_set in the loop), so plan never recommends a
        # config run cannot try.
        plan = build_plan(start, ladder, spec, device_mib, predict=estimator.predict_many,
                          assumptions=(describe_reading(start, reading.sources), how),
                          can_set=reading.can_set,
                          confirm=estimator.confirm if ranked else None)
    finally:
        if tracer is not None:
            tracer.close()
    progress.finish(len(plan.rows) if ranked else None, estimator.traced)
    print(render_plan(plan))  # noqa: T201
    return ExitCode.FITTED if plan.recommended is not None else ExitCode.EXHAUSTED


class _Progress:
    """The prediction's progress line on stderr (plan's and run's): rewritten in place on a
    terminal, else one line per traced config; each with the seconds so far and an ETA."""

    def __init__(self, verb: str, model: str, python: str | None, *,
                 as_json: bool = False) -> None:
        self.verb = verb
        self.as_json = as_json
        """--log-format json: each line is a log event, stderr stays JSON lines."""
        self.started = time.monotonic()
        self.tty = sys.stderr.isatty() and not as_json
        self.total = 0
        self.open = False
        where = ("the analytic count ranks the ladder; FakeTensor traces in "
                 f"{python} confirm the config to start with and its neighbour"
                 if python else "analytic count")
        self._line(f"{verb}: predicting {model}'s memory ({where})")

    def _line(self, text: str, *, again: bool = False) -> None:
        if self.as_json:
            log.info("estimate.progress", line=text)
            return
        if again and self.tty:
            print(f"\r\x1b[K{text}", end="", file=sys.stderr, flush=True)  # noqa: T201
            self.open = True
            return
        print(("\n" if self.open else "") + text, file=sys.stderr, flush=True)  # noqa: T201
        self.open = False

    def __call__(self, done: int, total: int) -> None:
        self.total = total
        took = time.monotonic() - self.started
        left = took / done * (total - done) if done else None
        eta = f", about {human_duration(left)} left" if left else ""
        self._line(f"{self.verb}: predicting {done}/{total} configs, {human_duration(took)}"
                   f"{eta}", again=True)

    def say(self, text: str) -> None:
        """A sentence about the prediction (said once by the estimator)."""
        self._line(f"{self.verb}: {text}")

    def finish(self, configs: int | None = None, traced: int | None = None) -> None:
        """The prediction's end: its seconds, and how many configs were ranked and traced."""
        what = (f" ({configs} configs ranked by the analytic count, {traced} traced)"
                if configs is not None and traced is not None else "")
        self._line(f"{self.verb}: done in {human_duration(time.monotonic() - self.started)}"
                   f"{what}")


def _model_spec(command: Command, knobs: Knobs | None = None) -> ModelSpec:
    name = model_name(knobs, command.argv) if knobs is not None else model_argument(command.argv)
    if name is None:
        msg = ("the command names no model (--model_name_or_path, or model_name_or_path in "
               "its config); plan and the estimator need the model's config.json (a local "
               "directory or a named size)")
        raise ModelSpecError(msg)
    return ModelSpec.resolve(name, cwd=command.cwd)


def _estimate_device(probe: NvmlProbe | None) -> str:
    return "cuda" if probe is not None and probe.unavailable is None else "cpu"


@dataclasses.dataclass(slots=True)
class _Early:
    """What `run` starts before reading the command: the warm tracer, its interpreter."""

    python: str | None
    how: str
    tracer: WarmTracer | None
    gpu: NvmlProbe


def _start_early(args: argparse.Namespace, command: Command) -> _Early | None:
    """The warm tracing process, started first: torch's import overlaps the `--help` probe,
    the run folder and the journal (None: this run predicts nothing)."""
    if (args.verb not in {"run", "demo"} or getattr(args, "walk", False)
            or not getattr(args, "estimate", False)):
        return None
    probe = NvmlProbe()
    gpu = probe if probe.unavailable is None else None
    if _device_mib(args, gpu) is None:
        return _Early(python=None, how="", tracer=None, gpu=probe)
    python, how = pick_python(command.argv, env=environment(command), cwd=command.cwd)
    tracer = WarmTracer(python) if python is not None else None
    return _Early(python=python, how=how, tracer=tracer, gpu=probe)


def _memory(args: argparse.Namespace, command: Command, early: _Early | None) -> Memory:
    """Predictions and GPU sampling for `run`: each used only where it can be."""
    probe = early.gpu if early is not None else NvmlProbe()
    gpu = probe if probe.unavailable is None else None
    device_mib = _device_mib(args, gpu)
    predictor = None
    if getattr(args, "estimate", False) and device_mib is not None:
        try:
            knobs = _dialect(args, command).read(command)
            python, how = (early.python, early.how) if early is not None and early.how else \
                pick_python(command.argv, env=environment(command), cwd=command.cwd)
            log.info("estimate.interpreter", how=how)
            predictor = Estimator(_model_spec(command, knobs), device=_estimate_device(gpu),
                                  python=python, store=_trace_store(args), ranked=True,
                                  tracer=early.tracer if early is not None else None)
        except ModelSpecError as exc:
            log.info("estimate.unavailable", reason=str(exc))
    began = time.monotonic()
    if predictor is not None and args.policy and device_mib is not None:
        output = getattr(args, "output", None)
        progress = _Progress("run", predictor.spec.name, predictor.python,
                             as_json=getattr(output, "fmt", None) == "json")
        predictor.progress, predictor.notice = progress, progress.say
        ranked = None
        with contextlib.suppress(Exception):
            reading = _dialect(args, command).read_sourced(command)
            ladder = resolve(args.policy)
            ranked = len(walk_plan(reading.knobs, ladder, can_set=reading.can_set))
            predict_first(predictor, reading.knobs, ladder, device_mib,
                          margin=Memory().margin, can_set=reading.can_set)
        progress.finish(ranked, predictor.traced)
        predictor.progress = None
    spent = round(time.monotonic() - began, 2) if predictor is not None else None
    return Memory(predictor=predictor, device_mib=device_mib, gpu=gpu or probe,
                  predicted_s=spent,
                  count=_count(args, command, gpu) if getattr(args, "estimate", False) else None)


def _count(args: argparse.Namespace, command: Command,
           gpu: NvmlProbe | None) -> Callable[[Knobs], Prediction | None] | None:
    """The analytic count the walk checks its OOMs' figures against where no prediction is
    in force (a device of unknown size: the blind walk); None: the model's shape is unknown,
    and every config runs."""
    with contextlib.suppress(ModelSpecError, CommandError, OSError, ValueError):
        spec = _model_spec(command, _dialect(args, command).read(command))
        if spec.shape() is not None:
            return Estimator(spec, method="analytic", python=None,
                             device=_estimate_device(gpu)).predict
    return None


def _trace_store(args: argparse.Namespace) -> FitStore | None:
    """Traces kept across runs, in the fit store's file (None where it cannot be opened: the
    predictions are then this run's only)."""
    try:
        store = FitStore.open(args.fits_db or default_fits_path())
    except FitStoreError as exc:
        log.info("estimate.traces_not_kept", reason=str(exc))
        return None
    store.on_dropped = lambda why: args.output.print(f"oom-supervisor: note: {why}")
    return store


def predict_first(predictor: Estimator, start: Knobs, ladder: Ladder, device_mib: float, *,  # noqa: PLR0913 - keyword-only
                  margin: float, can_set: CanSet | None) -> None:
    """Before attempt 1, the prediction `run`'s first step needs, in the order that pays
    (plan.next_runnable with `confirm`: the analytic count ranks, traces confirm the config
    the walk would take and its neighbour across the device line); the loop's own first
    step then finds every trace it needs made."""
    next_runnable(start, [], ladder, predict=predictor.predict, device_mib=device_mib,
                  margin=margin, can_set=can_set, confirm=predictor.confirm)
    log.debug("estimate.predicted", traced=predictor.traced,
              seconds=round(predictor.traced_s, 2))


_DEMO_NEEDS = ("torch", "transformers", "peft")


DEMO_HELP = """\
The same ambitious command (full fine-tuning of the bundled tiny model, batch 4 x 1024 tokens)
on a simulated device of 70 MiB, in two acts:

  act 1 (default): the supervisor is told the device's size, predicts the memory of each
         config on the ladder (FakeTensor traces) and runs the first predicted to fit: it
         fits at once, and the report shows the prediction beside the measured peak.
  act 2 (--walk): the supervisor is not told; it walks the ladder for real, one real OOM
         after another, until a config fits.
"""


def _check_demo_packages() -> None:
    """The demo trains the bundled tiny model in this interpreter: say what is missing first."""
    missing = [name for name in _DEMO_NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        msg = (f"the demo trains a tiny model here and needs {', '.join(missing)}, which "
               f"{sys.executable} cannot import; install it with the train extra: pip install "
               "'oom-supervisor[train,plot]' (uv tool install and pipx install take the same "
               "'[train,plot]'); `run` itself needs none of it")
        raise CommandError(msg)


def demo_command() -> Command:
    """The demo's ambitious start: full fine-tuning, batch 4 x 1024 tokens, on a small device."""
    return Command(argv=(
        sys.executable, "-m", "supervisor.reference_trainer",
        "--model_name_or_path", "tiny", "--finetuning_type", "full",
        "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
        "--cutoff_len", "1024", "--max_steps", "1",
        "--output_dir", "reference-trainer-output",
    ), cwd=str(Path.cwd()))


def _run(args: argparse.Namespace, command: Command) -> int:
    early = _start_early(args, command)
    try:
        return _run_started(args, command, early)
    finally:
        if early is not None and early.tracer is not None:
            early.tracer.close()


def _run_started(args: argparse.Namespace, command: Command, early: _Early | None) -> int:
    ladder = resolve(args.policy)
    if getattr(args, "keep_quality", False):
        ladder = dataclasses.replace(ladder, keep_quality=True)
    dialect = _dialect(args, command)
    # Fail on an unreadable command, impossible knob values or a knob map the policy cannot
    # walk before anything is created.
    check_knobs(dialect.read(command))
    if isinstance(dialect, knobmap.KnobMapDialect):
        dialect.check_policy((r.name, r.knob, r.compensate) for r in ladder.rungs)
    if args.verb == "run" and args.fits_db is not None and not args.fresh:
        _check_fits_db(args.fits_db)
    _before_run(args.stop)
    if args.verb == "demo":
        _check_demo_packages()
    run_dir = prepare_run_dir(args.runs_dir, args.run_id or new_run_id())
    if args.verb == "demo":
        command = _demo_output_into(command, run_dir)
    env = environment(command)
    # The demo's act 1 is told the device and predicts; act 2 (--walk) shows the ladder itself:
    # no predictions, every OOM real.
    walk = args.verb == "demo" and args.walk
    memory = (Memory(device_mib=args.device_memory) if walk else dataclasses.replace(
        _memory(args, command, early), margin=ladder.estimate_margin))
    if args.device_memory is not None:
        # The trainer never hears of it: the limit is injected (sitecustomize on PYTHONPATH).
        env = device_memory_env(env, args.device_memory)
    device_source = ("--device-memory" if args.device_memory is not None
                     else "nvml" if memory.device_mib is not None else None)
    # The demo walks the whole ladder every time: it never uses the fit store.
    remembered = _remembered(args, command, dialect, ladder, memory) if args.verb == "run" \
        else None
    stop, signals = args.stop, args.signals
    _install_signal_handlers(stop, signals, run_dir)
    args.output.attach(run_dir.resolve(), fresh=True)  # a reused folder's old log is not kept
    try:
        result = supervise(command, dialect=dialect, ladder=ladder, run_dir=run_dir.resolve(),
                           max_attempts=args.max_attempts, stop=stop, echo=not args.quiet,
                           sleep=stop.graceful.wait, env=env, memory=memory,
                           device_source=device_source,
                           inject_device_memory=args.device_memory is not None,
                           signals=signals,
                           fits_key=remembered.key if remembered else None,
                           remembered=remembered.knobs if remembered else None,
                           remembered_from=remembered.run_id if remembered else None,
                           fits_db=str(args.fits_db) if args.fits_db else None,
                           remembered_ignored="; ".join(remembered.ignored)
                           if remembered and remembered.knobs else None,
                           share_output_dir=getattr(args, "share_output_dir", False),
                           process_started_at=process_start_time(),
                           draw_later=draw_later)
    finally:
        args.output.close()
    if remembered is not None and result.final_knobs is not None:
        remember.store(args.fits_db, remembered.key, final=result.final_knobs,
                       run_id=result.run_dir.name, attempts=result.attempts,
                       about=_fit_about(result.run_dir), argv=command.argv)
    return _ended(args, result)


def _fit_about(run_dir: Path) -> dict[str, str]:
    """What `fits list` shows of the run that found a fit: its model, its program, its
    working directory (the project) and its run folder."""
    about = {"run_dir": str(run_dir)}
    with contextlib.suppress(JournalError, CommandError, OSError, ValueError, IndexError):
        config = load_journal(run_dir)[0].config
        if config.cwd:
            about["cwd"] = config.cwd
        if config.start.model:
            about["model"] = str(config.start.model)
        about["program"] = locate(tuple(config.argv), cwd=config.cwd).program
    return about


def _check_fits_db(path: Path) -> None:
    """A store named with --fits-db must open: a typo there is bad input, not a warning at dawn.

    (The default store may be unusable on a machine: the run then warns and goes on.)
    """
    try:
        with FitStore.open(path):
            pass
    except FitStoreError as exc:
        raise CommandError(str(exc)) from None


def _remembered(args: argparse.Namespace, command: Command, dialect: Dialect, ladder: Ladder,
                memory: Memory) -> remember.Remembered:
    """This run's key in the fit store, and the fit remembered under it unless --fresh."""
    start = dialect.read(command)
    model_config = None
    with contextlib.suppress(ModelSpecError, CommandError, OSError, ValueError):
        model_config = _model_spec(command).config
    device_name: str | None = None
    if args.device_memory is None and isinstance(memory.gpu, NvmlProbe):
        devices = memory.gpu.devices() if memory.gpu.unavailable is None else ()
        device_name = devices[0].name if devices else None
    policy_text = ""
    with contextlib.suppress(OSError):
        policy_text = Path(ladder.source).read_text(encoding="utf-8")
    key, legacy = remember.keys_of(
        start=start, model_config=model_config, dialect=dialect.name, policy_text=policy_text,
        device_name=device_name or ("simulated" if args.device_memory
                                    else None if memory.device_mib
                                    else remember.host_limit(command.argv)),
        device_mib=memory.device_mib)
    return remember.lookup(args.fits_db, key, start, fresh=args.fresh, legacy_key=legacy,
                           argv=command.argv)


def _rebuild(config: RunConfig) -> Rebuilt:
    """The edges of a journaled run, exactly as it was started (resume)."""
    command = _unredact(Command(argv=config.argv, cwd=config.cwd), config)
    # Never ask the program for its --help again (an adopted attempt may be training): what
    # the first run's probe parsed was journaled with its config.
    program.record_help(command, config.program_help_text)
    if config.knobs_file is not None:
        dialect: Dialect = knobmap.load(Path(config.knobs_file))
    else:
        dialect = detect(command, forced=config.dialect)
    try:
        ladder = parse_policy(tomllib.loads(config.policy_text), source=config.policy_source)
        ladder = dataclasses.replace(ladder, keep_quality=config.keep_quality)
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        msg = f"the journaled policy is not valid TOML ({exc})"
        raise ResumeError(msg) from None
    env = environment(command)
    env.update(config.env_added)  # the variables the run saw, whatever this shell has
    # ...except SLURM's: a requeued or new batch job has its own allocation (job id, nodes,
    # task count), and srun must use that one, never the journaled job's (docs/slurm.md).
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    env.update((k, v) for k, v in os.environ.items() if k.startswith("SLURM_"))
    if config.inject_device_memory and config.device_mib is not None:
        env = device_memory_env(env, int(config.device_mib))
    probe = NvmlProbe()
    predictor = None
    if config.estimate and config.device_mib is not None:
        with contextlib.suppress(ModelSpecError):
            predictor = Estimator(_model_spec(command),
                                  device=_estimate_device(probe if probe.unavailable is None
                                                          else None))
    memory = Memory(predictor=predictor, device_mib=config.device_mib,
                    margin=config.estimate_margin, gpu=probe)
    check_knobs(config.start)
    if isinstance(dialect, knobmap.KnobMapDialect):
        dialect.check_policy((r.name, r.knob, r.compensate) for r in ladder.rungs)
    return Rebuilt(command=command, dialect=dialect, ladder=ladder, env=env, memory=memory)


def _unredact(command: Command, config: RunConfig) -> Command:
    """Secrets come back from this shell's environment, by the names the run journaled."""
    env = environment(command)
    missing = [n for n in config.secret_names if n not in env]
    if missing:
        msg = (f"the run needs the secret {'variable' if len(missing) == 1 else 'variables'} "
               f"{', '.join(missing)}, which this shell "
               "does not have; export them (the journal keeps names, never values) and run "
               "resume again")
        raise ResumeError(msg)
    words = []
    for word in command.argv:
        for name in config.secret_names:
            word = word.replace(f"<redacted:{name}>", env[name])  # noqa: PLW2901
        words.append(word)
    return Command(argv=tuple(words), cwd=command.cwd, env=command.env)


def _resume(args: argparse.Namespace) -> int:
    state, _ = load_journal(args.run_dir)  # not a run folder: one line, nothing written into it
    cwd = state.config.cwd
    if cwd is not None and not Path(cwd).is_dir():
        msg = (f"the run's working directory {printable(cwd)} no longer exists; restore it (the "
               f"command's relative paths are read from there), then resume {args.run_dir}")
        raise ResumeError(msg)
    stop, signals = args.stop, args.signals
    _install_signal_handlers(stop, signals, args.run_dir)
    args.output.attach(args.run_dir.resolve())
    try:
        result = resume(args.run_dir.resolve(), rebuild=_rebuild, orphan=args.orphan,
                        stop=stop, echo=not args.quiet, sleep=stop.graceful.wait,
                        signals=signals)
    finally:
        args.output.close()
    config = load_journal(result.run_dir)[0].config
    if config.fits_key and result.final_knobs is not None:
        remember.store(Path(config.fits_db) if config.fits_db else None, config.fits_key,
                       final=result.final_knobs, run_id=result.run_dir.name,
                       attempts=result.attempts, about=_fit_about(result.run_dir),
                       argv=config.argv)
    return _ended(args, result)


def _demo_output_into(command: Command, run_dir: Path) -> Command:
    argv = list(command.argv)
    argv[argv.index("--output_dir") + 1] = str((run_dir / "trainer-output").resolve())
    return Command(argv=tuple(argv), env=command.env, cwd=command.cwd)


def _install_signal_handlers(stop: StopRequest, signals: Signals, run_dir: Path) -> None:
    # The handlers only hand their work to `signals`' thread: see loop.Signals.
    def stopping(signum: int) -> None:
        how = "immediately" if stop.graceful.is_set() else "gracefully (again to hurry)"
        signals.stopping(signal.Signals(signum).name, how)  # journaled before the stop is seen
        stop.request()

    def handler(signum: int, _frame: FrameType | None) -> None:
        signals.from_handler(lambda: stopping(signum))

    def hangup(_signum: int, _frame: FrameType | None) -> None:
        signals.from_handler(moved)

    def moved() -> None:
        # A dropped ssh or a closed terminal must not end the night: the output that went to
        # the terminal goes to the run folder from now on, and the run carries on.
        target = run_dir.resolve() / "supervisor.log"
        with contextlib.suppress(OSError):
            target.parent.mkdir(parents=True, exist_ok=True)
            fd = open_regular(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND)  # never a link
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(OSError, ValueError):
                    stream.flush()
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
        signals.hangup(str(target))

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    # Slurm's warning signal (`sbatch --signal=B:USR1@120`): time is nearly up, stop politely
    # (the trainer saves at its next step end) so that a requeue resumes from there.
    signal.signal(signal.SIGUSR1, handler)
    signal.signal(signal.SIGHUP, hangup)


def _ended(args: argparse.Namespace, result: RunResult) -> int:
    """The summary for people, then the user's --notify command (which never changes the code)."""
    lines = summary(result.report, result.run_dir) if result.report else [
        f"oom-supervisor: {result.status} after {plural(result.attempts, 'attempt')}"]
    args.output.print("\n".join(lines))
    if getattr(args, "notify", None):
        event = notify.run(args.notify, exit_code=int(result.exit_code), run_dir=result.run_dir,
                           summary="\n".join(lines))
        try:
            with Journal(result.run_dir) as journal:  # the run has ended: the lock is free
                journal.write(event)
            write_report(result.run_dir, load_journal(result.run_dir)[0], pictures=False)
            draw_later(result.run_dir)
        except (RunFolderBusyError, JournalWriteError, JournalError, WriteFailedError) as exc:
            args.output.print(f"oom-supervisor: note: the notify result was not journaled "
                              f"({exc})")
        if event.error:
            args.output.print(f"oom-supervisor: note: --notify {event.error} (the run's exit "
                              f"code is unchanged: {int(result.exit_code)})")
    return int(result.exit_code)


def _status(args: argparse.Namespace) -> int:
    """`oom-supervisor status [RUN_DIR] [--runs-dir DIR] [--watch [S]]`."""
    run_dir = args.run_dir if args.run_dir is not None else newest_run(args.runs_dir)
    if args.watch is None:
        print(render_status(run_dir, lines=args.lines))  # noqa: T201
        return ExitCode.FITTED
    with contextlib.suppress(KeyboardInterrupt):
        watch_status(run_dir, every_s=args.watch, lines=args.lines)
    return ExitCode.FITTED


def _report(run_dir: Path) -> int:
    state, torn = load_journal(run_dir)
    try:
        data = write_report(run_dir, state)
    except OSError as exc:
        msg = (f"cannot write the report into {run_dir} ({exc.strerror or exc}); make the "
               "folder writable, or copy the run folder somewhere writable and run report there")
        raise CommandError(msg) from None
    if torn is not None:
        print("oom-supervisor: note: the journal's last line was torn (the supervisor died "  # noqa: T201
              "mid-write) and was left out", file=sys.stderr)
    if state.foreign_lines:
        print(f"oom-supervisor: note: {foreign_note(state.foreign_lines)}",  # noqa: T201
              file=sys.stderr)
    # The same closing lines as the run's own: the final config is said, not only pointed to.
    print("\n".join(summary(data, run_dir)))  # noqa: T201
    print(f"wrote {run_dir / 'report.md'}")  # noqa: T201
    return ExitCode.FITTED


if __name__ == "__main__":
    sys.exit(main())
