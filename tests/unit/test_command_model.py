"""The command model: every memory-relevant value read in every dialect, with where it came from.

Programs are read through `--help` texts recorded from real programs (tests/data/help/README.md).
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path

import pytest

from supervisor.classify import OomKind, Verdict, VerdictKind
from supervisor.command import Command, CommandError
from supervisor.dialects import detect
from supervisor.dialects.argv import ArgvDialect, TrlDialect
from supervisor.dialects.axolotl import AxolotlDialect
from supervisor.dialects.hfargs import HfArgsFileDialect
from supervisor.dialects.knobmap import from_table
from supervisor.dialects.llamafactory import LlamaFactoryDialect
from supervisor.knobs import FinetuningType, Knobs, Reading, Source
from supervisor.policy import Attempt, GiveUp, Step, next_step, resolve

HELP = Path(__file__).resolve().parents[1] / "data" / "help"
CMD = Source.COMMAND_LINE
FILE = Source.CONFIG_FILE
PROGRAM = Source.PROGRAM
KNOWN = Source.KNOWN_DEFAULT
ASSUMED = Source.ASSUMED
LORA = FinetuningType.LORA
FULL = FinetuningType.FULL
FREEZE = FinetuningType.FREEZE


def recorded(name: str) -> ArgvDialect:
    """The argv dialect whose probe answers with a help text recorded from a real program."""
    text = (HELP / f"{name}.txt").read_text(encoding="utf-8")
    return ArgvDialect(probe=lambda _command: text)


def cmd(text: str, cwd: Path | None = None) -> Command:
    return Command(argv=tuple(shlex.split(text)), cwd=str(cwd) if cwd else None)


def sources(reading: Reading, *names: str) -> tuple[Source, ...]:
    return tuple(reading.source(n) for n in names)


# --- the program's word outranks its name ------------------------------------------------------

HF_BASH = "python train_bash.py --per_device_train_batch_size 8 --max_seq_length 512"


def test_hf_train_bash_is_read_from_its_help_not_its_name() -> None:
    """A `train_bash.py` whose help is HfArgumentParser's: checkpointing off, settable."""
    reading = recorded("hf_train_bash").read_sourced(cmd(HF_BASH))
    knobs = reading.knobs
    assert (knobs.gradient_checkpointing, knobs.finetuning_type, knobs.cutoff_len,
            knobs.lora_rank, knobs.precision, knobs.model) == (False, FULL, 512, 8, "fp32",
                                                               "tiny")
    assert sources(reading, "gradient_checkpointing", "finetuning_type", "per_device_batch",
                   "precision", "model") == (PROGRAM, PROGRAM, CMD, PROGRAM, PROGRAM)
    assert reading.can_set("gradient_checkpointing")
    assert reading.can_set("finetuning_type", LORA)
    assert not reading.can_set("finetuning_type", FREEZE)
    assert not reading.can_set("freeze_trainable_layers")
    assert reading.program == "its --help lists 12 options (defaults printed)"


def test_without_its_help_the_same_name_reads_as_llamafactory_legacy() -> None:
    """The name alone (no help: the script is not there) gives LLaMA-Factory's defaults."""
    reading = ArgvDialect(probe=None).read_sourced(cmd(HF_BASH))
    assert (reading.knobs.gradient_checkpointing, reading.knobs.finetuning_type) == (True, LORA)
    assert sources(reading, "gradient_checkpointing", "finetuning_type") == (KNOWN, KNOWN)


def test_lora_rung_on_an_hf_script_adds_only_flags_its_help_lists() -> None:
    """LoRA renders as `--use_peft` (TRL-style), never LLaMA-Factory's `--finetuning_type`."""
    dialect = recorded("hf_train_bash")
    command = cmd(HF_BASH)
    knobs = dataclasses.replace(dialect.read(command), finetuning_type=LORA,
                                gradient_checkpointing=True, lora_rank=16)
    assert shlex.join(dialect.render(command, knobs, Path()).argv) == (
        HF_BASH + " --gradient_checkpointing --use_peft --lora_r 16")
    with pytest.raises(CommandError, match="finetuning_type=freeze through --use_peft"):
        dialect.render(command, dataclasses.replace(knobs, finetuning_type=FREEZE), Path())


