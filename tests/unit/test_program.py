"""Reading a program's `--help`: texts recorded from real programs (tests/data/help/README.md)."""

from __future__ import annotations

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
