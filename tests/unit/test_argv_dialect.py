"""The argv-flags dialect: knobs read behind launchers, changes rendered in the command's syntax."""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path

import pytest

from supervisor.command import Command, CommandError, locate
from supervisor.dialects.argv import ArgvDialect, TrlDialect
from supervisor.knobs import FinetuningType, Knobs

D = ArgvDialect()
SEED_LORA = ("python src/train_bash.py --model_name_or_path llama-7b --stage sft --do_train "
             "--finetuning_type lora --lora_rank 8 --output_dir outputs/llama-7b-lora")
SEED_FULL = ("python src/train_bash.py --model_name_or_path llama-7b --stage sft --do_train "
             "--finetuning_type full --output_dir outputs/llama-7b-ft")


def cmd(text: str) -> Command:
    return Command(argv=tuple(shlex.split(text)))


def render(text: str, **changes: object) -> str:
    command = cmd(text)
    knobs = dataclasses.replace(D.read(command), **changes)  # type: ignore[arg-type]
    return shlex.join(D.render(command, knobs, Path()).argv)


COMMANDS = [
    SEED_LORA,
    SEED_FULL,
    ("python -m supervisor.reference_trainer --per_device_train_batch_size=8 "
     "--gradient_checkpointing"),
    ("env CUDA_VISIBLE_DEVICES=0 HF_HUB_OFFLINE=1 python -u train.py "
     "--per_device_train_batch_size 4"),
    "prlimit --as=8000000000 --nofile=1024 python3 train.py --per_device_train_batch_size 4",
    ("torchrun --standalone --nnodes=1 --nproc-per-node=4 src/train_bash.py --cutoff_len 2100 "
     "--per_device_train_batch_size 1 --gradient_accumulation_steps 4 "
     "--gradient_accumulation_steps 4"),
    "python -m torch.distributed.run --nproc_per_node 2 train.py --per_device_train_batch_size 2",
    ("accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 train.py "
     "--per_device_train_batch_size 2 --max_seq_length 4096 --bf16"),
    ("nice -n 10 numactl --cpunodebind=0 taskset -c 0-7 python train.py "
     "--per_device_train_batch_size 1"),
]


@pytest.mark.parametrize("text", COMMANDS)
def test_render_without_change_gives_back_the_same_argv(text: str) -> None:
    """read -> render with the same knobs is the identity, byte for byte."""
    command = cmd(text)
    assert D.render(command, D.read(command), Path()).argv == command.argv


def test_seed_lora_command_reads_llamafactory_defaults() -> None:
    """The seed's LoRA line: given values, and LLaMA-Factory's defaults for the rest."""
    knobs = D.read(cmd(SEED_LORA))
    assert knobs == Knobs(per_device_batch=8, grad_accum=1, cutoff_len=1024,
                          gradient_checkpointing=True, finetuning_type=FinetuningType.LORA,
                          lora_rank=8, output_dir="outputs/llama-7b-lora", precision="fp32",
                          model="llama-7b")
    assert D.describe(cmd(SEED_LORA)) == (
        "argv (llamafactory-legacy; a shorter cutoff_len truncates the samples longer than it)")


def test_absent_knobs_are_added_with_their_flags() -> None:
    """The seed's full line gains batch, accumulation and cutoff flags when a rung changes them."""
    assert render(SEED_FULL, per_device_batch=4, grad_accum=2, cutoff_len=512) == (
        SEED_FULL + " --per_device_train_batch_size 4 --gradient_accumulation_steps 2"
        " --cutoff_len 512 --overwrite_output_dir")


def test_values_are_rewritten_in_their_own_form() -> None:
    """`--flag=value` stays `=`, `--flag value` stays separate, repeated flags all change."""
    text = ("torchrun --nproc_per_node 2 train.py --per_device_train_batch_size=8 "
            "--gradient_accumulation_steps 1 --gradient_accumulation_steps 1")
    assert render(text, per_device_batch=4, grad_accum=2) == (
        "torchrun --nproc_per_node 2 train.py --per_device_train_batch_size=4 "
        "--gradient_accumulation_steps 2 --gradient_accumulation_steps 2")