ARGPARSE = "python train.py --per_device_train_batch_size 4 --bf16"


def test_plain_argparse_script_bare_switches_and_no_lora_flag() -> None:
    """store_true switches read as off; no LoRA flag: the rung cannot be rendered."""
    dialect = recorded("argparse_train")
    reading = dialect.read_sourced(cmd(ARGPARSE))
    assert (reading.knobs.gradient_checkpointing, reading.knobs.precision,
            reading.knobs.cutoff_len) == (False, "bf16-mixed", None)
    assert sources(reading, "gradient_checkpointing", "precision", "cutoff_len",
                   "finetuning_type") == (PROGRAM, CMD, ASSUMED, ASSUMED)
    assert not reading.can_set("finetuning_type")
    assert reading.can_set("cutoff_len")  # --max_length: its help lists it
    lora = dataclasses.replace(reading.knobs, finetuning_type=LORA)
    with pytest.raises(CommandError, match=r"finetuning_type=lora: its --help lists no flag"):
        dialect.render(cmd(ARGPARSE), lora, Path())
    shorter = dataclasses.replace(reading.knobs, cutoff_len=256, gradient_checkpointing=True)
    assert shlex.join(dialect.render(cmd(ARGPARSE), shorter, Path()).argv) == (
        ARGPARSE + " --max_length 256 --gradient_checkpointing")


def test_a_no_switch_alone_says_the_default_is_on() -> None:
    """HfArgumentParser prints no default without a help text; `--no_X` means X defaults on."""
    command = cmd("python train.py --per_device_train_batch_size 2")
    reading = recorded("hf_default_on").read_sourced(command)
    assert (reading.knobs.gradient_checkpointing, reading.source("gradient_checkpointing")) == (
        True, PROGRAM)
    off = dataclasses.replace(reading.knobs, gradient_checkpointing=False)
    assert shlex.join(recorded("hf_default_on").render(command, off, Path()).argv) == (
        "python train.py --per_device_train_batch_size 2 --gradient_checkpointing false")


def test_unasked_generic_script_never_gets_a_llamafactory_flag() -> None:
    """No help (the script is not there): LoRA is not settable on an unknown HF script."""
    dialect = ArgvDialect(probe=None)
    command = cmd("python train.py --per_device_train_batch_size 4")
    reading = dialect.read_sourced(command)
    assert not reading.can_set("finetuning_type")
    assert reading.can_set("gradient_checkpointing")
    assert sources(reading, "gradient_checkpointing", "precision") == (ASSUMED, ASSUMED)
    with pytest.raises(CommandError, match="cannot set finetuning_type=lora"):
        dialect.render(command, dataclasses.replace(reading.knobs, finetuning_type=LORA),
                       Path())


def test_reference_trainer_help_agrees_with_its_known_defaults() -> None:
    """Its help prints no defaults: the family's known ones hold where its flags match."""
    reading = recorded("reference_trainer").read_sourced(
        cmd("python -m supervisor.reference_trainer --per_device_train_batch_size 4"))
    assert (reading.knobs.cutoff_len, reading.knobs.gradient_checkpointing,
            reading.knobs.precision) == (512, False, "fp32")
    assert sources(reading, "cutoff_len", "precision", "world_size") == (KNOWN, KNOWN, CMD)
    assert reading.can_set("freeze_trainable_layers")


# --- precision, quantisation, model, DeepSpeed in every dialect --------------------------------

