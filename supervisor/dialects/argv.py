"""The argv-flags dialect: `--flag value`, `--flag=value`, bare booleans (HF, LLaMA-Factory, TRL).

A command is read with the flag table of its program family (known by name), and, for a Python
script or module, with what the program's own `--help` says (supervisor.program): which flags it
accepts and their defaults. The program's word outranks its name: a `train_bash.py` whose help
lists `--gradient_checkpointing [GRADIENT_CHECKPOINTING] (default: False)` and no
`--disable_gradient_checkpointing` is a Hugging Face script, whatever LLaMA-Factory once called
its entry point. Render never adds a flag the program's help does not list.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, NoReturn

from supervisor._families import PEFT_DEFAULT, canonical_target
from supervisor.command import Command, CommandError, Invocation, locate
from supervisor.dialects import deepspeed
from supervisor.dialects._config import ConfigFile, is_inside, output_dir_for, params_of, resolve
from supervisor.dialects._read import (
    READ_ONLY,
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
from supervisor.knobs import KNOB_NAMES, FinetuningType, Knobs, Precision, Reading, Source
from supervisor.program import (
    HelpProbe,
    Option,
    ProgramHelp,
    find_program,
    probe_note,
    read_help,
    run_help,
)

_TRUE = frozenset({"true", "t", "yes", "y", "1"})
_FALSE = frozenset({"false", "f", "no", "n", "0"})


@dataclass(frozen=True, slots=True)
class Flag:
    """One knob's flag: its spellings (the first is the one added), codec, and inversion."""

    knob: str
    names: tuple[str, ...]
    codec: str  # "int" | "bool" | "str" | "finetuning_type" | "peft" (`--use_peft`: lora/full)
    # | "targets" (LoRA's module names: `--lora_target q_proj,v_proj`, nargs `q_proj v_proj`)
    inverted: bool = False  # `--disable_gradient_checkpointing` is True when the knob is False


@dataclass(frozen=True, slots=True)
class Profile:
    """A program family: how to recognise it, its flags and its documented defaults."""

    name: str
    programs: re.Pattern[str]
    flags: tuple[Flag, ...]
    defaults: dict[str, Any]
    requires_flags: bool = False
    """A program we know nothing about must name at least one knob, or we cannot read it."""
    output_hygiene: bool = False
    """LLaMA-Factory: changed attempts set overwrite_output_dir, and another parameter set
    writes to its own sibling folder (see the llamafactory dialect and docs/dialects.md)."""
    known: bool = True
    """Its defaults are documented for the family (else they are only assumed)."""
    appendable: frozenset[str] | None = None
    """Knobs whose flag may be added when the command lacks it (None: every flag's); without
    the program's `--help`, a generic script is trusted only with TrainingArguments' flags."""


_CUTOFF_NAMES = ("--cutoff_len", "--max_seq_length", "--max_length", "--block_size",
                 "--model_max_length", "--max_seq_len")

_COMMON = (
    Flag("per_device_batch", ("--per_device_train_batch_size", "--per-device-train-batch-size"),
         "int"),
    Flag("grad_accum", ("--gradient_accumulation_steps", "--gradient-accumulation-steps"), "int"),
    Flag("finetuning_type", ("--finetuning_type",), "finetuning_type"),
    Flag("lora_rank", ("--lora_rank", "--lora_r"), "int"),
    # LLaMA-Factory's comma-separated `--lora_target`, TRL's (and peft scripts') nargs
    # `--lora_target_modules`: read, never rewritten.
    Flag("lora_target", ("--lora_target", "--lora_target_modules", "--lora-target-modules"),
         "targets"),
    Flag("freeze_trainable_layers", ("--freeze_trainable_layers", "--num_layer_trainable"), "int"),
    Flag("quantization_bit", ("--quantization_bit",), "int"),
    Flag("max_steps", ("--max_steps", "--max-steps"), "int"),
    Flag("optimizer", ("--optim",), "str"),  # TrainingArguments.optim (LLaMA-Factory, TRL too)
    Flag("resume_from_checkpoint", ("--resume_from_checkpoint",), "str"),
    Flag("output_dir", ("--output_dir", "--output-dir"), "str"),
    Flag("model", ("--model_name_or_path", "--model-name-or-path"), "str"),
    # Not knobs: what the supervisor reads or sets besides them (DeepSpeed copies, hygiene,
    # and the settings precision and quantisation are derived from).
    Flag("deepspeed", ("--deepspeed", "--deepspeed_config"), "str"),
    Flag("bf16", ("--bf16",), "bool"),
    Flag("fp16", ("--fp16",), "bool"),
    Flag("load_in_4bit", ("--load_in_4bit", "--load-in-4bit"), "bool"),
    Flag("load_in_8bit", ("--load_in_8bit", "--load-in-8bit"), "bool"),
)
_LF_EXTRA = (
    Flag("pure_bf16", ("--pure_bf16",), "bool"),
    Flag("overwrite_output_dir", ("--overwrite_output_dir",), "bool"),
    Flag("stage", ("--stage",), "str"),
    Flag("packing", ("--packing",), "bool"),
    Flag("neat_packing", ("--neat_packing",), "bool"),
)
_HF_GC = (Flag("gradient_checkpointing", ("--gradient_checkpointing",
                                           "--activation_checkpointing"), "bool"),)
