"""The axolotl dialect: each attempt runs a rewritten copy of the YAML."""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path

import pytest

from supervisor.command import Command, CommandError
from supervisor.dialects import detect
from supervisor.dialects.axolotl import AxolotlDialect
from supervisor.knobs import FinetuningType, Knobs, Reading

D = AxolotlDialect()

LORA_YML = """\
base_model: NousResearch/Llama-3.2-1B
# data
datasets:
  - path: data/alpaca.jsonl
    type: alpaca
sequence_len: 4096
sample_packing: true

adapter: lora
lora_r: 32
lora_alpha: 16
lora_target_linear: true

micro_batch_size: 8
gradient_accumulation_steps: 1
output_dir: ./outputs/lora-out
deepspeed: ds.json
"""
FULL_YML = "base_model: m\ndatasets:\n- path: d.jsonl\n  type: alpaca\nmicro_batch_size: 2\n"
DS = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
      "zero_optimization": {"stage": 2}}


@pytest.fixture
def cwd(tmp_path: Path) -> Path:
    (tmp_path / "lora.yml").write_text(LORA_YML, encoding="utf-8")
    (tmp_path / "full.yml").write_text(FULL_YML, encoding="utf-8")
    (tmp_path / "ds.json").write_text(json.dumps(DS), encoding="utf-8")
    return tmp_path


def cmd(text: str, cwd: Path) -> Command:
    return Command(argv=tuple(shlex.split(text)), cwd=str(cwd))


@pytest.mark.parametrize("text", [
    "axolotl train lora.yml",
    "accelerate launch --num_processes 2 -m axolotl.cli.train lora.yml",
    "python -m axolotl.cli.train full.yml --micro-batch-size 4",
    "axolotl train full.yml --micro_batch_size=1 --sequence_len 256",
])
def test_render_without_change_gives_back_the_same_argv(text: str, cwd: Path) -> None:
    """Detected as axolotl; unchanged knobs give the same argv and write nothing."""
    command = cmd(text, cwd)
    assert detect(command).name == "axolotl"
    assert D.render(command, D.read(command), cwd / "a").argv == command.argv
    assert not (cwd / "a").exists()


@pytest.mark.parametrize(("text", "expected"), [
    ("axolotl train lora.yml",
     Knobs(per_device_batch=8, cutoff_len=4096, finetuning_type=FinetuningType.LORA,
           lora_rank=32, deepspeed_stage=2, deepspeed_offload=False,
           output_dir="./outputs/lora-out", precision="fp32",
           model="NousResearch/Llama-3.2-1B")),
    ("accelerate launch --multi_gpu --num_processes 2 -m axolotl.cli.train lora.yml",
     Knobs(per_device_batch=8, cutoff_len=4096, finetuning_type=FinetuningType.LORA,
           lora_rank=32, deepspeed_stage=2, deepspeed_offload=False,
           output_dir="./outputs/lora-out", world_size=2, precision="fp32",
           model="NousResearch/Llama-3.2-1B")),
    ("axolotl train full.yml",
     Knobs(per_device_batch=2, cutoff_len=512, output_dir="./model-out", precision="fp32",
           model="m")),
    ("axolotl train full.yml --micro-batch-size 4 --adapter qlora",
     Knobs(per_device_batch=4, cutoff_len=512, finetuning_type=FinetuningType.LORA,
           quantization_bit=4, output_dir="./model-out", precision="fp32", model="m")),
])
def test_read_uses_axolotls_keys_and_defaults(text: str, expected: Knobs, cwd: Path) -> None:
    """micro_batch_size, sequence_len (default 512), adapter (empty = full), lora_r."""
    assert D.read(cmd(text, cwd)) == expected