@pytest.mark.parametrize(("program", "flags", "precision"), [
    ("train.py", "--bf16", "bf16-mixed"),
    ("train.py", "--bf16 True", "bf16-mixed"),
    ("train.py", "--fp16", "fp16-mixed"),
    ("src/train_bash.py", "--bf16", "bf16-base-mixed"),
    ("src/train_bash.py", "--bf16=false", "fp32"),
    ("src/train_bash.py", "--fp16", "fp16-base-mixed"),
    ("src/train_bash.py", "--pure_bf16", "bf16"),
    ("src/train_bash.py", "", "fp32"),
    ("-m supervisor.reference_trainer", "--bf16", "bf16-mixed"),
    ("-m supervisor.reference_trainer", "--load_in_bf16", "bf16-base-mixed"),
    ("-m supervisor.reference_trainer", "--load_in_bf16 false", "fp32"),
])
def test_argv_precision(program: str, flags: str, precision: str) -> None:
    """A Hugging Face script's `--bf16`/`--fp16` is autocast over the weights as loaded
    (fp32); LLaMA-Factory loads the model in that dtype (a half base, trainable parameters
    upcast); its `--pure_bf16` is pure. The reference trainer says which: `--bf16` as a
    Hugging Face script, `--load_in_bf16` as LLaMA-Factory's bf16."""
    command = cmd(f"python {program} --per_device_train_batch_size 2 {flags}")
    reading = ArgvDialect(probe=None).read_sourced(command)
    assert reading.knobs.precision == precision


LF_YAML = """\
model_name_or_path: ./models/llama
stage: sft
finetuning_type: lora
per_device_train_batch_size: 2
"""


@pytest.mark.parametrize(("extra", "overrides", "precision", "source"), [
    ("bf16: true\n", "", "bf16-base-mixed", FILE),
    ("pure_bf16: true\n", "", "bf16", FILE),
    ("fp16: true\n", "", "fp16-base-mixed", FILE),
    ("", "bf16=true", "bf16-base-mixed", CMD),
    ("", "", "fp32", ASSUMED),
])
def test_llamafactory_precision_and_model(tmp_path: Path, extra: str, overrides: str,
                                          precision: str, source: Source) -> None:
    """LLaMA-Factory `bf16: true` loads the model in bf16 and upcasts the trainable parameters
    (bf16-base-mixed); `pure_bf16` is pure."""
    (tmp_path / "sft.yaml").write_text(LF_YAML + extra, encoding="utf-8")
    reading = LlamaFactoryDialect().read_sourced(
        cmd(f"llamafactory-cli train sft.yaml {overrides}", tmp_path))
    assert (reading.knobs.precision, reading.source("precision")) == (precision, source)
    assert reading.knobs.model == str(tmp_path / "models" / "llama")
    assert sources(reading, "model", "per_device_batch", "cutoff_len") == (FILE, FILE, KNOWN)


def test_llamafactory_quantised_refuses_freeze(tmp_path: Path) -> None:
    """QLoRA (`quantization_bit: 4`) is read; LLaMA-Factory rejects freeze on it."""
    (tmp_path / "sft.yaml").write_text(LF_YAML + "quantization_bit: 4\n", encoding="utf-8")
    reading = LlamaFactoryDialect().read_sourced(cmd("llamafactory-cli train sft.yaml",
                                                     tmp_path))
    assert reading.knobs.quantization_bit == 4
    assert reading.can_set("finetuning_type", LORA)
    assert not reading.can_set("finetuning_type", FREEZE)


