"""Knobs: the memory-relevant settings of one training attempt."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class FinetuningType(StrEnum):
    """Which parameters train: all of them, LoRA adapters, or the last layers only."""

    FULL = "full"
    LORA = "lora"
    FREEZE = "freeze"


@dataclass(frozen=True, slots=True, kw_only=True)
class Knobs:
    """Frozen memory-relevant settings of one attempt; rungs return new ones via replace()."""

    per_device_batch: int
    grad_accum: int = 1
    cutoff_len: int | None = None
    gradient_checkpointing: bool = False
    finetuning_type: FinetuningType = FinetuningType.FULL
    lora_rank: int = 8
    freeze_trainable_layers: int = 2
    precision: str | None = None
    quantization_bit: int | None = None
    deepspeed_stage: int | None = None
    max_steps: int | None = None
    resume_from_checkpoint: str | None = None
    # Read, never rewritten by a rung: the launcher's world size (so the effective batch counts
    # every rank) and where the trainer writes its checkpoints.
    world_size: int = 1
    output_dir: str | None = None

    @property
    def effective_batch(self) -> int:
        """Samples per optimizer step across all ranks: per-device batch x accumulation x world."""
        return self.per_device_batch * self.grad_accum * self.world_size

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready mapping (enums as their string values)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Knobs:
        """Inverse of to_dict (used by report and resume)."""
        values = dict(data)
        if "finetuning_type" in values:
            values["finetuning_type"] = FinetuningType(values["finetuning_type"])
        return cls(**values)

    def diff(self, other: Knobs) -> dict[str, tuple[Any, Any]]:
        """Fields whose value differs, as name -> (self's, other's)."""
        return {
            f.name: (_plain(getattr(self, f.name)), _plain(getattr(other, f.name)))
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        }


def _plain(value: object) -> object:
    return str(value) if isinstance(value, StrEnum) else value


KNOB_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Knobs))
"""Every knob a policy or dialect may name."""

KNOB_TYPES: dict[str, str] = {
    "per_device_batch": "int",
    "grad_accum": "int",
    "cutoff_len": "int",
    "gradient_checkpointing": "bool",
    "finetuning_type": "finetuning_type",
    "lora_rank": "int",
    "freeze_trainable_layers": "int",
    "precision": "str",
    "quantization_bit": "int",
    "deepspeed_stage": "int",
    "max_steps": "int",
    "resume_from_checkpoint": "str",
    "world_size": "int",
    "output_dir": "str",
}
"""The value type of each knob, as policy validation and dialect codecs see it."""
