"""Hugging Face scripts given one args file: `python train.py args.json` (or `.yaml`).

`HfArgumentParser.parse_json_file` / `parse_yaml_file` is the convention: a single positional
argument naming the file. Each attempt gets a rewritten copy of the file in its own folder; the
command points at the copy. The flag form (`--flag value`) is the argv dialect's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path, PurePath
from typing import Any

from supervisor._families import PEFT_DEFAULT
from supervisor.command import Command, CommandError, Invocation, locate, locate_command
from supervisor.dialects import deepspeed
from supervisor.dialects._config import (
    CONFIG_SUFFIXES,
    ConfigFile,
    Key,
    decode,
    encode,
    resolve,
    suffix_of,
)
from supervisor.dialects._read import (
    TRL_LORA_R,
    Values,
    model_path,
    module_refusals,
    precision_of,
    read_env_knobs,
    to_write,
    with_env_knobs,
    world_source,
)
from supervisor.knobs import FinetuningType, Knobs, Reading, Source

CUTOFF_KEYS = ("max_seq_length", "max_length", "block_size", "model_max_length", "cutoff_len",
               "max_seq_len")
"""Names scripts give the cutoff; the first one the file has is the one read and written."""

KEYS: tuple[Key, ...] = (
    Key("per_device_batch", ("per_device_train_batch_size",), "int"),
    Key("grad_accum", ("gradient_accumulation_steps",), "int"),
    Key("cutoff_len", CUTOFF_KEYS, "int"),
    # transformers 5 renamed it activation_checkpointing (the old name warns); 4.x knows only
    # the old one, so that is what an absent key is written as.
    Key("gradient_checkpointing", ("gradient_checkpointing", "activation_checkpointing"),
        "bool"),
    Key("finetuning_type", ("finetuning_type",), "finetuning_type"),
    Key("lora_rank", ("lora_r", "lora_rank"), "int"),
    # TRL's ModelConfig / peft scripts: lora_target_modules (a list, or all-linear); read only.
    Key("lora_target", ("lora_target_modules", "lora_target"), "targets"),
    Key("freeze_trainable_layers", ("freeze_trainable_layers",), "int"),
    Key("quantization_bit", ("quantization_bit",), "int"),
    Key("max_steps", ("max_steps",), "steps"),
    Key("optimizer", ("optim",), "str"),  # TrainingArguments.optim
    Key("resume_from_checkpoint", ("resume_from_checkpoint",), "str"),
    Key("output_dir", ("output_dir",), "str"),
)

DEFAULTS: dict[str, Any] = {
    # transformers.TrainingArguments; the cutoff is the script's own (unknown unless named).
    "per_device_batch": 8, "grad_accum": 1, "gradient_checkpointing": False,
    "finetuning_type": FinetuningType.FULL,
}
# (expandable_segments: in the environment; lora_target: read, never rewritten)
_READ_ONLY = ("world_size", "output_dir", "deepspeed_stage", "deepspeed_offload", "precision",
              "model", "expandable_segments", "lora_target")
_TRAINING_ARGS = ("per_device_batch", "grad_accum", "gradient_checkpointing", "max_steps",
                  "resume_from_checkpoint", "output_dir", "optimizer")
"""Knobs every HfArgumentParser script with TrainingArguments takes, named in the file or not."""


def args_file_index(argv: tuple[str, ...]) -> tuple[Invocation, int] | None:
    """Where the single args file sits, when the program's only argument is one."""
    try:
        invocation = locate(argv)
    except CommandError:
        return None
    rest = argv[invocation.args_start:]
    if len(rest) == 1 and suffix_of(rest[0]) in CONFIG_SUFFIXES:
        return invocation, invocation.args_start
    return None


