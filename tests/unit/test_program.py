"""Reading a program's `--help`: texts recorded from real programs (tests/data/help/README.md)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from supervisor.command import Command
from supervisor.program import Option, help_argv, parse_help

HELP = Path(__file__).resolve().parents[1] / "data" / "help"


def parsed(name: str) -> dict[str, Option]:
    found = parse_help((HELP / f"{name}.txt").read_text(encoding="utf-8"))
    assert found is not None
    return {n: o for o in found.options for n in o.names}


def test_hf_argument_parser_help_gives_flags_value_kinds_and_defaults() -> None:
    """HF booleans take an optional value and print their default; dashes are spellings too."""
    options = parsed("hf_train_bash")
    assert options["--gradient_checkpointing"] == Option(
        names=("--gradient_checkpointing", "--gradient-checkpointing"), takes="optional",
        default="False")
    assert options["--max_seq_length"].default == "512"
    assert options["--per_device_train_batch_size"].takes == "required"
    assert options["--max_steps"].default is None  # no help text: HF prints no default
    assert "--disable_gradient_checkpointing" not in options
    assert "--finetuning_type" not in options


def test_plain_argparse_help_gives_switches_without_defaults() -> None:
    """store_true switches take no value; plain argparse prints no defaults."""
    options = parsed("argparse_train")
    assert options["--gradient_checkpointing"].takes == "none"
    assert options["--max_length"] == Option(names=("--max_length",), takes="required")
    text = (HELP / "argparse_train.txt").read_text(encoding="utf-8")
    help_ = parse_help(text)
    assert help_ is not None
    assert not help_.prints_defaults


def test_reference_trainer_help_lists_choices_and_both_spellings() -> None:
    """`{full,lora,freeze}` choices are a value; `--host-memory-cap` has both spellings."""
    options = parsed("reference_trainer")
    assert options["--finetuning_type"].takes == "required"
    assert options["--host_memory_cap"].names == ("--host-memory-cap", "--host_memory_cap")
    assert options["--bf16"].takes == "optional"


@pytest.mark.parametrize("text", [
    "", "Traceback (most recent call last):\n  File x\nError: boom\n",
    "usage: x\n\nno options listed here\n",
])
def test_text_that_is_no_help_reads_as_none(text: str) -> None:
    """A crash or an empty output is not a help text: the program is read by its name."""
    assert parse_help(text) is None


def test_help_argv_runs_the_program_without_its_launcher(tmp_path: Path) -> None:
    """The script's own interpreter, the script (resolved), `--help`; modules with -m."""
    (tmp_path / "train.py").write_text("", encoding="utf-8")
    py = sys.executable
    script = Command(argv=("env", "A=1", py, "-u", "train.py", "--bs", "4"), cwd=str(tmp_path))
    assert help_argv(script) == (py, str(tmp_path / "train.py"), "--help")
    module = Command(argv=(py, "-m", "supervisor.reference_trainer", "--bs", "4"))
    assert help_argv(module) == (py, "-m", "supervisor.reference_trainer", "--help")
    launched = Command(argv=("torchrun", "--nproc_per_node", "2", "train.py"),
                       cwd=str(tmp_path))
    argv = help_argv(launched)
    assert argv is not None
    assert argv[1:] == (str(tmp_path / "train.py"), "--help")
    assert help_argv(Command(argv=(py, "missing.py"), cwd=str(tmp_path))) is None
    assert help_argv(Command(argv=("llamafactory-cli", "train", "x.yaml"))) is None


def test_a_module_run_with_dash_m_is_probed_once_and_cached_by_its_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`python -m pkg.train` is found without importing it and cached by its file's content:
    the next process asks the cache, not the program; an edit of the file asks again."""
    from supervisor import program  # noqa: PLC0415 - its module state is reset below

    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("", encoding="utf-8")
    train = package / "train.py"
    train.write_text("import argparse\np = argparse.ArgumentParser()\n"
                     "p.add_argument('--per_device_train_batch_size', type=int, default=8)\n"
                     "p.parse_args()\n", encoding="utf-8")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(program, "_MEMO", {})
    command = Command(argv=(sys.executable, "-m", "pkg.train"), cwd=str(tmp_path))
    found = program.run_help(command)
    assert found is not None
    assert "--per_device_train_batch_size" in found
    assert program._module_file(sys.executable, "pkg.train", str(tmp_path),  # noqa: SLF001
                                dict(os.environ)) == train
    assert "pkg" not in sys.modules  # found, not imported
    monkeypatch.setattr(program, "_MEMO", {})  # a later supervisor process
    probes: list[object] = []
    monkeypatch.setattr(program, "_probe", lambda *a, **_: probes.append(a))
    assert program.run_help(command) == found
    assert probes == []
    train.write_text(train.read_text(encoding="utf-8") + "# edited\n", encoding="utf-8")
    monkeypatch.setattr(program, "_MEMO", {})
    with pytest.raises(AttributeError):  # the stub probe's answer: it was asked again
        program.run_help(command)
    assert len(probes) == 1