def test_hf_args_json_precision_model_and_peft(tmp_path: Path) -> None:
    """An args JSON: `bf16` is mixed, `torch_dtype: bfloat16` pure, TRL's `use_peft` is LoRA."""
    args = {"model_name_or_path": "Qwen/Qwen2-0.5B", "per_device_train_batch_size": 4,
            "max_length": 1024, "bf16": True, "use_peft": True, "lora_r": 16,
            "load_in_4bit": True}
    (tmp_path / "args.json").write_text(json.dumps(args), encoding="utf-8")
    dialect = HfArgsFileDialect()
    command = cmd("python sft.py args.json", tmp_path)
    reading = dialect.read_sourced(command)
    knobs = reading.knobs
    assert (knobs.precision, knobs.model, knobs.finetuning_type, knobs.lora_rank,
            knobs.quantization_bit) == ("bf16-mixed", "Qwen/Qwen2-0.5B", LORA, 16, 4)
    assert sources(reading, "precision", "finetuning_type", "gradient_checkpointing") == (
        FILE, FILE, KNOWN)
    assert not reading.can_set("finetuning_type", FREEZE)
    full = dataclasses.replace(knobs, finetuning_type=FULL)
    rendered = dialect.render(command, full, tmp_path / "a")
    assert json.loads(Path(rendered.argv[-1]).read_text())["use_peft"] is False
    args["torch_dtype"] = "bfloat16"
    (tmp_path / "args.json").write_text(json.dumps(args), encoding="utf-8")
    assert dialect.read(command).precision == "bf16"


def test_hf_args_never_adds_a_key_no_dataclass_has(tmp_path: Path) -> None:
    """HfArgumentParser rejects unknown keys: a LoRA rung on a file without one cannot render."""
    (tmp_path / "args.json").write_text(json.dumps({"per_device_train_batch_size": 4}),
                                        encoding="utf-8")
    dialect = HfArgsFileDialect()
    command = cmd("python train.py args.json", tmp_path)
    assert not dialect.accepts(command, "finetuning_type")
    with pytest.raises(CommandError, match="has no key for it"):
        dialect.render(command, dataclasses.replace(dialect.read(command),
                                                    finetuning_type=LORA), tmp_path / "a")


def test_axolotl_base_model_and_bf16(tmp_path: Path) -> None:
    """axolotl: `base_model`, and `bf16: true` loads the weights in bf16 (pure)."""
    (tmp_path / "cfg.yml").write_text("base_model: ./m\nmicro_batch_size: 2\nbf16: true\n"
                                      "adapter: qlora\n", encoding="utf-8")
    reading = AxolotlDialect().read_sourced(cmd("axolotl train cfg.yml", tmp_path))
    assert (reading.knobs.model, reading.knobs.precision, reading.knobs.quantization_bit) == (
        str(tmp_path / "m"), "bf16", 4)
    assert sources(reading, "model", "precision", "cutoff_len") == (FILE, FILE, KNOWN)
    assert not reading.can_set("finetuning_type", FREEZE)


def test_knob_map_model_entry_and_declared_defaults(tmp_path: Path) -> None:
    """A knob map's `model` entry is read (and resolved); its defaults are the user's word."""
    dialect = from_table({"knobs": {"per_device_batch": {"flag": "--bs", "default": 8},
                                    "model": {"flag": "--model"}}}, source="map.toml")
    reading = dialect.read_sourced(cmd("python t.py --model ./ckpt", tmp_path))
    assert reading.knobs.model == str(tmp_path / "ckpt")
    assert sources(reading, "model", "per_device_batch", "gradient_checkpointing") == (
        CMD, KNOWN, ASSUMED)
    assert reading.can_set("per_device_batch")
    assert not reading.can_set("gradient_checkpointing")


# --- TRL ----------------------------------------------------------------------------------------

TRL = ("trl sft --model_name_or_path Qwen/Qwen2-0.5B --dataset_name d --use_peft --lora_r 16 "
       "--max_length 2048 --per_device_train_batch_size 4 --gradient_accumulation_steps 2 "
       "--load_in_4bit")


def test_trl_cli_reads_its_flags_and_sftconfig_defaults() -> None:
    """`trl sft`: LoRA via --use_peft, --max_length, 4-bit; SFTConfig's checkpointing and bf16."""
    command = cmd(TRL)
    dialect = detect(command)
    assert dialect.name == "trl"
    reading = dialect.read_sourced(command)
    assert reading.knobs == Knobs(
        per_device_batch=4, grad_accum=2, cutoff_len=2048, gradient_checkpointing=True,
        finetuning_type=LORA, lora_rank=16, quantization_bit=4, precision="bf16-mixed",
        model="Qwen/Qwen2-0.5B", lora_target="peft-default")  # TRL's: peft's own list
    assert sources(reading, "gradient_checkpointing", "precision", "quantization_bit") == (
        KNOWN, KNOWN, CMD)
    assert not reading.can_set("finetuning_type", FREEZE)


