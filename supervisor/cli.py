"""Command line: argv -> supervise(); the only place that configures structlog."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import NoReturn

import structlog

from supervisor import __version__
from supervisor.command import Command, CommandError, environment
from supervisor.device_memory import device_memory_env
from supervisor.dialects import Dialect, detect, knobmap
from supervisor.dialects import names as dialect_names
from supervisor.estimate import Estimator, ModelSpec, ModelSpecError, model_argument
from supervisor.gpu import NvmlProbe, smallest_device_mib
from supervisor.journal import replay
from supervisor.loop import (
    ExitCode,
    Memory,
    ResumeError,
    RunResult,
    new_run_id,
    resume,
    supervise,
)
from supervisor.plan import build as build_plan
from supervisor.plan import parse_size_mib
from supervisor.plan import render as render_plan
from supervisor.plan import walk as walk_plan
from supervisor.policy import PolicyError, resolve
from supervisor.report import render_table
from supervisor.report import write as write_report
from supervisor.runner import StopRequest

log = structlog.get_logger("supervisor")

EXIT_CODES_HELP = """exit codes:
  0    fitted: the command finished with the final config
  2    usage error: bad arguments, policy file or command
  3    ladder exhausted: every rung (or the attempt budget) spent, still out of memory
  4    fatal: the command failed for a reason other than memory
  5    transient failures outlasted their retries
  130  interrupted (SIGINT/SIGTERM)
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
    parser.add_argument("--log-format", choices=("auto", "console", "json"), default="auto",
                        help="console on a TTY, JSON lines otherwise (default: auto)")
    sub = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="supervise a training command",
                         epilog=EXIT_CODES_HELP,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_run_options(run)
    run.add_argument("--device-memory", type=_size, default=None, metavar="SIZE",
                     help="run as if the device had only SIZE (24GiB, 512MiB): a real memory "
                          "limit injected into any Python command; also what predictions "
                          "are checked against (default: the visible GPU's)")
    run.add_argument("--no-estimate", dest="estimate", action="store_false",
                     help="never skip a config on its predicted memory")
    run.add_argument("command", nargs=argparse.REMAINDER,
                     help="the training command, after `--`")

    plan = sub.add_parser("plan", help="predict the memory of every config on the ladder",
                          epilog=EXIT_CODES_HELP,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    plan.add_argument("--policy", default="default", metavar="NAME|FILE")
    plan.add_argument("--device-memory", type=_size, default=None, metavar="SIZE",
                      help="device size to plan for (default: the visible GPU's)")
    plan.add_argument("--dialect", choices=dialect_names(), default=None)
    plan.add_argument("--knobs", type=Path, default=None, metavar="FILE")
    plan.add_argument("--method", choices=("auto", "fake", "analytic"), default="auto",
                      help="FakeTensor (exact, runs torch in a child) or analytic (default: auto)")
    plan.add_argument("command", nargs=argparse.REMAINDER, help="the training command, after `--`")

    demo = sub.add_parser("demo", help="walk the ladder on the bundled tiny model (CPU, no GPU)")
    _add_run_options(demo)
    demo.add_argument("--device-memory", type=_size, default=DEMO_DEVICE_MIB, metavar="SIZE",
                      help=f"simulated device size (default {DEMO_DEVICE_MIB}MiB)")
    demo.add_argument("--echo", dest="quiet", action="store_false",
                      help="show the trainer's own output (tracebacks included)")
    demo.set_defaults(quiet=True)

    res = sub.add_parser("resume", help="carry on a run whose supervisor died",
                         epilog=EXIT_CODES_HELP,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    res.add_argument("run_dir", type=Path)
    res.add_argument("--orphan", choices=("adopt", "end"), default="adopt",
                     help="an attempt still running from the dead supervisor: follow it to its "
                          "end (adopt, default) or end it and run that config again (end)")
    res.add_argument("--quiet", action="store_true", help="do not echo the command's output")

    rep = sub.add_parser("report", help="rebuild report.md/json from a run's journal")
    rep.add_argument("run_dir", type=Path)
    return parser


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", default="default", metavar="NAME|FILE",
                   help="ladder to walk: a shipped name (default, quality-first) or a .toml file")
    p.add_argument("--runs-dir", type=Path, default=Path("runs"), metavar="DIR",
                   help="where run folders go (default ./runs)")
    p.add_argument("--run-id", default=None, help="name of the run folder (default: time-based)")
    p.add_argument("--max-attempts", type=_positive, default=None, metavar="N",
                   help="stop after N attempts (default: the policy's max_attempts)")
    p.add_argument("--quiet", action="store_true", help="do not echo the command's output")
    p.add_argument("--dialect", choices=dialect_names(), default=None,
                   help="how to read the command (default: detected)")
    p.add_argument("--knobs", type=Path, default=None, metavar="FILE",
                   help="a TOML knob map for a script no dialect reads (docs/dialects.md)")


def _size(text: str) -> int:
    try:
        return parse_size_mib(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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


def configure_logging(fmt: str = "auto") -> None:
    """Readable console lines on a TTY, JSON lines otherwise; always to stderr."""
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()) if use_console
        else structlog.processors.JSONRenderer())
    structlog.configure(
        processors=[structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True),
                    renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `oom-supervisor` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_format)
    try:
        if args.verb == "report":
            return _report(args.run_dir)
        if args.verb == "resume":
            return _resume(args)
        if args.verb == "plan":
            return _plan(args, _command_from(parser, args))
        command = demo_command() if args.verb == "demo" else _command_from(parser, args)
        return _run(args, command)
    except (PolicyError, CommandError, ResumeError, ModelSpecError) as exc:
        print(f"oom-supervisor: error: {exc}", file=sys.stderr)  # noqa: T201
        return ExitCode.USAGE


