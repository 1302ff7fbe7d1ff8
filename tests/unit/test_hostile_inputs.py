"""Issue 16's hostile inputs, unit by unit: printed passwords, terminal escapes, values that
expand without end, run files that are not files, writes that fail, the probe's cache."""

from __future__ import annotations

import os
import re
import shlex
import stat
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from supervisor.classify import Outcome
from supervisor.cli import main
from supervisor.command import Command, CommandError
from supervisor.dialects import detect
from supervisor.dialects.argv import ArgvDialect
from supervisor.echo import ConsoleWriter
from supervisor.events import JournalError
from supervisor.files import WriteFailedError, write_file
from supervisor.journal import Journal, holder, load
from supervisor.loop import ExitCode, supervise
from supervisor.policy import resolve
from supervisor.program import parse_help, render_help, run_help
from supervisor.runner import AttemptSpec
from supervisor.secrets import (
    Redactor,
    is_secret_name,
    private_copy,
    redact_printed,
    remove_private_copies,
)
from supervisor.text import bounded, printable
from tests.fakes import OOM, ScriptedRunner

HELP = Path(__file__).resolve().parents[1] / "data" / "help"


# --- the redactor: password names and printed forms -------------------------------------------

@pytest.mark.parametrize(("text", "shown"), [
    ("DB_PASS Sup3rS3cret!", "DB_PASS <redacted:DB_PASS>"),
    ("connecting with password Hunter2xy", "connecting with password <redacted:PASSWORD>"),
    ("MYSQL_PWD=abcdefgh12", "MYSQL_PWD=<redacted:MYSQL_PWD>"),
    ("PASS=abcd1234x", "PASS=<redacted:PASS>"),
    ("db_passwd: 'Zq9!xx77'", "db_passwd: '<redacted:DB_PASSWD>'"),
])
def test_printed_passwords_are_redacted(text: str, shown: str) -> None:
    """Password names the redactor did not know, with `=`, `:` or only a space."""
    assert redact_printed(text) == shown


@pytest.mark.parametrize("text", [
    "password required for login", "test passed 12345678", "the pass rate 0.95",
    "bypass Xy12345678", "forward pass took 3.2 s",
])
def test_words_about_passing_are_left_alone(text: str) -> None:
    """A plain word after `password`, and `pass` inside other words, are not secrets."""
    assert redact_printed(text) == text


def test_password_variables_are_secret_names_but_the_working_directory_is_not() -> None:
    """MYSQL_PWD, PASS, DB_PASS are secrets by name; the shell's PWD/OLDPWD are paths."""
    assert [n for n in ("MYSQL_PWD", "PASS", "DB_PASS", "PGPASSWORD", "SMTP_PASSPHRASE")
            if not is_secret_name(n)] == []
    assert [n for n in ("PWD", "OLDPWD", "COMPASS", "bypass_cache") if is_secret_name(n)] == []


def test_a_password_from_the_environment_is_redacted_wherever_it_is_printed() -> None:
    """`connecting with password <value>` with MYSQL_PWD set: the value is known."""
    redactor = Redactor.for_run([], {"MYSQL_PWD": "hunter2hunter", "PWD": "/home/me"})
    shown = redactor.data(b"connecting with password hunter2hunter from /home/me\n")
    assert shown == b"connecting with password <redacted:MYSQL_PWD> from /home/me\n"


# --- terminal control sequences ------------------------------------------------------------------

@pytest.mark.parametrize(("text", "shown"), [
    ("\x1b]0;pwned\x07CUDA out of memory", "CUDA out of memory"),  # OSC: window title
    ("\x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\", "link"),  # OSC 8 hyperlink, ST-terminated
    ("\x1b[2J\x1b[HOOM", "OOM"),  # clear screen, cursor home
    ("\x1b[31mred\x1b[0m", "red"),
    ("\x9b2Jeight-bit", "eight-bit"),
    ("a\rb\bc\x00d", "abcd"),
    ("tab\there\nnext line", "tab\there\nnext line"),
    ("plain text, unicode \u00e9\u4e2d", "plain text, unicode \u00e9\u4e2d"),
])
def test_control_sequences_are_stripped(text: str, shown: str) -> None:
    """CSI, OSC (BEL or ST), 8-bit CSI and C0 controls go; tabs, newlines and text stay."""
    assert printable(text) == shown


def test_report_md_holds_no_escape_from_the_trainer(tmp_path: Path) -> None:
    """An OOM line that retitles and clears the terminal reaches report.md without them."""
    runner = ScriptedRunner([OOM])

    def hostile(spec: AttemptSpec) -> Outcome:
        outcome = runner(spec)
        return replace(outcome, tail=tuple(f"\x1b]0;pwned\x07\x1b[2J{line}"
                                           for line in outcome.tail))

    with pytest.raises(AssertionError):  # the script runs out after the OOM: a dead supervisor
        supervise(Command(argv=tuple(shlex.split(
            "python -m supervisor.reference_trainer --per_device_train_batch_size 8")),
            cwd=str(tmp_path)), dialect=ArgvDialect(), ladder=resolve("default"),
            run_dir=tmp_path / "run", run_attempt=hostile, sleep=lambda _s: None, echo=False,
            env={})
    assert main(["report", str(tmp_path / "run")]) == 0
    report = (tmp_path / "run" / "report.md").read_text(encoding="utf-8")
    assert "out of memory" in report.lower()
    assert "\x1b" not in report
    assert "\x07" not in report


# --- bounded values --------------------------------------------------------------------------

def _laughs(depth: int = 30) -> str:
    lines = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, depth)]
    return "\n".join(lines)