@pytest.mark.parametrize(("changes", "expected"), [
    ({}, TRL),
    ({"per_device_batch": 2, "grad_accum": 4, "cutoff_len": 1024},
     TRL.replace("--max_length 2048", "--max_length 1024").replace(
         "--per_device_train_batch_size 4 --gradient_accumulation_steps 2",
         "--per_device_train_batch_size 2 --gradient_accumulation_steps 4")),
    ({"finetuning_type": FULL}, TRL.replace("--use_peft ", "")),
])
def test_trl_round_trips(changes: dict[str, object], expected: str) -> None:
    """Rendered in TRL's own flags; full fine-tuning drops the bare `--use_peft`."""
    command = cmd(TRL)
    dialect = TrlDialect()
    knobs = dataclasses.replace(dialect.read(command), **changes)  # type: ignore[arg-type]
    rendered = dialect.render(command, knobs, Path())
    assert shlex.join(rendered.argv) == expected
    assert {k: getattr(dialect.read(rendered), k) for k in changes} == changes


def test_trl_lora_on_a_full_command_appends_use_peft() -> None:
    """From full to LoRA: `--use_peft --lora_r 8`, never `--finetuning_type`."""
    command = cmd("trl sft --model_name_or_path m --per_device_train_batch_size 4")
    dialect = TrlDialect()
    knobs = dataclasses.replace(dialect.read(command), finetuning_type=LORA, lora_rank=32)
    assert shlex.join(dialect.render(command, knobs, Path()).argv) == (
        "trl sft --model_name_or_path m --per_device_train_batch_size 4 --use_peft --lora_r 32")
    trl_style = cmd("python sft.py --model_name_or_path m --dtype bfloat16")
    assert TrlDialect().read(trl_style).precision == "bf16"


def test_trl_config_file_values_and_command_line_overrides(tmp_path: Path) -> None:
    """`trl sft --config cfg.yaml`: the file's keys, the command line winning (TrlParser)."""
    (tmp_path / "sft.yaml").write_text(
        "model_name_or_path: Qwen/Qwen2-0.5B\nper_device_train_batch_size: 8\n"
        "max_length: 512\nuse_peft: true\nlora_r: 32\ngradient_checkpointing: false\n",
        encoding="utf-8")
    command = cmd("trl sft --config sft.yaml --per_device_train_batch_size 4", tmp_path)
    reading = TrlDialect().read_sourced(command)
    assert (reading.knobs.per_device_batch, reading.knobs.cutoff_len, reading.knobs.lora_rank,
            reading.knobs.finetuning_type, reading.knobs.gradient_checkpointing) == (
        4, 512, 32, LORA, False)
    assert sources(reading, "per_device_batch", "cutoff_len", "model") == (CMD, FILE, FILE)
    on = dataclasses.replace(reading.knobs, gradient_checkpointing=True, cutoff_len=256)
    assert shlex.join(TrlDialect().render(command, on, tmp_path).argv) == (
        "trl sft --config sft.yaml --per_device_train_batch_size 4 --max_length 256 "
        "--gradient_checkpointing")


# --- provenance and the policy ---------------------------------------------------------------

def test_reading_round_trips_and_lists_what_is_assumed() -> None:
    """to_dict/from_dict is the identity; every knob not named counts as assumed."""
    reading = Reading(knobs=Knobs(per_device_batch=2), sources={"per_device_batch": CMD},
                      rewritable=frozenset({"per_device_batch", "finetuning_type"}),
                      refused=frozenset({("finetuning_type", "freeze")}), program="help")
    assert Reading.from_dict(json.loads(json.dumps(reading.to_dict()))) == reading
    assert "per_device_batch" not in reading.assumed()
    assert "gradient_checkpointing" in reading.assumed()
    assert reading.to_dict()["sources"]["precision"] == "assumed"


