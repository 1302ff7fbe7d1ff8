"""The argv-flags dialect: `--flag value`, `--flag=value` and bare booleans (HF / LLaMA-Factory)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from supervisor.command import Command, CommandError, Invocation, locate
from supervisor.dialects import deepspeed
from supervisor.dialects._config import is_inside, output_dir_for, params_of
from supervisor.knobs import KNOB_NAMES, FinetuningType, Knobs

_TRUE = frozenset({"true", "t", "yes", "y", "1"})
_FALSE = frozenset({"false", "f", "no", "n", "0"})


@dataclass(frozen=True, slots=True)
class Flag:
    """One knob's flag: its spellings (the first is the one added), codec, and inversion."""

    knob: str
    names: tuple[str, ...]
    codec: str  # "int" | "bool" | "str" | "finetuning_type"
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


_CUTOFF_NAMES = ("--cutoff_len", "--max_seq_length", "--max_length", "--block_size",
                 "--model_max_length", "--max_seq_len")

_COMMON = (
    Flag("per_device_batch", ("--per_device_train_batch_size", "--per-device-train-batch-size"),
         "int"),
    Flag("grad_accum", ("--gradient_accumulation_steps", "--gradient-accumulation-steps"), "int"),
    Flag("finetuning_type", ("--finetuning_type",), "finetuning_type"),
    Flag("lora_rank", ("--lora_rank", "--lora_r"), "int"),
    Flag("freeze_trainable_layers", ("--freeze_trainable_layers", "--num_layer_trainable"), "int"),
    Flag("quantization_bit", ("--quantization_bit",), "int"),
    Flag("max_steps", ("--max_steps", "--max-steps"), "int"),
    Flag("resume_from_checkpoint", ("--resume_from_checkpoint",), "str"),
    Flag("output_dir", ("--output_dir", "--output-dir"), "str"),
    # Not knobs: what the supervisor reads or sets besides them (DeepSpeed copies, hygiene).
    Flag("deepspeed", ("--deepspeed", "--deepspeed_config"), "str"),
)
_LF_EXTRA = (
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

_HF_DEFAULTS: dict[str, Any] = {
    # transformers.TrainingArguments defaults.
    "per_device_batch": 8, "grad_accum": 1, "gradient_checkpointing": False,
    "finetuning_type": FinetuningType.FULL, "cutoff_len": None, "max_steps": None,
}

PROFILES: tuple[Profile, ...] = (
    Profile(
        name="reference-trainer",
        programs=re.compile(r"^(supervisor\.reference_trainer|.*reference_trainer\.py)$"),
        flags=(*_COMMON, *_HF_GC,
               Flag("cutoff_len", ("--cutoff_len",), "int")),
        defaults={**_HF_DEFAULTS, "cutoff_len": 512, "max_steps": 4},
    ),
    Profile(
        # The seed's legacy entry point (LLaMA-Factory <= 0.6): cutoff_len defaulted to 1024.
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
                  "gradient_checkpointing": True, "cutoff_len": 2048},
        output_hygiene=True,
    ),
    Profile(
        name="huggingface",
        programs=re.compile(r".*"),
        flags=(*_COMMON, *_HF_GC, Flag("cutoff_len", _CUTOFF_NAMES, "int")),
        defaults=_HF_DEFAULTS,
        requires_flags=True,
    ),
)


@dataclass(frozen=True, slots=True)
class _Occurrence:
    flag: Flag
    name: str
    index: int  # argv index of the flag token
    form: str  # "eq" | "sep" | "bare"
    raw: str | None
    negated: bool = False  # `--no_gradient_checkpointing`


class ArgvDialect:
    """Reads and rewrites HF / LLaMA-Factory style command-line flags."""

    name = "argv"

    def read(self, command: Command) -> Knobs:
        """Knobs from the flags, with the program's documented defaults for absent ones."""
        invocation, profile, found = _scan(command.argv)
        values: dict[str, Any] = {k: v for k, v in profile.defaults.items() if v is not None}
        for occ in found:  # the last occurrence wins, as with argparse
            if occ.flag.knob in KNOB_NAMES:
                values[occ.flag.knob] = _decode(occ)
        if "per_device_batch" not in values:
            values["per_device_batch"] = 8
        config = _extras(found).get("deepspeed")
        values["deepspeed_stage"] = (deepspeed.stage(config, command)
                                     if deepspeed.is_path(config) else None)
        values["world_size"] = invocation.world_size
        try:
            return Knobs(**values)
        except TypeError as exc:  # pragma: no cover - a profile naming an unknown knob
            msg = f"dialect table error: {exc}"
            raise CommandError(msg) from None

    def render(self, command: Command, knobs: Knobs, workdir: Path) -> Command:
        """The command with each changed knob's flags rewritten in place or appended."""
        _, profile, found = _scan(command.argv)
        current = self.read(command)
        wanted: dict[str, Any] = {}
        for knob in current.diff(knobs):
            if knob in ("world_size", "output_dir", "deepspeed_stage"):
                continue  # read from the command, never rewritten (stage: in the DS copy)
            wanted[knob] = getattr(knobs, knob)
        extras = _extras(found)
        config = extras.get("deepspeed")
        if knobs.deepspeed_stage != current.deepspeed_stage:
            deepspeed.require_config(config, "deepspeed_stage")
        updates = deepspeed.changes(config, command, current, knobs) if config else {}
        if updates and deepspeed.is_path(config):
            target = workdir / Path(str(config)).name
            wanted["deepspeed"] = str(deepspeed.write(str(config), command, updates, target))
        if wanted and profile.output_hygiene:
            wanted.update(_hygiene(command, current, knobs, extras))
        argv = list(command.argv)
        removals: set[int] = set()
        appended: list[str] = []
        for knob, value in wanted.items():
            occurrences = [o for o in found if o.flag.knob == knob]
            if occurrences:
                for occ in occurrences:
                    _rewrite(argv, removals, occ, value, profile.defaults.get(knob))
                continue
            flag = next((f for f in profile.flags if f.knob == knob), None)
            if flag is None:
                msg = (f"cannot set {knob}={value!r}: the {profile.name} command line has no "
                       "flag for it; use a policy without that rung or declare the flag "
                       "with --knobs FILE (docs/dialects.md)")
                raise CommandError(msg)
            appended.extend(_encode_new(flag, value))
        rendered = [tok for i, tok in enumerate(argv) if i not in removals] + appended
        return dataclasses.replace(command, argv=tuple(rendered))

    def claims(self, command: Command) -> bool:
        """Any command whose program it can read (the fallback dialect)."""
        try:
            _scan(command.argv)
        except CommandError:
            return False
        return True

    def describe(self, command: Command) -> str:
        """Which program family the command was read as (and, for LLaMA-Factory, the cutoff)."""
        _, profile, found = _scan(command.argv)
        if not profile.output_hygiene:
            return f"argv ({profile.name})"
        from supervisor.dialects.llamafactory import cutoff_effect  # noqa: PLC0415 - one use

        return f"argv ({profile.name}; {cutoff_effect(_extras(found))})"

    def finalize(self, command: Command, knobs: Knobs, run_dir: Path) -> tuple[Path, ...]:  # noqa: ARG002
        """Flags live in argv: final-command.sh (written by the report) is the whole config."""
        return ()


