"""How many processes `accelerate launch` really starts, read as accelerate 1.15 reads it.

Source: accelerate/commands/launch.py (_validate_launch_command, launch_command) and
accelerate/commands/config/config_args.py (default_config_file, load_config_from_file) of the
accelerate installed in .venv (1.15.0); the same lines are in huggingface/accelerate upstream.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from supervisor.command import Command, locate, locate_command
from supervisor.dialects.argv import ArgvDialect
from supervisor.knobs import Source

TRAIN = "-m supervisor.reference_trainer --per_device_train_batch_size 4"
NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}
TWO_GPUS = {"CUDA_VISIBLE_DEVICES": "0,1"}
ONE_GPU = {"CUDA_VISIBLE_DEVICES": "0"}


def world(text: str, env: dict[str, str], cwd: Path) -> tuple[int, bool, bool]:
    found = locate(tuple(shlex.split(text)), {"HF_HOME": str(cwd / "hf"), **env}, cwd=str(cwd))
    return found.world_size, found.world_size_known, found.world_size_from_config


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


@pytest.mark.parametrize(("launch", "env", "expected"), [
    # --cpu: the simple launcher, one process, whatever --num_processes says
    ("--cpu --num_processes 2", {}, (1, True, False)),
    ("--cpu --num_processes 8 --num_machines 2", TWO_GPUS, (1, True, False)),
    # --num_processes N without --multi_gpu or a config: multi-GPU only on a 2+ GPU host
    ("--num_processes 2", NO_GPU, (1, True, False)),
    ("--num_processes 4", ONE_GPU, (1, True, False)),
    ("--num_processes 2", TWO_GPUS, (2, True, False)),
    ("--num_processes=1", TWO_GPUS, (1, True, False)),
    ("--multi_gpu --num_processes 2", NO_GPU, (2, True, False)),
    ("--use_deepspeed --num_processes 4", {}, (4, True, False)),
    # a total across machines: num_processes // num_machines per machine
    ("--multi_gpu --num_processes 8 --num_machines 2", {}, (8, True, False)),
    ("--multi_gpu --num_processes 5 --num_machines 2", {}, (4, True, False)),
    # the device count at launch decides: not known here
    ("--multi_gpu", {}, (1, False, False)),
    ("", {}, (1, False, False)),
])
def test_flags_without_a_config_file(launch: str, env: dict[str, str],
                                     expected: tuple[int, bool, bool], tmp_path: Path) -> None:
    """accelerate's own flags, no config file (HF_HOME holds none)."""
    assert world(f"accelerate launch {launch} {TRAIN}", env, tmp_path) == expected


@pytest.mark.parametrize(("config", "launch", "expected"), [
    ("distributed_type: MULTI_GPU\nnum_processes: 4\n", "", (4, True, True)),
    ("distributed_type: MULTI_GPU\nnum_processes: 4\n", "--num_processes 2", (2, True, True)),
    # distributed_type NO takes the simple launcher even with --num_processes
    ("distributed_type: 'NO'\n", "--num_processes 2", (1, True, True)),
    ("distributed_type: DEEPSPEED\nnum_processes: 8\nnum_machines: 2\n", "", (8, True, True)),
    ("distributed_type: FSDP\nnum_processes: 2\n", "", (2, True, True)),
    ("distributed_type: 'NO'\n", "--multi_gpu --num_processes 2", (2, True, True)),
    # --cpu: simple launcher even under a multi-GPU config
    ("distributed_type: MULTI_GPU\nnum_processes: 4\n", "--cpu", (1, True, False)),
    # a config without num_processes: accelerate refuses to launch until it is given
    ("distributed_type: MULTI_GPU\n", "", (1, False, True)),
    ('{"distributed_type": "MULTI_GPU", "num_processes": 3}\n', "", (3, True, True)),
    ("compute_environment: AMAZON_SAGEMAKER\ndistributed_type: DATA_PARALLEL\n", "",
     (1, False, True)),
    ("distributed_type: [MULTI_GPU\n", "", (1, False, True)),  # not YAML
    ("num_processes: 2\n", "", (1, False, True)),  # "A `distributed_type` must be specified"
])
def test_config_file_as_accelerate_reads_it(config: str, launch: str,
                                            expected: tuple[int, bool, bool],
                                            tmp_path: Path) -> None:
    """`--config_file` (relative to the command's directory) and the default config file
    ($HF_HOME/accelerate/default_config.yaml) give what the command line does not."""
    write(tmp_path / "acc.yaml", config)
    text = f"accelerate launch --config_file acc.yaml {launch} {TRAIN}"
    assert world(text, NO_GPU, tmp_path) == expected
    write(tmp_path / "hf" / "accelerate" / "default_config.yaml", config)
    assert world(f"accelerate launch {launch} {TRAIN}", NO_GPU, tmp_path) == expected


def test_the_journaled_source_says_config_file_or_assumed(tmp_path: Path) -> None:
    """The world size read from accelerate's config is `config_file`; one decided at launch
    is `assumed` (the report marks it)."""
    write(tmp_path / "acc.yaml", "distributed_type: MULTI_GPU\nnum_processes: 4\n")
    env = (("HF_HOME", str(tmp_path / "hf")), ("CUDA_VISIBLE_DEVICES", ""))
    dialect = ArgvDialect(probe=None)
    for text, size, source in [
        (f"accelerate launch --config_file acc.yaml {TRAIN}", 4, Source.CONFIG_FILE),
        (f"accelerate launch --cpu --num_processes 2 {TRAIN}", 1, Source.COMMAND_LINE),
        (f"accelerate launch --multi_gpu {TRAIN}", 1, Source.ASSUMED),
    ]:
        command = Command(argv=tuple(shlex.split(text)), env=env, cwd=str(tmp_path))
        reading = dialect.read_sourced(command)
        assert (reading.knobs.world_size, reading.sources["world_size"]) == (size, source)
        assert locate_command(command).world_size == size