# LLaMA-Factory turns checkpointing on unless told `--disable_gradient_checkpointing`
# (hparams/model_args.py), so its flag is the inverse of the knob.
_LF_GC = (Flag("gradient_checkpointing", ("--disable_gradient_checkpointing",), "bool",
               inverted=True),)

_TRL = (
    # trl/trainer/sft_config.py (max_length; max_seq_length before TRL 0.16) and
    # trl/trainer/model_config.py (use_peft, lora_r, load_in_4bit/8bit, dtype / torch_dtype).
    Flag("cutoff_len", ("--max_length", "--max_seq_length", "--max-length"), "int"),
    Flag("finetuning_type", ("--use_peft", "--use-peft"), "peft"),
    Flag("lora_rank", ("--lora_r", "--lora-r"), "int"),
    Flag("dtype", ("--dtype", "--torch_dtype", "--torch-dtype"), "str"),
)

_HF_DEFAULTS: dict[str, Any] = {
    # transformers.TrainingArguments defaults (no bf16/fp16: fp32 training).
    "per_device_batch": 8, "grad_accum": 1, "gradient_checkpointing": False,
    "finetuning_type": FinetuningType.FULL, "cutoff_len": None, "max_steps": None,
    "bf16": False, "fp16": False, "quantization_bit": None,
}
_TRAINING_ARGS = frozenset({"per_device_batch", "grad_accum", "gradient_checkpointing",
                            "max_steps", "resume_from_checkpoint", "output_dir", "optimizer"})
"""Knobs whose flags every TrainingArguments script takes (HfArgumentParser)."""

PROFILES: tuple[Profile, ...] = (
    Profile(
        name="reference-trainer",
        programs=re.compile(r"^(supervisor\.reference_trainer|.*reference_trainer\.py)$"),
        flags=(*_COMMON, *_HF_GC,
               Flag("cutoff_len", ("--cutoff_len",), "int"),
               # The model loaded in bf16, trainable parameters upcast: bf16-base-mixed.
               Flag("load_in_bf16", ("--load_in_bf16",), "bool")),
        defaults={**_HF_DEFAULTS, "cutoff_len": 512, "max_steps": 4, "model": "tiny",
                  "load_in_bf16": False},
    ),
    Profile(
        # `trl sft --model_name_or_path M --use_peft --lora_r 16 ...`: SFTConfig turns
        # checkpointing and bf16 on by default and cuts samples at max_length 1024.
        name="trl",
        programs=re.compile(r"^(.*/)?trl$"),
        flags=(*(f for f in _COMMON if f.knob not in ("finetuning_type", "lora_rank",
                                                     "freeze_trainable_layers",
                                                     "quantization_bit")),
               *_HF_GC, *_TRL),
        defaults={**_HF_DEFAULTS, "gradient_checkpointing": True, "cutoff_len": 1024,
                  "bf16": True, "lora_rank": TRL_LORA_R, "lora_target": PEFT_DEFAULT},
    ),
    Profile(
        # LLaMA-Factory's legacy entry point (<= 0.6): cutoff_len defaulted to 1024.
        name="llamafactory-legacy",
        programs=re.compile(r"^(.*/)?train_bash\.py$"),
        flags=(*_COMMON, *_LF_GC, *_LF_EXTRA, Flag("cutoff_len", ("--cutoff_len",), "int")),
        defaults={**_HF_DEFAULTS, "finetuning_type": FinetuningType.LORA,
                  "gradient_checkpointing": True, "cutoff_len": 1024},
        output_hygiene=True,
    ),
    Profile(
        # llamafactory-cli train --flag value ... (hparams: finetuning_type lora, cutoff_len 2048).
        name="llamafactory",
        programs=re.compile(r"^(.*/)?(llamafactory-cli|lmf)$|^llamafactory(\..*)?$"),
        flags=(*_COMMON, *_LF_GC, *_LF_EXTRA, Flag("cutoff_len", ("--cutoff_len",), "int")),
        defaults={**_HF_DEFAULTS, "finetuning_type": FinetuningType.LORA,
                  "gradient_checkpointing": True, "cutoff_len": 2048,
                  "lora_target": None},  # `all`: every linear layer but the head
        output_hygiene=True,
    ),
    Profile(
        name="huggingface",
        programs=re.compile(r".*"),
        flags=(*_COMMON, *_HF_GC, Flag("cutoff_len", _CUTOFF_NAMES, "int")),
        defaults=_HF_DEFAULTS,
        requires_flags=True,
        known=False,
        appendable=_TRAINING_ARGS,
    ),
)

