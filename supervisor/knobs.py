"""Knobs: the memory-relevant settings of one training attempt."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from supervisor._compat import StrEnum


class Precision(StrEnum):
    """How training holds numbers: fp32, autocast (-mixed) over fp32 or half weights, or pure.

    `precision_dtypes` says which dtype each part is held in.
    """

    FP32 = "fp32"
    BF16_MIXED = "bf16-mixed"
    """Autocast in bf16 over fp32 weights, frozen and trainable alike: a Hugging Face
    TrainingArguments script's `--bf16` (the model stays in the dtype it was loaded in)."""
    FP16_MIXED = "fp16-mixed"
    BF16_BASE_MIXED = "bf16-base-mixed"
    """The model loaded in bf16, its trainable parameters upcast to fp32, autocast in bf16:
    LLaMA-Factory's `bf16: true` (compute_dtype is the load dtype; frozen weights stay bf16)."""
    FP16_BASE_MIXED = "fp16-base-mixed"
    BF16 = "bf16"
    """Pure bf16 weights and optimizer state: LLaMA-Factory `pure_bf16: true`, `--dtype bf16`."""
    FP16 = "fp16"


_DTYPE_NAMES = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16",
                "fp16": "fp16", "float16": "fp16", "half": "fp16"}


def precision_dtypes(precision: str | None) -> tuple[str, str, str]:
    """(frozen weights, trainable weights with their gradients and AdamW state, compute).

    Each is "fp32", "bf16" or "fp16"; None (not said) counts as fp32. The estimator and its
    child both size memory from this, so the two agree on what each precision means.
    """
    text = str(precision or "fp32").lower()
    half = _DTYPE_NAMES.get(text.split("-", 1)[0], "fp32")
    if half == "fp32":
        return ("fp32", "fp32", "fp32")
    if text.endswith("-base-mixed"):
        return (half, "fp32", half)
    if text.endswith("-mixed"):
        return ("fp32", "fp32", half)
    return (half, half, half)


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
    lora_target: str | None = None
    """The modules LoRA adapts as the program names them, joined by commas (`q_proj,v_proj`:
    peft adapts a module whose name is one of them or ends with `.name`); None: every linear
    layer but the output head (`all`, `all-linear`, or unsaid: its source says which).
    Read from the command, never rewritten by a rung."""
    freeze_trainable_layers: int = 2
    precision: str | None = None
    quantization_bit: int | None = None
    deepspeed_stage: int | None = None
    deepspeed_offload: bool | None = None
    """ZeRO offloads optimizer state (and parameters, stage 3) to CPU or NVMe (DS JSON)."""
    expandable_segments: bool = False
    """PyTorch's CUDA allocator maps memory in growable segments (fragmentation relief): set
    through `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` in the attempt's environment."""
    optimizer: str | None = None
    """The optimizer as the program names it (`--optim` / `optim:`); None: the program's own."""
    max_steps: int | None = None
    resume_from_checkpoint: str | None = None
    # Read, never rewritten by a rung: the launcher's world size (so the effective batch counts
    # every rank) and where the trainer writes its checkpoints.
    world_size: int = 1
    output_dir: str | None = None
    model: str | None = None
    """The model (a local folder or a hub id / built-in size name), as the command names it."""

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

    def without_progress(self) -> Knobs:
        """The config alone: the same knobs with no checkpoint to continue from."""
        return dataclasses.replace(self, resume_from_checkpoint=None)

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
    "lora_target": "str",
    "freeze_trainable_layers": "int",
    "precision": "str",
    "quantization_bit": "int",
    "deepspeed_stage": "int",
    "deepspeed_offload": "bool",
    "expandable_segments": "bool",
    "optimizer": "str",
    "max_steps": "int",
    "resume_from_checkpoint": "str",
    "world_size": "int",
    "output_dir": "str",
    "model": "str",
}
"""The value type of each knob, as policy validation and dialect codecs see it."""


ALLOC_CONF = "PYTORCH_CUDA_ALLOC_CONF"
"""The variable PyTorch's CUDA caching allocator reads its settings from (comma-separated)."""

ENV_KNOBS = frozenset({"expandable_segments"})
"""Knobs that live in the attempt's environment: every program running PyTorch takes them."""

BNB_OPTIMIZERS = frozenset({
    # transformers.training_args.OptimizerNames backed by bitsandbytes (its optim names).
    "adamw_bnb_8bit", "adamw_8bit", "paged_adamw", "paged_adamw_8bit", "paged_adamw_32bit",
    "lion_8bit", "lion_32bit", "paged_lion_8bit", "paged_lion_32bit", "rmsprop_bnb",
    "rmsprop_bnb_8bit", "rmsprop_bnb_32bit", "ademamix", "ademamix_8bit", "paged_ademamix",
    "paged_ademamix_8bit", "paged_ademamix_32bit",
})


