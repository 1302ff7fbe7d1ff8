# ruff: noqa: INP001 - a standalone program the tests run, not a module of the test package
"""TRL's own ModelConfig beside TrainingArguments, as a TRL-style script parses them: its
`--help` is recorded in tests/data/help/trl_modelconfig.txt (needs trl installed)."""

from transformers import HfArgumentParser, TrainingArguments
from trl import ModelConfig  # type: ignore[import-not-found]  # only in a venv with trl

HfArgumentParser((TrainingArguments, ModelConfig)).parse_args_into_dataclasses()  # type: ignore[arg-type]
