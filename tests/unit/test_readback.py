"""Every rendered attempt is read back through its dialect and trains what the run reports.

One test per dialect x rung of the shipped policies: the rung's knobs are rendered, the
rendered argv (and its config copies) read again, and the knobs compared; the TRL-style script
whose `--lora_r` prints no default (its rank is 16) gets its rank written out.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from collections.abc import Callable
from pathlib import Path

import pytest

from supervisor.command import Command
from supervisor.dialects import Dialect
from supervisor.dialects.argv import ArgvDialect, TrlDialect
from supervisor.dialects.axolotl import AxolotlDialect
from supervisor.dialects.hfargs import HfArgsFileDialect
from supervisor.dialects.knobmap import load
from supervisor.dialects.llamafactory import LlamaFactoryDialect
from supervisor.dialects.readback import NOT_COMPARED, RenderMismatchError, check, render_checked
from supervisor.knobs import KNOB_NAMES, FinetuningType, Knobs, Source
from supervisor.policy import ACTIONS, resolve
from supervisor.program import Program

HELP = Path(__file__).resolve().parents[1] / "data" / "help"


def _recorded(name: str) -> Callable[[Program], str | None]:
    text = (HELP / f"{name}.txt").read_text(encoding="utf-8")
    return lambda _command: text


DS = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
      "zero_optimization": {"stage": 0}}
FILES = {
    "sft.yaml": ("model_name_or_path: m\nstage: sft\nfinetuning_type: full\n"
                 "per_device_train_batch_size: 8\ncutoff_len: 2048\noutput_dir: out\n"
                 "deepspeed: ds.json\n"),
    "lora.yml": ("base_model: m\ndatasets:\n- path: d.jsonl\n  type: alpaca\nsequence_len: 2048\n"
                 "micro_batch_size: 8\ngradient_accumulation_steps: 1\noutput_dir: ./out\n"
                 "deepspeed: ds.json\n"),
    "args.json": json.dumps({"model_name_or_path": "m", "use_peft": False,
                             "per_device_train_batch_size": 8, "max_length": 1024,
                             "output_dir": "out", "deepspeed": "ds.json"}),
    "ds.json": json.dumps(DS),
    "map.toml": ('name = "mine"\nprogram = "mine.py"\n[knobs.per_device_batch]\nflag = "--bs"\n'
                 'default = 8\n[knobs.grad_accum]\nflag = "--accum"\ndefault = 1\n'
                 '[knobs.gradient_checkpointing]\nflag = "--gc"\nformat = "presence"\n'
                 '[knobs.cutoff_len]\nflag = "--seq"\ndefault = 512\n'),
}

# (label, dialect factory, command)
CASES: list[tuple[str, Callable[[Path], Dialect], str]] = [
    ("trl-style script", lambda _: ArgvDialect(probe=_recorded("trl_style")),
     "python train.py --per_device_train_batch_size 8 --max_length 512"),
    ("hf script (help)", lambda _: ArgvDialect(probe=_recorded("hf_train_bash")),
     "python train_bash.py --per_device_train_batch_size 8 --max_seq_length 512"),
    ("transformers 5 script", lambda _: ArgvDialect(probe=_recorded("hf_trainingargs")),
     "python train.py --per_device_train_batch_size 8 --activation-checkpointing false"),
    ("reference trainer", lambda _: ArgvDialect(probe=_recorded("reference_trainer")),
     ("python -m supervisor.reference_trainer --per_device_train_batch_size 8 "
     "--deepspeed ds.json")),
    ("llamafactory flags", lambda _: ArgvDialect(probe=None),
     ("llamafactory-cli train --stage sft --finetuning_type full "
     "--per_device_train_batch_size 8 --output_dir out")),
    ("trl cli", lambda _: TrlDialect(probe=None),
     "trl sft --model_name_or_path m --per_device_train_batch_size 8 --output_dir out"),
    ("llamafactory yaml", lambda _: LlamaFactoryDialect(),
     "llamafactory-cli train sft.yaml"),
    ("axolotl", lambda _: AxolotlDialect(), "axolotl train lora.yml"),
    ("hf-args with deepspeed", lambda _: HfArgsFileDialect(), "python train.py args.json"),
    ("knob map", lambda cwd: load(cwd / "map.toml"), "python mine.py --bs 8"),
]
RUNGS = [(policy, rung.name) for policy in ("default", "multi-gpu")
         for rung in resolve(policy).rungs]


@pytest.fixture
def cwd(tmp_path: Path) -> Path:
    for name, text in FILES.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    for script in ("train.py", "train_bash.py", "mine.py"):
        (tmp_path / script).write_text("", encoding="utf-8")
    return tmp_path


def _command(text: str, cwd: Path) -> Command:
    return Command(argv=tuple(shlex.split(text)), cwd=str(cwd))


# The rungs each case's program can take (the rest the ladder skips: no flag, no bitsandbytes
# in this Python, a method the program lacks, a value it already has).
TAKES = {
    "trl-style script": {"expandable-segments", "smaller-batch", "shorter-cutoff",
                         "gradient-checkpointing", "lora"},
    "hf script (help)": {"expandable-segments", "smaller-batch", "shorter-cutoff",
                         "gradient-checkpointing", "lora"},
    "transformers 5 script": {"expandable-segments", "smaller-batch", "shorter-cutoff",
                              "gradient-checkpointing"},
    "reference trainer": {"expandable-segments", "smaller-batch", "shorter-cutoff",
                          "gradient-checkpointing", "lora", "freeze"},
    "llamafactory flags": {"expandable-segments", "smaller-batch", "shorter-cutoff", "lora",
                           "freeze"},
    "trl cli": {"expandable-segments", "smaller-batch", "shorter-cutoff", "lora"},
    "llamafactory yaml": {"expandable-segments", "smaller-batch", "shorter-cutoff", "lora",
                          "freeze", "zero-2", "zero-3", "zero-offload"},
    "axolotl": {"expandable-segments", "smaller-batch", "shorter-cutoff",
                "gradient-checkpointing", "lora", "zero-2", "zero-3", "zero-offload"},
    "hf-args with deepspeed": {"expandable-segments", "smaller-batch", "shorter-cutoff",
                               "gradient-checkpointing", "lora", "zero-2", "zero-3",
                               "zero-offload"},
    "knob map": {"expandable-segments", "smaller-batch", "shorter-cutoff",
                 "gradient-checkpointing"},
}


@pytest.mark.parametrize(("label", "factory", "text"), CASES, ids=[c[0] for c in CASES])
def test_each_rung_renders_what_the_run_reports(
        label: str, factory: Callable[[Path], Dialect], text: str, cwd: Path) -> None:
    """Every rung of the shipped policies this program can take: its knobs, rendered and read
    back, are the knobs the run says it trains; a rank LoRA puts to use is the command's word."""
    dialect = factory(cwd)
    command = _command(text, cwd)
    reading = dialect.read_sourced(command)
    checked: set[str] = set()
    for policy, rung_name in RUNGS:
        rung = resolve(policy).rung(rung_name)
        new = ACTIONS[rung.action](reading.knobs, rung)
        if new is None or any(not reading.can_set(k, v)
                              for k, (_, v) in reading.knobs.diff(new).items()):
            continue
        rendered = render_checked(dialect, command, new, cwd / policy / rung_name)
        after = dialect.read_sourced(rendered)
        for knob in KNOB_NAMES:
            if knob not in NOT_COMPARED:
                assert getattr(after.knobs, knob) == getattr(new, knob), (rung_name, knob)
        if new.finetuning_type is FinetuningType.LORA and reading.can_set("lora_rank"):
            assert after.source("lora_rank") is not Source.ASSUMED, rung_name
        checked.add(rung_name)
    assert checked == TAKES[label]