def test_a_billion_laughs_knob_value_is_quoted_short_and_fast(tmp_path: Path) -> None:
    """9^30 items behind one alias: the error names the value in a few words, at once."""
    (tmp_path / "sft.yaml").write_text(
        _laughs() + "\nper_device_train_batch_size: *a29\nmodel_name_or_path: tiny\n"
        "stage: sft\nfinetuning_type: full\noutput_dir: out\n", encoding="utf-8")
    command = Command(argv=("llamafactory-cli", "train", "sft.yaml"), cwd=str(tmp_path))
    started = time.monotonic()
    with pytest.raises(CommandError) as caught:
        detect(command).read(command)
    assert time.monotonic() - started < 10
    assert "is not a whole number" in str(caught.value)
    assert len(str(caught.value)) < 400


def test_bounded_handles_nesting_subclasses_and_odd_objects() -> None:
    """Shared nesting, list subclasses (ruamel's), long strings, escapes: short and printable."""
    class Seq(list[object]):
        def __repr__(self) -> str:
            msg = "never asked"
            raise AssertionError(msg)

    nested: list[object] = [1]
    for _ in range(40):
        nested = [nested] * 9
    assert len(bounded(Seq(nested))) <= 120
    assert bounded("x" * 10_000).count("x") < 100
    assert "\x1b" not in bounded("\x1b[2Jboom")
    assert bounded(object()) == "<object>"
    assert bounded(3) == "3"


# --- run files that are not regular files ---------------------------------------------------------

def _in_thread(call: Callable[[], object], timeout_s: float = 10.0) -> object:
    """Run `call` in a thread; fail (instead of hanging the suite) if it blocks."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["value"] = call()
        except Exception as exc:  # noqa: BLE001 - handed back to the test
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), "blocked"
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box.get("value")


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_a_journal_that_is_not_a_file_is_refused_by_name(tmp_path: Path, kind: str) -> None:
    """A FIFO or a directory named journal.jsonl: one line saying what it is, never a hang."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    journal = run_dir / "journal.jsonl"
    os.mkfifo(journal) if kind == "fifo" else journal.mkdir()
    with pytest.raises(JournalError) as caught:
        _in_thread(lambda: load(run_dir))
    words = "a FIFO (named pipe)" if kind == "fifo" else "a directory"
    assert f"is {words}, not a regular file" in str(caught.value)
    with pytest.raises(JournalError):
        _in_thread(lambda: Journal(run_dir))


def test_a_lock_that_is_a_fifo_neither_blocks_status_nor_is_opened(tmp_path: Path) -> None:
    """`status` asks who holds the lock: a FIFO answers nobody, at once; a run refuses it."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    os.mkfifo(run_dir / ".lock")
    assert _in_thread(lambda: holder(run_dir)) is None
    with pytest.raises(JournalError) as caught:
        _in_thread(lambda: Journal(run_dir))
    assert "FIFO" in str(caught.value)
    assert stat.S_ISFIFO((run_dir / ".lock").stat().st_mode)  # left as it was


# --- writes that fail ---------------------------------------------------------------------------

def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    """write_file replaces whole; into a vanished folder it is one line naming path and fix."""
    target = tmp_path / "report.md"
    write_file(target, "old\n")
    write_file(target, "new\n")
    assert target.read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "journal.jsonl").write_text("")
    with pytest.raises(WriteFailedError) as caught:
        write_file(tmp_path / "run" / "attempts" / "03" / "argv.json", "[]")
    message = str(caught.value)
    assert "argv.json (its folder is gone)" in message
    assert f"`oom-supervisor resume {tmp_path / 'run'}`" in message


def test_resume_whose_working_directory_is_gone_journals_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One line naming the folder, exit 2, and the journal byte for byte as it was."""
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(AssertionError):  # the scripted runner runs out: the supervisor "died"
        supervise(Command(argv=tuple(shlex.split(
            "python -m supervisor.reference_trainer --per_device_train_batch_size 8")),
            cwd=str(work)), dialect=ArgvDialect(), ladder=resolve("default"),
            run_dir=tmp_path / "run", run_attempt=ScriptedRunner([OOM]),
            sleep=lambda _s: None, echo=False, env={})
    before = (tmp_path / "run" / "journal.jsonl").read_bytes()
    work.rmdir()
    assert main(["resume", str(tmp_path / "run")]) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert f"working directory {work} no longer exists" in err
    assert "Traceback" not in err
    assert (tmp_path / "run" / "journal.jsonl").read_bytes() == before