OOM = Verdict(kind=VerdictKind.OOM, oom_kind=OomKind.TORCH, evidence="recorded")


def test_policy_skips_a_rung_the_program_cannot_take() -> None:
    """On the argparse script (no LoRA flag) LoRA and freeze are skipped, each with a reason."""
    reading = recorded("argparse_train").read_sourced(cmd(ARGPARSE))
    floor = dataclasses.replace(reading.knobs, per_device_batch=1, grad_accum=4,
                                gradient_checkpointing=True, cutoff_len=256)
    history = [Attempt(number=1, knobs=floor, rung=None, verdict=OOM)]
    ladder = resolve("default")
    blind = next_step(floor, history, ladder)
    assert isinstance(blind, Step)
    assert blind.rung == "8bit-optimizer"
    gave_up = next_step(floor, history, ladder, can_set=reading.can_set)
    assert isinstance(gave_up, GiveUp)
    skipped = [s for s in gave_up.skipped if s.split(":")[0] in (
        "gradient-checkpointing", "lora", "freeze")]
    assert skipped == [
        "gradient-checkpointing: gradient_checkpointing is already true",
        "lora: the program takes no flag or key for finetuning_type=lora",
        "freeze: the program takes no flag or key for finetuning_type=freeze"]


def test_policy_skips_only_the_value_a_program_refuses() -> None:
    """A TRL command takes LoRA (`--use_peft`) but not freeze: only freeze is skipped."""
    reading = TrlDialect().read_sourced(cmd(TRL))
    full = dataclasses.replace(reading.knobs, finetuning_type=FULL, per_device_batch=1,
                               grad_accum=8, cutoff_len=256)
    lora = dataclasses.replace(full, finetuning_type=LORA, lora_rank=8)
    history = [Attempt(number=1, knobs=full, rung=None, verdict=OOM),
               Attempt(number=2, knobs=lora, rung="lora", verdict=OOM)]
    gave_up = next_step(full, history, resolve("default"), can_set=reading.can_set)
    assert isinstance(gave_up, GiveUp)
    assert gave_up.skipped[-1] == "freeze: the program cannot take finetuning_type=freeze"


# --- checkpointing under both names (transformers 5 deprecates gradient_checkpointing) ---------

@pytest.mark.parametrize("name", ["hf_trainingargs", "hf_activation_only"])
def test_checkpointing_is_read_and_written_under_the_name_the_program_takes(name: str) -> None:
    """transformers 5's TrainingArguments lists --activation_checkpointing and its deprecated
    alias --gradient_checkpointing, both `(default: None)`: read as off (from the program),
    and the rung writes the current name; a script with only the new name gets it too."""
    dialect = recorded(name)
    command = cmd("python train.py --per_device_train_batch_size 8")
    reading = dialect.read_sourced(command)
    assert reading.knobs.gradient_checkpointing is False
    assert reading.source("gradient_checkpointing") is PROGRAM
    assert reading.can_set("gradient_checkpointing")
    on = dialect.render(command, dataclasses.replace(reading.knobs, gradient_checkpointing=True),
                        Path("unused"))
    assert on.argv == (*command.argv, "--activation_checkpointing")
    assert dialect.read(on).gradient_checkpointing is True


def test_the_deprecated_name_on_the_command_line_is_rewritten_where_it_stands() -> None:
    """`--gradient_checkpointing` already on the command (transformers 5 still takes it) is
    the one read and the one turned off; no second spelling is added."""
    dialect = recorded("hf_trainingargs")
    command = cmd("python train.py --gradient_checkpointing false --per_device_train_batch_size 8")
    assert dialect.read(command).gradient_checkpointing is False
    on = dialect.render(command, dataclasses.replace(dialect.read(command),
                                                     gradient_checkpointing=True), Path("unused"))
    assert on.argv == ("python", "train.py", "--gradient_checkpointing", "true",
                       "--per_device_train_batch_size", "8")
