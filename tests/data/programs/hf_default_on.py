# ruff: noqa: INP001 - a standalone program the tests run, not a module of the test package
"""An HfArgumentParser script whose checkpointing defaults to ON and whose fields have no help.

HfArgumentParser then prints no defaults, only a `--no_gradient_checkpointing` switch: that
switch alone says the default is on.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import HfArgumentParser


@dataclass
class Args:
    """Two fields, no help texts."""

    per_device_train_batch_size: int = 8
    gradient_checkpointing: bool = True


if __name__ == "__main__":
    HfArgumentParser(Args).parse_args_into_dataclasses()  # type: ignore[arg-type]
