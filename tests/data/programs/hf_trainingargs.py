# ruff: noqa: INP001 - a standalone program the tests run, not a module of the test package
"""A Hugging Face script over the real `TrainingArguments` of the installed transformers.

transformers 5 takes checkpointing as `--activation_checkpointing` and keeps
`--gradient_checkpointing` as a deprecated alias ("will be removed in v6"); both default to
None (read as off). Its --help is recorded in tests/data/help/hf_trainingargs.txt.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import HfArgumentParser, TrainingArguments


@dataclass
class DataArgs:
    """The script's own cutoff."""

    max_seq_length: int = field(default=512, metadata={"help": "tokens per sample"})


if __name__ == "__main__":
    HfArgumentParser((DataArgs, TrainingArguments)).parse_args_into_dataclasses()  # type: ignore[arg-type]
