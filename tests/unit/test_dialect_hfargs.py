"""HF scripts given one args file (`python train.py args.json`): a rewritten copy per attempt."""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path

import pytest

from supervisor.command import Command, CommandError
from supervisor.dialects import detect
from supervisor.dialects.hfargs import HfArgsFileDialect
from supervisor.knobs import FinetuningType, Knobs

D = HfArgsFileDialect()

ARGS = {"model_name_or_path": "m", "output_dir": "out", "per_device_train_batch_size": 8,
        "max_seq_length": 2048, "activation_checkpointing": False, "learning_rate": 2e-5}
ARGS_YAML = """\
# script arguments
model_name_or_path: m
per_device_train_batch_size: 4   # per GPU
block_size: 1024
gradient_checkpointing: true
"""


@pytest.fixture
def cwd(tmp_path: Path) -> Path:
    (tmp_path / "args.json").write_text(json.dumps(ARGS, indent=2) + "\n", encoding="utf-8")
    (tmp_path / "args.yaml").write_text(ARGS_YAML, encoding="utf-8")
    (tmp_path / "other.json").write_text('{"learning_rate": 1e-4}\n', encoding="utf-8")
    return tmp_path


def cmd(text: str, cwd: Path) -> Command:
    return Command(argv=tuple(shlex.split(text)), cwd=str(cwd))


@pytest.mark.parametrize("text", [
    "python train.py args.json",
    "torchrun --nproc_per_node 2 train.py args.yaml",
    "accelerate launch --num_processes 4 -m mypkg.train args.json",
])
def test_render_without_change_gives_back_the_same_argv(text: str, cwd: Path) -> None:
    """Unchanged knobs: the same argv and no copy."""
    command = cmd(text, cwd)
    assert detect(command).name == "hf-args"
    assert D.render(command, D.read(command), cwd / "a").argv == command.argv
    assert not (cwd / "a").exists()


@pytest.mark.parametrize(("name", "expected"), [
    ("args.json", Knobs(per_device_batch=8, cutoff_len=2048, gradient_checkpointing=False,
                        output_dir="out", precision="fp32", model="m")),
    ("args.yaml", Knobs(per_device_batch=4, cutoff_len=1024, gradient_checkpointing=True,
                        precision="fp32", model="m")),
])
def test_read_takes_the_keys_the_file_uses(name: str, expected: Knobs, cwd: Path) -> None:
    """Both checkpointing names and the usual cutoff names are read."""
    assert D.read(cmd(f"python train.py {name}", cwd)) == expected


def test_copy_writes_the_names_the_file_already_uses(cwd: Path) -> None:
    """activation_checkpointing stays activation_checkpointing; max_seq_length stays too."""
    command = cmd("python train.py args.json", cwd)
    knobs = dataclasses.replace(D.read(command), per_device_batch=2, grad_accum=4,
                                cutoff_len=1024, gradient_checkpointing=True,
                                finetuning_type=FinetuningType.FULL, max_steps=5)
    workdir = cwd / "attempts" / "03"
    assert D.render(command, knobs, workdir).argv == ("python", "train.py",
                                                      str(workdir / "args.json"))
    assert json.loads((workdir / "args.json").read_text(encoding="utf-8")) == {
        **ARGS, "per_device_train_batch_size": 2, "max_seq_length": 1024,
        "activation_checkpointing": True, "gradient_accumulation_steps": 4, "max_steps": 5}
    assert (cwd / "args.json").read_text(encoding="utf-8") == json.dumps(ARGS, indent=2) + "\n"


def test_yaml_copy_keeps_comments_and_finalize_writes_final_yaml(cwd: Path) -> None:
    """A YAML args file is rewritten in its own style, and final.yaml is the working one."""
    command = cmd("python train.py args.yaml", cwd)
    knobs = dataclasses.replace(D.read(command), per_device_batch=1, grad_accum=4)
    assert D.finalize(command, knobs, cwd) == (cwd / "final.yaml",)
    assert (cwd / "final.yaml").read_text(encoding="utf-8") == ARGS_YAML.replace(
        "per_device_train_batch_size: 4   # per GPU",
        "per_device_train_batch_size: 1   # per GPU") + "gradient_accumulation_steps: 4\n"


def test_absent_checkpointing_key_is_written_under_its_old_name(cwd: Path) -> None:
    """gradient_checkpointing works with transformers 4 and 5 (5 warns), so it is the one added."""
    (cwd / "plain.json").write_text('{"per_device_train_batch_size": 2}', encoding="utf-8")
    command = cmd("python train.py plain.json", cwd)
    knobs = dataclasses.replace(D.read(command), gradient_checkpointing=True)
    copy = Path(D.render(command, knobs, cwd / "a").argv[-1])
    assert json.loads(copy.read_text(encoding="utf-8")) == {
        "per_device_train_batch_size": 2, "gradient_checkpointing": True}


@pytest.mark.parametrize(("text", "message"), [
    ("python train.py other.json",
     ("other.json names none of per_device_train_batch_size, gradient_accumulation_steps or a "
     "cutoff .* declare them with --knobs FILE")),
    ("python train.py missing.json", "cannot read the arguments file"),
])
def test_unreadable_args_files_say_what_to_fix(text: str, message: str, cwd: Path) -> None:
    """One line naming the file and the keys looked for."""
    with pytest.raises(CommandError, match=message):
        D.read(cmd(text, cwd))


def test_cutoff_rung_needs_a_cutoff_key(cwd: Path) -> None:
    """Without a cutoff key there is nothing to halve; setting one anyway is a clear error."""
    (cwd / "plain.json").write_text('{"per_device_train_batch_size": 2}', encoding="utf-8")
    command = cmd("python train.py plain.json", cwd)
    with pytest.raises(CommandError, match="names no cutoff key"):
        D.render(command, dataclasses.replace(D.read(command), cutoff_len=512), cwd)
