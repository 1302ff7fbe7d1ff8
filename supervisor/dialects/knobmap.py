"""A knob map the user declares in TOML, for any script the built-in dialects cannot read.

```toml
name = "my-trainer"            # a label, shown in the journal and report
program = "train.py"           # optional: the script (or -m module) this map is for
config = "--config"            # optional: the flag whose value is the YAML/JSON file that
                               # `key = ...` entries live in ("positional": the first argument)

[knobs.per_device_batch]
flag = "--bs"                  # where the knob lives: flag, key (dotted, in the config) or env
default = 8                    # the script's default when the command does not say
[knobs.gradient_checkpointing]
flag = "--no-gc"
format = "presence"            # number | text | true/false | 1/0 | presence
inverted = true                # the flag says the opposite of the knob
[knobs.cutoff_len]
env = "SEQ_LEN"
```

Flags render in the command's own syntax (`--bs 4` stays separate, `--bs=4` stays joined),
config keys in a rewritten copy of the file per attempt, environment variables as `env NAME=V`
in front of the command.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from supervisor._compat import tomllib
from supervisor.command import (
    Command,
    CommandError,
    Invocation,
    environment,
    locate,
    locate_command,
)
from supervisor.dialects._config import ConfigFile, lookup, resolve
from supervisor.dialects._read import (
    Values,
    model_path,
    module_refusals,
    read_env_knobs,
    with_env_knobs,
    world_source,
)
from supervisor.knobs import KNOB_NAMES, KNOB_TYPES, FinetuningType, Knobs, Reading, Source

FORMATS = ("number", "text", "true/false", "1/0", "presence")
_READ_ONLY = ("world_size",)
_TRUE_WORDS = frozenset({"true", "1", "yes", "y", "on"})
_FALSE_WORDS = frozenset({"false", "0", "no", "n", "off"})


@dataclass(frozen=True, slots=True, kw_only=True)
class Place:
    """Where one knob lives and how its value is written."""

    knob: str
    flag: str | None = None
    key: str | None = None
    env: str | None = None
    format: str = "number"
    inverted: bool = False
    default: object = None


@dataclass(frozen=True, slots=True, kw_only=True)
class _Hit:
    index: int
    joined: bool  # `--flag=value`
    raw: str | None  # None: a bare switch


def load(path: Path) -> KnobMapDialect:
    """The dialect a knob-map TOML file declares (a policy's `[dialect]` table works too)."""
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        msg = f"cannot read the knob map {path}: {exc.strerror or exc}; check the path"
        raise CommandError(msg) from None
    except (UnicodeDecodeError, RecursionError):
        msg = f"{path}: not a text TOML file (binary or nested too deeply); fix the knob map"
        raise CommandError(msg) from None
    except (tomllib.TOMLDecodeError, ValueError) as exc:  # a 5000-digit int is a ValueError
        msg = f"{path}: not valid TOML ({exc}); fix the knob map"
        raise CommandError(msg) from None
    table = data.get("dialect", data)
    if not isinstance(table, Mapping):
        msg = f"{path}: [dialect] must be a table"
        raise CommandError(msg)
    return from_table(table, source=str(path))


def from_table(table: Mapping[str, Any], *, source: str) -> KnobMapDialect:
    """Check a knob-map table and build its dialect; every mistake names the file and the key."""
    knobs_table = table.get("knobs")
    if not isinstance(knobs_table, Mapping) or not knobs_table:
        msg = (f"{source}: no [knobs.NAME] tables; declare at least one, e.g. "
               '[knobs.per_device_batch] flag = "--batch-size"')
        raise CommandError(msg)
    unknown = sorted(set(table) - {"name", "program", "config", "knobs"})
    if unknown:
        msg = f"{source}: unknown key(s) {', '.join(unknown)}; valid: name, program, config, knobs"
        raise CommandError(msg)
    for key in ("name", "program", "config"):
        if table.get(key) is not None and not isinstance(table[key], str):
            msg = (f'{source}: {key} must be one string (e.g. {key} = "train.py"), not '
                   f"{type(table[key]).__name__} {str(table[key])[:60]}")
            raise CommandError(msg)
    places = tuple(_place(name, spec, source) for name, spec in knobs_table.items())
    homes: dict[str, str] = {}
    for place in places:
        home = _where(place)
        if home in homes:
            msg = (f"{source}: [knobs.{homes[home]}] and [knobs.{place.knob}] both live at "
                   f"{home}; each knob needs its own flag, key or variable")
            raise CommandError(msg)
        homes[home] = place.knob
    if any(p.key for p in places) and not table.get("config"):
        msg = (f"{source}: a knob lives at a config `key` but no `config` says which argument "
               'names the file; add e.g. config = "--config" (or "positional")')
        raise CommandError(msg)
    return KnobMapDialect(label=str(table.get("name", PurePath(source).stem)),
                          program=_str_or_none(table.get("program")),
                          config=_str_or_none(table.get("config")), places=places,
                          source=source)


def _place(name: str, spec: object, source: str) -> Place:
    where = f"{source}: [knobs.{name}]"
    if name not in KNOB_NAMES or name in _READ_ONLY:
        valid = ", ".join(k for k in KNOB_NAMES if k not in _READ_ONLY)
        msg = f"{where}: unknown knob {name!r}; valid: {valid}"
        raise CommandError(msg)
    if not isinstance(spec, Mapping):
        msg = f"{where} must be a table with flag, key or env"
        raise CommandError(msg)
    unknown = sorted(set(spec) - {"flag", "key", "env", "format", "inverted", "default"})
    if unknown:
        msg = (f"{where}: unknown setting(s) {', '.join(unknown)}; valid: flag, key, env, "
               "format, inverted, default")
        raise CommandError(msg)
    homes = [k for k in ("flag", "key", "env") if spec.get(k)]
    if len(homes) != 1:
        msg = f"{where}: give exactly one of flag, key or env (found {', '.join(homes) or 'none'})"
        raise CommandError(msg)
    kind = KNOB_TYPES[name]
    fmt = str(spec.get("format", "true/false" if kind == "bool" else
                       "number" if kind == "int" else "text"))
    if fmt not in FORMATS:
        msg = f"{where}: unknown format {fmt!r}; valid: {', '.join(FORMATS)}"
        raise CommandError(msg)
    if (kind == "bool") != (fmt in ("true/false", "1/0", "presence")):
        msg = (f"{where}: format {fmt!r} does not fit a {kind} knob; use "
               + ("true/false, 1/0 or presence" if kind == "bool" else "number or text"))
        raise CommandError(msg)
    if fmt == "presence" and not spec.get("flag"):
        msg = f"{where}: format 'presence' needs a flag (a switch that is there or not)"
        raise CommandError(msg)
    flag = spec.get("flag")
    if flag is not None and not str(flag).startswith("-"):
        msg = f"{where}: flag {flag!r} must start with '-'"
        raise CommandError(msg)
    inverted = spec.get("inverted", False)
    if not isinstance(inverted, bool):
        msg = f"{where}: inverted must be true or false (no quotes), not {inverted!r}"
        raise CommandError(msg)
    place = Place(knob=name, flag=_str_or_none(flag), key=_str_or_none(spec.get("key")),
                  env=_str_or_none(spec.get("env")), format=fmt, inverted=inverted,
                  default=spec.get("default"))
    default = spec.get("default")
    if default is not None:
        expected = {"int": int, "bool": bool}.get(kind)
        if expected is not None and (type(default) is not expected):
            msg = (f"{where}: default {default!r} is not a {kind} value; write it without "
                   f"quotes, e.g. default = {'8' if kind == 'int' else 'false'}")
            raise CommandError(msg)
        _decode(place, default, source)  # a finetuning type must be one this tool knows
    return place


def _str_or_none(value: object) -> str | None:
    return None if value is None else str(value)


class KnobMapDialect:
    """Reads and renders the knobs a user's TOML map declares."""

    name = "knobmap"

    def __init__(self, *, label: str, program: str | None, config: str | None,
                 places: tuple[Place, ...], source: str) -> None:
        self.label = label
        self.program = program
        self.config = config
        self.places = places
        self.source = source

    def claims(self, command: Command) -> bool:
        """The declared program (any program when the map names none)."""
        if self.program is None:
            return True
        try:
            program = locate(command.argv).program
        except CommandError:
            return False
        return (fnmatch.fnmatch(program, self.program)
                or fnmatch.fnmatch(PurePath(program).name, self.program))

    def read(self, command: Command) -> Knobs:
        """Each declared knob from its flag, key or variable; its declared default otherwise."""
        return self.read_sourced(command).knobs

    def read_sourced(self, command: Command) -> Reading:
        """The declared knobs (from the command, its file or the map's defaults); the rest
        are Knobs' own defaults, shown as assumed."""
        invocation = locate(command.argv)
        config = self._config(command, invocation)
        env = environment(command)
        env.update(invocation.env_assignments)
        values = Values()
        read_env_knobs(command, values)  # a place the map declares for it wins below
        for place in self.places:
            value, source = self._read_one(command, invocation, config, env, place)
            if value is not None:
                if place.knob == "model":
                    value = model_path(command, value)
                values.set(place.knob, value, source)
        if "per_device_batch" not in values.values:
            msg = (f"{self.source}: the command does not give per_device_batch and the map has "
                   "no default for it; add `default = N` under [knobs.per_device_batch]")
            raise CommandError(msg)
        launch = locate_command(command)
        values.set("world_size", launch.world_size, world_source(launch))
        return values.reading(rewritable=frozenset(p.knob for p in self.places),
                              refused=module_refusals(command))

    def accepts(self, command: Command, knob: str) -> bool:  # noqa: ARG002 - the map says it all
        """True for the knobs the map declares a place for."""
        return any(p.knob == knob for p in self.places)

    def render(self, command: Command, knobs: Knobs, workdir: Path) -> Command:
        """The command with each changed knob written where the map says it lives."""
        if all(p.knob != "expandable_segments" for p in self.places):
            command = with_env_knobs(command, knobs)
        current = self.read(command)
        changed = [p for p in self.places if getattr(current, p.knob) != getattr(knobs, p.knob)]
        undeclared = sorted(set(current.diff(knobs)) - {p.knob for p in self.places}
                            - set(_READ_ONLY) - {"output_dir"})
        if undeclared:
            msg = (f"cannot set {', '.join(undeclared)}: {self.source} does not say where "
                   "it lives; add [knobs.NAME] for it or use a policy without that rung")
            raise CommandError(msg)
        if not changed:
            return command
        invocation = locate(command.argv)
        argv = list(command.argv)
        removals: set[int] = set()
        appended: list[str] = []
        config_changes: dict[str, object] = {}
        env_changes: dict[str, str] = {}
        for place in changed:
            value = getattr(knobs, place.knob)
            if place.flag is not None:
                appended += self._render_flag(argv, removals, invocation, place, value)
            elif place.key is not None:
                config_changes[place.key] = _typed(place, value)
            elif place.env is not None:
                env_changes[place.env] = _text(place, value)
        if config_changes:
            config_at = self._config_index(command, invocation)
            config = ConfigFile.load(resolve(command, argv[config_at]), what="config file")
            argv[config_at] = str(config.write_copy(config_changes,
                                                    workdir / config.path.name))
        rendered = [t for i, t in enumerate(argv) if i not in removals] + appended
        rendered = _with_env(rendered, env_changes)
        return dataclasses.replace(command, argv=tuple(rendered))

    def check_policy(self, rungs: Iterable[tuple[str, str, str | None]]) -> None:
        """Fail before anything runs if a rung (name, knob, compensate) needs an undeclared knob.

        A rung on an undeclared knob is skipped (the program cannot take it); but one that
        halves a declared knob and compensates with an undeclared one would change the
        effective batch, so the map is incomplete.
        """
        declared = {p.knob for p in self.places}
        for name, knob, compensate in rungs:
            if knob in declared and compensate and compensate not in declared:
                msg = (f"{self.source}: the policy's rung {name!r} halves {knob} and multiplies "
                       f"{compensate} to keep the effective batch, but the map does not say "
                       f"where {compensate} lives; add [knobs.{compensate}] (e.g. flag and "
                       "default = 1), or use a policy without that rung")
                raise CommandError(msg)

    def describe(self, command: Command) -> str:  # noqa: ARG002 - the map says it all
        """The map's name and file."""
        return f"knob map {self.label} ({self.source})"

    def finalize(self, command: Command, knobs: Knobs, run_dir: Path) -> tuple[Path, ...]:  # noqa: ARG002
        """The rendered command (final-command.sh) is the whole config; config copies stay
        in the attempt's folder it names."""
        return ()

    # -- internals ---------------------------------------------------------------------------

    def _config_index(self, command: Command, invocation: Invocation) -> int:
        argv = command.argv
        if self.config == "positional":
            index = next((i for i in range(invocation.args_start, len(argv))
                          if not argv[i].startswith("-")), None)
        else:
            index = next((i + 1 for i in range(invocation.args_start, len(argv) - 1)
                          if argv[i] == self.config), None)
        if index is None or index >= len(argv):
            msg = (f"{self.source}: the map reads keys from the file named by "
                   f"{self.config!r}, but the command gives none; add it to the command")
            raise CommandError(msg)
        return index

    def _config(self, command: Command, invocation: Invocation) -> ConfigFile | None:
        if not any(p.key for p in self.places):
            return None
        index = self._config_index(command, invocation)
        return ConfigFile.load(resolve(command, command.argv[index]), what="config file")

    def _read_one(self, command: Command, invocation: Invocation, config: ConfigFile | None,
                  env: dict[str, str], place: Place) -> tuple[object, Source]:
        raw: object = None
        said = Source.COMMAND_LINE
        if place.flag is not None:
            hits = _flag_hits(command.argv, invocation, place)
            if place.format == "presence":
                return ((not hits) if place.inverted else bool(hits)), said
            if hits:
                raw = hits[-1].raw
        elif place.key is not None and config is not None:
            found, value = lookup(config.data, place.key)
            raw = value if found else None
            said = Source.CONFIG_FILE
        elif place.env is not None:
            raw = env.get(place.env)
        if raw is None:
            # The map's declared default: what the user knows of the program.
            return ((_decode(place, place.default, self.source), Source.KNOWN_DEFAULT)
                    if place.default is not None else (None, Source.ASSUMED))
        return _decode(place, raw, self.source), said

    def _render_flag(self, argv: list[str], removals: set[int], invocation: Invocation,
                     place: Place, value: object) -> list[str]:
        assert place.flag is not None  # noqa: S101 - checked by the caller
        hits = _flag_hits(tuple(argv), invocation, place)
        if place.format == "presence":
            wanted = bool(value) != place.inverted  # should the switch be there?
            if wanted and not hits:
                return [place.flag]
            if not wanted:
                removals.update(h.index for h in hits)
            return []
        text = _text(place, value)
        if not hits:
            return [place.flag, text]
        for hit in hits:
            if hit.joined:
                argv[hit.index] = f"{place.flag}={text}"
            else:
                argv[hit.index + 1] = text
        return []


def _flag_hits(argv: tuple[str, ...], invocation: Invocation, place: Place) -> list[_Hit]:
    hits = []
    i = invocation.args_start
    while i < len(argv):
        token = argv[i]
        if token == place.flag:
            if place.format == "presence":
                hits.append(_Hit(index=i, joined=False, raw=None))
            elif i + 1 < len(argv):
                hits.append(_Hit(index=i, joined=False, raw=argv[i + 1]))
                i += 1
            else:
                msg = f"{place.flag} has no value after it; give one, e.g. `{place.flag} 4`"
                raise CommandError(msg)
        elif place.flag and token.startswith(f"{place.flag}="):
            hits.append(_Hit(index=i, joined=True, raw=token.partition("=")[2]))
        i += 1
    return hits


def _decode(place: Place, raw: object, source: str) -> object:
    kind = KNOB_TYPES[place.knob]
    if kind == "bool":
        text = str(raw).lower()
        if isinstance(raw, bool):
            value = raw
        elif text in _TRUE_WORDS | _FALSE_WORDS:
            value = text in _TRUE_WORDS
        else:
            msg = f"{place.knob} ({_where(place)}): {raw!r} is not a boolean ({source})"
            raise CommandError(msg)
        return (not value) if place.inverted else value
    if kind == "int":
        try:
            return int(str(raw))
        except ValueError:
            msg = f"{place.knob} ({_where(place)}): {raw!r} is not a whole number ({source})"
            raise CommandError(msg) from None
    if kind == "finetuning_type":
        try:
            return FinetuningType(str(raw))
        except ValueError:
            valid = ", ".join(t.value for t in FinetuningType)
            msg = f"{place.knob} ({_where(place)}): {raw!r} is not one of {valid}"
            raise CommandError(msg) from None
    return str(raw)


def _where(place: Place) -> str:
    return place.flag or (f"key {place.key}" if place.key else f"${place.env}")


def _text(place: Place, value: object) -> str:
    if KNOB_TYPES[place.knob] == "bool":
        on = bool(value) != place.inverted
        if place.format == "1/0":
            return "1" if on else "0"
        return "true" if on else "false"
    return str(value.value if isinstance(value, FinetuningType) else value)


def _typed(place: Place, value: object) -> object:
    if KNOB_TYPES[place.knob] == "bool":
        on = bool(value) != place.inverted
        return (1 if on else 0) if place.format == "1/0" else on
    return value.value if isinstance(value, FinetuningType) else value


def _with_env(argv: list[str], changes: dict[str, str]) -> list[str]:
    """Set variables on an existing leading `env NAME=V ...`, or put `env NAME=V` in front."""
    if not changes:
        return argv
    out = list(argv)
    pending = dict(changes)
    if out and PurePath(out[0]).name == "env":
        i = 1
        while i < len(out) and out[i].startswith("-"):
            i += 2 if out[i] in ("-u", "--unset", "-C", "--chdir", "-S") else 1
        while i < len(out) and "=" in out[i] and not out[i].startswith("-"):
            name = out[i].partition("=")[0]
            if name in pending:
                out[i] = f"{name}={pending.pop(name)}"
            i += 1
        return out[:i] + [f"{k}={v}" for k, v in pending.items()] + out[i:]
    return ["env", *(f"{k}={v}" for k, v in pending.items()), *out]