_ANY_FLAGS: tuple[Flag, ...] = (*_COMMON, *_LF_GC, *_HF_GC, *_LF_EXTRA, *_TRL,
                                Flag("cutoff_len", _CUTOFF_NAMES, "int"))
"""Every flag spelling any family uses: what a program's `--help` is matched against."""



@dataclass(frozen=True, slots=True)
class _Occurrence:
    flag: Flag
    name: str
    index: int  # argv index of the flag token
    form: str  # "eq" | "sep" | "bare"
    raw: str | None
    negated: bool = False  # `--no_gradient_checkpointing`


@dataclass(frozen=True, slots=True)
class _Scan:
    """One command as its program reads it: the family, the flag table, what argv says."""

    invocation: Invocation
    profile: Profile
    flags: tuple[Flag, ...]
    """The flags the program takes: the family's, or (asked) those its --help lists."""
    found: list[_Occurrence]
    help: ProgramHelp | None


class ArgvDialect:
    """Reads and rewrites HF / LLaMA-Factory / TRL style command-line flags."""

    name = "argv"
    _forced: Profile | None = None

    def __init__(self, *, probe: HelpProbe | None = run_help) -> None:
        self.probe = probe

    def read(self, command: Command) -> Knobs:
        """Knobs from the flags, with the program's own or its family's defaults."""
        return self.read_sourced(command).knobs

    def read_sourced(self, command: Command) -> Reading:
        """Knobs from the flags, where each came from, and which ones the program can take."""
        scan = self._scan(command)
        values = self._base(scan)
        _config_defaults(command, scan, values)
        for occ in scan.found:  # the last occurrence wins, as with argparse
            values.set(occ.flag.knob, _decode(occ), Source.COMMAND_LINE)
        if values.get("per_device_batch") is None:
            values.set("per_device_batch", 8, Source.ASSUMED)
        _derive(command, scan, values)
        read_env_knobs(command, values)
        return values.reading(rewritable=self._rewritable(scan), program=_said(scan, command),
                              refused=_refused(scan) | module_refusals(command))

    def accepts(self, command: Command, knob: str) -> bool:
        """True when the program takes a flag for `knob` (a rung on it can be rendered)."""
        return self.read_sourced(command).can_set(knob)

    def render(self, command: Command, knobs: Knobs, workdir: Path) -> Command:
        """The command with each changed knob's flags rewritten in place or appended."""
        command = with_env_knobs(command, knobs)
        scan = self._scan(command)
        reading = self.read_sourced(command)
        current = reading.knobs
        wanted: dict[str, Any] = {}
        for knob in to_write(reading, knobs):
            if knob in ("world_size", "output_dir", "deepspeed_stage", "deepspeed_offload",
                        "model", "precision"):
                continue  # read from the command, never rewritten (stage: in the DS copy)
            if knob == "quantization_bit" and not any(f.knob == knob for f in scan.flags):
                # TRL / HF-style scripts say it with switches: --load_in_4bit, --load_in_8bit.
                switches = _bit_switches(scan)
                if not switches:
                    _refuse(scan, knob, getattr(knobs, knob))
                on_argv = {o.flag.knob for o in scan.found}
                for bits, name in switches:
                    if knobs.quantization_bit == bits or name in on_argv:
                        wanted[name] = knobs.quantization_bit == bits
                continue
            wanted[knob] = getattr(knobs, knob)
        extras = _extras(scan.found)
        config = extras.get("deepspeed")
        if (knobs.deepspeed_stage, knobs.deepspeed_offload) != (current.deepspeed_stage,
                                                                current.deepspeed_offload):
            deepspeed.require_config(config, "deepspeed_stage")
        updates = deepspeed.changes(config, command, current, knobs) if config else {}
        if updates and deepspeed.is_path(config):
            target = workdir / Path(str(config)).name
            wanted["deepspeed"] = str(deepspeed.write(str(config), command, updates, target))
        if wanted and _hygiene_applies(scan):
            wanted.update(_hygiene(command, current, knobs, extras))
        argv = list(command.argv)
        removals: set[int] = set()
        appended: list[str] = []
        base = self._base(scan)
        for knob, value in wanted.items():
            # (A value the flag cannot say, freeze through --use_peft, fails in _on.)
            if (knob in KNOB_NAMES and knob != "output_dir" and not reading.can_set(knob)
                    and not any(o.flag.knob == knob for o in scan.found)):
                _refuse(scan, knob, value)
            occurrences = [o for o in scan.found if o.flag.knob == knob]
            if occurrences:
                for occ in occurrences:
                    _rewrite(argv, removals, occ, value, base.get(knob))
                continue
            flag = next((f for f in scan.flags if f.knob == knob), None)
            if flag is None:
                _refuse(scan, knob, value)
            appended.extend(_encode_new(flag, value, _option(scan, flag)))
        rendered = [tok for i, tok in enumerate(argv) if i not in removals] + appended
        return dataclasses.replace(command, argv=tuple(rendered))

    def claims(self, command: Command) -> bool:
        """Any command whose program it can read (the fallback dialect)."""
        try:
            self._scan(command)
        except CommandError:
            return False
        return True

    def describe(self, command: Command) -> str:
        """Which program family the command was read as (and, for LLaMA-Factory, the cutoff)."""
        scan = self._scan(command)
        asked = "; read from its --help" if scan.help is not None else ""
        if not _hygiene_applies(scan):
            return f"{self.name} ({_family(scan)}{asked})"
        from supervisor.dialects.llamafactory import cutoff_effect  # noqa: PLC0415 - one use

        return f"{self.name} ({_family(scan)}{asked}; {cutoff_effect(_extras(scan.found))})"

    def finalize(self, command: Command, knobs: Knobs, run_dir: Path) -> tuple[Path, ...]:  # noqa: ARG002
        """Flags live in argv: final-command.sh (written by the report) is the whole config."""
        return ()

    # -- internals ---------------------------------------------------------------------------

    def _scan(self, command: Command) -> _Scan:
        # Located once, and that one value asked (program.find_program): never read two ways.
        program = find_program(command)
        if program.invocation is None:
            raise CommandError(program.error)
        invocation = program.invocation
        profile = self._forced or _profile_for(invocation.program)
        help_ = read_help(program, self.probe) if _askable(profile) else None
        flags = _flag_table(profile, help_)
        found = _occurrences(command.argv, invocation, flags)
        if help_ is not None and not any(f.knob in KNOB_NAMES and f.knob not in READ_ONLY
                                         for f in flags):
            help_ = None  # the help names none of our flags: read it by family as before
            flags = profile.flags
            found = _occurrences(command.argv, invocation, flags)
        if (help_ is None and profile.requires_flags
                and not any(o.flag.knob in KNOB_NAMES and o.flag.knob not in READ_ONLY
                            for o in found)):
            names = ", ".join(f.names[0] for f in profile.flags[:3])
            msg = (f"found none of the memory flags this tool rewrites ({names}, ...) in the "
                   f"arguments of {invocation.program!r}; add them to the command, declare "
                   "where the script keeps them with --knobs FILE (docs/dialects.md), or "
                   "force a reader with --dialect NAME")
            raise CommandError(msg)
        return _Scan(invocation=invocation, profile=profile, flags=flags, found=found,
                     help=help_)

    def _base(self, scan: _Scan) -> Values:
        """What the program runs with before its command line says anything."""
        values = Values()
        profile = scan.profile
        if scan.help is None:
            values.defaults(_HF_DEFAULTS, Source.ASSUMED)
            values.defaults(profile.defaults,
                            Source.KNOWN_DEFAULT if profile.known else Source.ASSUMED)
            return values
        # Asked: the family's default holds only where the program takes the family's own
        # flag (same semantics); the program's printed default outranks it.
        values.defaults(_HF_DEFAULTS, Source.ASSUMED)
        own = {f.knob: f for f in profile.flags}
        for flag in scan.flags:
            family = own.get(flag.knob)
            if (profile.known and family is not None and flag.knob in profile.defaults
                    and _spelled(flag.names) <= _spelled(family.names)):
                values.set(flag.knob, profile.defaults[flag.knob], Source.KNOWN_DEFAULT)
            negatable = scan.help.accepts(f"--no_{flag.names[0].removeprefix('--')}")
            said = _help_default(flag, _option(scan, flag), negatable=negatable)
            if said is not _UNSAID:
                values.set(flag.knob, said, Source.PROGRAM)
        if (values.source("lora_rank") is Source.ASSUMED and scan.help.accepts("--use_peft")
                and scan.help.accepts("--lora_r")):
            # TRL's ModelConfig signature (--use_peft with --lora_r): its rank unless said.
            values.set("lora_rank", TRL_LORA_R, Source.KNOWN_DEFAULT)
        if values.source("lora_target") is Source.ASSUMED and scan.help.accepts("--use_peft"):
            # ModelConfig's target list is None unless said: peft's own for the model type.
            values.set("lora_target", PEFT_DEFAULT, Source.KNOWN_DEFAULT)
        return values

    def _rewritable(self, scan: _Scan) -> frozenset[str]:
        on_argv = {o.flag.knob for o in scan.found}
        if scan.help is None and scan.profile.appendable is not None:
            flagged = {f.knob for f in scan.flags} & scan.profile.appendable
        else:
            flagged = {f.knob for f in scan.flags}
        names = (flagged | on_argv) & set(KNOB_NAMES)
        if _bit_switches(scan) and (scan.help is not None or scan.profile.name == "trl"):
            names |= {"quantization_bit"}  # set through --load_in_4bit / --load_in_8bit
        if deepspeed.is_path(_extras(scan.found).get("deepspeed")):
            names |= {"deepspeed_stage", "deepspeed_offload"}
        return frozenset(names)


