# ruff: noqa: INP001 - a standalone program the tests run, not a module of the test package
"""An HfArgumentParser script that takes checkpointing only under its new name.

As a script on transformers 6 will (TrainingArguments.gradient_checkpointing "will be removed
in v6"): `--activation_checkpointing`, and no `--gradient_checkpointing`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import HfArgumentParser


@dataclass
class Args:
    """The memory knobs, with help texts (so the defaults are printed)."""

    per_device_train_batch_size: int = field(default=8, metadata={"help": "batch per device"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "accumulation"})
    activation_checkpointing: bool = field(default=False,
                                           metadata={"help": "recompute activations"})


if __name__ == "__main__":
    HfArgumentParser(Args).parse_args_into_dataclasses()  # type: ignore[arg-type]