def test_trl_style_rank_is_written_when_lora_starts(cwd: Path) -> None:
    """`--lora_r` with no printed default: the rank is TRL's 16 until the LoRA rung says 8, and
    the attempt's argv says `--lora_r 8` beside `--use_peft`."""
    dialect = ArgvDialect(probe=_recorded("trl_style"))
    command = _command("python train.py --per_device_train_batch_size 8", cwd)
    reading = dialect.read_sourced(command)
    assert reading.knobs.lora_rank == 16
    assert reading.source("lora_rank") is Source.KNOWN_DEFAULT
    lora = resolve("default").rung("lora")
    new = ACTIONS[lora.action](reading.knobs, lora)
    assert new is not None
    rendered = render_checked(dialect, command, new, cwd)
    assert rendered.argv[-3:] == ("--use_peft", "--lora_r", "8")
    assert dialect.read(rendered).lora_rank == 8


def test_an_assumed_rank_put_to_use_is_written(cwd: Path) -> None:
    """A script whose help lists `--lora_r` but not TRL's `--use_peft` signature: the assumed
    rank is written explicitly when LoRA starts (the program's default is unknown)."""
    help_text = ((HELP / "trl_style.txt").read_text(encoding="utf-8")
                 .replace("--use_peft [USE_PEFT], --use-peft [USE_PEFT]",
                          "--finetuning_type FINETUNING_TYPE"))
    dialect = ArgvDialect(probe=lambda _c: help_text)
    command = _command("python train.py --per_device_train_batch_size 8", cwd)
    reading = dialect.read_sourced(command)
    assert reading.source("lora_rank") is Source.ASSUMED
    new = dataclasses.replace(reading.knobs, finetuning_type=FinetuningType.LORA, lora_rank=8)
    rendered = render_checked(dialect, command, new, cwd)
    assert rendered.argv[-4:] == ("--finetuning_type", "lora", "--lora_r", "8")


