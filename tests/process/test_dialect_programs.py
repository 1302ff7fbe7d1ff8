"""Dialects against the real programs: what the supervisor renders is what the program parses.

- Hugging Face scripts (HfArgumentParser): flags with `--no_` booleans, and a single args JSON.
- torchrun with 2 ranks (gloo, CPU) around the reference trainer: the effective batch counts
  both ranks, before and after a real OOM step.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from supervisor.command import Command
from supervisor.dialects import detect
from supervisor.loop import supervise
from supervisor.policy import resolve

pytestmark = pytest.mark.process

# A script of the usual shape: its own dataclass, where checkpointing defaults to ON, so
# HfArgumentParser gives it a `--no_gradient_checkpointing` switch.
FLAGS_SCRIPT = """
import json, sys
from dataclasses import asdict, dataclass
from transformers import HfArgumentParser

@dataclass
class Args:
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_seq_length: int = 2048
    gradient_checkpointing: bool = True
    learning_rate: float = 1e-4

(args,) = HfArgumentParser(Args).parse_args_into_dataclasses()
print(json.dumps(asdict(args)))
"""
# The args-file convention with the real TrainingArguments (transformers 5 spelling).
FILE_SCRIPT = """
import json, sys
from dataclasses import dataclass
from transformers import HfArgumentParser, TrainingArguments

@dataclass
class Data:
    max_seq_length: int = 512

data, training = HfArgumentParser((Data, TrainingArguments)).parse_json_file(sys.argv[1])
print(json.dumps({"per_device_train_batch_size": training.per_device_train_batch_size,
                  "gradient_accumulation_steps": training.gradient_accumulation_steps,
                  "max_seq_length": data.max_seq_length,
                  "activation_checkpointing": training.activation_checkpointing,
                  "max_steps": training.max_steps}))
"""


def _parsed(command: Command, env: dict[str, str]) -> dict[str, Any]:
    done = subprocess.run(command.argv, cwd=command.cwd, env=env, capture_output=True,  # noqa: S603
                          text=True, check=False, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    parsed: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return parsed


def test_hf_flags_with_no_booleans_render_what_the_script_parses(
        tmp_path: Path, trainer_env: dict[str, str]) -> None:
    """`--no_gradient_checkpointing` reads as off; turning it on drops the switch, since the
    script's --help (a `--no_` switch) says the default is on."""
    (tmp_path / "train.py").write_text(FLAGS_SCRIPT, encoding="utf-8")
    command = Command(argv=(sys.executable, "train.py", "--per_device_train_batch_size", "4",
                            "--no_gradient_checkpointing", "--max_seq_length=1024"),
                      cwd=str(tmp_path))
    dialect = detect(command)
    knobs = dialect.read(command)
    assert (dialect.name, knobs.per_device_batch, knobs.cutoff_len,
            knobs.gradient_checkpointing) == ("argv", 4, 1024, False)
    assert _parsed(command, trainer_env) == {
        "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
        "max_seq_length": 1024, "gradient_checkpointing": False, "learning_rate": 1e-4}

    stepped = dataclasses.replace(knobs, per_device_batch=2, grad_accum=2, cutoff_len=512,
                                  gradient_checkpointing=True)
    rendered = dialect.render(command, stepped, tmp_path / "attempt")
    assert shlex.join(rendered.argv[1:]) == (
        "train.py --per_device_train_batch_size 2 --max_seq_length=512 "
        "--gradient_accumulation_steps 2")
    assert _parsed(rendered, trainer_env) == {
        "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
        "max_seq_length": 512, "gradient_checkpointing": True, "learning_rate": 1e-4}


def test_hf_args_json_copy_is_what_the_script_parses(
        tmp_path: Path, trainer_env: dict[str, str]) -> None:
    """`python train.py args.json`: the attempt's copy parses to the stepped values."""
    (tmp_path / "train.py").write_text(FILE_SCRIPT, encoding="utf-8")
    args = {"output_dir": "out", "per_device_train_batch_size": 8, "max_seq_length": 2048,
            "activation_checkpointing": False, "max_steps": 3}
    (tmp_path / "args.json").write_text(json.dumps(args, indent=2), encoding="utf-8")
    command = Command(argv=(sys.executable, "train.py", "args.json"), cwd=str(tmp_path))
    dialect = detect(command)
    assert dialect.name == "hf-args"
    knobs = dialect.read(command)
    assert dialect.render(command, knobs, tmp_path / "same").argv == command.argv

    stepped = dataclasses.replace(knobs, per_device_batch=2, grad_accum=4, cutoff_len=1024,
                                  gradient_checkpointing=True)
    rendered = dialect.render(command, stepped, tmp_path / "attempt")
    assert rendered.argv == (sys.executable, "train.py", str(tmp_path / "attempt" / "args.json"))
    assert _parsed(rendered, trainer_env) == {
        "per_device_train_batch_size": 2, "gradient_accumulation_steps": 4,
        "max_seq_length": 1024, "activation_checkpointing": True, "max_steps": 3}


def test_torchrun_two_ranks_count_in_the_effective_batch(
        tmp_path: Path, trainer_env: dict[str, str]) -> None:
    """2 gloo ranks x batch 4: effective 8; after the real OOM, 2 ranks x 2 x GA 2 is still 8."""
    torchrun = str(Path(sys.executable).parent / "torchrun")
    # Peak live bytes of one rank (tiny, cutoff 512): batch 4 ~289 MiB, batch 2 ~154 MiB.
    command = Command(argv=(
        torchrun, "--nproc_per_node", "2", "-m", "supervisor.reference_trainer",
        "--model_name_or_path", "tiny", "--per_device_train_batch_size", "4",
        "--cutoff_len", "512", "--max_steps", "1", "--device-memory", "230",
        "--output_dir", str(tmp_path / "out")), cwd=str(tmp_path))
    dialect = detect(command)
    start = dialect.read(command)
    assert (start.world_size, start.effective_batch) == (2, 8)

    run_dir = tmp_path / "runs" / "tr"
    result = supervise(command, dialect=dialect, ladder=resolve("default"), run_dir=run_dir,
                       env=trainer_env, echo=False)
    report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    assert [a["verdict"] for a in report["attempts"]] == ["oom", "fits"], report["attempts"]
    assert result.final_knobs is not None
    assert (result.final_knobs.per_device_batch, result.final_knobs.grad_accum,
            result.final_knobs.world_size) == (2, 2, 2)
    assert report["effective_batch"] == {"start": 8, "final": 8, "world_size_known": True}
    assert report["final_command"][-2:] == ["--gradient_accumulation_steps", "2"]