class TrlDialect(ArgvDialect):
    """`trl sft --model_name_or_path M --use_peft --lora_r N ...`: TRL's own CLI."""

    name = "trl"
    _forced = next(p for p in PROFILES if p.name == "trl")

    def claims(self, command: Command) -> bool:
        """The `trl` command line (TRL-style scripts are read by the argv dialect's --help)."""
        try:
            program = locate(command.argv).program
        except CommandError:
            return False
        return bool(self._forced and self._forced.programs.match(program))


_DEFAULT_OUTPUT_DIR = "trainer_output"
_UNSAID = object()


def _profile_for(program: str) -> Profile:
    return next(p for p in PROFILES if p.programs.match(program)
                or p.programs.match(PurePath(program).name))


def _askable(profile: Profile) -> bool:
    """Scripts and modules are asked for their --help; known CLIs are read by their tables."""
    return profile.name not in ("llamafactory", "trl")


def _family(scan: _Scan) -> str:
    """The family by name, or (asked) the kind of flags the program's help lists."""
    if scan.help is None or _same_family(scan):
        return scan.profile.name
    gc = next((f for f in scan.flags if f.knob == "gradient_checkpointing"), None)
    return "LLaMA-Factory flags" if gc is not None and gc.inverted else "Hugging Face flags"