def test_hf_args_file_with_use_peft_gets_its_rank(cwd: Path) -> None:
    """An args file with `use_peft` (TRL's ModelConfig): rank 16 unless the file says; the LoRA
    rung writes `lora_r: 8` into the attempt's copy."""
    dialect = HfArgsFileDialect()
    command = _command("python train.py args.json", cwd)
    reading = dialect.read_sourced(command)
    assert (reading.knobs.lora_rank, reading.source("lora_rank")) == (16, Source.KNOWN_DEFAULT)
    new = dataclasses.replace(reading.knobs, finetuning_type=FinetuningType.LORA, lora_rank=8)
    rendered = render_checked(dialect, command, new, cwd / "a")
    copy = json.loads(Path(rendered.argv[-1]).read_text(encoding="utf-8"))
    assert (copy["use_peft"], copy["lora_r"]) == (True, 8)


def test_dashed_alias_reads_like_its_twin(cwd: Path) -> None:
    """transformers 5's `--activation-checkpointing true` is checkpointing on, as the help
    lists it beside `--activation_checkpointing`; a rung turning it off rewrites it there."""
    dialect = ArgvDialect(probe=_recorded("hf_activation_only"))
    command = _command("python train.py --per_device_train_batch_size 8 "
                       "--activation-checkpointing true", cwd)
    reading = dialect.read_sourced(command)
    assert reading.knobs.gradient_checkpointing is True
    assert reading.source("gradient_checkpointing") is Source.COMMAND_LINE
    off = dataclasses.replace(reading.knobs, gradient_checkpointing=False)
    rendered = dialect.render(command, off, cwd)
    assert rendered.argv.count("--activation-checkpointing") == 1
    assert "--activation_checkpointing" not in rendered.argv
    assert dialect.read(rendered).gradient_checkpointing is False


def test_dashed_spellings_read_without_help(cwd: Path) -> None:
    """Without a help text, `--lora-r 4` reads as `--lora_r 4` (HfArgumentParser takes both)."""
    command = _command("trl sft --model_name_or_path m --use-peft --lora-r 4", cwd)
    knobs = TrlDialect(probe=None).read(command)
    assert (knobs.finetuning_type, knobs.lora_rank) == (FinetuningType.LORA, 4)


class _Forgetful:
    """A dialect whose render forgets one knob: what the check exists for."""

    name = "forgetful"

    def __init__(self, inner: ArgvDialect) -> None:
        self.inner = inner

    def read_sourced(self, command: Command):  # type: ignore[no-untyped-def]  # noqa: ANN202
        return self.inner.read_sourced(command)

    def render(self, command: Command, knobs: Knobs, workdir: Path) -> Command:
        return self.inner.render(command, dataclasses.replace(knobs, grad_accum=1), workdir)


def test_a_render_that_trains_something_else_is_refused(cwd: Path) -> None:
    """A rendered command that reads back as other knobs stops the run in one line naming
    the knob, before anything runs."""
    inner = ArgvDialect(probe=_recorded("hf_train_bash"))
    dialect = _Forgetful(inner)
    command = _command("python train_bash.py --per_device_train_batch_size 8", cwd)
    knobs = dataclasses.replace(inner.read(command), per_device_batch=4, grad_accum=2)
    with pytest.raises(RenderMismatchError, match=r"grad_accum = 1 \(the run says 2\)") as info:
        render_checked(dialect, command, knobs, cwd)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)
    before = inner.read_sourced(command)
    assert check(inner, before, inner.render(command, knobs, cwd), knobs).knobs == knobs