class HfArgsFileDialect:
    """A script whose only argument is an HfArgumentParser args file (.json/.yaml)."""

    name = "hf-args"

    def claims(self, command: Command) -> bool:
        """The program's only argument is a .json/.yaml file (read() then says what it lacks)."""
        return args_file_index(command.argv) is not None

    def read(self, command: Command) -> Knobs:
        """Knobs from the args file, with TrainingArguments' defaults for absent keys."""
        return self.read_sourced(command).knobs

    def read_sourced(self, command: Command) -> Reading:
        """The knobs, each from the args file or TrainingArguments' defaults."""
        _, config, found = self._parse(command)
        data = config.data
        values = Values()
        values.defaults({k: v for k, v in DEFAULTS.items() if k != "finetuning_type"},
                        Source.KNOWN_DEFAULT)
        values.set("finetuning_type", FinetuningType.FULL, Source.ASSUMED)
        for key in KEYS:
            name = found.get(key.knob)
            if name is not None:
                decoded = decode(key, name, data[name], config.path.name)
                if decoded is not None or key.knob not in DEFAULTS:
                    values.set(key.knob, decoded, Source.CONFIG_FILE)
        if "use_peft" in data:  # TRL's ModelConfig
            values.set("finetuning_type", FinetuningType.LORA if data["use_peft"] is True
                       else FinetuningType.FULL, Source.CONFIG_FILE)
            if "lora_rank" not in found:
                values.set("lora_rank", TRL_LORA_R, Source.KNOWN_DEFAULT)
            if "lora_target" not in found:  # ModelConfig's None: peft's list for the model
                values.set("lora_target", PEFT_DEFAULT, Source.KNOWN_DEFAULT)
        for bits, name in ((4, "load_in_4bit"), (8, "load_in_8bit")):
            if data.get(name) is True:
                values.set("quantization_bit", bits, Source.CONFIG_FILE)
        flags = Values()
        flags.defaults({"bf16": False, "fp16": False}, Source.KNOWN_DEFAULT)
        for name, alias in (("bf16", "bf16"), ("fp16", "fp16"), ("dtype", "dtype"),
                            ("torch_dtype", "dtype")):
            if name in data:
                flags.set(alias, data[name], Source.CONFIG_FILE)
        values.set("precision", *precision_of(flags))
        if data.get("model_name_or_path"):
            values.set("model", model_path(command, data["model_name_or_path"]),
                       Source.CONFIG_FILE)
        ds = data.get("deepspeed")
        ds_source = Source.CONFIG_FILE if ds else Source.KNOWN_DEFAULT
        values.set("deepspeed_stage", deepspeed.stage(ds, command) if ds else None, ds_source)
        values.set("deepspeed_offload", deepspeed.offload(ds, command) if ds else None,
                   ds_source)
        launch = locate_command(command)
        values.set("world_size", launch.world_size, world_source(launch))
        rewritable = set(found) | set(_TRAINING_ARGS)
        refused: frozenset[tuple[str, str]] = frozenset()
        if "use_peft" in data:
            rewritable |= {"finetuning_type", "lora_rank"}  # ModelConfig has lora_r too
            refused = frozenset({("finetuning_type", FinetuningType.FREEZE.value)})
        if ds:
            rewritable |= {"deepspeed_stage", "deepspeed_offload"}
        read_env_knobs(command, values)
        return values.reading(rewritable=frozenset(rewritable),
                              refused=refused | module_refusals(command))

    def accepts(self, command: Command, knob: str) -> bool:
        """TrainingArguments' knobs, and any other knob whose key the args file already has."""
        return self.read_sourced(command).can_set(knob)

    def render(self, command: Command, knobs: Knobs, workdir: Path) -> Command:
        """The command pointed at a rewritten copy of the args file (unchanged: as it was)."""
        command = with_env_knobs(command, knobs)
        _, index, config, changes = self._changes(command, knobs, workdir, prefix="")
        if not changes:
            return command
        copy = config.write_copy(changes, workdir / config.path.name)
        argv = list(command.argv)
        argv[index] = str(copy)
        return dataclasses.replace(command, argv=tuple(argv))

    def describe(self, command: Command) -> str:
        """The args file read."""
        _, config, found = self._parse(command)
        cutoff = found.get("cutoff_len")
        note = (f"a shorter {cutoff} truncates or drops long samples as the script decides"
                if cutoff else "no cutoff key: the cutoff rung is skipped")
        return f"hf-args ({config.path.name}; {note})"

    def finalize(self, command: Command, knobs: Knobs, run_dir: Path) -> tuple[Path, ...]:
        """final.json / final.yaml: the args file with the working values."""
        _, _, config, changes = self._changes(command, knobs, run_dir, prefix="final-")
        target = run_dir / f"final{config.path.suffix}"
        config.write_copy(changes, target, private=False)  # secrets: placeholders only
        ds = changes.get("deepspeed")
        extra = (Path(ds),) if isinstance(ds, str) and Path(ds).parent == run_dir else ()
        return (target, *extra)

    def _parse(self, command: Command) -> tuple[Invocation, ConfigFile, dict[str, str]]:
        found_at = args_file_index(command.argv)
        if found_at is None:
            msg = ("not an args-file command: expected the script's only argument to be a "
                   ".json or .yaml file (HfArgumentParser convention)")
            raise CommandError(msg)
        invocation, index = found_at
        config = ConfigFile.load(resolve(command, command.argv[index]), what="arguments file")
        found = {key.knob: name for key in KEYS
                 for name in reversed(key.names) if name in config.data}
        if not {"per_device_batch", "grad_accum", "cutoff_len"} & found.keys():
            msg = (f"{config.path.name} names none of per_device_train_batch_size, "
                   f"gradient_accumulation_steps or a cutoff ({', '.join(CUTOFF_KEYS)}); add "
                   "the keys the script uses, or declare them with --knobs FILE")
            raise CommandError(msg)
        return invocation, config, found

    def _changes(self, command: Command, knobs: Knobs, folder: Path, *,
                 prefix: str) -> tuple[Invocation, int, ConfigFile, dict[str, object]]:
        invocation, config, found = self._parse(command)
        reading = self.read_sourced(command)
        current = reading.knobs
        by_knob = {k.knob: k for k in KEYS}
        changes: dict[str, object] = {}
        for knob in to_write(reading, knobs):
            if knob in _READ_ONLY:
                continue
            key = by_knob[knob]
            name = found.get(knob, key.names[0])
            if knob == "cutoff_len" and knob not in found:
                msg = ("cannot set cutoff_len: the args file names no cutoff key; add the one "
                       "the script reads, or use a policy without the cutoff rung")
                raise CommandError(msg)
            if knob == "finetuning_type" and "use_peft" in config.data:
                changes["use_peft"] = _use_peft(knobs.finetuning_type)
                continue
            if knob not in found and knob not in _TRAINING_ARGS and not (
                    knob == "lora_rank" and "use_peft" in config.data):
                # HfArgumentParser rejects keys no dataclass has (allow_extra_keys=False).
                msg = (f"cannot set {knob}: {config.path.name} has no key for it and "
                       "TrainingArguments has none either; add the key the script reads, or "
                       "use a policy without that rung")
                raise CommandError(msg)
            changes[name] = encode(key, getattr(knobs, knob))
        ds = config.data.get("deepspeed")
        if (knobs.deepspeed_stage, knobs.deepspeed_offload) != (current.deepspeed_stage,
                                                                current.deepspeed_offload):
            deepspeed.require_config(ds, "deepspeed_stage")
        ds_updates = deepspeed.changes(ds, command, current, knobs) if ds else {}
        if ds_updates and deepspeed.is_path(ds):
            target = folder / f"{prefix}{PurePath(str(ds)).name}"
            changes["deepspeed"] = str(deepspeed.write(str(ds), command, ds_updates, target))
        elif ds_updates:  # an inline DeepSpeed mapping lives in the args file itself
            changes.update({f"deepspeed.{k}": v for k, v in ds_updates.items()})
        return invocation, invocation.args_start, config, changes


def _use_peft(finetuning_type: FinetuningType) -> bool:
    if finetuning_type is FinetuningType.FREEZE:
        msg = ("cannot set finetuning_type=freeze: use_peft gives LoRA (true) or full "
               "fine-tuning (false); use a policy without the freeze rung")
        raise CommandError(msg)
    return finetuning_type is FinetuningType.LORA