def _same_family(scan: _Scan) -> bool:
    """The program takes its family's own flag for every knob both know (the name holds)."""
    own = {f.knob: f for f in scan.profile.flags}
    return scan.profile.known and all(
        _spelled(f.names) <= _spelled(own[f.knob].names) for f in scan.flags if f.knob in own)


def _hygiene_applies(scan: _Scan) -> bool:
    """LLaMA-Factory's output-folder care, where the program really is LLaMA-Factory."""
    if not scan.profile.output_hygiene:
        return False
    return scan.help is None or scan.help.accepts("--overwrite_output_dir")


def _said(scan: _Scan, command: Command) -> str | None:
    return scan.help.describe() if scan.help is not None else probe_note(command)


def _flag_table(profile: Profile, help_: ProgramHelp | None) -> tuple[Flag, ...]:
    """The flags the program takes: the family's first, then any family's, as its help lists."""
    if help_ is None:
        return tuple(_with_twins(f) for f in profile.flags)
    table: list[Flag] = []
    done: set[str] = set()
    for flag in (*profile.flags, *_ANY_FLAGS):
        if flag.knob in done:
            continue
        names = tuple(n for n in flag.names if help_.accepts(n))
        # Every spelling the help lists for the same option reads alike (HfArgumentParser
        # lists `--activation-checkpointing` beside `--activation_checkpointing`).
        listed = (o for n in names if (o := help_.option(n)) is not None)
        names = tuple(dict.fromkeys((*names, *(a for o in listed for a in o.names
                                                if a.startswith("--")))))
        # The name a rung writes is the first: the current one where the program lists both
        # (transformers 5: --gradient_checkpointing is a deprecated alias, gone in v6).
        names = tuple(sorted(names, key=lambda n: n in _DEPRECATED_NAMES))
        if names:
            table.append(dataclasses.replace(flag, names=names))
            done.add(flag.knob)
    return tuple(table)