def test_copy_changes_only_the_stepped_keys(cwd: Path) -> None:
    """The attempt's copy differs from the user's YAML in exactly the changed lines."""
    command = cmd("axolotl train lora.yml", cwd)
    knobs = dataclasses.replace(D.read(command), per_device_batch=4, grad_accum=2,
                                cutoff_len=2048, gradient_checkpointing=True)
    workdir = cwd / "attempts" / "02"
    assert D.render(command, knobs, workdir).argv == ("axolotl", "train",
                                                      str(workdir / "lora.yml"))
    assert (workdir / "lora.yml").read_text(encoding="utf-8") == (
        LORA_YML.replace("sequence_len: 4096", "sequence_len: 2048")
        .replace("micro_batch_size: 8", "micro_batch_size: 4")
        .replace("gradient_accumulation_steps: 1", "gradient_accumulation_steps: 2")
        + "gradient_checkpointing: true\n")
    assert (cwd / "lora.yml").read_text(encoding="utf-8") == LORA_YML


def test_switching_to_lora_writes_what_axolotl_needs(cwd: Path) -> None:
    """adapter, lora_r, lora_alpha and target modules; a fresh sibling output folder."""
    command = cmd("axolotl train full.yml", cwd)
    knobs = dataclasses.replace(D.read(command), finetuning_type=FinetuningType.LORA,
                                lora_rank=8)
    D.render(command, knobs, cwd / "a")
    assert (cwd / "a" / "full.yml").read_text(encoding="utf-8") == FULL_YML + (
        "adapter: lora\nlora_r: 8\nlora_alpha: 16\nlora_target_linear: true\n"
        "output_dir: ./model-out-lora-r8\n")


def test_command_line_options_are_rewritten_where_they_stand(cwd: Path) -> None:
    """`--micro-batch-size 4` wins over the file, so it changes too."""
    command = cmd("axolotl train full.yml --micro-batch-size 4", cwd)
    knobs = dataclasses.replace(D.read(command), per_device_batch=2, grad_accum=2)
    out = D.render(command, knobs, cwd / "a")
    assert out.argv == ("axolotl", "train", str(cwd / "a" / "full.yml"),
                        "--micro-batch-size", "2")


def test_finalize_and_describe(cwd: Path) -> None:
    """final.yml is the user's YAML with the working values; long rows are said to be dropped."""
    command = cmd("axolotl train lora.yml", cwd)
    knobs = dataclasses.replace(D.read(command), cutoff_len=1024)
    assert D.finalize(command, knobs, cwd) == (cwd / "final.yml",)
    assert (cwd / "final.yml").read_text(encoding="utf-8") == LORA_YML.replace(
        "sequence_len: 4096", "sequence_len: 1024")
    assert D.describe(command) == (
        "axolotl (lora.yml; a shorter sequence_len DROPS the rows longer than it)")


def test_freeze_is_refused_in_one_line(cwd: Path) -> None:
    """axolotl has no 'last N layers' setting: the freeze rung is a clear error."""
    command = cmd("axolotl train full.yml", cwd)
    with pytest.raises(CommandError, match="cannot set finetuning_type=freeze: axolotl"):
        D.render(command, dataclasses.replace(D.read(command),
                                              finetuning_type=FinetuningType.FREEZE), cwd)


def test_freeze_refusal_carries_axolotls_reason(cwd: Path) -> None:
    """The reading refuses freeze with the reason a run's skip line and give-up repeat."""
    reading = D.read_sourced(cmd("axolotl train full.yml", cwd))
    assert not reading.can_set("finetuning_type", FinetuningType.FREEZE)
    why = reading.refusal("finetuning_type", FinetuningType.FREEZE)
    assert why is not None
    assert "`unfrozen_parameters` patterns" in why
    assert reading.refusal("finetuning_type", FinetuningType.LORA) is None
    assert Reading.from_dict(reading.to_dict()).refusal("finetuning_type", "freeze") == why


QLORA_YML = LORA_YML.replace("adapter: lora", "adapter: qlora  # 4-bit base\nload_in_4bit: true")


