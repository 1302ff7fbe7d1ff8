"""A user-declared knob map (--knobs FILE): flags, config keys and environment variables."""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

import pytest

from supervisor.command import Command, CommandError
from supervisor.dialects.knobmap import KnobMapDialect, load
from supervisor.knobs import FinetuningType, Knobs

MAP = """\
name = "mytrainer"
program = "train.py"
config = "--config"

[knobs.per_device_batch]
flag = "--bs"
default = 8
[knobs.grad_accum]
flag = "--accum"
default = 1
[knobs.cutoff_len]
key = "data.seq_len"
[knobs.gradient_checkpointing]
flag = "--no-gc"
format = "presence"
inverted = true
[knobs.finetuning_type]
env = "FT_TYPE"
default = "full"
[knobs.lora_rank]
flag = "--lora-r"
[knobs.max_steps]
env = "STEPS"
"""
CONFIG = "model: m\ndata:\n  path: d.jsonl\n  seq_len: 2048  # tokens\n"


@pytest.fixture
def cwd(tmp_path: Path) -> Path:
    (tmp_path / "map.toml").write_text(MAP, encoding="utf-8")
    (tmp_path / "cfg.yaml").write_text(CONFIG, encoding="utf-8")
    return tmp_path


@pytest.fixture
def dialect(cwd: Path, monkeypatch: pytest.MonkeyPatch) -> KnobMapDialect:
    monkeypatch.delenv("FT_TYPE", raising=False)
    monkeypatch.delenv("STEPS", raising=False)
    return load(cwd / "map.toml")


def cmd(text: str, cwd: Path) -> Command:
    return Command(argv=tuple(shlex.split(text)), cwd=str(cwd))


COMMANDS = [
    "python train.py --config cfg.yaml --bs 4 --no-gc",
    "env STEPS=10 python train.py --config cfg.yaml --bs=4 --accum 2",
    "torchrun --nproc_per_node 2 train.py --config cfg.yaml",
]


@pytest.mark.parametrize("text", COMMANDS)
def test_render_without_change_gives_back_the_same_argv(text: str, cwd: Path,
                                                        dialect: KnobMapDialect) -> None:
    """Unchanged knobs: the same argv and no copy."""
    command = cmd(text, cwd)
    assert dialect.claims(command)
    assert dialect.render(command, dialect.read(command), cwd / "a").argv == command.argv
    assert not (cwd / "a").exists()


def test_read_from_flags_keys_env_and_defaults(cwd: Path, dialect: KnobMapDialect) -> None:
    """Each knob where the map says; presence + inverted reads `--no-gc` as checkpointing off."""
    assert dialect.read(cmd(COMMANDS[1], cwd)) == Knobs(
        per_device_batch=4, grad_accum=2, cutoff_len=2048, max_steps=10,
        gradient_checkpointing=True, finetuning_type=FinetuningType.FULL)
    assert dialect.read(cmd(COMMANDS[0], cwd)).gradient_checkpointing is False
    assert dialect.read(cmd(COMMANDS[2], cwd)).effective_batch == 16


def test_every_kind_of_place_renders_in_its_own_syntax(cwd: Path,
                                                       dialect: KnobMapDialect) -> None:
    """Flags in place (`--bs=4` stays joined), a switch removed, a config copy, `env` in front."""
    command = cmd(COMMANDS[1], cwd)
    knobs = dataclasses.replace(dialect.read(command), per_device_batch=2, grad_accum=4,
                                cutoff_len=1024, gradient_checkpointing=False,
                                finetuning_type=FinetuningType.LORA, lora_rank=16, max_steps=20)
    out = dialect.render(command, knobs, cwd / "a")
    assert shlex.join(out.argv) == (
        "env STEPS=20 FT_TYPE=lora python train.py --config "
        f"{cwd / 'a' / 'cfg.yaml'} --bs=2 --accum 4 --no-gc --lora-r 16")
    assert (cwd / "a" / "cfg.yaml").read_text(encoding="utf-8") == CONFIG.replace(
        "seq_len: 2048", "seq_len: 1024")
    back_on = dialect.render(cmd(COMMANDS[0], cwd), dataclasses.replace(
        dialect.read(cmd(COMMANDS[0], cwd)), gradient_checkpointing=True), cwd / "b")
    assert shlex.join(back_on.argv) == "python train.py --config cfg.yaml --bs 4"