@pytest.mark.parametrize(("text", "on", "off"), [
    ("python train.py --per_device_train_batch_size 2",
     "python train.py --per_device_train_batch_size 2 --gradient_checkpointing", None),
    ("python train.py --per_device_train_batch_size 2 --gradient_checkpointing false",
     "python train.py --per_device_train_batch_size 2 --gradient_checkpointing true", None),
    ("python train.py --per_device_train_batch_size 2 --gradient_checkpointing",
     None, "python train.py --per_device_train_batch_size 2"),
    ("python train.py --per_device_train_batch_size 2 --activation_checkpointing=True",
     None, "python train.py --per_device_train_batch_size 2 --activation_checkpointing=false"),
    # LLaMA-Factory's inverse switch: dropping it turns checkpointing back on (and a changed
    # LLaMA-Factory attempt never auto-resumes an earlier attempt's checkpoint).
    ("python src/train_bash.py --disable_gradient_checkpointing",
     "python src/train_bash.py --overwrite_output_dir", None),
])
def test_boolean_flags(text: str, on: str | None, off: str | None) -> None:
    """Bare switches, valued booleans and inverse switches all render in their own syntax."""
    if on is not None:
        assert render(text, gradient_checkpointing=True) == on
    if off is not None:
        assert render(text, gradient_checkpointing=False) == off


def test_finetuning_type_change_renders_rank() -> None:
    """Switching to LoRA writes the type and rank the rung set."""
    out = render("python -m supervisor.reference_trainer --finetuning_type full",
                 finetuning_type=FinetuningType.LORA, lora_rank=16)
    assert out == ("python -m supervisor.reference_trainer --finetuning_type lora "
                   "--lora_rank 16")


@pytest.mark.parametrize(("text", "program", "world"), [
    ("torchrun --nnodes=2 --nproc_per_node 4 train.py", "train.py", 8),
    ("python -m torch.distributed.run --standalone --nproc-per-node=2 train.py", "train.py", 2),
    ("accelerate launch --multi_gpu --num_processes=3 -m mypkg.train", "mypkg.train", 3),
    ("deepspeed --num_gpus 4 train.py", "train.py", 4),
    ("srun -N2 --ntasks-per-node=4 python train.py", "train.py", 8),
    ("env -i A=1 B=2 python -X dev -W ignore -m mypkg.train", "mypkg.train", 1),
    ("taskset -c 0-3 python train.py", "train.py", 1),
])
def test_launchers_are_skipped_and_world_size_read(text: str, program: str, world: int) -> None:
    """The program behind each launcher is found and every rank counts in the world size."""
    invocation = locate(tuple(shlex.split(text)))
    assert invocation.program == program
    assert invocation.world_size == world


def test_effective_batch_counts_every_rank() -> None:
    """torchrun x2 with batch 4 and GA 2: effective batch 16."""
    knobs = D.read(cmd("torchrun --nproc_per_node 2 train.py --per_device_train_batch_size 4 "
                       "--gradient_accumulation_steps 2"))
    assert knobs.effective_batch == 16


@pytest.mark.parametrize(("text", "message"), [
    ("python train.py --per_device_train_batch_size eight",
     "--per_device_train_batch_size 'eight' is not a whole number"),
    ("python train.py --lr 3e-5",
     "found none of the memory flags .* declare where the script keeps them with --knobs FILE"),
    ("python train.py --deepspeed ds.json", "found none of the memory flags"),
    ("python train.py --per_device_train_batch_size", "has no value after it"),
    ("python src/train_bash.py --finetuning_type qlora", "valid: full, lora, freeze"),
    ("env A=1", "No training program found"),
    ("python -m", "has no module name"),
])
def test_unreadable_commands_say_what_to_fix(text: str, message: str) -> None:
    """A command the dialect cannot read raises one CommandError line."""
    with pytest.raises(CommandError, match=message):
        D.read(cmd(text))


