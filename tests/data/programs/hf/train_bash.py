# ruff: noqa: INP001 - a standalone program the tests run, not a module of the test package
"""A Hugging Face-style training script under LLaMA-Factory's legacy name, for tests (issue 9).

Its flags are HfArgumentParser's over its own dataclasses, with TrainingArguments' names and
defaults: gradient checkpointing is OFF unless `--gradient_checkpointing` is given, LoRA is
TRL-style `--use_peft --lora_r N`. It trains the bundled tiny Llama through the reference
trainer's `main`, so an OOM under `--device-memory` is a real allocator failure. Its name says
LLaMA-Factory; its `--help` says Hugging Face, and that is what the supervisor must believe.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from supervisor import reference_trainer


@dataclass
class ModelArguments:
    """Which model, and whether to train LoRA adapters instead of every weight."""

    model_name_or_path: str = field(default="tiny",
                                    metadata={"help": "a named size or a local folder"})
    use_peft: bool = field(default=False, metadata={"help": "train LoRA adapters"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})


@dataclass
class DataArguments:
    """How long each sample is."""

    max_seq_length: int = field(default=512, metadata={"help": "tokens per sample"})


@dataclass
class TrainArguments:
    """The TrainingArguments fields this script uses, with their defaults."""

    output_dir: str = field(default="trainer_output", metadata={"help": "where to write"})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "batch per device"})
    gradient_accumulation_steps: int = field(default=1,
                                             metadata={"help": "micro-batches per step"})
    gradient_checkpointing: bool = field(default=False,
                                         metadata={"help": "recompute activations"})
    max_steps: int = field(default=4)
    learning_rate: float = field(default=1e-4)
    bf16: bool = field(default=False, metadata={"help": "bf16 mixed precision"})


def main() -> int:
    """Parse HF-style flags and train through the reference trainer."""
    model, data, train = HfArgumentParser(
        (ModelArguments, DataArguments, TrainArguments),  # type: ignore[arg-type]
    ).parse_args_into_dataclasses()
    argv = ["--model_name_or_path", model.model_name_or_path,
            "--finetuning_type", "lora" if model.use_peft else "full",
            "--lora_rank", str(model.lora_r),
            "--cutoff_len", str(data.max_seq_length),
            "--per_device_train_batch_size", str(train.per_device_train_batch_size),
            "--gradient_accumulation_steps", str(train.gradient_accumulation_steps),
            "--gradient_checkpointing", str(train.gradient_checkpointing).lower(),
            "--max_steps", str(train.max_steps), "--learning_rate", str(train.learning_rate),
            "--bf16", str(train.bf16).lower(), "--output_dir", train.output_dir]
    return reference_trainer.main(argv)


if __name__ == "__main__":
    sys.exit(main())
