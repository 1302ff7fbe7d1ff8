"""What every dialect's reading shares: values with their sources, model paths, precision."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from supervisor.command import Command, CommandError, Invocation, environment, locate
from supervisor.knobs import (
    ALLOC_CONF,
    ENV_KNOBS,
    KNOB_NAMES,
    FinetuningType,
    Knobs,
    Precision,
    Reading,
    Source,
    refusals_without,
)
from supervisor.program import ModuleProbe, can_import, prefetch_import

_STRENGTH = {Source.COMMAND_LINE: 4, Source.CONFIG_FILE: 3, Source.PROGRAM: 2,
             Source.KNOWN_DEFAULT: 1, Source.ASSUMED: 0}

READ_ONLY = frozenset({"world_size", "output_dir", "model", "precision", "lora_target"})
"""Knobs read from the command but never rewritten by a rung."""


class Values:
    """Knob (and extra setting) values as they are read, each with its source; later set() wins."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.sources: dict[str, Source] = {}

    def set(self, name: str, value: object, source: Source) -> None:
        """Record `name` = `value`, said by `source`."""
        self.values[name] = value
        self.sources[name] = source

    def defaults(self, values: Mapping[str, Any], source: Source) -> None:
        """Record each of `values` as said by `source`."""
        for name, value in values.items():
            self.set(name, value, source)

    def get(self, name: str, default: object = None) -> Any:  # noqa: ANN401 - the value's own type
        """The value of `name` (default when nothing said it)."""
        return self.values.get(name, default)

    def source(self, name: str) -> Source:
        """Who said `name` (assumed when nobody did)."""
        return self.sources.get(name, Source.ASSUMED)

    def reading(self, *, rewritable: frozenset[str], program: str | None = None,
                refused: frozenset[tuple[str, str]] = frozenset(),
                refused_why: Mapping[str, str] | None = None) -> Reading:
        """The Reading of the knob values recorded (extras are left out)."""
        knobs = Knobs(**{k: v for k, v in self.values.items() if k in KNOB_NAMES})
        sources = {k: self.source(k) for k in KNOB_NAMES}
        # Environment knobs: every program that runs PyTorch reads its allocator settings.
        return Reading(knobs=knobs, sources=sources,
                       rewritable=(rewritable | ENV_KNOBS) - READ_ONLY,
                       program=program, refused=refused, refused_why=dict(refused_why or {}))


TRL_LORA_R = 16
"""TRL's ModelConfig.lora_r default (trl/trainer/model_config.py); its field has help, but a
TRL-style script's own `lora_r` field often has none, and HfArgumentParser then prints no
default."""

_IN_USE_UNDER = {"lora_rank": FinetuningType.LORA,
                 "freeze_trainable_layers": FinetuningType.FREEZE}
"""Knobs that matter only under one fine-tuning method (the adapters' rank, the layers trained)."""


def to_write(reading: Reading, knobs: Knobs) -> tuple[str, ...]:
    """The knobs a render writes to run `knobs`: those that change, and those the change puts to
    use whose value was only assumed (in field order).

    A LoRA rung sets rank 8 where the command said no rank: the assumed 8 is written out
    (`--use_peft --lora_r 8`), since the program's own default may be another (TRL's
    ModelConfig.lora_r is 16, and an HfArgumentParser field without help prints no default).
    """
    changed = reading.knobs.diff(knobs)
    if "finetuning_type" not in changed:
        return tuple(changed)
    used = {knob for knob, method in _IN_USE_UNDER.items()
            if knobs.finetuning_type is method and reading.source(knob) is Source.ASSUMED
            and reading.can_set(knob)}
    return tuple(k for k in KNOB_NAMES if k in changed or k in used)


def strongest(*sources: Source) -> Source:
    """The most direct of `sources` (the command line beats a file beats the program ...)."""
    return max(sources, key=_STRENGTH.__getitem__, default=Source.ASSUMED)


def model_path(command: Command, text: object) -> str | None:
    """A model as the program will find it: a local path against the command's cwd, else as is.

    A hub id (`org/name`) or a name that is no local path stays as written; `./x`, `../x`, `~/x`
    and any relative path that exists under the command's directory become absolute.
    """
    if text is None or text == "":
        return None
    value = str(text)
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    base = Path(command.cwd) if command.cwd else Path.cwd()
    candidate = base / path
    if value.startswith(("./", "../", "~")) or candidate.exists():
        return str(candidate.resolve())
    return value