_DEFAULT_OUTPUT_DIR = "trainer_output"


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
            # A checkpoint of the command's own parameter set cannot seed another one.
            out["resume_from_checkpoint"] = current.resume_from_checkpoint
    return out


def _scan(argv: tuple[str, ...]) -> tuple[Invocation, Profile, list[_Occurrence]]:
    invocation = locate(argv)
    program = invocation.program
    profile = next(p for p in PROFILES if p.programs.match(program)
                   or p.programs.match(PurePath(program).name))
    by_name: dict[str, Flag] = {n: f for f in profile.flags for n in f.names}
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
            negated = flag.codec == "bool"
            if not negated:
                flag = None
        if flag is None:
            i += 1
            continue
        if eq:
            found.append(_Occurrence(flag, name, i, "eq", raw, negated))
            i += 1
        elif flag.codec == "bool":
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
            found.append(_Occurrence(flag, name, i, "sep", argv[i + 1]))
            i += 2
    if profile.requires_flags and not any(o.flag.knob in KNOB_NAMES for o in found):
        names = ", ".join(f.names[0] for f in profile.flags[:3])
        msg = (f"found none of the memory flags this tool rewrites ({names}, ...) in the "
               f"arguments of {program!r}; add them to the command, declare where the script "
               "keeps them with --knobs FILE (docs/dialects.md), or force a reader with "
               "--dialect NAME")
        raise CommandError(msg)
    return invocation, profile, found


def _decode(occ: _Occurrence) -> Any:  # noqa: ANN401 - the knob's own type
    flag, raw = occ.flag, occ.raw
    if flag.codec == "bool":
        if raw is None:
            value = not occ.negated
        elif raw.lower() in _TRUE:
            value = True
        elif raw.lower() in _FALSE:
            value = False
        else:
            msg = f"{occ.name}={raw!r} is not a boolean; use true or false"
            raise CommandError(msg)
        return (not value) if flag.inverted else value
    assert raw is not None  # noqa: S101 - only booleans can be bare
    if flag.codec == "int":
        try:
            return int(raw)
        except ValueError:
            msg = f"{occ.name} {raw!r} is not a whole number; give e.g. `{occ.name} 4`"
            raise CommandError(msg) from None
    if flag.codec == "finetuning_type":
        try:
            return FinetuningType(raw)
        except ValueError:
            valid = ", ".join(t.value for t in FinetuningType)
            msg = f"{occ.name} {raw!r} is not a finetuning type; valid: {valid}"
            raise CommandError(msg) from None
    return raw


def _text(flag: Flag, value: Any) -> str:  # noqa: ANN401
    if flag.codec == "bool":
        return "true" if (not value if flag.inverted else value) else "false"
    return str(value)


def _rewrite(argv: list[str], removals: set[int], occ: _Occurrence,
             value: Any, default: Any) -> None:  # noqa: ANN401
    if value is None and occ.flag.codec != "bool":  # unset: drop the flag and its value
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
        bare_means = not occ.negated
        bare_knob = (not bare_means) if occ.flag.inverted else bare_means
        if bool(value) == bare_knob:
            return
        if default is not None and bool(default) == bool(value):
            removals.add(occ.index)
        else:
            argv[occ.index] = f"{occ.flag.names[0]}={_text(occ.flag, value)}"


def _encode_new(flag: Flag, value: Any) -> list[str]:  # noqa: ANN401
    if value is None:
        return []
    if flag.codec == "bool":
        flag_on = (not value) if flag.inverted else bool(value)
        # A bare switch works with argparse store_true scripts as well as HfArgumentParser.
        return [flag.names[0]] if flag_on else [flag.names[0], "false"]
    return [flag.names[0], str(value)]
