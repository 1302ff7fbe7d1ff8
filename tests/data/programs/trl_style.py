# ruff: noqa: INP001 - a standalone program the tests run, not a module of the test package
"""A TRL-style script: ModelConfig's `use_peft` and `lora_r` as fields without help texts.

HfArgumentParser prints a field's default only inside its help text, so `--lora_r` is listed
with no default, although the script trains rank 16 (TRL's ModelConfig.lora_r) unless told.
Its --help is recorded in tests/data/help/trl_style.txt.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import HfArgumentParser


@dataclass
class ModelConfig:
    """TRL's ModelConfig fields that decide memory, as a script copies them."""

    model_name_or_path: str = "tiny"
    use_peft: bool = False
    lora_r: int = 16


@dataclass
class TrainConfig:
    """The TrainingArguments fields the script takes."""

    output_dir: str = "trainer_output"
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    max_length: int = 1024
    max_steps: int = 4


if __name__ == "__main__":
    HfArgumentParser((ModelConfig, TrainConfig)).parse_args_into_dataclasses()  # type: ignore[arg-type]