def precision_of(values: Values, *, loads_in_half: bool = False) -> tuple[str, Source]:
    """The precision the HF-family settings give: pure, mixed (autocast) or fp32, and its source.

    `pure_bf16` (LLaMA-Factory) and a bf16/fp16 model dtype (`--torch_dtype`/`--dtype`, TRL)
    keep the trained weights in half precision: pure. `bf16`/`fp16` alone are autocast: over
    the weights as loaded (fp32) in a Hugging Face script (`bf16-mixed`), over a model loaded
    in half precision with its trainable parameters upcast to fp32 where the program is
    LLaMA-Factory (`loads_in_half`: its compute dtype is the load dtype; `bf16-base-mixed`).
    When both bf16 and fp16 are set, the more directly given one wins.
    """
    names = ("pure_bf16", "dtype", "bf16", "fp16")
    said = [n for n in names if n in values.values]
    source = strongest(*(values.source(n) for n in said)) if said else Source.ASSUMED
    if values.get("pure_bf16") is True:
        return Precision.BF16.value, values.source("pure_bf16")
    dtype = str(values.get("dtype") or "").lower().removeprefix("torch.")
    if dtype in ("bfloat16", "bf16"):
        return Precision.BF16.value, values.source("dtype")
    if dtype in ("float16", "fp16", "half"):
        return Precision.FP16.value, values.source("dtype")
    bf16, fp16 = values.get("bf16") is True, values.get("fp16") is True
    if bf16 and fp16:
        bf16 = _STRENGTH[values.source("bf16")] >= _STRENGTH[values.source("fp16")]
        fp16 = not bf16
    if bf16:
        return (Precision.BF16_BASE_MIXED if loads_in_half else Precision.BF16_MIXED).value, \
            values.source("bf16")
    if fp16:
        return (Precision.FP16_BASE_MIXED if loads_in_half else Precision.FP16_MIXED).value, \
            values.source("fp16")
    return Precision.FP32.value, source


def world_source(invocation: Invocation) -> Source:
    """The launchers' world size: the command's own word, the launcher's config file (read
    as the launcher reads it), or assumed where it is decided at launch."""
    if not invocation.world_size_known:
        return Source.ASSUMED
    return Source.CONFIG_FILE if invocation.world_size_from_config else Source.COMMAND_LINE


# --- knobs that live in the environment (PYTORCH_CUDA_ALLOC_CONF) -----------------------------

def _alloc_conf(command: Command) -> tuple[str | None, int | None]:
    """The allocator settings the program sees, and the argv index that sets them (if any)."""
    try:
        invocation = locate(command.argv)
    except CommandError:
        invocation = None
    if invocation is not None:
        for index in range(invocation.args_start - 1, -1, -1):
            name, eq, value = command.argv[index].partition("=")
            if eq and name == ALLOC_CONF:
                return value, index
    return environment(command).get(ALLOC_CONF), None


def _expandable(conf: str | None) -> bool:
    settings = dict(part.partition(":")[::2] for part in (conf or "").split(",") if part)
    return settings.get("expandable_segments", "").strip().lower() in ("true", "1")


def read_env_knobs(command: Command, values: Values) -> None:
    """expandable_segments from PYTORCH_CUDA_ALLOC_CONF in the command's environment."""
    conf, _ = _alloc_conf(command)
    said = conf is not None and "expandable_segments" in conf
    values.set("expandable_segments", _expandable(conf),
               Source.COMMAND_LINE if said else Source.KNOWN_DEFAULT)


def with_env_knobs(command: Command, knobs: Knobs) -> Command:
    """The command with its allocator settings as `knobs` wants them, others kept.

    The variable is merged, never replaced: `max_split_size_mb:128` stays beside
    `expandable_segments:True`. Where the command sets it on its own line (`env
    PYTORCH_CUDA_ALLOC_CONF=... python ...`), that token is rewritten, since it would win.
    """
    conf, index = _alloc_conf(command)
    if _expandable(conf) == knobs.expandable_segments:
        return command
    parts = [p for p in (conf or "").split(",")
             if p and p.partition(":")[0].strip() != "expandable_segments"]
    parts.append(f"expandable_segments:{knobs.expandable_segments}")
    merged = ",".join(parts)
    if index is not None:
        argv = list(command.argv)
        argv[index] = f"{ALLOC_CONF}={merged}"
        return dataclasses.replace(command, argv=tuple(argv))
    env = tuple((k, v) for k, v in command.env if k != ALLOC_CONF)
    return dataclasses.replace(command, env=(*env, (ALLOC_CONF, merged)))


REFUSING_MODULES = ("bitsandbytes",)
"""The modules whose absence refuses knob values (module_refusals)."""


def prefetch_refusals(command: Command) -> None:
    """Start asking the command's Python for REFUSING_MODULES now, beside the --help probe."""
    for module in REFUSING_MODULES:
        prefetch_import(command, module)


def module_refusals(command: Command,
                    probe: ModuleProbe = can_import) -> frozenset[tuple[str, str]]:
    """The knob values the command's Python cannot take: bitsandbytes' when it cannot import it."""
    if probe(command, "bitsandbytes"):
        return frozenset()
    return refusals_without("bitsandbytes")
