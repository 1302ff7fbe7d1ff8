"""DeepSpeed JSON: explicit batch numbers stay consistent (micro x GA x world) per attempt."""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path
from typing import Any

import pytest

from supervisor.command import Command, CommandError
from supervisor.dialects import detect
from supervisor.knobs import Knobs

EXPLICIT = {"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4,
            "gradient_accumulation_steps": 2, "zero_optimization": {"stage": 2},
            "bf16": {"enabled": "auto"}}
AUTO = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto", "zero_optimization": {"stage": 3}}
LF_YAML = ("stage: sft\nper_device_train_batch_size: 4\ngradient_accumulation_steps: 2\n"
           "deepspeed: ds.json\noutput_dir: out\n")


@pytest.fixture
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("FORCE_TORCHRUN", "NPROC_PER_NODE", "NNODES", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "ds.json").write_text(json.dumps(EXPLICIT, indent=2), encoding="utf-8")
    (tmp_path / "auto.json").write_text(json.dumps(AUTO, indent=2), encoding="utf-8")
    (tmp_path / "sft.yaml").write_text(LF_YAML, encoding="utf-8")
    return tmp_path


def step(text: str, cwd: Path, **changes: Any) -> tuple[Command, Knobs, Command]:  # noqa: ANN401
    command = Command(argv=tuple(shlex.split(text)), cwd=str(cwd))
    dialect = detect(command)
    knobs = dialect.read(command)
    return command, knobs, dialect.render(command, dataclasses.replace(knobs, **changes),
                                          cwd / "attempt")


@pytest.mark.parametrize("text", [
    "env FORCE_TORCHRUN=1 NPROC_PER_NODE=4 llamafactory-cli train sft.yaml",
    ("deepspeed --num_gpus 4 train.py --per_device_train_batch_size 4 "
    "--gradient_accumulation_steps 2 --deepspeed ds.json"),
])
def test_explicit_values_are_rewritten_consistently(text: str, cwd: Path) -> None:
    """Halving the batch doubles GA in the copy; train_batch_size stays micro x GA x world."""
    _, knobs, rendered = step(text, cwd, per_device_batch=2, grad_accum=4)
    assert (knobs.world_size, knobs.deepspeed_stage, knobs.effective_batch) == (4, 2, 32)
    copy = cwd / "attempt" / "ds.json"
    assert str(copy) in " ".join(rendered.argv)
    assert json.loads(copy.read_text(encoding="utf-8")) == {
        **EXPLICIT, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4}


def test_auto_values_need_no_copy(cwd: Path) -> None:
    """A config of "auto" values follows the trainer: the command keeps pointing at it."""
    _, _, rendered = step("python train.py --per_device_train_batch_size 4 "
                          "--deepspeed auto.json", cwd, per_device_batch=2, grad_accum=2)
    assert shlex.join(rendered.argv) == ("python train.py --per_device_train_batch_size 2 "
                                         "--deepspeed auto.json --gradient_accumulation_steps 2")
    assert not (cwd / "attempt").exists()


def test_stage_change_writes_the_stage(cwd: Path) -> None:
    """A ZeRO rung changes zero_optimization.stage in the copy."""
    command, _, rendered = step("python train.py --per_device_train_batch_size 4 "
                                "--deepspeed auto.json", cwd, deepspeed_stage=3)
    assert rendered.argv == command.argv  # stage 3 already: nothing to change
    _, _, rendered = step("python train.py --per_device_train_batch_size 4 "
                          "--deepspeed ds.json", cwd, deepspeed_stage=3)
    copy = json.loads((cwd / "attempt" / "ds.json").read_text(encoding="utf-8"))
    assert copy["zero_optimization"] == {"stage": 3}


def test_stage_change_without_a_config_is_one_line(cwd: Path) -> None:
    """No DeepSpeed config, no ZeRO rung: the error says what to add."""
    with pytest.raises(CommandError, match="no DeepSpeed config"):
        step("python train.py --per_device_train_batch_size 4", cwd, deepspeed_stage=3)
