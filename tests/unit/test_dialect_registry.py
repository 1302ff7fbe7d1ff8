"""Which dialect reads which command, and how an unreadable command is reported."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from supervisor import cli
from supervisor.command import Command, CommandError
from supervisor.dialects import detect, names


@pytest.fixture
def cwd(tmp_path: Path) -> Path:
    (tmp_path / "sft.yaml").write_text("stage: sft\n", encoding="utf-8")
    (tmp_path / "ax.yml").write_text("micro_batch_size: 2\n", encoding="utf-8")
    (tmp_path / "args.json").write_text('{"per_device_train_batch_size": 2}', encoding="utf-8")
    return tmp_path


def test_argv_stays_the_fallback() -> None:
    """Most specific first; the flag reader last."""
    assert names() == ("llamafactory", "axolotl", "hf-args", "trl", "argv")


@pytest.mark.parametrize(("text", "name"), [
    ("llamafactory-cli train sft.yaml", "llamafactory"),
    ("FORCE_TORCHRUN=1 lmf train sft.yaml cutoff_len=512", "llamafactory"),
    ("llamafactory-cli train --stage sft --per_device_train_batch_size 2", "argv"),
    ("python src/train_bash.py --stage sft --finetuning_type lora --lora_rank 8", "argv"),
    ("axolotl train ax.yml", "axolotl"),
    ("accelerate launch -m axolotl.cli.train ax.yml", "axolotl"),
    ("python -m axolotl.cli.train ax.yml", "axolotl"),
    ("python train.py args.json", "hf-args"),
    ("torchrun --nproc_per_node 2 train.py --per_device_train_batch_size 2", "argv"),
])
def test_detect(text: str, name: str, cwd: Path) -> None:
    """Each command family goes to its own dialect."""
    assert detect(Command(argv=tuple(shlex.split(text)), cwd=str(cwd))).name == name


def test_forcing_a_dialect_that_cannot_read_the_command_is_one_line(cwd: Path) -> None:
    """--dialect NAME on a command of another family says what that dialect expects."""
    command = Command(argv=("python", "train.py", "--per_device_train_batch_size", "2"),
                      cwd=str(cwd))
    with pytest.raises(CommandError, match=r"expected `axolotl train CONFIG\.yml`"):
        detect(command, forced="axolotl").read(command)


@pytest.mark.parametrize(("words", "message"), [
    (["python", "train.py", "--lr", "3e-5"],
     "found none of the memory flags this tool rewrites"),
    (["llamafactory-cli", "train", "missing.yaml"], "cannot read the LLaMA-Factory config"),
    (["--dialect", "llamafactory", "python", "train.py", "--per_device_train_batch_size", "2"],
     "not a LLaMA-Factory config command"),
])
def test_unreadable_command_is_one_clear_line(words: list[str], message: str, cwd: Path,
                                              capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI prints one line (what was wrong, what to do) and exits 2: no traceback."""
    monkeypatch.chdir(cwd)
    options = words[:2] if words[0] == "--dialect" else []
    command = words[2:] if options else words
    code = cli.main(["run", "--runs-dir", str(cwd / "runs"), *options, "--", *command])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert err.startswith("oom-supervisor: error: ")
    assert message in err
    assert "Traceback" not in err
    assert not (cwd / "runs").exists()
