"""The CLI: argv maps onto supervise(); every usage error is one line and exit code 2."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from supervisor import cli
from supervisor.command import Command
from supervisor.events import RunResumed
from supervisor.journal import Journal
from supervisor.loop import ExitCode


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:  # argparse exits; main() itself returns
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(("policy_text", "message"), [
    ("[[rung]\n", "not valid TOML"),
    ('[[rung]]\naction = "shrink"\nknob = "per_device_batch"\n', "unknown action 'shrink'"),
    ('[[rung]]\naction = "halve"\nknob = "cutoff_len"\nfloor = -1\n', "floor must be >= 1"),
])
def test_bad_policy_file_is_one_line_and_usage_exit(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], policy_text: str,
        message: str) -> None:
    """A broken policy stops before anything runs: one stderr line, exit 2, no run folder."""
    policy = tmp_path / "p.toml"
    policy.write_text(policy_text, encoding="utf-8")
    code, _, err = run_cli(capsys, "run", "--policy", str(policy), "--runs-dir",
                           str(tmp_path / "runs"), "--", "python", "train.py",
                           "--per_device_train_batch_size", "8")
    assert code == ExitCode.USAGE
    assert err.count("\n") == 1
    assert message in err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("argv", "message"), [
    (["run"], "no command to supervise"),
    (["run", "--"], "no command to supervise"),
    (["run", "--max-attempts", "0", "--", "python", "t.py"], "must be at least 1"),
    (["run", "--policy", "nope", "--", "python", "t.py"], "no policy named 'nope'"),
    (["run", "--", "python", "t.py", "--lr", "1e-4"], "found none of the memory flags"),
    (["run", "--", "python", "t.py", "--per_device_train_batch_size", "x"],
     "is not a whole number"),
    (["fly"], "invalid choice: 'fly'"),
    (["run", "--knobs", "/nonexistent/map.toml", "--", "python", "t.py"],
     "cannot read the knob map"),
    (["report", "/nonexistent/run"], "does not exist"),
])
def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                   argv: list[str], message: str) -> None:
    """Missing or unreadable commands and bad options: one clear line, exit 2."""
    code, _, err = run_cli(capsys, *argv[:1], *(["--runs-dir", str(tmp_path)]
                                                 if argv[0] == "run" else []), *argv[1:])
    assert code == ExitCode.USAGE
    assert err.strip().count("\n") == 0
    assert message in err


def test_run_options_reach_the_parser() -> None:
    """--policy, --runs-dir, --max-attempts and the command after -- are parsed as given."""
    args = cli.build_parser().parse_args(shlex.split(
        "run --policy quality-first --runs-dir /x --max-attempts 5 -- "
        "torchrun --nproc_per_node 2 train.py --per_device_train_batch_size 8"))
    assert (args.policy, args.runs_dir, args.max_attempts) == ("quality-first", Path("/x"), 5)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    assert command == ["torchrun", "--nproc_per_node", "2", "train.py",
                       "--per_device_train_batch_size", "8"]


def test_report_of_a_journal_without_start_is_a_usage_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`report` on a folder whose journal is not ours says so in one line."""
    with Journal(tmp_path) as journal:
        journal.write(RunResumed(attempts_done=0))
    code, _, err = run_cli(capsys, "report", str(tmp_path))
    assert code == ExitCode.USAGE
    assert "does not begin with run.started" in err
    assert "Traceback" not in err