SEED_LF_FLAGS = ("llamafactory-cli train --stage sft --model_name_or_path m --finetuning_type full "
                 "--output_dir saves/full --per_device_train_batch_size 4 --cutoff_len 1024")


@pytest.mark.parametrize(("changes", "appended"), [
    ({"per_device_batch": 2, "grad_accum": 2},
     ("--per_device_train_batch_size 2 --cutoff_len 1024 --gradient_accumulation_steps 2 "
     "--overwrite_output_dir")),
    ({"gradient_checkpointing": False},
     ("--per_device_train_batch_size 4 --cutoff_len 1024 --disable_gradient_checkpointing "
     "--overwrite_output_dir")),
    ({"finetuning_type": FinetuningType.LORA, "lora_rank": 16},
     ("--per_device_train_batch_size 4 --cutoff_len 1024 --lora_rank 16 "
     "--overwrite_output_dir")),
    ({"finetuning_type": FinetuningType.FREEZE, "freeze_trainable_layers": -2},
     ("--per_device_train_batch_size 4 --cutoff_len 1024 --freeze_trainable_layers -2 "
     "--overwrite_output_dir")),
])
def test_llamafactory_keys_work_as_flags(changes: dict[str, object], appended: str) -> None:
    """Every LLaMA-Factory key is a flag too, with the same output-folder hygiene."""
    out = render(SEED_LF_FLAGS, **changes)
    ft = changes.get("finetuning_type", FinetuningType.FULL)
    assert isinstance(ft, FinetuningType)
    folder = {FinetuningType.FULL: "saves/full", FinetuningType.LORA: "saves/full-lora-r16",
              FinetuningType.FREEZE: "saves/full-freeze--2"}[ft]
    assert out == ("llamafactory-cli train --stage sft --model_name_or_path m "
                   f"--finetuning_type {ft} --output_dir {folder} " + appended)


def test_llamafactory_flags_read_their_defaults_and_packing() -> None:
    """`train --flag` form: LLaMA-Factory's defaults, and packing named in the description."""
    command = cmd("lmf train --stage sft --packing true --disable_gradient_checkpointing")
    assert D.read(command) == Knobs(per_device_batch=8, cutoff_len=2048,
                                    gradient_checkpointing=False,
                                    finetuning_type=FinetuningType.LORA, precision="fp32")
    assert D.describe(command) == ("argv (llamafactory; packing is on: a shorter cutoff_len "
                                   "DROPS the samples longer than it (they are not truncated))")


def test_hf_scripts_get_no_llamafactory_hygiene() -> None:
    """A plain HF script keeps its output folder: only LLaMA-Factory resumes by itself."""
    assert render("python train.py --per_device_train_batch_size 4 --output_dir out",
                  per_device_batch=2, grad_accum=2) == (
        "python train.py --per_device_train_batch_size 2 --output_dir out "
        "--gradient_accumulation_steps 2")


def test_no_flag_booleans_turn_back_on() -> None:
    """`--no_gradient_checkpointing` (HfArgumentParser, default-true field) is rewritten."""
    assert render("python train.py --per_device_train_batch_size 2 --no_gradient_checkpointing",
                  gradient_checkpointing=True) == (
        "python train.py --per_device_train_batch_size 2 --gradient_checkpointing=true")