@pytest.mark.parametrize(("fmt", "expected"), [
    ("true/false", "python t.py --bs 1 --gc true"),
    ("1/0", "python t.py --bs 1 --gc 1"),
    ("presence", "python t.py --bs 1 --gc"),
])
def test_boolean_formats(fmt: str, expected: str, tmp_path: Path) -> None:
    """true/false, 1/0 and presence each write the value their own way."""
    path = tmp_path / "m.toml"
    path.write_text(f'[knobs.per_device_batch]\nflag = "--bs"\n'
                    f'[knobs.gradient_checkpointing]\nflag = "--gc"\nformat = "{fmt}"\n'
                    "default = false\n", encoding="utf-8")
    dialect = load(path)
    command = cmd("python t.py --bs 1", tmp_path)
    knobs = dataclasses.replace(dialect.read(command), gradient_checkpointing=True)
    assert shlex.join(dialect.render(command, knobs, tmp_path).argv) == expected


def test_a_policy_file_can_carry_the_map(tmp_path: Path) -> None:
    """A `[dialect]` table (e.g. inside a policy file) is read the same way."""
    path = tmp_path / "policy.toml"
    path.write_text('name = "p"\n[dialect]\nname = "x"\n[dialect.knobs.per_device_batch]\n'
                    'flag = "--batch"\n', encoding="utf-8")
    dialect = load(path)
    assert (dialect.name, dialect.label) == ("knobmap", "x")
    assert dialect.describe(cmd("python t.py", tmp_path)) == f"knob map x ({path})"
    assert dialect.read(cmd("python t.py --batch 3", tmp_path)).per_device_batch == 3


@pytest.mark.parametrize(("text", "message"), [
    ("", "no \\[knobs.NAME\\] tables"),
    ('[knobs.batch]\nflag = "--b"\n', "unknown knob 'batch'; valid: per_device_batch"),
    ('[knobs.per_device_batch]\nflag = "--b"\nenv = "B"\n',
     "give exactly one of flag, key or env \\(found flag, env\\)"),
    ('[knobs.per_device_batch]\nflag = "--b"\nformat = "presence"\n',
     "format 'presence' does not fit a int knob"),
    ('[knobs.gradient_checkpointing]\nflag = "--gc"\nformat = "yesno"\n',
     "unknown format 'yesno'; valid: number, text, true/false, 1/0, presence"),
    ('[knobs.per_device_batch]\nkey = "train.bs"\n',
     "no `config` says which argument names the file"),
    ('[knobs.per_device_batch]\nflag = "b"\n', "flag 'b' must start with '-'"),
    ('[knobs.per_device_batch]\nflag = "--b"\ncolour = 1\n', "unknown setting\\(s\\) colour"),
    ("[knobs\n", "not valid TOML"),
])
def test_bad_maps_fail_at_load_in_one_line(text: str, message: str, tmp_path: Path) -> None:
    """Every mistake names the file and the table, and lists the valid choices."""
    path = tmp_path / "m.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(CommandError, match=message) as caught:
        load(path)
    assert "\n" not in str(caught.value)
    assert str(path) in str(caught.value)


def test_rung_on_an_undeclared_knob_says_how_to_declare_it(cwd: Path,
                                                           dialect: KnobMapDialect) -> None:
    """A rung the map cannot place is one line naming the knob and the file."""
    command = cmd(COMMANDS[0], cwd)
    with pytest.raises(CommandError, match=(r"cannot set freeze_trainable_layers: .*map\.toml "
                                            r"does not say where it lives; add \[knobs\.NAME\]")):
        dialect.render(command, dataclasses.replace(dialect.read(command),
                                                    freeze_trainable_layers=1), cwd)


def test_missing_batch_without_default_is_one_line(tmp_path: Path) -> None:
    """The batch must come from the command or the map's default."""
    path = tmp_path / "m.toml"
    path.write_text('[knobs.per_device_batch]\nflag = "--b"\n', encoding="utf-8")
    with pytest.raises(CommandError, match="add `default = N` under"):
        load(path).read(cmd("python t.py", tmp_path))