def _spelled(names: tuple[str, ...]) -> frozenset[str]:
    """Flag names with dashes and underscores read alike (`--lora-r` is `--lora_r`)."""
    return frozenset("--" + n[2:].replace("-", "_") if n.startswith("--") else n for n in names)


def _with_twins(flag: Flag) -> Flag:
    """The flag with the dashed twin of each underscored spelling (`--lora-r` for `--lora_r`),
    as HfArgumentParser accepts both; the first spelling (the one written) stays first."""
    twins = tuple(n.replace("_", "-") for n in flag.names if n.startswith("--") and "_" in n)
    return dataclasses.replace(flag, names=tuple(dict.fromkeys((*flag.names, *twins))))


_DEPRECATED_NAMES = frozenset({"--gradient_checkpointing", "--gradient-checkpointing"})
"""Flags with a current spelling beside them: transformers 5's TrainingArguments documents
`gradient_checkpointing` as "Deprecated alias of `activation_checkpointing`, will be removed
in v6" (training_args.py); without --help the old name stays first, as transformers 4 takes
only it."""


def _option(scan: _Scan, flag: Flag) -> Option | None:
    return scan.help.option(flag.names[0]) if scan.help is not None else None


def _help_default(flag: Flag, option: Option | None, *, negatable: bool = False) -> object:
    """The knob's value when the flag is absent, as the program's help says (or _UNSAID)."""
    if option is None:
        return _UNSAID
    if option.takes == "none" and flag.codec in ("bool", "peft"):
        value: object = False  # a bare switch: store_true
    elif option.default is None and flag.codec in ("bool", "peft") and negatable:
        value = True  # HfArgumentParser adds `--no_X` only for a field that defaults to True
    elif option.default is None:
        return _UNSAID
    else:
        text = option.default
        if text == "None" and flag.codec == "bool":
            # `bool | None = None` (transformers 5's activation_checkpointing and its alias):
            # unset, which TrainingArguments.__post_init__ resolves to False.
            return flag.inverted
        if text == "None" and flag.codec == "targets":
            return PEFT_DEFAULT  # no list handed to peft: its own for the model type
        if text == "None":
            return None
        try:
            value = _decode(_Occurrence(flag, flag.names[0], -1, "sep", text))
        except CommandError:
            return _UNSAID
        return value
    if flag.codec == "peft":
        return FinetuningType.FULL
    return (not value) if flag.inverted else value


def _derive(command: Command, scan: _Scan, values: Values) -> None:
    """Precision, quantisation, model path, DeepSpeed and world size from what was read."""
    # LLaMA-Factory loads the model in its compute dtype (bf16: true -> a bf16 base); a
    # Hugging Face script's --bf16 is autocast over the weights as loaded.
    lf = _family(scan) in ("llamafactory", "llamafactory-legacy", "LLaMA-Factory flags")
    precision, source = precision_of(values, loads_in_half=lf)
    if values.get("load_in_bf16") is True:  # the reference trainer's LLaMA-Factory-style bf16
        precision, source = Precision.BF16_BASE_MIXED.value, values.source("load_in_bf16")
    values.set("precision", precision, source)
    for bits, name in ((4, "load_in_4bit"), (8, "load_in_8bit")):
        if values.get(name) is True:
            values.set("quantization_bit", bits, values.source(name))
    if values.get("model") is not None:
        values.set("model", model_path(command, values.get("model")), values.source("model"))
    config = _extras(scan.found).get("deepspeed")
    on_file = deepspeed.is_path(config)
    ds_source = Source.CONFIG_FILE if on_file else (
        Source.ASSUMED if "accelerate launch" in scan.invocation.launchers
        else Source.COMMAND_LINE)
    values.set("deepspeed_stage", deepspeed.stage(config, command) if on_file else None,
               ds_source)
    values.set("deepspeed_offload", deepspeed.offload(config, command) if on_file else None,
               ds_source)
    values.set("world_size", scan.invocation.world_size, world_source(scan.invocation))
    for name in list(values.values):
        if name not in KNOB_NAMES:
            del values.values[name]