def test_deepspeed_json_gets_a_consistent_copy(tmp_path: Path) -> None:
    """Explicit micro batch, GA and train_batch_size are rewritten in a copy per attempt."""
    (tmp_path / "ds.json").write_text(json.dumps({
        "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
        "train_batch_size": 8, "zero_optimization": {"stage": 2}}), encoding="utf-8")
    command = Command(argv=tuple(shlex.split(
        "torchrun --nproc_per_node 2 train.py --per_device_train_batch_size 4 "
        "--deepspeed ds.json")), cwd=str(tmp_path))
    knobs = D.read(command)
    assert (knobs.deepspeed_stage, knobs.effective_batch) == (2, 8)
    workdir = tmp_path / "attempts" / "02"
    out = D.render(command, dataclasses.replace(knobs, per_device_batch=2, grad_accum=2),
                   workdir)
    assert shlex.join(out.argv) == (
        "torchrun --nproc_per_node 2 train.py --per_device_train_batch_size 2 "
        f"--deepspeed {workdir / 'ds.json'} --gradient_accumulation_steps 2")
    assert json.loads((workdir / "ds.json").read_text(encoding="utf-8")) == {
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
        "train_batch_size": 8, "zero_optimization": {"stage": 2}}
    assert D.render(command, knobs, workdir).argv == command.argv  # unchanged: no copy


@pytest.mark.parametrize(("text", "allocation", "world"), [
    ("srun --ntasks 2 --label python train.py", {"SLURM_NTASKS": "8"}, 2),
    ("srun -n2 python train.py", {}, 2),
    ("srun --ntasks=4 python train.py", {}, 4),
    ("srun python train.py", {"SLURM_NTASKS": "16", "SLURM_NNODES": "2"}, 16),
    ("srun python train.py", {"SLURM_NPROCS": "3"}, 3),
    ("srun python train.py", {"SLURM_NNODES": "2"}, 2),
    ("srun python train.py", {}, 1),
    ("srun --ntasks-per-node 4 python train.py", {"SLURM_NNODES": "2"}, 8),
    ("srun --ntasks-per-node 4 -N 1 python train.py", {"SLURM_NNODES": "2"}, 4),
    ("srun -N2 --ntasks-per-node=4 python train.py", {}, 8),
    # Measured (Slurm 22.05, sbatch --ntasks 4): srun reads SLURM_NTASKS as its -n, and
    # `-N 1` or `--ntasks-per-node 2` then still start 4 tasks.
    ("srun -N 1 python train.py", {"SLURM_NTASKS": "4"}, 4),
    ("srun --ntasks-per-node 2 python train.py", {"SLURM_NTASKS": "4", "SLURM_NNODES": "1"}, 4),
])
def test_srun_world_size_from_flags_or_allocation(text: str, allocation: dict[str, str],
                                                  world: int) -> None:
    """srun's flags win; without them the allocation's task count (as srun itself reads it)."""
    invocation = locate(tuple(shlex.split(text)), env=allocation)
    assert invocation.program == "train.py"
    assert (invocation.world_size, invocation.world_size_known) == (world, True)


def test_trl_says_4bit_with_its_switch_and_takes_it_back(tmp_path: Path) -> None:
    """TRL has no --quantization_bit: 4-bit is `--load_in_4bit` (ModelConfig), 8-bit its twin."""
    dialect = TrlDialect(probe=None)
    command = Command(argv=("trl", "sft", "--model_name_or_path", "m", "--use_peft",
                            "--lora_r", "8", "--per_device_train_batch_size", "4"))
    reading = dialect.read_sourced(command)
    assert reading.knobs.quantization_bit is None
    assert "quantization_bit" in reading.rewritable
    four = dialect.render(command, dataclasses.replace(reading.knobs, quantization_bit=4),
                          tmp_path)
    assert four.argv == (*command.argv, "--load_in_4bit")
    assert dialect.read(four).quantization_bit == 4
    eight = dialect.render(four, dataclasses.replace(reading.knobs, quantization_bit=8), tmp_path)
    assert eight.argv == (*command.argv, "--load_in_4bit=false", "--load_in_8bit")
    assert dialect.read(eight).quantization_bit == 8
    none = dialect.render(four, reading.knobs, tmp_path)
    assert dialect.read(none).quantization_bit is None
