"""What the config-file dialects share: key tables, value codecs, YAML/JSON round trips.

A dialect names each knob's key(s) in a `Key` table; `decode` turns what the file (or a
`key=value` override) says into the knob's value and `encode` turns a knob's value back into
what the file says. YAML goes through ruamel.yaml's round-trip mode so comments, key order and
quoting survive a rewrite.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from supervisor._families import canonical_target
from supervisor.command import Command, CommandError
from supervisor.files import write_failed, write_file
from supervisor.knobs import FinetuningType, Knobs
from supervisor.secrets import private_copy, redact_config
from supervisor.text import bounded

_TRUE = frozenset({"true", "t", "yes", "y", "1", "on"})
_FALSE = frozenset({"false", "f", "no", "n", "0", "off"})
YAML_SUFFIXES = (".yaml", ".yml")
CONFIG_SUFFIXES = (*YAML_SUFFIXES, ".json")


@dataclass(frozen=True, slots=True)
class Key:
    """One knob's config key: its spellings (the first is written when absent), codec, inversion."""

    knob: str
    names: tuple[str, ...]
    codec: str  # "int" | "bool" | "str" | "finetuning_type" | "steps" (-1 means unset)
    # | "targets" (LoRA's module names: `q_proj,v_proj` or a list; `all`)
    inverted: bool = False  # `disable_gradient_checkpointing: true` is the knob False


def decode(key: Key, name: str, value: object, where: str) -> Any:  # noqa: ANN401 - the knob's type
    """The knob's value from what `where` says under `name`; one CommandError line if it cannot."""
    if key.codec == "bool":
        flag = _bool(value)
        if flag is None:
            msg = f"{where}: {name}: {bounded(value)} is not a boolean; use true or false"
            raise CommandError(msg)
        return (not flag) if key.inverted else flag
    if value is None:
        return None
    if key.codec in ("int", "steps"):
        number = _int(value)
        if number is None:
            msg = f"{where}: {name}: {bounded(value)} is not a whole number; give e.g. `{name}: 4`"
            raise CommandError(msg)
        return None if key.codec == "steps" and number < 0 else number
    if key.codec == "targets":
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return canonical_target([str(v) for v in value])
        if not isinstance(value, str):
            msg = (f"{where}: {name}: {bounded(value)} is not a list of module names; give "
                   f"e.g. `{name}: q_proj,v_proj`")
            raise CommandError(msg)
        return canonical_target(value)
    if key.codec == "finetuning_type":
        try:
            return FinetuningType(str(value))
        except ValueError:
            valid = ", ".join(t.value for t in FinetuningType)
            msg = (f"{where}: {name}: {bounded(value)} is not a finetuning type this tool can step "
                   f"down from; valid: {valid}")
            raise CommandError(msg) from None
    return str(value)


def encode(key: Key, value: object) -> object:
    """What the file says for the knob's value (typed: YAML and JSON keep ints and booleans)."""
    if key.codec == "bool":
        return (not value) if key.inverted else bool(value)
    if key.codec == "steps" and value is None:
        return -1
    if isinstance(value, FinetuningType):
        return value.value
    return value


def _bool(value: object) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str | int) and str(value).lower() in _TRUE | _FALSE:
        return str(value).lower() in _TRUE
    return None


def _int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return None
    return None


def parse_scalar(text: str) -> object:
    """A `key=value` override's value as OmegaConf reads it: a YAML scalar (`4`, `true`, `null`)."""
    try:
        # Round-trip mode keeps a float's spelling (`5.0e-5`) for when it is written back.
        value = YAML().load(text)
    except YAMLError:
        return text
    return value if isinstance(value, str | int | float | bool) or value is None else text


def format_scalar(value: object) -> str:
    """The text of a `key=value` override that parses back to `value`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    if isinstance(value, str) and parse_scalar(text) != value:
        return json.dumps(value)  # a double-quoted YAML scalar
    return text


def lookup(data: Mapping[str, Any], dotted: str) -> tuple[bool, object]:
    """(found, value) of a dotted key (`training.batch_size`) in nested mappings."""
    node: object = data
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def assign(data: MutableMapping[str, Any], dotted: str, value: object) -> None:
    """Set a dotted key, creating the mappings on its way (appended at the end of each)."""
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, MutableMapping):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


# --- files -------------------------------------------------------------------------------------


def resolve(command: Command, text: str) -> Path:
    """A path as the command sees it: relative paths start in the command's directory."""
    path = Path(text).expanduser()
    if not path.is_absolute() and command.cwd:
        path = Path(command.cwd) / path
    return path


def _round_trip_yaml(text: str) -> YAML:
    """A round-trip YAML whose indentation reproduces `text` where any common style does."""
    styles = ((2, 2, 0), (2, 4, 2), (4, 4, 2), (4, 6, 4), (4, 4, 0))
    for mapping, sequence, offset in styles:
        yaml = _yaml(mapping, sequence, offset)
        try:
            if dump(yaml, yaml.load(text)) == text:
                return yaml
        except YAMLError:
            break
    return _yaml(2, 4, 2)


def _yaml(mapping: int, sequence: int, offset: int) -> YAML:
    yaml = YAML()  # round-trip: comments, order and quotes survive
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap a user's long line
    yaml.indent(mapping=mapping, sequence=sequence, offset=offset)
    return yaml