def test_4bit_under_a_lora_config_writes_adapter_qlora_and_keeps_the_folder(cwd: Path) -> None:
    """On a config that is already `adapter: lora`, the QLoRA rung writes `adapter: qlora`
    (axolotl 0.19 ignores load_in_4bit under `lora`); the output folder stays: same kind."""
    command = cmd("axolotl train lora.yml", cwd)
    start = D.read(command)
    assert start.quantization_bit is None
    D.render(command, dataclasses.replace(start, quantization_bit=4), cwd / "a")
    text = (cwd / "a" / "lora.yml").read_text(encoding="utf-8")
    assert text == LORA_YML.replace("adapter: lora", "adapter: qlora") + (
        "load_in_4bit: true\nload_in_8bit: false\n")
    assert "# data" in text  # the ruamel round trip keeps comments
    back = D.read(cmd(f"axolotl train {cwd / 'a' / 'lora.yml'}", cwd))
    assert (back.finetuning_type, back.quantization_bit, back.lora_rank,
            back.output_dir) == (FinetuningType.LORA, 4, 32, "./outputs/lora-out")


def test_leaving_4bit_writes_adapter_lora_back(cwd: Path) -> None:
    """From `adapter: qlora`, a config without 4 bits is `adapter: lora`, load_in_4bit off."""
    (cwd / "qlora.yml").write_text(QLORA_YML, encoding="utf-8")
    command = cmd("axolotl train qlora.yml", cwd)
    start = D.read(command)
    assert start.quantization_bit == 4
    D.render(command, dataclasses.replace(start, quantization_bit=None), cwd / "a")
    text = (cwd / "a" / "qlora.yml").read_text(encoding="utf-8")
    assert text == LORA_YML.replace(
        # ruamel keeps the comment's column
        "adapter: lora", "adapter: lora   # 4-bit base\nload_in_4bit: false") + (
        "load_in_8bit: false\n")
    assert D.read(cmd(f"axolotl train {cwd / 'a' / 'qlora.yml'}", cwd)).quantization_bit is None


def test_lora_with_load_in_4bit_alone_reads_as_plain_lora(cwd: Path) -> None:
    """`adapter: lora` + `load_in_4bit: true` trains a full-precision base in axolotl: read as
    no quantisation, so the QLoRA rung is not skipped as already done."""
    text = LORA_YML.replace("adapter: lora", "adapter: lora\nload_in_4bit: true")
    (cwd / "l4.yml").write_text(text, encoding="utf-8")
    command = cmd("axolotl train l4.yml", cwd)
    assert D.read(command).quantization_bit is None
    D.render(command, dataclasses.replace(D.read(command), quantization_bit=4), cwd / "a")
    assert "adapter: qlora\n" in (cwd / "a" / "l4.yml").read_text(encoding="utf-8")


def test_full_to_qlora_in_one_step_renames_the_folder_for_the_adapter(cwd: Path) -> None:
    """Full -> LoRA + 4 bits: `adapter: qlora` and a sibling folder named for the adapter."""
    command = cmd("axolotl train full.yml", cwd)
    knobs = dataclasses.replace(D.read(command), finetuning_type=FinetuningType.LORA,
                                lora_rank=8, quantization_bit=4)
    D.render(command, knobs, cwd / "a")
    assert (cwd / "a" / "full.yml").read_text(encoding="utf-8") == FULL_YML + (
        "adapter: qlora\nlora_r: 8\nlora_alpha: 16\nlora_target_linear: true\n"
        "load_in_4bit: true\nload_in_8bit: false\noutput_dir: ./model-out-lora-r8\n")


@pytest.mark.parametrize(("extra", "source"), [
    ("bf16: false\n", "config_file"),        # the file's own word: fp32
    ("fp16: false\nbf16: false\n", "config_file"),
    ("", "known_default"),                   # the file names neither: axolotl's default
])
def test_fp32_is_labelled_with_where_it_was_read(cwd: Path, extra: str, source: str) -> None:
    """`bf16: false` is the user's own word, not a family default (issue 17)."""
    (cwd / "p.yml").write_text(FULL_YML + extra, encoding="utf-8")
    reading = D.read_sourced(cmd("axolotl train p.yml", cwd))
    assert reading.knobs.precision == "fp32"
    assert reading.sources["precision"] == source
