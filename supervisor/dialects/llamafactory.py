"""The LLaMA-Factory dialect: `llamafactory-cli train cfg.yaml [key=value ...]` (also `lmf`).

LLaMA-Factory reads the YAML (or JSON) file, then the `key=value` overrides after it (OmegaConf,
later wins). A rung is applied the same way: as overrides appended to the command, so the
user's file is never touched; `finalize` writes `final.yaml`, the user's file with the working
values put in (comments and key order kept).

Output folders (measured with llamafactory 0.9.5): a folder holding `checkpoint-N` is resumed
automatically unless `overwrite_output_dir` is set, and one that still holds another parameter
set's files fails after training (LoRA leftovers make a full/freeze run raise AttributeError in
`create_model_card`; a full checkpoint makes a LoRA run fail to resume). So an attempt that
changes anything sets `overwrite_output_dir=true` (resuming is then the supervisor's explicit
`resume_from_checkpoint`), and an attempt with another parameter set than the command's own
writes to a sibling folder named for it (`saves/x` -> `saves/x-lora-r8`).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from supervisor.command import (
    Command,
    CommandError,
    Invocation,
    environment,
    locate,
    locate_command,
)
from supervisor.dialects import deepspeed
from supervisor.dialects._config import (
    CONFIG_SUFFIXES,
    ConfigFile,
    Key,
    decode,
    encode,
    format_scalar,
    is_inside,
    output_dir_for,
    params_of,
    parse_scalar,
    resolve,
    suffix_of,
)
from supervisor.dialects._read import (
    Values,
    model_path,
    module_refusals,
    precision_of,
    read_env_knobs,
    with_env_knobs,
    world_source,
)
from supervisor.files import write_file
from supervisor.knobs import FinetuningType, Knobs, Reading, Source
from supervisor.secrets import redact_config

_CLI = re.compile(r"^(llamafactory-cli|lmf)$")
_MODULES = frozenset({"llamafactory.cli", "llamafactory.launcher"})
_REPO_SCRIPT = re.compile(r"(^|.*/)src/train\.py$")  # the LLaMA-Factory checkout's own entry
_OVERRIDE = re.compile(r"^([A-Za-z_][\w.]*)=(.*)$", re.DOTALL)

KEYS: tuple[Key, ...] = (
    Key("per_device_batch", ("per_device_train_batch_size",), "int"),
    Key("grad_accum", ("gradient_accumulation_steps",), "int"),
    Key("cutoff_len", ("cutoff_len",), "int"),
    # hparams/model_args.py: checkpointing is on unless `disable_gradient_checkpointing: true`.
    Key("gradient_checkpointing", ("disable_gradient_checkpointing",), "bool", inverted=True),
    Key("finetuning_type", ("finetuning_type",), "finetuning_type"),
    Key("lora_rank", ("lora_rank",), "int"),
    Key("lora_target", ("lora_target",), "targets"),  # read, never rewritten
    Key("freeze_trainable_layers", ("freeze_trainable_layers",), "int"),
    Key("quantization_bit", ("quantization_bit",), "int"),
    Key("max_steps", ("max_steps",), "steps"),
    Key("optimizer", ("optim",), "str"),  # TrainingArguments.optim
    Key("resume_from_checkpoint", ("resume_from_checkpoint",), "str"),
    Key("output_dir", ("output_dir",), "str"),
)
"""Knob -> LLaMA-Factory key (the same names work as `--flag`s in the argv dialect)."""

DEFAULTS: dict[str, Any] = {
    # hparams/*_args.py of llamafactory 0.9.5 and transformers' TrainingArguments.
    "per_device_batch": 8, "grad_accum": 1, "cutoff_len": 2048, "gradient_checkpointing": True,
    "finetuning_type": FinetuningType.LORA, "lora_rank": 8,
    # finetuning_args.py: `all`, every linear layer but the output head (its
    # find_all_linear_modules): the knob's None.
    "lora_target": None,
    # Positive: the last n layers train; negative: the first n (hparams/finetuning_args.py).
    "freeze_trainable_layers": 2,
}
_DEFAULT_OUTPUT_DIR = "trainer_output"  # transformers >= 4.50 when output_dir is not given
_BY_KNOB = {k.knob: k for k in KEYS}


@dataclass(frozen=True, slots=True)
class _Override:
    index: int  # in argv
    key: str
    value: object


@dataclass(frozen=True, slots=True)
class _Parsed:
    invocation: Invocation
    config_index: int
    config: ConfigFile
    overrides: tuple[_Override, ...]
    merged: dict[str, Any]


def config_index(argv: tuple[str, ...]) -> tuple[Invocation, int] | None:
    """Where `train CONFIG` sits, when argv is a LLaMA-Factory training command with a config."""
    try:
        invocation = locate(argv)
    except CommandError:
        return None
    program, start = invocation.program, invocation.args_start
    if _CLI.match(PurePath(program).name) or program in _MODULES:
        if argv[start:start + 1] != ("train",):
            return None
        start += 1
    elif not _REPO_SCRIPT.match(program):
        return None
    if start < len(argv) and suffix_of(argv[start]) in CONFIG_SUFFIXES:
        return invocation, start
    return None


def cutoff_effect(merged: dict[str, Any]) -> str:
    """What a shorter cutoff_len does to the data, from stage and packing (data_args.py)."""
    stage = str(merged.get("stage", "sft"))
    packing = merged.get("packing")
    if merged.get("neat_packing") is True:
        packing = True
    if packing is None:
        packing = stage == "pt"
    if stage == "pt":
        return "pre-training text is cut into blocks of cutoff_len: no sample is lost"
    if packing is True:
        return ("packing is on: a shorter cutoff_len DROPS the samples longer than it "
                "(they are not truncated)")
    return "a shorter cutoff_len truncates the samples longer than it"


class LlamaFactoryDialect:
    """`llamafactory-cli train cfg.yaml [key=value ...]`: YAML plus OmegaConf overrides."""

    name = "llamafactory"

    def claims(self, command: Command) -> bool:
        """A LLaMA-Factory `train` command with a YAML or JSON config."""
        return config_index(command.argv) is not None

    def read(self, command: Command) -> Knobs:
        """The knobs of the config plus its overrides, with LLaMA-Factory's defaults."""
        return self._knobs(command, self._parse(command))

    def read_sourced(self, command: Command) -> Reading:
        """The knobs, each from the file, an override or LLaMA-Factory's defaults."""
        parsed = self._parse(command)
        values = self._values(command, parsed)
        rewritable = set(_BY_KNOB)
        if deepspeed.is_path(parsed.merged.get("deepspeed")):
            rewritable |= {"deepspeed_stage", "deepspeed_offload"}
        # LLaMA-Factory refuses freeze tuning of a quantised model (hparams/parser.py).
        refused = (frozenset({("finetuning_type", FinetuningType.FREEZE.value)})
                   if values.get("quantization_bit") is not None else frozenset())
        return values.reading(rewritable=frozenset(rewritable),
                              refused=refused | module_refusals(command))

    def accepts(self, command: Command, knob: str) -> bool:
        """True for every knob LLaMA-Factory has a key for (the DeepSpeed ones need a config)."""
        return self.read_sourced(command).can_set(knob)

    def render(self, command: Command, knobs: Knobs, workdir: Path) -> Command:
        """The command with each change appended (or rewritten) as a `key=value` override."""
        command = with_env_knobs(command, knobs)
        parsed = self._parse(command)
        changes = self._changes(command, parsed, knobs, workdir, prefix="")
        if not changes:
            return command
        argv = list(command.argv)
        appended: list[str] = []
        for key, value in changes.items():
            token = f"{key}={format_scalar(value)}"
            hits = [o.index for o in parsed.overrides if o.key == key]
            for index in hits:
                argv[index] = token
            if not hits:
                appended.append(token)
        return dataclasses.replace(command, argv=(*argv, *appended))

    def describe(self, command: Command) -> str:
        """Config name, overrides, and what a shorter cutoff does with this data setup."""
        parsed = self._parse(command)
        extra = f" + {len(parsed.overrides)} override(s)" if parsed.overrides else ""
        return (f"llamafactory ({parsed.config.path.name}{extra}; "
                f"{cutoff_effect(parsed.merged)})")

    def finalize(self, command: Command, knobs: Knobs, run_dir: Path) -> tuple[Path, ...]:
        """final.yaml (or final.json): the user's file with overrides and working values in."""
        parsed = self._parse(command)
        values: dict[str, object] = {o.key: o.value for o in parsed.overrides}
        values.update(self._changes(command, parsed, knobs, run_dir, prefix="final-"))
        is_json = parsed.config.yaml is None
        target = run_dir / ("final.json" if is_json else "final.yaml")
        # The record never holds a secret (a `hub_token` key or override): final-command.sh
        # runs the user's own file with the overrides, reading secrets from the environment.
        text = redact_config(parsed.config.render(values), json_text=is_json)
        if not is_json:
            text = (f"# The working config found by oom-supervisor (run {run_dir.name}).\n"
                    f"# Run it from {command.cwd or 'the original directory'}: "
                    f"llamafactory-cli train {target}\n{text}")
        write_file(target, text)  # whole or not at all; WriteFailedError says what to do
        written = [target]
        ds = values.get("deepspeed")
        if isinstance(ds, str) and Path(ds).parent == run_dir:
            written.append(Path(ds))
        return tuple(written)

    # -- internals ---------------------------------------------------------------------------

    def _parse(self, command: Command) -> _Parsed:
        found = config_index(command.argv)
        if found is None:
            msg = ("not a LLaMA-Factory config command: expected `llamafactory-cli train "
                   "CONFIG.yaml [key=value ...]`; without a config file use --dialect argv")
            raise CommandError(msg)
        invocation, index = found
        config = ConfigFile.load(resolve(command, command.argv[index]),
                                 what="LLaMA-Factory config")
        merged: dict[str, Any] = dict(config.data)
        overrides = []
        for i in range(index + 1, len(command.argv)):
            token = command.argv[i]
            match = _OVERRIDE.match(token)
            if match is None:
                msg = (f"LLaMA-Factory takes overrides after the config as key=value; "
                       f"{token!r} is not one (write e.g. `per_device_train_batch_size=4`)")
                raise CommandError(msg)
            value = parse_scalar(match.group(2))
            overrides.append(_Override(i, match.group(1), value))
            merged[match.group(1)] = value  # later wins, as OmegaConf.merge does
        return _Parsed(invocation=invocation, config_index=index, config=config,
                       overrides=tuple(overrides), merged=merged)

    def _knobs(self, command: Command, parsed: _Parsed) -> Knobs:
        return self._values(command, parsed).reading(rewritable=frozenset()).knobs

    def _values(self, command: Command, parsed: _Parsed) -> Values:
        values = Values()
        values.defaults({"quantization_bit": None, "bf16": False, "fp16": False,
                         "pure_bf16": False, **DEFAULTS}, Source.KNOWN_DEFAULT)
        overridden = {o.key for o in parsed.overrides}
        where = f"{parsed.config.path.name} (+ overrides)"

        def said(name: str) -> Source:
            return Source.COMMAND_LINE if name in overridden else Source.CONFIG_FILE

        for key in KEYS:
            name = key.names[0]
            if name in parsed.merged:
                decoded = decode(key, name, parsed.merged[name], where)
                if decoded is not None or key.knob not in DEFAULTS or key.codec == "targets":
                    values.set(key.knob, decoded, said(name))  # (`lora_target: all` is None)
        for name in ("bf16", "fp16", "pure_bf16"):
            if name in parsed.merged:
                values.set(name, parsed.merged[name] is True, said(name))
        precision, source = precision_of(values, loads_in_half=True)
        if source is Source.KNOWN_DEFAULT:
            # Neither bf16 nor fp16: LLaMA-Factory picks the compute dtype from the model and
            # the device (infer_optim_dtype), so fp32 is only a guess.
            source = Source.ASSUMED
        values.set("precision", precision, source)
        for name in ("bf16", "fp16", "pure_bf16"):
            del values.values[name]
        if "model_name_or_path" in parsed.merged:
            values.set("model", model_path(command, parsed.merged["model_name_or_path"]),
                       said("model_name_or_path"))
        ds = parsed.merged.get("deepspeed")
        ds_source = said("deepspeed") if ds else Source.KNOWN_DEFAULT
        values.set("deepspeed_stage", deepspeed.stage(ds, command) if ds else None, ds_source)
        values.set("deepspeed_offload", deepspeed.offload(ds, command) if ds else None,
                   ds_source)
        launch = locate_command(command)
        values.set("world_size", world_size(command, launch), world_source(launch))
        read_env_knobs(command, values)
        return values

    def _changes(self, command: Command, parsed: _Parsed, knobs: Knobs, folder: Path, *,
                 prefix: str) -> dict[str, object]:
        """The keys to set so the command runs with `knobs` (empty: it already does)."""
        current = self._knobs(command, parsed)
        changes: dict[str, object] = {}
        for knob in current.diff(knobs):
            if knob in ("world_size", "output_dir", "resume_from_checkpoint",
                        "deepspeed_stage", "deepspeed_offload", "model", "precision",
                        "expandable_segments"):
                continue  # (expandable_segments: in the environment, see with_env_knobs)
            if knob not in _BY_KNOB:
                msg = (f"cannot set {knob}: LLaMA-Factory's config has no key this tool writes "
                       "for it; use a policy without that rung")
                raise CommandError(msg)
            changes[_BY_KNOB[knob].names[0]] = encode(_BY_KNOB[knob], getattr(knobs, knob))
        other_params = params_of(knobs) != params_of(current)
        resume = knobs.resume_from_checkpoint
        if other_params and is_inside(resume, current.output_dir or _DEFAULT_OUTPUT_DIR, command):
            resume = None  # a checkpoint of the command's own parameter set cannot start this one
        if resume != current.resume_from_checkpoint:
            changes["resume_from_checkpoint"] = resume
        ds = parsed.merged.get("deepspeed")
        if (knobs.deepspeed_stage, knobs.deepspeed_offload) != (current.deepspeed_stage,
                                                                current.deepspeed_offload):
            deepspeed.require_config(ds, "deepspeed_stage")
        ds_updates = deepspeed.changes(ds, command, current, knobs) if ds else {}
        if ds_updates and deepspeed.is_path(ds):
            target = folder / f"{prefix}{PurePath(str(ds)).name}"
            changes["deepspeed"] = str(deepspeed.write(str(ds), command, ds_updates, target))
        if not changes:
            return changes
        # Output-folder hygiene (see the module docstring).
        if parsed.merged.get("overwrite_output_dir") is not True:
            changes["overwrite_output_dir"] = True
        if other_params:
            changes["output_dir"] = output_dir_for(current.output_dir or _DEFAULT_OUTPUT_DIR,
                                                   knobs)
        return changes


def world_size(command: Command, invocation: Invocation) -> int:
    """Ranks LLaMA-Factory starts: its own torchrun under FORCE_TORCHRUN (launcher.py)."""
    env = environment(command)
    env.update(invocation.env_assignments)
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    forced = env.get("FORCE_TORCHRUN", "0").lower() in ("true", "y", "1")
    if not forced:
        # More than one visible device also makes LLaMA-Factory launch torchrun itself.
        return invocation.world_size * max(1, len(visible))
    nproc = env.get("NPROC_PER_NODE") or (str(len(visible)) if visible else "1")
    nnodes = env.get("NNODES", "1")
    if not (nproc.isdigit() and nnodes.isdigit()):
        msg = (f"NPROC_PER_NODE={nproc!r} / NNODES={nnodes!r} are not whole numbers; "
               "set them to the number of processes per node and of nodes")
        raise CommandError(msg)
    return invocation.world_size * int(nproc) * int(nnodes)