def dump(yaml: YAML, data: object) -> str:
    """YAML text of `data`, written the way `yaml` read it."""
    out = io.StringIO()
    yaml.dump(data, out)
    return out.getvalue()


@dataclass(slots=True)
class ConfigFile:
    """A YAML or JSON config loaded for reading and for writing back in its own style."""

    path: Path
    text: str
    data: MutableMapping[str, Any]
    yaml: YAML | None  # None: JSON

    @classmethod
    def load(cls, path: Path, *, what: str) -> ConfigFile:
        """Read `path`; any failure is one CommandError line saying which file and why."""
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            msg = f"cannot read the {what} {path}: {exc.strerror or exc}; check the path"
            raise CommandError(msg) from None
        except UnicodeDecodeError:
            msg = f"{path} is not a UTF-8 text file (binary?); give the {what} as YAML or JSON"
            raise CommandError(msg) from None
        if path.suffix.lower() == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                msg = f"{path} is not valid JSON ({exc.msg}, line {exc.lineno}); fix the {what}"
                raise CommandError(msg) from None
            except RecursionError:
                msg = f"{path} is nested too deeply to be a {what}"
                raise CommandError(msg) from None
            yaml = None
        else:
            try:
                yaml = _round_trip_yaml(text)
                data = yaml.load(text)
            except YAMLError as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else "syntax error"
                msg = f"{path} is not valid YAML ({first}); fix the {what}"
                raise CommandError(msg) from None
            except RecursionError:
                msg = f"{path} is nested too deeply to be a {what}"
                raise CommandError(msg) from None
        if data is None:
            data = {}
        if not isinstance(data, MutableMapping):
            msg = (f"{path} must hold a mapping of keys to values; it holds "
                   f"{_kind_of(data)}; fix the {what}")
            raise CommandError(msg)
        return cls(path=path, text=text, data=data, yaml=yaml)

    def render(self, changes: Mapping[str, object]) -> str:
        """The file's text with each (dotted) key set; untouched keys keep their bytes."""
        if not changes:
            return self.text
        if self.yaml is None:
            data = json.loads(self.text)
            for key, value in changes.items():
                assign(data, key, value)
            return json.dumps(data, indent=_json_indent(self.text)) + "\n"
        data = self.yaml.load(self.text)  # a fresh copy: self.data stays as read
        for key, value in changes.items():
            assign(data, key, value)
        return dump(self.yaml, data)

    def write_copy(self, changes: Mapping[str, object], target: Path, *,
                   private: bool = True) -> Path:
        """Write the rendered text to `target` (its folder is created); return what to read.

        `target` never holds a secret: one found in the text (a `hub_token:` key, a token by
        its shape) is a placeholder there, and the real text goes to a private 0600 copy
        outside the run folder, whose path is returned for the command to read (none is
        written when `private` is false, e.g. for final.yaml).
        """
        text = self.render(changes)
        shown = redact_config(text, json_text=self.yaml is None)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_failed(target, exc) from None
        write_file(target, shown)
        if shown == text or not private:
            return target
        return private_copy(target, text)


def _json_indent(text: str) -> int | None:
    for line in text.splitlines()[1:]:
        stripped = line.lstrip(" ")
        if stripped:
            return len(line) - len(stripped) or None
    return None


# --- output folders ----------------------------------------------------------------------------


def params_of(knobs: Knobs) -> tuple[object, ...]:
    """What decides which parameters train: a checkpoint of one set cannot start another."""
    if knobs.finetuning_type is FinetuningType.LORA:
        return (knobs.finetuning_type, knobs.lora_rank, knobs.quantization_bit)
    if knobs.finetuning_type is FinetuningType.FREEZE:
        return (knobs.finetuning_type, knobs.freeze_trainable_layers)
    return (knobs.finetuning_type,)


def params_tag(knobs: Knobs) -> str:
    """A folder-name tag for the parameter set: `full`, `lora-r8`, `freeze-2`."""
    if knobs.finetuning_type is FinetuningType.LORA:
        return f"lora-r{knobs.lora_rank}"
    if knobs.finetuning_type is FinetuningType.FREEZE:
        return f"freeze-{knobs.freeze_trainable_layers}"
    return str(knobs.finetuning_type)


def output_dir_for(output_dir: str, knobs: Knobs) -> str:
    """The sibling folder an attempt with another parameter set writes to: `saves/x-lora-r8`."""
    trimmed = output_dir.rstrip("/") or output_dir
    return f"{trimmed}-{params_tag(knobs)}"


def is_inside(path: str | None, folder: str | None, command: Command) -> bool:
    """True when `path` lies in `folder` (both as the command's directory resolves them)."""
    if not path or not folder:
        return False
    inner, outer = resolve(command, path).resolve(), resolve(command, folder).resolve()
    return inner == outer or outer in inner.parents


def suffix_of(token: str) -> str:
    """The lower-case suffix of a path token (`.yaml`, `.json`, ...)."""
    return PurePath(token).suffix.lower()


def _kind_of(data: object) -> str:
    """What a config file holds, in words (ruamel's CommentedSeq is a list to the user)."""
    if isinstance(data, (list, tuple)):
        return "a list"
    if isinstance(data, str):
        return "a single string"
    if isinstance(data, bool):
        return "a single true/false"
    if isinstance(data, (int, float)):
        return "a single number"
    return f"a {type(data).__name__}"