def _config_defaults(command: Command, scan: _Scan, values: Values) -> None:
    """TRL's `--config cfg.yaml`: its keys are defaults the command line overrides (TrlParser)."""
    if scan.profile.name != "trl":
        return
    argv, start = command.argv, scan.invocation.args_start
    path = next((argv[i + 1] for i in range(start, len(argv) - 1) if argv[i] == "--config"),
                None)
    path = path or next((a.partition("=")[2] for a in argv[start:]
                         if a.startswith("--config=")), None)
    if not path:
        return
    data = ConfigFile.load(resolve(command, path), what="TRL config").data
    for flag in scan.flags:
        key = next((k for n in flag.names if (k := n.removeprefix("--")) in data), None)
        if key is not None and data[key] is not None:
            raw = data[key]
            text = str(raw).lower() if isinstance(raw, bool) else (
                ",".join(map(str, raw)) if isinstance(raw, list) else str(raw))
            values.set(flag.knob, _decode(_Occurrence(flag, key, -1, "sep", text)),
                       Source.CONFIG_FILE)


def _refused(scan: _Scan) -> frozenset[tuple[str, str]]:
    refused: set[tuple[str, str]] = set()
    flag = next((f for f in scan.flags if f.knob == "finetuning_type"), None)
    if flag is not None and flag.codec == "peft":
        refused.add(("finetuning_type", FinetuningType.FREEZE.value))
    switches = _bit_switches(scan)
    if switches and not any(f.knob == "quantization_bit" for f in scan.flags):
        refused |= {("quantization_bit", str(bits)) for bits in (4, 8)
                    if bits not in dict(switches)}
    return frozenset(refused)


def _bit_switches(scan: _Scan) -> tuple[tuple[int, str], ...]:
    """(bits, flag knob) for the quantisation switches the program takes (TRL's ModelConfig)."""
    have = {f.knob for f in scan.flags}
    return tuple((bits, name) for bits, name in ((4, "load_in_4bit"), (8, "load_in_8bit"))
                 if name in have)


def _refuse(scan: _Scan, knob: str, value: object) -> NoReturn:
    said = "its --help lists no flag" if scan.help is not None else "the command line has no flag"
    msg = (f"cannot set {knob}={_show(value)}: {said} for it ({scan.invocation.program}, read "
           f"as {_family(scan)}); use a policy without that rung or declare the flag with "
           "--knobs FILE (docs/dialects.md)")
    raise CommandError(msg)