# --- the probe's cache and the private copies -------------------------------------------

@pytest.mark.parametrize("name", sorted(p.stem for p in HELP.glob("*.txt")))
def test_the_cached_help_reads_back_as_the_help(name: str) -> None:
    """What is cached (the parsed flags and defaults, rebuilt as text) parses to the same."""
    parsed = parse_help((HELP / f"{name}.txt").read_text(encoding="utf-8"))
    assert parsed is not None
    assert parse_help(render_help(parsed)) == parsed


def test_the_cached_help_keeps_no_secret_default() -> None:
    """ArgumentDefaultsHelpFormatter with default=os.environ['HF_TOKEN']: a placeholder."""
    token = "hf_" + "Z" * 34
    text = ("usage: t.py [-h]\n\noptions:\n  -h, --help  show this help\n"
            f"  --hub_token HUB_TOKEN  the token (default: {token})\n"
            "  --db_url DB_URL  where (default: mysql://me:Pa55word99@db/x)\n"
            "  --per_device_train_batch_size B  (default: 8)\n")
    parsed = parse_help(text)
    assert parsed is not None
    cached = render_help(parsed)
    assert token not in cached
    assert "Pa55word99" not in cached
    assert "(default: <redacted:HUB_TOKEN>)" in cached
    assert "(default: 8)" in cached


def test_private_copies_are_removed_when_the_run_ends(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The 0600 copy holding the real secret goes, and its folder, at the run's end."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "runtime"))
    (tmp_path / "runtime").mkdir()
    copy = private_copy(tmp_path / "sft.yaml", "hub_token: hf_secret_value\n")
    assert copy.read_text() == "hub_token: hf_secret_value\n"
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    remove_private_copies()
    assert not copy.exists()
    assert list((tmp_path / "runtime").rglob("*")) == []


# --- the console echo -----------------------------------------------------------------------------

def test_the_echo_never_blocks_on_a_console_that_does_not_read() -> None:
    """A pipe nobody reads: `put` returns at once, the overflow is counted, a flush gives up
    quickly; once the console reads again it is told how many lines it missed."""
    read_end, write_end = os.pipe()
    try:
        writer = ConsoleWriter(write_end)
        line = b"y" * 99 + b"\n"
        started = time.monotonic()
        for _ in range(30_000):  # 3 MB: the pipe takes 64 KiB, the queue 1 MiB
            writer.put(line)
        assert time.monotonic() - started < 5
        assert writer.dropped_total > 0
        started = time.monotonic()
        assert writer.flush() is False
        assert time.monotonic() - started < 3
        got = bytearray()
        os.set_blocking(read_end, False)
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < 2:  # read until the writer has nothing left
            try:
                chunk = os.read(read_end, 1 << 20)
            except BlockingIOError:
                time.sleep(0.01)
                continue
            got += chunk
            quiet_since = time.monotonic()
        said = sum(int(n) for n in re.findall(rb"(\d+) lines? of output not echoed", got))
        assert said == writer.dropped_total
        assert got.count(line) + writer.dropped_total == 30_000
    finally:
        os.close(read_end)


def test_a_help_in_bytes_that_are_not_utf8_is_read(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Binary bytes in the help: decoded leniently, the options still read, no traceback."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "binary.py").write_text(
        "import sys\nsys.stdout.buffer.write(b'usage: binary.py [-h]\\n\\xff\\xfe\\x80 caf\\xe9\\n"
        "\\noptions:\\n  --per_device_train_batch_size X  (default: 8)\\n')\n", encoding="utf-8")
    text = run_help(Command(argv=(sys.executable, "binary.py"), cwd=str(tmp_path)))
    assert text is not None
    parsed = parse_help(text)
    assert parsed is not None
    assert parsed.option("--per_device_train_batch_size") is not None
