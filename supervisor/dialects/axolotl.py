"""The axolotl dialect: `axolotl train cfg.yml`, `python -m axolotl.cli.train cfg.yml`
(also behind `accelerate launch -m`).

axolotl has no command-line override for every knob, so each attempt runs a rewritten copy of
the YAML in its own folder (comments and key order kept). `--key value` / `--key=value` options
after the config are read too (they win over the file) and rewritten in place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from supervisor.command import Command, CommandError, Invocation, locate, locate_command
from supervisor.dialects import deepspeed
from supervisor.dialects._config import (
    YAML_SUFFIXES,
    ConfigFile,
    Key,
    decode,
    encode,
    format_scalar,
    output_dir_for,
    params_tag,
    parse_scalar,
    resolve,
    suffix_of,
)
from supervisor.dialects._read import (
    Values,
    model_path,
    module_refusals,
    read_env_knobs,
    with_env_knobs,
    world_source,
)
from supervisor.knobs import FinetuningType, Knobs, Precision, Reading, Source, refusal_key

_MODULE = "axolotl.cli.train"
_BITS_4, _BITS_8 = 4, 8

KEYS: tuple[Key, ...] = (
    Key("per_device_batch", ("micro_batch_size",), "int"),
    Key("grad_accum", ("gradient_accumulation_steps",), "int"),
    Key("cutoff_len", ("sequence_len",), "int"),
    Key("gradient_checkpointing", ("gradient_checkpointing",), "bool"),
    Key("lora_rank", ("lora_r",), "int"),
    Key("max_steps", ("max_steps",), "steps"),
    Key("optimizer", ("optimizer",), "str"),  # axolotl's name for TrainingArguments.optim
    Key("resume_from_checkpoint", ("resume_from_checkpoint",), "str"),
    Key("output_dir", ("output_dir",), "str"),
)
"""Knob -> axolotl key; `adapter` (empty = full, lora, qlora) is decoded on its own."""

DEFAULTS: dict[str, Any] = {
    # utils/schemas/config.py and training.py of axolotl.
    "per_device_batch": 1, "grad_accum": 1, "cutoff_len": 512, "gradient_checkpointing": False,
    "finetuning_type": FinetuningType.FULL, "output_dir": "./model-out",
}
_BY_KNOB = {k.knob: k for k in KEYS}
_TARGETS = Key("lora_target", ("lora_target_modules",), "targets")
"""Read only (with `lora_target_linear`), never written: not among the rewritable KEYS."""
_NO_FREEZE = ("axolotl selects trainable layers with `unfrozen_parameters` patterns this tool "
              "does not write; use a policy without the freeze rung, or add the patterns "
              "yourself")
"""Why freeze tuning is refused (the run's skip line and the render error both say it)."""
_OPTION_KEYS = {name for k in KEYS for name in k.names} | {
    "adapter", "deepspeed", "lora_target_modules", "lora_target_linear"}


@dataclass(frozen=True, slots=True)
class _Option:
    index: int  # the option token's index in argv
    key: str
    value: object
    separate: bool = False  # `--key value` (else `--key=value`)


def config_index(argv: tuple[str, ...]) -> tuple[Invocation, int] | None:
    """Where the YAML sits, when argv is an axolotl training command."""
    try:
        invocation = locate(argv)
    except CommandError:
        return None
    start = invocation.args_start
    if PurePath(invocation.program).name == "axolotl":
        if argv[start:start + 1] != ("train",):
            return None
        start += 1
    elif invocation.program != _MODULE:
        return None
    if start < len(argv) and suffix_of(argv[start]) in YAML_SUFFIXES:
        return invocation, start
    return None


class AxolotlDialect:
    """axolotl's YAML config; a rewritten copy per attempt."""

    name = "axolotl"

    def claims(self, command: Command) -> bool:
        """`axolotl train X.yml` or the `axolotl.cli.train` module with a YAML."""
        return config_index(command.argv) is not None

    def read(self, command: Command) -> Knobs:
        """Knobs from the YAML and any `--key value` options, with axolotl's defaults."""
        _, _, config, options = self._parse(command)
        return self._knobs(command, config, options)

    def read_sourced(self, command: Command) -> Reading:
        """The knobs, each from the YAML, an option or axolotl's defaults."""
        _, _, config, options = self._parse(command)
        values = self._values(command, config, options)
        merged = {**config.data, **{o.key: o.value for o in options}}
        rewritable = set(_BY_KNOB) | {"finetuning_type", "quantization_bit"}
        if deepspeed.is_path(merged.get("deepspeed")):
            rewritable |= {"deepspeed_stage", "deepspeed_offload"}
        return values.reading(rewritable=frozenset(rewritable),
                              refused=frozenset({("finetuning_type", "freeze")})
                              | module_refusals(command),
                              refused_why={refusal_key("finetuning_type", "freeze"): _NO_FREEZE})

    def accepts(self, command: Command, knob: str) -> bool:
        """True for the knobs axolotl has keys for (freeze tuning is not one of them)."""
        return self.read_sourced(command).can_set(knob)

    def render(self, command: Command, knobs: Knobs, workdir: Path) -> Command:
        """The command pointed at a rewritten copy of the YAML (unchanged: as it was)."""
        command = with_env_knobs(command, knobs)
        _, index, config, options = self._parse(command)
        changes = self._changes(command, config, options, knobs, workdir, prefix="")
        if not changes:
            return command
        copy = config.write_copy(changes, workdir / config.path.name)
        argv = list(command.argv)
        argv[index] = str(copy)
        for option in options:
            if option.key in changes:
                text = format_scalar(changes[option.key])
                if option.separate:
                    argv[option.index + 1] = text
                else:
                    argv[option.index] = f"{argv[option.index].partition('=')[0]}={text}"
        return dataclasses.replace(command, argv=tuple(argv))

    def describe(self, command: Command) -> str:
        """The YAML read, and what a shorter sequence_len does to long rows."""
        _, _, config, options = self._parse(command)
        merged = {**config.data, **{o.key: o.value for o in options}}
        strategy = str(merged.get("excess_length_strategy") or "drop")
        effect = ("a shorter sequence_len DROPS the rows longer than it" if strategy == "drop"
                  else f"rows longer than sequence_len: {strategy}")
        return f"axolotl ({config.path.name}; {effect})"

    def finalize(self, command: Command, knobs: Knobs, run_dir: Path) -> tuple[Path, ...]:
        """final.yml: the user's YAML with the working values (and options) put in."""
        _, _, config, options = self._parse(command)
        values: dict[str, object] = {o.key: o.value for o in options}
        values.update(self._changes(command, config, options, knobs, run_dir, prefix="final-"))
        target = run_dir / f"final{config.path.suffix}"
        config.write_copy(values, target, private=False)  # secrets: placeholders only
        ds = values.get("deepspeed")
        extra = (Path(ds),) if isinstance(ds, str) and Path(ds).parent == run_dir else ()
        return (target, *extra)

    def _parse(self, command: Command) -> tuple[Invocation, int, ConfigFile, list[_Option]]:
        found = config_index(command.argv)
        if found is None:
            msg = ("not an axolotl command: expected `axolotl train CONFIG.yml` or "
                   "`python -m axolotl.cli.train CONFIG.yml`")
            raise CommandError(msg)
        invocation, index = found
        config = ConfigFile.load(resolve(command, command.argv[index]), what="axolotl config")
        options: list[_Option] = []
        argv = command.argv
        i = index + 1
        while i < len(argv):
            name, eq, raw = argv[i].removeprefix("--").partition("=")
            key = name.replace("-", "_")
            if argv[i].startswith("--") and key in _OPTION_KEYS:
                if eq:
                    options.append(_Option(i, key, parse_scalar(raw), separate=False))
                elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                    options.append(_Option(i, key, parse_scalar(argv[i + 1]), separate=True))
                    i += 1
                else:
                    options.append(_Option(i, key, value=True, separate=False))
            i += 1
        return invocation, index, config, options

    def _knobs(self, command: Command, config: ConfigFile, options: list[_Option]) -> Knobs:
        return self._values(command, config, options).reading(rewritable=frozenset()).knobs

    def _values(self, command: Command, config: ConfigFile, options: list[_Option]) -> Values:
        merged = {**config.data, **{o.key: o.value for o in options}}
        on_argv = {o.key for o in options}

        def said(name: str) -> Source:
            return Source.COMMAND_LINE if name in on_argv else Source.CONFIG_FILE

        where = config.path.name
        values = Values()
        values.defaults({**DEFAULTS, "quantization_bit": None}, Source.KNOWN_DEFAULT)
        for key in KEYS:
            name = key.names[0]
            if name in merged:
                raw = merged[name]
                if key.knob == "gradient_checkpointing" and isinstance(raw, str):
                    raw = raw.lower() not in ("false", "none", "")  # "unsloth", "offload": on
                decoded = decode(key, name, raw, where)
                if decoded is not None or key.knob not in DEFAULTS:
                    values.set(key.knob, decoded, said(name))
        adapter = merged.get("adapter") or None
        if adapter not in (None, "lora", "qlora"):
            msg = (f"{where}: adapter: {adapter!r} is not one this tool steps down from; "
                   "valid: (empty) for full fine-tuning, lora, qlora")
            raise CommandError(msg)
        if "adapter" in merged:
            values.set("finetuning_type",
                       FinetuningType.LORA if adapter is not None else FinetuningType.FULL,
                       said("adapter"))
        # axolotl loads a 4-bit base only for `adapter: qlora` (its model loader builds the
        # BitsAndBytesConfig for that pair; schema: "Require cfg.load_in_4bit to be True for
        # qlora"): `adapter: lora` with `load_in_4bit: true` trains plain LoRA on a full base.
        if adapter == "qlora":
            values.set("quantization_bit", _BITS_4, said("adapter"))
        elif merged.get("load_in_8bit") is True:
            values.set("quantization_bit", _BITS_8, said("load_in_8bit"))
        values.set("precision", *_precision(merged, said))
        # axolotl adapts `lora_target_modules` and, with `lora_target_linear`, every linear
        # layer besides (its find_all_linear_names, the head excluded): all of them.
        if merged.get("lora_target_linear") is True:
            values.set("lora_target", None, said("lora_target_linear"))
        elif merged.get("lora_target_modules"):
            values.set("lora_target", decode(_TARGETS, "lora_target_modules",
                                             merged["lora_target_modules"], where),
                       said("lora_target_modules"))
        if merged.get("base_model"):
            values.set("model", model_path(command, merged["base_model"]), said("base_model"))
        ds = merged.get("deepspeed")
        ds_source = said("deepspeed") if ds else Source.KNOWN_DEFAULT
        values.set("deepspeed_stage", deepspeed.stage(ds, command) if ds else None, ds_source)
        values.set("deepspeed_offload", deepspeed.offload(ds, command) if ds else None,
                   ds_source)
        invocation = locate_command(command)
        values.set("world_size", invocation.world_size, world_source(invocation))
        read_env_knobs(command, values)
        return values

    def _changes(self, command: Command, config: ConfigFile, options: list[_Option],  # noqa: PLR0913
                 knobs: Knobs, folder: Path, *, prefix: str) -> dict[str, object]:
        current = self._knobs(command, config, options)
        merged = {**config.data, **{o.key: o.value for o in options}}
        changes: dict[str, object] = {}
        for knob in current.diff(knobs):
            if knob in ("world_size", "output_dir", "deepspeed_stage", "quantization_bit",
                        "finetuning_type", "deepspeed_offload", "model", "precision",
                        "expandable_segments"):
                continue  # (expandable_segments: in the environment, see with_env_knobs)
            if knob not in _BY_KNOB:
                msg = (f"cannot set {knob}: axolotl's config has no key this tool writes for "
                       "it; use a policy without that rung")
                raise CommandError(msg)
            changes[_BY_KNOB[knob].names[0]] = encode(_BY_KNOB[knob], getattr(knobs, knob))
        if knobs.finetuning_type != current.finetuning_type:
            changes.update(_adapter_keys(knobs, merged))
        elif (knobs.quantization_bit != current.quantization_bit
              and knobs.finetuning_type is FinetuningType.LORA):
            # The same adapter over another base: `qlora` is what makes axolotl load 4 bits,
            # `lora` again when the ladder leaves them (on a config that was LoRA already).
            changes["adapter"] = "qlora" if knobs.quantization_bit == _BITS_4 else "lora"
        if knobs.quantization_bit != current.quantization_bit:
            changes.update(_quantization_keys(knobs.quantization_bit))
        ds = merged.get("deepspeed")
        if (knobs.deepspeed_stage, knobs.deepspeed_offload) != (current.deepspeed_stage,
                                                                current.deepspeed_offload):
            deepspeed.require_config(ds, "deepspeed_stage")
        ds_updates = deepspeed.changes(ds, command, current, knobs) if ds else {}
        if ds_updates and deepspeed.is_path(ds):
            target = folder / f"{prefix}{PurePath(str(ds)).name}"
            changes["deepspeed"] = str(deepspeed.write(str(ds), command, ds_updates, target))
        if changes and params_tag(knobs) != params_tag(current):
            # Another kind of parameter set must not meet the first one's files (see
            # docs/dialects.md); a quantisation change under the same adapter keeps the folder:
            # it holds the same adapter files (the supervisor itself never resumes across it).
            changes["output_dir"] = output_dir_for(str(current.output_dir), knobs)
        return changes


def _adapter_keys(knobs: Knobs, merged: dict[str, Any]) -> dict[str, object]:
    if knobs.finetuning_type is FinetuningType.FREEZE:
        msg = f"cannot set finetuning_type=freeze: {_NO_FREEZE}"
        raise CommandError(msg)
    if knobs.finetuning_type is FinetuningType.FULL:
        return {"adapter": None}
    keys: dict[str, object] = {"adapter": "qlora" if knobs.quantization_bit == _BITS_4 else "lora",
                               "lora_r": knobs.lora_rank}
    if "lora_alpha" not in merged:
        keys["lora_alpha"] = 2 * knobs.lora_rank
    if "lora_target_modules" not in merged and "lora_target_linear" not in merged:
        keys["lora_target_linear"] = True
    return keys


def _precision(merged: dict[str, Any],
               said: Callable[[str], Source]) -> tuple[str, Source]:
    """axolotl loads the model in bf16/fp16 under `bf16`/`fp16` (or `bfloat16`/`float16`):
    the weights train in that precision (normalize_config sets torch_dtype from them)."""
    for names, precision in ((("bfloat16", "bf16"), Precision.BF16),
                             (("float16", "fp16"), Precision.FP16)):
        for name in names:
            value = merged.get(name)
            if value is True:
                return precision.value, said(name)
            if isinstance(value, str) and value.lower() == "auto":
                return precision.value, Source.ASSUMED  # bf16 where the device has it
    # fp32: the file's own word where it switches the half precisions off (`bf16: false`),
    # the family's default only where it names neither.
    said_off = [n for n in ("bf16", "bfloat16", "fp16", "float16") if merged.get(n) is False]
    if said_off:
        return Precision.FP32.value, said(said_off[0])
    return Precision.FP32.value, Source.KNOWN_DEFAULT


def _quantization_keys(bits: int | None) -> dict[str, object]:
    return {"load_in_4bit": bits == _BITS_4, "load_in_8bit": bits == _BITS_8}