def needs_module(knob: str, value: object) -> str | None:
    """The Python module `knob` = `value` needs in the program's interpreter (None: none)."""
    if knob == "optimizer" and str(value) in BNB_OPTIMIZERS:
        return "bitsandbytes"
    if knob == "quantization_bit" and value is not None:
        return "bitsandbytes"  # 4- and 8-bit weights: bitsandbytes' Linear4bit / Linear8bitLt
    return None


def refusals_without(module: str) -> frozenset[tuple[str, str]]:
    """(knob, value) pairs a program cannot take when `module` is not importable."""
    if module != "bitsandbytes":
        return frozenset()
    return frozenset({("optimizer", name) for name in BNB_OPTIMIZERS}
                     | {("quantization_bit", "4"), ("quantization_bit", "8")})


def refusal_key(knob: str, value: object) -> str:
    """How a refused value is named in `refused_why`: `knob=value`."""
    return f"{knob}={_plain(value)}"


def refusal(refused_why: Mapping[str, str], knob: str, value: object) -> str | None:
    """The reason given for refusing `knob` = `value` (None: none given)."""
    return refused_why.get(refusal_key(knob, value))


class Source(StrEnum):
    """Where a knob's value came from; only the first two are the user's own words."""

    COMMAND_LINE = "command_line"
    CONFIG_FILE = "config_file"
    PROGRAM = "program"
    """The program said so itself: a default printed by its `--help`."""
    KNOWN_DEFAULT = "known_default"
    """The documented default of the program family the command was recognised as."""
    ASSUMED = "assumed"
    """Nothing confirmed it: a guess, shown as assumed wherever a person reads it."""


def can_set(rewritable: Collection[str], refused: Collection[tuple[str, str]], knob: str,
            value: object = None) -> bool:
    """The one skip predicate: may a rung set `knob` (to `value`, if given) in this command?

    `rewritable` are the knobs the program takes a flag or key for; `refused` the (knob,
    value) pairs it cannot take all the same (a value needing a module its Python cannot
    import, a method it lacks). `run` (RunConfig.can_set) and `plan` (Reading.can_set) both
    ask this, so they walk the same rungs.
    """
    if knob not in rewritable:
        return False
    return value is None or (knob, str(_plain(value))) not in refused


@dataclass(frozen=True, slots=True, kw_only=True)
class Reading:
    """What a dialect read from a command: the knobs, where each came from, what it can set."""

    knobs: Knobs
    sources: Mapping[str, Source] = field(default_factory=lambda: MappingProxyType({}))
    """Knob name -> source, for every knob (one the dialect did not name counts as assumed)."""
    rewritable: frozenset[str] = frozenset()
    """Knobs the dialect can write for this command (the program accepts their flag or key)."""
    program: str | None = None
    """What the program's own `--help` told us, in a few words (None: not asked)."""
    refused: frozenset[tuple[str, str]] = frozenset()
    """(knob, value) pairs the program cannot take although it can set the knob
    (a TRL script's `--use_peft` gives LoRA or full, never freeze)."""
    refused_why: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    """Why, in the dialect's words, by `knob=value` (where it has more to say than "cannot")."""

    def __post_init__(self) -> None:
        # Every knob has a source: one the dialect did not name counts as assumed.
        full = {k: Source(self.sources.get(k, Source.ASSUMED)) for k in KNOB_NAMES}
        object.__setattr__(self, "sources", MappingProxyType(full))

    def source(self, knob: str) -> Source:
        """Where `knob`'s value came from (assumed when the dialect did not say)."""
        return self.sources.get(knob, Source.ASSUMED)

    def can_set(self, knob: str, value: object = None) -> bool:
        """True when a rung may set `knob` (to `value`, if given) in this program's command."""
        return can_set(self.rewritable, self.refused, knob, value)

    def refusal(self, knob: str, value: object) -> str | None:
        """The dialect's reason for refusing `knob` = `value`, when it gave one."""
        return refusal(self.refused_why, knob, value)

    def assumed(self) -> tuple[str, ...]:
        """Knobs whose value nothing confirmed, in field order."""
        return tuple(k for k in KNOB_NAMES if self.source(k) is Source.ASSUMED)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready mapping: knobs, sources (every knob), rewritable (sorted), program."""
        return {"knobs": self.knobs.to_dict(),
                "sources": {k: str(self.source(k)) for k in KNOB_NAMES},
                "rewritable": sorted(self.rewritable), "program": self.program,
                "refused": sorted([k, v] for k, v in self.refused),
                "refused_why": dict(sorted(self.refused_why.items()))}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Reading:
        """Inverse of to_dict."""
        return cls(knobs=Knobs.from_dict(dict(data["knobs"])),
                   sources={k: Source(v) for k, v in dict(data.get("sources", {})).items()},
                   rewritable=frozenset(data.get("rewritable", ())),
                   program=data.get("program"),
                   refused=frozenset((str(k), str(v)) for k, v in data.get("refused", ())),
                   refused_why={str(k): str(v)
                                for k, v in dict(data.get("refused_why", {})).items()})