def _show(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(value.value if isinstance(value, FinetuningType) else value)


def _extras(found: list[_Occurrence]) -> dict[str, Any]:
    """The last value of each non-knob flag (deepspeed, overwrite_output_dir, packing ...)."""
    return {occ.flag.knob: _decode(occ) for occ in found if occ.flag.knob not in KNOB_NAMES}


def _hygiene(command: Command, current: Knobs, knobs: Knobs,
             extras: dict[str, Any]) -> dict[str, Any]:
    """LLaMA-Factory's output folder: no auto-resume, no other parameter set's leftovers."""
    out: dict[str, Any] = {}
    if extras.get("overwrite_output_dir") is not True:
        out["overwrite_output_dir"] = True
    if params_of(knobs) != params_of(current):
        base = current.output_dir or _DEFAULT_OUTPUT_DIR
        out["output_dir"] = output_dir_for(base, knobs)
        if is_inside(knobs.resume_from_checkpoint, base, command):
            # A checkpoint of the command's own parameter set cannot start another one.
            out["resume_from_checkpoint"] = current.resume_from_checkpoint
    return out


def _occurrences(argv: tuple[str, ...], invocation: Invocation,
                 flags: tuple[Flag, ...]) -> list[_Occurrence]:
    by_name: dict[str, Flag] = {n: f for f in flags for n in f.names}
    found: list[_Occurrence] = []
    i = invocation.args_start
    while i < len(argv):
        token = argv[i]
        if token == "--":
            break
        name, eq, raw = token.partition("=")
        negated = False
        flag = by_name.get(name)
        if flag is None and name.startswith("--no_") and f"--{name[5:]}" in by_name:
            flag = by_name[f"--{name[5:]}"]
            negated = flag.codec in ("bool", "peft")
            if not negated:
                flag = None
        if flag is None:
            i += 1
            continue
        if eq:
            found.append(_Occurrence(flag, name, i, "eq", raw, negated))
            i += 1
        elif flag.codec in ("bool", "peft"):
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if not negated and nxt is not None and nxt.lower() in _TRUE | _FALSE:
                found.append(_Occurrence(flag, name, i, "sep", nxt))
                i += 2
            else:
                found.append(_Occurrence(flag, name, i, "bare", None, negated))
                i += 1
        else:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                msg = f"{name} has no value after it; give one, e.g. `{name} 4`"
                raise CommandError(msg)
            end = i + 2
            if flag.codec == "targets":  # nargs: every value up to the next option
                while end < len(argv) and not argv[end].startswith("-"):
                    end += 1
            found.append(_Occurrence(flag, name, i, "sep", " ".join(argv[i + 1:end])))
            i = end
    return found


def _decode(occ: _Occurrence) -> Any:  # noqa: ANN401 - the knob's own type
    flag, raw = occ.flag, occ.raw
    if flag.codec in ("bool", "peft"):
        if raw is None:
            value = not occ.negated
        elif raw.lower() in _TRUE:
            value = True
        elif raw.lower() in _FALSE:
            value = False
        else:
            msg = f"{occ.name}={raw!r} is not a boolean; use true or false"
            raise CommandError(msg)
        if flag.codec == "peft":
            return FinetuningType.LORA if value else FinetuningType.FULL
        return (not value) if flag.inverted else value
    assert raw is not None  # noqa: S101 - only booleans can be bare
    if flag.codec == "int":
        try:
            return int(raw)
        except ValueError:
            msg = f"{occ.name} {raw!r} is not a whole number; give e.g. `{occ.name} 4`"
            raise CommandError(msg) from None
    if flag.codec == "targets":
        return canonical_target(raw)
    if flag.codec == "finetuning_type":
        try:
            return FinetuningType(raw)
        except ValueError:
            valid = ", ".join(t.value for t in FinetuningType)
            msg = f"{occ.name} {raw!r} is not a finetuning type; valid: {valid}"
            raise CommandError(msg) from None
    return raw


def _on(flag: Flag, value: Any) -> bool:  # noqa: ANN401
    """Whether a boolean flag is on for the knob's value (inverted flags, `--use_peft`)."""
    if flag.codec == "peft":
        if value not in (FinetuningType.LORA, FinetuningType.FULL):
            msg = (f"cannot set finetuning_type={_show(value)} through {flag.names[0]}: it "
                   "gives LoRA (on) or full fine-tuning (off); use a policy without that rung")
            raise CommandError(msg)
        return value is FinetuningType.LORA
    return (not value) if flag.inverted else bool(value)


def _text(flag: Flag, value: Any) -> str:  # noqa: ANN401
    if flag.codec in ("bool", "peft"):
        return "true" if _on(flag, value) else "false"
    return str(value)


def _rewrite(argv: list[str], removals: set[int], occ: _Occurrence,
             value: Any, default: Any) -> None:  # noqa: ANN401
    boolean = occ.flag.codec in ("bool", "peft")
    if value is None and not boolean:  # unset: drop the flag and its value
        removals.add(occ.index)
        if occ.form == "sep":
            removals.add(occ.index + 1)
        return
    if occ.form == "eq":
        argv[occ.index] = f"{occ.name}={_text(occ.flag, value)}"
    elif occ.form == "sep":
        argv[occ.index + 1] = _text(occ.flag, value)
    else:
        # A bare switch means its own "on"; for the other value drop it when the
        # program's default gives that value (store_true scripts take no `=false`).
        if _on(occ.flag, value) != occ.negated:
            return
        if default is not None and _on(occ.flag, default) == _on(occ.flag, value):
            removals.add(occ.index)
        else:
            argv[occ.index] = f"{occ.flag.names[0]}={_text(occ.flag, value)}"


def _encode_new(flag: Flag, value: Any, option: Option | None) -> list[str]:  # noqa: ANN401
    if value is None:
        return []
    if flag.codec in ("bool", "peft"):
        if _on(flag, value):
            # A bare switch works with argparse store_true scripts as well as HfArgumentParser.
            return [flag.names[0]]
        if option is not None and option.takes == "none":
            msg = (f"cannot turn {flag.names[0]} off: the program takes it only as a bare "
                   "switch (store_true); remove it from the command instead")
            raise CommandError(msg)
        return [flag.names[0], "false"]
    return [flag.names[0], str(value)]
