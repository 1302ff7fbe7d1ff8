"""The LoRA target list each program says it will adapt, read through its dialect: what the
estimator adapts, and what a narrow list puts in the fit key.

LLaMA-Factory: `lora_target: q_proj,v_proj` (YAML, or `--lora_target` on its CLI), `all` its
default. TRL: `--lora_target_modules q_proj v_proj` (nargs) or `all-linear`, or a list in
its `--config` YAML. axolotl: `lora_target_modules` (a list) and `lora_target_linear: true`.
An HfArgumentParser args file: `lora_target_modules`. Every linear layer, said or not, is the
knob's None; where nothing says it, the source says assumed.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path

import pytest

from supervisor._families import (
    PEFT_DEFAULT,
    canonical_target,
    lora_target_modules,
    target_names,
)
from supervisor.command import Command, CommandError
from supervisor.dialects import detect
from supervisor.dialects.argv import ArgvDialect, TrlDialect
from supervisor.dialects.readback import render_checked
from supervisor.estimate import ModelSpec, analytic
from supervisor.knobs import FinetuningType, Knobs, Source
from supervisor.plan import describe_reading
from supervisor.policy import PolicyError, parse

LF_YAML = ("model_name_or_path: m\nstage: sft\ndo_train: true\ndataset: d\n"
           "finetuning_type: lora\nper_device_train_batch_size: 4\n")


@pytest.fixture(autouse=True)
def _no_launcher_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FORCE_TORCHRUN", "NPROC_PER_NODE", "NNODES", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)


def _read(text: str, cwd: Path, files: dict[str, str] | None = None) -> tuple[str | None, Source]:
    for name, body in (files or {}).items():
        (cwd / name).write_text(body, encoding="utf-8")
    command = Command(argv=tuple(shlex.split(text)), cwd=str(cwd))
    reading = detect(command).read_sourced(command)
    return reading.knobs.lora_target, reading.source("lora_target")


@pytest.mark.parametrize(("text", "files", "target", "source"), [
    # LLaMA-Factory's YAML, an override on its command line, its `all` and its default.
    ("llamafactory-cli train sft.yaml", {"sft.yaml": LF_YAML + "lora_target: q_proj,v_proj\n"},
     "q_proj,v_proj", Source.CONFIG_FILE),
    ("llamafactory-cli train sft.yaml lora_target=q_proj,k_proj",
     {"sft.yaml": LF_YAML + "lora_target: all\n"}, "q_proj,k_proj", Source.COMMAND_LINE),
    ("llamafactory-cli train sft.yaml", {"sft.yaml": LF_YAML + "lora_target: all\n"},
     None, Source.CONFIG_FILE),
    ("llamafactory-cli train sft.yaml", {"sft.yaml": LF_YAML}, None, Source.KNOWN_DEFAULT),
    # LLaMA-Factory's flags.
    ("llamafactory-cli train --stage sft --lora_target q_proj,v_proj", None, "q_proj,v_proj",
     Source.COMMAND_LINE),
    ("llamafactory-cli train --stage sft", None, None, Source.KNOWN_DEFAULT),
    # TRL: nargs, one name, all-linear, its --config YAML, and nothing said.
    (("trl sft --model_name_or_path m --use_peft --lora_target_modules q_proj v_proj "
      "--per_device_train_batch_size 2"), None, "q_proj,v_proj", Source.COMMAND_LINE),
    ("trl sft --model_name_or_path m --use_peft --lora_target_modules=c_attn", None, "c_attn",
     Source.COMMAND_LINE),
    ("trl sft --model_name_or_path m --use_peft --lora_target_modules all-linear", None, None,
     Source.COMMAND_LINE),
    ("trl sft --config trl.yaml", {"trl.yaml": "model_name_or_path: m\nuse_peft: true\n"
                                               "lora_target_modules:\n- q_proj\n- v_proj\n"},
     "q_proj,v_proj", Source.CONFIG_FILE),
    # TRL's ModelConfig.lora_target_modules is None: peft's own list for the model type.
    ("trl sft --model_name_or_path m --use_peft", None, PEFT_DEFAULT, Source.KNOWN_DEFAULT),
    # axolotl: a list, all linear layers, both (all), nothing.
    ("axolotl train lora.yml", {"lora.yml": "base_model: m\nadapter: lora\n"
                                            "lora_target_modules:\n  - q_proj\n  - v_proj\n"},
     "q_proj,v_proj", Source.CONFIG_FILE),
    ("axolotl train lora.yml", {"lora.yml": "base_model: m\nadapter: lora\n"
                                            "lora_target_linear: true\n"},
     None, Source.CONFIG_FILE),
    ("axolotl train lora.yml", {"lora.yml": "base_model: m\nadapter: lora\n"
                                            "lora_target_modules: [q_proj]\n"
                                            "lora_target_linear: true\n"},
     None, Source.CONFIG_FILE),
    ("axolotl train lora.yml", {"lora.yml": "base_model: m\nadapter: lora\n"}, None,
     Source.ASSUMED),
    # An HfArgumentParser args file (a TRL-style script).
    ("python train.py args.json", {"args.json": json.dumps({
        "output_dir": "o", "per_device_train_batch_size": 2, "use_peft": True,
        "lora_target_modules": ["q_proj", "v_proj"]})}, "q_proj,v_proj", Source.CONFIG_FILE),
    ("python train.py args.json", {"args.json": json.dumps({
        "output_dir": "o", "per_device_train_batch_size": 2, "use_peft": True})},
     PEFT_DEFAULT, Source.KNOWN_DEFAULT),
])
def test_each_program_s_spelling_of_the_target_list_is_read(
        tmp_path: Path, text: str, files: dict[str, str] | None, target: str | None,
        source: Source) -> None:
    """The list as the program will adapt it, and where it was said."""
    assert _read(text, tmp_path, files) == (target, source)


def test_the_argv_readers_take_the_list_whatever_follows_it() -> None:
    """nargs ends at the next option; the options after it are still read."""
    command = Command(argv=("trl", "sft", "--lora_target_modules", "q_proj", "v_proj",
                            "--use_peft", "--lora_r", "4"))
    knobs = TrlDialect().read(command)
    assert (knobs.lora_target, knobs.finetuning_type, knobs.lora_rank) == (
        "q_proj,v_proj", FinetuningType.LORA, 4)
    command = Command(argv=("llamafactory-cli", "train", "--lora_target", "q_proj, v_proj"))
    assert ArgvDialect(probe=None).read(command).lora_target == "q_proj,v_proj"


def test_a_target_that_is_no_list_is_one_line(tmp_path: Path) -> None:
    """`lora_target: 3` in a YAML: one line saying what to give instead."""
    with pytest.raises(CommandError, match="is not a list of module names"):
        _read("llamafactory-cli train sft.yaml", tmp_path,
              {"sft.yaml": LF_YAML + "lora_target: 3\n"})


def test_a_rung_keeps_the_list_and_never_writes_it(tmp_path: Path) -> None:
    """Halving the batch of a LoRA run on `q_proj,v_proj`: the rendered command still says it,
    reads back the same, and no rung may set it (it is the program's, not a memory lever)."""
    (tmp_path / "sft.yaml").write_text(LF_YAML + "lora_target: q_proj,v_proj\n",
                                       encoding="utf-8")
    command = Command(argv=("llamafactory-cli", "train", "sft.yaml"), cwd=str(tmp_path))
    dialect = detect(command)
    halved = dataclasses.replace(dialect.read(command), per_device_batch=2)
    rendered = render_checked(dialect, command, halved, tmp_path / "attempt")
    assert dialect.read(rendered).lora_target == "q_proj,v_proj"
    assert "lora_target" not in dialect.read_sourced(command).rewritable
    with pytest.raises(PolicyError, match="lora_target"):
        parse({"rung": [{"name": "t", "action": "set", "knob": "lora_target",
                         "value": "q_proj"}]})


def test_the_names_read_as_peft_matches_them() -> None:
    """Commas and spaces separate names; `all` anywhere is every linear layer."""
    assert target_names("q_proj, v_proj") == ("q_proj", "v_proj")
    assert target_names(["q_proj", "v_proj", "q_proj"]) == ("q_proj", "v_proj")
    assert target_names("['q_proj', 'v_proj']") == ("q_proj", "v_proj")  # a printed default
    assert target_names("all") is None
    assert target_names(["q_proj", "all-linear"]) is None
    assert canonical_target("all_linear") is None
    assert lora_target_modules("q_proj,v_proj") == ["q_proj", "v_proj"]
    assert lora_target_modules(None) == "all-linear"
    assert lora_target_modules(PEFT_DEFAULT) is None  # peft picks the model type's own list


@pytest.mark.parametrize(("config", "target", "adapted"), [
    ({"model_type": "llama", "hidden_size": 64, "intermediate_size": 172,
      "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 128},
     "q_proj,v_proj", 2 * 4 * (2 * (64 + 64))),
    ({"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 128},
     "c_attn", 2 * 4 * (64 + 3 * 64)),
    # `c_proj` is attention's output and the MLP's: peft adapts both, as the suffix matches.
    ({"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 128},
     "c_proj", 2 * 4 * ((64 + 64) + (256 + 64))),
    ({"model_type": "gpt_neox", "hidden_size": 64, "intermediate_size": 256,
      "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 128},
     "attention.dense", 2 * 4 * (64 + 64)),
])
def test_the_count_adapts_only_the_matching_layers(
        tmp_path: Path, config: dict[str, object], target: str, adapted: int) -> None:
    """The analytic count trains the matching projections' A and B only, and predicts less
    than LoRA on every linear layer; a list naming none of the family's layers counts all."""
    (tmp_path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    spec = ModelSpec.resolve(str(tmp_path))
    lora = Knobs(per_device_batch=2, cutoff_len=64, finetuning_type=FinetuningType.LORA,
                 lora_rank=4)
    narrow = analytic(spec, dataclasses.replace(lora, lora_target=target))
    every = analytic(spec, lora)
    assert narrow.breakdown["trainable_params"] == adapted
    assert narrow.peak_mib < every.peak_mib
    unknown = analytic(spec, dataclasses.replace(lora, lora_target="no_such_proj"))
    assert unknown.breakdown["trainable_params"] == every.breakdown["trainable_params"]


@pytest.mark.parametrize(("config", "adapted"), [
    ({"model_type": "llama", "hidden_size": 64, "intermediate_size": 172,
      "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 128},
     2 * 4 * (2 * (64 + 64))),  # q_proj, v_proj
    ({"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 128},
     2 * 4 * (64 + 3 * 64)),  # c_attn
    ({"model_type": "phi", "hidden_size": 64, "intermediate_size": 256,
      "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 128},
     2 * 4 * (2 * (64 + 64) + (64 + 256) + (256 + 64))),  # q_proj, v_proj, fc1, fc2
])
def test_peft_s_own_list_is_counted_for_the_model_type(
        tmp_path: Path, config: dict[str, object], adapted: int) -> None:
    """TRL names no list by default: peft adapts its own for the model type, and so does the
    count."""
    (tmp_path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    spec = ModelSpec.resolve(str(tmp_path))
    knobs = Knobs(per_device_batch=2, cutoff_len=64, finetuning_type=FinetuningType.LORA,
                  lora_rank=4, lora_target=PEFT_DEFAULT)
    assert analytic(spec, knobs).breakdown["trainable_params"] == adapted


def test_the_plan_says_which_layers_lora_adapts_and_where_that_was_read() -> None:
    """A LoRA start names its targets and their source; unsaid, every linear layer is shown
    as assumed; a full fine-tuning start says nothing of adapters."""
    lora = Knobs(per_device_batch=2, finetuning_type=FinetuningType.LORA)
    said = describe_reading(dataclasses.replace(lora, lora_target="q_proj,v_proj"),
                            {"lora_target": "command_line"})
    assert "LoRA targets q_proj v_proj (command line)" in said
    assert "LoRA targets every linear layer (assumed)" in describe_reading(lora, {})
    assert "LoRA" not in describe_reading(Knobs(per_device_batch=2), {})
    trl = describe_reading(dataclasses.replace(lora, lora_target=PEFT_DEFAULT),
                           {"lora_target": "known_default"})
    assert "LoRA targets peft's own list for the model type (known default)" in trl


TRL_HELP = (Path(__file__).resolve().parents[1] / "data" / "help" /
            "trl_modelconfig.txt").read_text(encoding="utf-8")


@pytest.mark.parametrize(("extra", "target", "source"), [
    ((), PEFT_DEFAULT, Source.PROGRAM),  # its help: (default: None), handed to peft as is
    (("--lora_target_modules", "q_proj", "v_proj"), "q_proj,v_proj", Source.COMMAND_LINE),
    (("--lora-target-modules", "all-linear"), None, Source.COMMAND_LINE),
])
def test_a_script_with_trl_s_model_config_is_read_by_its_help(
        extra: tuple[str, ...], target: str | None, source: Source) -> None:
    """A TRL-style script (TRL's real ModelConfig, its --help recorded): the list after the
    nargs flag, or, unsaid, peft's own for the model type."""
    dialect = ArgvDialect(probe=lambda _program: TRL_HELP)
    command = Command(argv=("python", "sft.py", "--output_dir", "o", "--use_peft", *extra,
                            "--per_device_train_batch_size", "2"))
    reading = dialect.read_sourced(command)
    assert (reading.knobs.lora_target, reading.source("lora_target")) == (target, source)
    assert (reading.knobs.per_device_batch, reading.knobs.finetuning_type) == (
        2, FinetuningType.LORA)


def test_trl_s_nargs_list_survives_a_render() -> None:
    """The LoRA rung and a smaller batch on a TRL command that names its list: the values
    after `--lora_target_modules` stay where they were, and the attempt reads the same list."""
    dialect = TrlDialect()
    command = Command(argv=("trl", "sft", "--model_name_or_path", "m", "--lora_target_modules",
                            "q_proj", "v_proj", "--per_device_train_batch_size", "4"))
    knobs = dataclasses.replace(dialect.read(command), per_device_batch=2,
                                finetuning_type=FinetuningType.LORA)
    rendered = render_checked(dialect, command, knobs, Path())
    assert rendered.argv == ("trl", "sft", "--model_name_or_path", "m", "--lora_target_modules",
                             "q_proj", "v_proj", "--per_device_train_batch_size", "2",
                             "--use_peft")
    assert dialect.read(rendered).lora_target == "q_proj,v_proj"