def _command_from(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Command:
    words = list(args.command)
    if words and words[0] == "--":
        words = words[1:]
    if not words:
        parser.error(f"no command to {'plan' if args.verb == 'plan' else 'supervise'}; put it "
                     "after `--`, e.g. `oom-supervisor run -- python train.py "
                     "--per_device_train_batch_size 8`")
    return Command(argv=tuple(words), cwd=str(Path.cwd()))


def _dialect(args: argparse.Namespace, command: Command) -> Dialect:
    knobs_file = getattr(args, "knobs", None)
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
    start = dialect.read(command)
    probe = NvmlProbe() if args.device_memory is None else None
    device_mib = _device_mib(args, probe)
    if device_mib is None:
        msg = ("no NVIDIA GPU is visible to take the device size from; give one, e.g. "
               "--device-memory 24GiB")
        raise CommandError(msg)
    spec = _model_spec(command)
    estimator = Estimator(spec, method=args.method, device=_estimate_device(probe))
    print(render_plan(build_plan(start, ladder, spec, device_mib,  # noqa: T201
                                 predict=estimator.predict_many)))
    return ExitCode.FITTED


def _model_spec(command: Command) -> ModelSpec:
    name = model_argument(command.argv)
    if name is None:
        msg = ("the command names no --model_name_or_path; plan and the estimator need the "
               "model's config.json (a local directory or a named size)")
        raise ModelSpecError(msg)
    return ModelSpec.resolve(name)


def _estimate_device(probe: NvmlProbe | None) -> str:
    return "cuda" if probe is not None and probe.unavailable is None else "cpu"


def _memory(args: argparse.Namespace, command: Command) -> Memory:
    """Predictions and GPU sampling for `run`: each used only where it can be."""
    probe = NvmlProbe()
    gpu = probe if probe.unavailable is None else None
    device_mib = _device_mib(args, gpu)
    predictor = None
    if getattr(args, "estimate", False) and device_mib is not None:
        try:
            predictor = Estimator(_model_spec(command), device=_estimate_device(gpu))
        except ModelSpecError as exc:
            log.info("estimate.unavailable", reason=str(exc))
    if predictor is not None and args.policy:
        # One batch of child processes for the whole walk, rather than one per step.
        with contextlib.suppress(Exception):
            start = _dialect(args, command).read(command)
            predictor.predict_many([k for k, _ in walk_plan(start, resolve(args.policy))])
    return Memory(predictor=predictor, device_mib=device_mib, gpu=gpu or probe)


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
    ladder = resolve(args.policy)
    dialect = _dialect(args, command)
    dialect.read(command)  # fail on an unreadable command before anything is created
    run_dir = args.runs_dir / (args.run_id or new_run_id())
    if (run_dir / "journal.jsonl").exists():
        msg = f"{run_dir} already holds a run; choose another --run-id or --runs-dir"
        raise CommandError(msg)
    if args.verb == "demo":
        command = _demo_output_into(command, run_dir)
    env = environment(command)
    # The demo shows the ladder itself: no predictions, every OOM real.
    memory = (_memory(args, command) if args.verb == "run"
              else Memory(device_mib=args.device_memory))
    if args.device_memory is not None:
        # The trainer never hears of it: the limit is injected (sitecustomize on PYTHONPATH).
        env = device_memory_env(env, args.device_memory)
    stop = StopRequest()
    _install_signal_handlers(stop)
    result = supervise(command, dialect=dialect, ladder=ladder, run_dir=run_dir.resolve(),
                       max_attempts=args.max_attempts, stop=stop, echo=not args.quiet,
                       sleep=stop.graceful.wait, env=env, memory=memory)
    _print_summary(result)
    return int(result.exit_code)


def _resume(args: argparse.Namespace) -> int:
    stop = StopRequest()
    _install_signal_handlers(stop)
    def dialect_for(command: Command, name: str | None, knobs_file: str | None) -> Dialect:
        if knobs_file is not None:
            return knobmap.load(Path(knobs_file))
        return detect(command, forced=name)

    result = resume(args.run_dir.resolve(), dialect_for=dialect_for,
                    ladder_for=resolve, orphan=args.orphan, stop=stop, echo=not args.quiet,
                    sleep=stop.graceful.wait)
    _print_summary(result)
    return int(result.exit_code)


def _demo_output_into(command: Command, run_dir: Path) -> Command:
    argv = list(command.argv)
    argv[argv.index("--output_dir") + 1] = str((run_dir / "trainer-output").resolve())
    return Command(argv=tuple(argv), env=command.env, cwd=command.cwd)


def _install_signal_handlers(stop: StopRequest) -> None:
    def handler(signum: int, _frame: FrameType | None) -> None:
        stop.request()
        how = "immediately" if stop.immediate.is_set() else "gracefully (again to hurry)"
        log.warning("supervisor.stopping", signal=signal.Signals(signum).name, how=how)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _print_summary(result: RunResult) -> None:
    lines = []
    if result.report:
        lines += [render_table(result.report), ""]
    lines += [(f"oom-supervisor: {result.status} after {result.attempts} attempt(s); "
               f"report: {result.run_dir / 'report.md'}")]
    if result.final_knobs is not None:
        k = result.final_knobs
        lines.append(
            f"working config: per_device_batch={k.per_device_batch} grad_accum={k.grad_accum} "
            f"(effective batch {k.effective_batch}) cutoff_len={k.cutoff_len} "
            f"gradient_checkpointing={str(k.gradient_checkpointing).lower()} "
            f"finetuning_type={k.finetuning_type}")
        lines.append(f"run it again as is: sh {result.run_dir / 'final-command.sh'}")
    print("\n".join(lines), file=sys.stderr)  # noqa: T201


def _report(run_dir: Path) -> int:
    journal = run_dir / "journal.jsonl"
    if not journal.is_file():
        print(f"oom-supervisor: error: {journal} does not exist; give a run folder "  # noqa: T201
              "(runs/<run-id>)", file=sys.stderr)
        return ExitCode.USAGE
    try:
        replayed = replay(journal)
        data = write_report(run_dir, replayed.events)
    except ValueError as exc:
        print(f"oom-supervisor: error: {exc}", file=sys.stderr)  # noqa: T201
        return ExitCode.USAGE
    if replayed.torn_line is not None:
        print("oom-supervisor: note: the journal's last line was torn (the supervisor died "  # noqa: T201
              "mid-write) and was left out", file=sys.stderr)
    print(f"{data['summary']}; wrote {run_dir / 'report.md'}")  # noqa: T201
    return ExitCode.FITTED


if __name__ == "__main__":
    sys.exit(main())