def test_existing_run_id_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A run folder that already holds a journal is never overwritten."""
    (tmp_path / "r1").mkdir()
    (tmp_path / "r1" / "journal.jsonl").write_text("{}\n", encoding="utf-8")
    code, _, err = run_cli(capsys, "run", "--runs-dir", str(tmp_path), "--run-id", "r1", "--",
                           "python", "t.py", "--per_device_train_batch_size", "8")
    assert code == ExitCode.USAGE
    assert "already holds a run" in err


@pytest.mark.parametrize(("verb", "has", "lacks"), [
    ("run", ["--knobs", "--fits-db", "--fresh", "--quiet", "3    ladder exhausted"], []),
    ("demo", ["--echo", "--device-memory", "3    ladder exhausted"],
     ["--knobs", "--dialect", "--fits-db", "--fresh", "--quiet"]),
    ("plan", ["--method", "3    the plan was printed and no config"],
     ["ladder exhausted", "--notify", "--fresh"]),
    ("resume", ["--orphan", "130  interrupted"], ["--knobs", "--policy"]),
    ("report", ["report.md and report.json were written"], ["ladder exhausted", "--watch"]),
    ("status", ["--watch", "the run was shown"], ["ladder exhausted", "--policy"]),
    ("fits", ["--fits-db", "store that cannot be opened"], ["ladder exhausted", "--policy"]),
])
def test_each_subcommands_help_has_its_own_options_and_exit_codes(
        capsys: pytest.CaptureFixture[str], verb: str, has: list[str], lacks: list[str]) -> None:
    """`oom-supervisor VERB --help`: that verb's options and exit codes, nobody else's."""
    code, out, _ = run_cli(capsys, verb, "--help")
    assert code == 0
    for text in has:
        assert text in out, (verb, text)
    for text in lacks:
        assert text not in out, (verb, text)


def test_status_watch_then_a_run_folder_reads_the_folder_as_the_run(
        capsys: pytest.CaptureFixture[str]) -> None:
    """`status --watch runs/x`: the folder is the run (not the interval); a finished run is
    drawn once and the command ends."""
    run = Path(__file__).parent.parent / "data" / "runs" / "demo-70"
    assert cli.attach_values(["status", "--watch", str(run)]) == (
        ["status", "--watch=2", str(run)])
    assert cli.attach_values(["status", "--watch", "5", str(run)]) == (
        ["status", "--watch", "5", str(run)])
    code, out, err = run_cli(capsys, "status", "--watch", str(run))
    assert (code, err) == (0, "")
    assert "supervisor ended" in out


def test_a_deepspeed_command_walks_the_zero_rungs_by_default(tmp_path: Path) -> None:
    """No --policy: `multi-gpu` for a command whose DeepSpeed JSON the ZeRO rungs can rewrite,
    `default` otherwise; a --policy given is kept. The run's one-line note says which."""
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 2}}', encoding="utf-8")
    (tmp_path / "ds.yml").write_text("base_model: m\nmicro_batch_size: 2\ndeepspeed: ds.json\n",
                                     encoding="utf-8")
    (tmp_path / "plain.yml").write_text("base_model: m\nmicro_batch_size: 2\n", encoding="utf-8")
    parser = cli.build_parser()

    def chosen(words: str, config: str) -> str:
        args = parser.parse_args(shlex.split(f"run {words} -- axolotl train {config}"))
        return cli.policy_name(args, Command(argv=("axolotl", "train", config),
                                             cwd=str(tmp_path)))

    assert chosen("", "ds.yml") == "multi-gpu"
    assert chosen("", "plain.yml") == "default"
    assert chosen("--policy default", "ds.yml") == "default"
    assert chosen("--policy quality-first", "plain.yml") == "quality-first"


def test_report_prints_the_final_config(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """`report RUN_DIR` of a fitted run says the working config, not "the final config below"
    with nothing below (tests/data/runs/demo-150: a recorded demo run)."""
    import shutil  # noqa: PLC0415

    run_dir = tmp_path / "demo-150"
    shutil.copytree(Path(__file__).resolve().parents[1] / "data" / "runs" / "demo-150", run_dir)
    code, out, _ = run_cli(capsys, "report", str(run_dir))
    assert code == 0
    assert "working config: " in out
    assert "below" not in out
    assert f"run it again as is: sh {run_dir / 'final-command.sh'}" in out
    assert out.rstrip().endswith(f"wrote {run_dir / 'report.md'}")
