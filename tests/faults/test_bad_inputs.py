"""Bad input of any kind: one line on stderr, exit 2, no traceback, nothing written outside the
runs directory, and a journal (if one exists) left intact.

Each row is run through the real CLI (`python -m supervisor ...`) in a fresh folder.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.rundir import MAX_RUN_ID, RunDirError, prepare_run_dir, validate_run_id
from tests.faults.conftest import quiet_env

pytestmark = pytest.mark.process

OK = "ok.py"  # a command that would fit at once, if it ever ran
RUN = ("run", "--quiet", "--runs-dir", "runs")
COMMAND = ("--", sys.executable, OK, "--per_device_train_batch_size", "4",
           "--gradient_accumulation_steps", "1")
MAP_HEAD = 'name = "m"\n[knobs.per_device_batch]\nflag = "--per_device_train_batch_size"\n'


@dataclass(frozen=True)
class Row:
    """One bad input: the CLI words, and what to lay out in the folder first."""

    name: str
    words: tuple[str, ...]
    files: dict[str, bytes | str] | None = None
    prepare: Callable[[Path], None] | None = None


def _policy(body: str) -> dict[str, bytes | str]:
    return {"bad.toml": f'name = "bad"\n{body}'}


def _rung(body: str) -> dict[str, bytes | str]:
    return _policy(f"[[rung]]\n{body}\n")


def _report_dir_unwritable(root: Path) -> None:
    """A finished run whose folder cannot take report.md (it is a folder: writing fails)."""
    subprocess.run([sys.executable, "-m", "supervisor", *RUN, "--run-id", "done", *COMMAND],  # noqa: S603
                   cwd=root, env=quiet_env(), check=True, capture_output=True, timeout=300)
    report = root / "runs" / "done" / "report.md"
    report.unlink()
    report.mkdir()


def _a_finished_run(root: Path) -> None:
    """A copy of a recorded finished run (the demo at 70 MiB) to point `status` at."""
    shutil.copytree(Path(__file__).parent.parent / "data" / "runs" / "demo-70", root / "done")


def _ten_mb_policy() -> dict[str, bytes | str]:
    rungs = "".join(f'[[rung]]\nname = "r{i:07d}"\naction = "enable"\n'
                    f'knob = "gradient_checkpointing"\n' for i in range(150_000))
    duplicate = '[[rung]]\nname = "r0000000"\naction = "enable"\nknob = "gradient_checkpointing"\n'
    return {"big.toml": f'name = "big"\n{rungs}{duplicate}'}


ROWS = [
    # --run-id: one plain name, nothing else
    Row("run-id dotdot", (*RUN, "--run-id", "../x", *COMMAND)),
    Row("run-id dotdot alone", (*RUN, "--run-id", "..", *COMMAND)),
    Row("run-id absolute", (*RUN, "--run-id", "/tmp/oom-supervisor-abs", *COMMAND)),  # noqa: S108
    Row("run-id dot", (*RUN, "--run-id", ".", *COMMAND)),
    Row("run-id slash", (*RUN, "--run-id", "a/b", *COMMAND)),
    Row("run-id newline", (*RUN, "--run-id", "x\ntouch injected", *COMMAND)),
    Row("run-id control char", (*RUN, "--run-id", "x\x1b[2Jy", *COMMAND)),
    Row("run-id empty", (*RUN, "--run-id", "", *COMMAND)),
    Row("run-id 300 chars", (*RUN, "--run-id", "x" * 300, *COMMAND)),
    # --runs-dir: a place to write
    Row("runs-dir is a file", ("run", "--runs-dir", "afile", "--run-id", "r", *COMMAND),
        files={"afile": "x"}),
    Row("runs-dir under a file", ("run", "--runs-dir", "afile/runs", "--run-id", "r", *COMMAND),
        files={"afile": "x"}),
    Row("runs-dir under /proc", ("run", "--runs-dir", "/proc/oom-supervisor-runs", "--run-id",
                                 "r", *COMMAND)),
    # report into a folder that cannot take it
    Row("report unwritable", ("report", "runs/done"), prepare=_report_dir_unwritable),
    # files that are not text
    Row("binary knob map", (*RUN, "--run-id", "r", "--knobs", "map.toml", *COMMAND),
        files={"map.toml": b"\x00\xff\xfe\x80binary\x00"}),
    Row("binary policy", (*RUN, "--run-id", "r", "--policy", "bad.toml", *COMMAND),
        files={"bad.toml": b"\x00\xff\xfe\x80binary\x00"}),
    Row("binary yaml", (*RUN, "--run-id", "r", "--", "llamafactory-cli", "train", "sft.yaml"),
        files={"sft.yaml": b"\x00\xff\xfe\x80binary\x00"}),
    Row("yaml nested deep", (*RUN, "--run-id", "r", "--", "llamafactory-cli", "train",
                             "sft.yaml"), files={"sft.yaml": "a: " + "[" * 100_000}),
    Row("policy nested 100k deep", (*RUN, "--run-id", "r", "--policy", "bad.toml", *COMMAND),
        files=_policy("a = " + "[" * 100_000 + "]" * 100_000 + "\n")),
    # policies that would do harm
    Row("set batch 0", (*RUN, "--run-id", "r", "--policy", "bad.toml", *COMMAND),
        files=_rung('action = "set"\nknob = "per_device_batch"\nvalue = 0')),
    Row("set batch -4", (*RUN, "--run-id", "r", "--policy", "bad.toml", *COMMAND),
        files=_rung('action = "set"\nknob = "per_device_batch"\nvalue = -4')),
    Row("lora rank -8", (*RUN, "--run-id", "r", "--policy", "bad.toml", *COMMAND),
        files=_rung('action = "set"\nknob = "finetuning_type"\nvalue = "lora"\n'
                    "with = { lora_rank = -8 }")),
    Row("compensate with the halved knob", (*RUN, "--run-id", "r", "--policy", "bad.toml",
                                            *COMMAND),
        files=_rung('action = "halve"\nknob = "per_device_batch"\n'
                    'compensate = "per_device_batch"')),
    Row("10 MB policy with a duplicate at its end", (*RUN, "--run-id", "r", "--policy",
                                                     "big.toml", *COMMAND),
        files=_ten_mb_policy()),
    # commands
    Row("huge batch", (*RUN, "--run-id", "r", "--", sys.executable, OK,
                       "--per_device_train_batch_size", "99999999999999999999999999")),
    Row("batch 0", (*RUN, "--run-id", "r", "--", sys.executable, OK,
                    "--per_device_train_batch_size", "0")),
    # knob maps
    Row("map without grad_accum under the default policy",
        (*RUN, "--run-id", "r", "--knobs", "map.toml", *COMMAND),
        files={"map.toml": MAP_HEAD + "default = 4\n"}),
    Row("two knobs on one flag", (*RUN, "--run-id", "r", "--knobs", "map.toml", *COMMAND),
        files={"map.toml": MAP_HEAD + "[knobs.grad_accum]\n"
                                      'flag = "--per_device_train_batch_size"\n'}),
    Row("default is a word", (*RUN, "--run-id", "r", "--knobs", "map.toml", *COMMAND),
        files={"map.toml": MAP_HEAD + 'default = "eight"\n'}),
    Row("inverted is a string", (*RUN, "--run-id", "r", "--knobs", "map.toml", *COMMAND),
        files={"map.toml": MAP_HEAD + '[knobs.gradient_checkpointing]\nflag = "--gc"\n'
                                      'inverted = "yes"\n'}),
    Row("--dialect with --knobs", (*RUN, "--run-id", "r", "--dialect", "argv", "--knobs",
                                   "map.toml", *COMMAND),
        files={"map.toml": MAP_HEAD + "[knobs.grad_accum]\n"
                                      'flag = "--gradient_accumulation_steps"\n'}),
    # sizes, counts and the command itself
    Row("device-memory a word", (*RUN, "--device-memory", "abc", *COMMAND)),
    Row("device-memory zero", (*RUN, "--device-memory", "0", *COMMAND)),
    Row("device-memory overflows", (*RUN, "--device-memory", "1e400GiB", *COMMAND)),
    Row("device-memory negative", (*RUN, "--device-memory", "-5GiB", *COMMAND)),
    Row("max-attempts zero", (*RUN, "--max-attempts", "0", *COMMAND)),
    Row("max-attempts negative", (*RUN, "--max-attempts", "-3", *COMMAND)),
    Row("status --watch inf", ("status", "--watch", "inf", "done"), prepare=_a_finished_run),
    Row("status --watch negative", ("status", "--watch", "-1", "done"),
        prepare=_a_finished_run),
    Row("status --lines negative", ("status", "--lines", "-2", "done"), prepare=_a_finished_run),
    Row("max-attempts a word", (*RUN, "--max-attempts", "many", *COMMAND)),
    Row("no command", RUN),
    Row("nothing after --", (*RUN, "--")),
    Row("unknown subcommand", ("train", *COMMAND)),
    Row("policy file missing", (*RUN, "--policy", "nope.toml", *COMMAND)),
    Row("yaml holding a list", (*RUN, "--", "llamafactory-cli", "train", "list.yaml"),
        files={"list.yaml": "- a\n- b\n"}),
    Row("args JSON holding a number", (*RUN, "--", sys.executable, OK, "args.json"),
        files={"args.json": "42"}),
    # a fit store named on the command line must be usable before the night starts
    Row("fits-db is a folder", (*RUN, "--fits-db", "adir", *COMMAND),
        prepare=lambda root: (root / "adir").mkdir()),
    Row("fits-db under /proc", (*RUN, "--fits-db", "/proc/oom-supervisor-fits.db", *COMMAND)),
    # a folder that is not a run: resume, report and status write nothing into it
    Row("resume a folder that is not a run", ("resume", "notarun"),
        prepare=lambda root: (root / "notarun").mkdir()),
    Row("resume a path that does not exist", ("resume", "gone/run")),
    Row("report a folder that is not a run", ("report", "notarun"),
        prepare=lambda root: (root / "notarun").mkdir()),
    Row("status a folder that is not a run", ("status", "notarun"),
        prepare=lambda root: (root / "notarun").mkdir()),
]


def _snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")
            if "runs" not in p.relative_to(root).parts[:1]}


def _lay_out(root: Path, row: Row) -> None:
    (root / OK).write_text("print('ok')\n", encoding="utf-8")
    for name, content in (row.files or {}).items():
        path = root / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    if row.prepare is not None:
        row.prepare(root)


def _journals_intact(root: Path) -> None:
    for journal in (root / "runs").rglob("journal.jsonl"):
        for line in journal.read_text(encoding="utf-8").splitlines():
            json.loads(line)


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_bad_input_gets_one_line_and_exit_2(tmp_path: Path, row: Row) -> None:
    """One line on stderr naming the problem, exit 2, no traceback, nothing outside runs/."""
    _lay_out(tmp_path, row)
    before = _snapshot(tmp_path)
    done = subprocess.run([sys.executable, "-m", "supervisor", *row.words],  # noqa: S603
                          cwd=tmp_path, env=quiet_env(), capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr[-2000:]
    assert "error" in lines[0]
    assert _snapshot(tmp_path) == before
    assert not Path("/tmp/oom-supervisor-abs").exists()  # noqa: S108 - the row's own target
    _journals_intact(tmp_path)


def test_closed_stderr_does_not_kill_the_run(tmp_path: Path) -> None:
    """`2>&-`: the run still fits, writes its report, and its exit code says so (0)."""
    (tmp_path / OK).write_text("import sys; print('ok'); print('to stderr', file=sys.stderr)\n",
                               encoding="utf-8")
    argv = " ".join([sys.executable, "-m", "supervisor", *RUN, "--run-id", "closed",
                     *COMMAND])
    done = subprocess.run(["sh", "-c", f"{argv} 2>&-"], cwd=tmp_path, env=quiet_env(),  # noqa: S603, S607
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-2000:]
    assert (tmp_path / "runs" / "closed" / "report.md").is_file()
    _journals_intact(tmp_path)
    bad = subprocess.run(["sh", "-c", f"{argv.replace('closed', '../x')} 2>&-"],  # noqa: S603, S607
                         cwd=tmp_path, env=quiet_env(), capture_output=True, text=True,
                         timeout=300, check=False)
    assert bad.returncode == 2


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=MAX_RUN_ID + 20))
def test_any_run_id_names_one_folder_inside_the_runs_dir_or_is_refused(text: str) -> None:
    """Whatever the text: a RunDirError, or a folder whose parent is the runs directory."""
    import tempfile  # noqa: PLC0415 - hypothesis cannot share pytest's tmp_path across examples

    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp) / "runs"
        try:
            validate_run_id(text)
            run_dir = prepare_run_dir(runs, text)
        except RunDirError as exc:
            refusal = str(exc)
        else:
            refusal = ""
        if refusal:
            assert "\n" not in refusal
            assert [p.name for p in Path(tmp).iterdir()] in ([], ["runs"])
            return
        assert run_dir.parent == runs.resolve()
        assert run_dir.name == text
        assert "\n" not in text
        assert text not in (".", "..")
