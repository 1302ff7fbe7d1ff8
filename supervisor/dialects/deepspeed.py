"""DeepSpeed JSON configs: read the ZeRO stage; keep explicit batch numbers consistent per attempt.

DeepSpeed checks `train_batch_size == train_micro_batch_size_per_gpu * gradient_accumulation_steps
* world_size` and the HF integration refuses explicit values that disagree with the
TrainingArguments. Values set to "auto" follow the trainer and need nothing; explicit ones are
rewritten in a copy whenever an attempt changes the batch, the accumulation or the stage.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from supervisor.command import Command, CommandError
from supervisor.dialects._config import ConfigFile, resolve
from supervisor.knobs import Knobs

_MICRO = "train_micro_batch_size_per_gpu"
_GA = "gradient_accumulation_steps"
_TOTAL = "train_batch_size"
_STAGE = "zero_optimization.stage"
_OFFLOAD = "zero_optimization.offload_optimizer.device"


def is_path(value: object) -> bool:
    """True for a DeepSpeed config given as a file path (HF also accepts an inline dict)."""
    return isinstance(value, str) and value.strip().lower().endswith(".json")


def stage(config: object, command: Command) -> int | None:
    """The ZeRO stage a DeepSpeed config (path or inline mapping) sets, if it sets one."""
    data = _data(config, command)
    zero = data.get("zero_optimization") if data is not None else None
    value = zero.get("stage") if isinstance(zero, Mapping) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def offload(config: object, command: Command) -> bool | None:
    """True when ZeRO offloads optimizer state or parameters to CPU/NVMe (None: no config)."""
    data = _data(config, command)
    if data is None:
        return None
    zero = data.get("zero_optimization")
    if not isinstance(zero, Mapping):
        return False
    if zero.get("cpu_offload") is True:  # the pre-0.3.13 spelling
        return True
    devices = (_get(zero, f"{part}.device") for part in ("offload_optimizer", "offload_param"))
    return any(str(d).lower() in ("cpu", "nvme") for d in devices if d is not None)


def changes(config: object, command: Command, before: Knobs, after: Knobs) -> dict[str, object]:
    """The (dotted) keys a DeepSpeed config needs so that it agrees with `after`."""
    if (before.per_device_batch, before.grad_accum, before.deepspeed_stage,
            before.deepspeed_offload) == (after.per_device_batch, after.grad_accum,
                                          after.deepspeed_stage, after.deepspeed_offload):
        return {}
    data = _data(config, command)
    if data is None:
        return {}
    out: dict[str, object] = {}
    micro = after.per_device_batch if _explicit(data.get(_MICRO)) else None
    accum = after.grad_accum if _explicit(data.get(_GA)) else None
    if micro is not None:
        out[_MICRO] = micro
    if accum is not None:
        out[_GA] = accum
    if _explicit(data.get(_TOTAL)):
        out[_TOTAL] = after.per_device_batch * after.grad_accum * after.world_size
    if after.deepspeed_stage != before.deepspeed_stage and after.deepspeed_stage is not None:
        out[_STAGE] = after.deepspeed_stage
    if after.deepspeed_offload != before.deepspeed_offload and after.deepspeed_offload is not None:
        out[_OFFLOAD] = "cpu" if after.deepspeed_offload else "none"
    return {k: v for k, v in out.items() if _get(data, k) != v}


def write(config: str, command: Command, updates: Mapping[str, object], target: Path) -> Path:
    """A copy of the DeepSpeed JSON with `updates` at `target`."""
    return ConfigFile.load(resolve(command, config), what="DeepSpeed config").write_copy(
        updates, target)


def _data(config: object, command: Command) -> Mapping[str, Any] | None:
    if isinstance(config, Mapping):
        return config
    if not is_path(config):
        return None
    return ConfigFile.load(resolve(command, str(config)), what="DeepSpeed config").data


def _explicit(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _get(data: Mapping[str, Any], dotted: str) -> object:
    node: object = data
    for part in dotted.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(part)
    return node


def require_config(config: object, knob: str) -> None:
    """A stage change needs a DeepSpeed config to write it into; say so if there is none."""
    if config is None:
        msg = (f"cannot set {knob}: the command has no DeepSpeed config (--deepspeed ds.json); "
               "add one, or use a policy without the DeepSpeed rungs")
        raise CommandError(msg)
