"""The LLaMA-Factory dialect: YAML + `key=value` overrides read, rungs rendered as overrides."""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path

import pytest

from supervisor.command import Command, CommandError
from supervisor.dialects import detect
from supervisor.dialects.llamafactory import LlamaFactoryDialect
from supervisor.knobs import FinetuningType, Knobs

D = LlamaFactoryDialect()

SFT_YAML = """\
### model
model_name_or_path: models/llama  # a local folder

### method
stage: sft
do_train: true
finetuning_type: full   # the ladder may change this

### dataset
dataset: alpaca_tiny
cutoff_len: 1024

### output
output_dir: saves/llama-full
overwrite_cache: true

### train
per_device_train_batch_size: 4
gradient_accumulation_steps: 2
learning_rate: 1.0e-4
"""

MINIMAL_YAML = "model_name_or_path: m\nstage: sft\ndo_train: true\ndataset: d\n"


@pytest.fixture(autouse=True)
def _no_launcher_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FORCE_TORCHRUN", "NPROC_PER_NODE", "NNODES", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def cwd(tmp_path: Path) -> Path:
    (tmp_path / "sft.yaml").write_text(SFT_YAML, encoding="utf-8")
    (tmp_path / "minimal.yaml").write_text(MINIMAL_YAML, encoding="utf-8")
    (tmp_path / "sft.json").write_text(json.dumps({"per_device_train_batch_size": 2,
                                                   "finetuning_type": "lora"}, indent=2),
                                       encoding="utf-8")
    return tmp_path


def cmd(text: str, cwd: Path) -> Command:
    return Command(argv=tuple(shlex.split(text)), cwd=str(cwd))


def render(text: str, cwd: Path, **changes: object) -> str:
    command = cmd(text, cwd)
    knobs = dataclasses.replace(D.read(command), **changes)  # type: ignore[arg-type]
    return shlex.join(D.render(command, knobs, cwd / "attempt").argv)


@pytest.mark.parametrize("text", [
    "llamafactory-cli train sft.yaml",
    "lmf train sft.yaml per_device_train_batch_size=2 cutoff_len=512",
    "env FORCE_TORCHRUN=1 NPROC_PER_NODE=2 llamafactory-cli train sft.yaml",
    "python -m llamafactory.cli train sft.json gradient_accumulation_steps=4",
    "prlimit --as=4000000000 /opt/lf/bin/llamafactory-cli train minimal.yaml",
    "python src/train.py sft.yaml",
])
def test_render_without_change_gives_back_the_same_argv(text: str, cwd: Path) -> None:
    """read -> render with the same knobs: the same argv, byte for byte, and no file written."""
    command = cmd(text, cwd)
    assert D.render(command, D.read(command), cwd / "attempt").argv == command.argv
    assert not (cwd / "attempt").exists()


def test_defaults_decide_which_rungs_are_no_ops(cwd: Path) -> None:
    """An unsaid key takes LLaMA-Factory's default: checkpointing on, LoRA r8, cutoff 2048."""
    assert D.read(cmd("llamafactory-cli train minimal.yaml", cwd)) == Knobs(
        per_device_batch=8, grad_accum=1, cutoff_len=2048, gradient_checkpointing=True,
        finetuning_type=FinetuningType.LORA, lora_rank=8, freeze_trainable_layers=2,
        precision="fp32", model="m")


@pytest.mark.parametrize(("overrides", "expected"), [
    ("", {"per_device_batch": 4, "grad_accum": 2, "cutoff_len": 1024}),
    ("per_device_train_batch_size=2 per_device_train_batch_size=1", {"per_device_batch": 1}),
    ("disable_gradient_checkpointing=true", {"gradient_checkpointing": False}),
    ("finetuning_type=freeze freeze_trainable_layers=-2",
     {"finetuning_type": FinetuningType.FREEZE, "freeze_trainable_layers": -2}),
    ("lora_rank=16 quantization_bit=4 max_steps=-1", {"lora_rank": 16, "quantization_bit": 4,
                                                      "max_steps": None}),
    ("resume_from_checkpoint=saves/llama-full/checkpoint-5 bf16=true",
     {"resume_from_checkpoint": "saves/llama-full/checkpoint-5",
      "precision": "bf16-base-mixed"}),
])
def test_overrides_win_over_the_file(overrides: str, expected: dict[str, object],
                                     cwd: Path) -> None:
    """`key=value` after the config wins, the last one most (OmegaConf merge order)."""
    knobs = D.read(cmd(f"llamafactory-cli train sft.yaml {overrides}", cwd))
    assert {k: getattr(knobs, k) for k in expected} == expected


@pytest.mark.parametrize(("changes", "appended"), [
    ({"per_device_batch": 2, "grad_accum": 4},
     "per_device_train_batch_size=2 gradient_accumulation_steps=4 overwrite_output_dir=true"),
    ({"cutoff_len": 512}, "cutoff_len=512 overwrite_output_dir=true"),
    ({"gradient_checkpointing": False},
     "disable_gradient_checkpointing=true overwrite_output_dir=true"),
    ({"finetuning_type": FinetuningType.LORA, "lora_rank": 16},
     ("finetuning_type=lora lora_rank=16 overwrite_output_dir=true "
     "output_dir=saves/llama-full-lora-r16")),
    ({"finetuning_type": FinetuningType.FREEZE, "freeze_trainable_layers": -1},
     ("finetuning_type=freeze freeze_trainable_layers=-1 overwrite_output_dir=true "
     "output_dir=saves/llama-full-freeze--1")),
    ({"quantization_bit": 4, "finetuning_type": FinetuningType.LORA},
     ("finetuning_type=lora quantization_bit=4 overwrite_output_dir=true "
     "output_dir=saves/llama-full-lora-r8")),
    ({"max_steps": 10}, "max_steps=10 overwrite_output_dir=true"),
    ({"resume_from_checkpoint": "/runs/x/checkpoint-3"},
     "resume_from_checkpoint=/runs/x/checkpoint-3 overwrite_output_dir=true"),
])
def test_every_knob_renders_as_an_appended_override(changes: dict[str, object], appended: str,
                                                    cwd: Path) -> None:
    """Each rung is `key=value` after the command; the user's YAML is never rewritten."""
    before = (cwd / "sft.yaml").read_bytes()
    assert render("llamafactory-cli train sft.yaml", cwd, **changes) == (
        "llamafactory-cli train sft.yaml " + appended)
    assert (cwd / "sft.yaml").read_bytes() == before


def test_an_existing_override_is_rewritten_in_place(cwd: Path) -> None:
    """A key the user already overrides changes where it stands, every time it appears."""
    text = ("llamafactory-cli train sft.yaml per_device_train_batch_size=8 "
            "overwrite_output_dir=true per_device_train_batch_size=8")
    assert render(text, cwd, per_device_batch=4, grad_accum=4) == (
        "llamafactory-cli train sft.yaml per_device_train_batch_size=4 "
        "overwrite_output_dir=true per_device_train_batch_size=4 gradient_accumulation_steps=4")


def test_turning_checkpointing_on_overrides_the_users_disable(cwd: Path) -> None:
    """`disable_gradient_checkpointing=true` in argv becomes false, in place."""
    text = "lmf train sft.yaml disable_gradient_checkpointing=true"
    assert render(text, cwd, gradient_checkpointing=True) == (
        "lmf train sft.yaml disable_gradient_checkpointing=false overwrite_output_dir=true")


def test_a_checkpoint_of_the_commands_own_parameter_set_is_not_resumed_by_another(
        cwd: Path) -> None:
    """LoRA never resumes from a full fine-tuning checkpoint in the command's own folder."""
    out = render("llamafactory-cli train sft.yaml", cwd, finetuning_type=FinetuningType.LORA,
                 resume_from_checkpoint="saves/llama-full/checkpoint-4")
    assert out == ("llamafactory-cli train sft.yaml finetuning_type=lora "
                   "overwrite_output_dir=true output_dir=saves/llama-full-lora-r8")


def test_finalize_writes_the_users_yaml_with_the_working_values(cwd: Path) -> None:
    """final.yaml: comments and key order kept, overrides and working values in, nothing else."""
    command = cmd("llamafactory-cli train sft.yaml learning_rate=5.0e-5", cwd)
    knobs = dataclasses.replace(D.read(command), per_device_batch=1, grad_accum=8,
                                finetuning_type=FinetuningType.LORA)
    run_dir = cwd / "runs" / "r1"
    run_dir.mkdir(parents=True)
    assert D.finalize(command, knobs, run_dir) == (run_dir / "final.yaml",)
    assert (run_dir / "final.yaml").read_text(encoding="utf-8") == f"""\
# The working config found by oom-supervisor (run r1).
# Run it from {cwd}: llamafactory-cli train {run_dir / "final.yaml"}
### model
model_name_or_path: models/llama  # a local folder

### method
stage: sft
do_train: true
finetuning_type: lora   # the ladder may change this

### dataset
dataset: alpaca_tiny
cutoff_len: 1024

### output
output_dir: saves/llama-full-lora-r8
overwrite_cache: true

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 5.0e-5
overwrite_output_dir: true
"""


def test_finalize_keeps_a_json_config_json(cwd: Path) -> None:
    """A JSON config gives final.json with the working values."""
    command = cmd("llamafactory-cli train sft.json", cwd)
    knobs = dataclasses.replace(D.read(command), per_device_batch=1, grad_accum=2)
    (path,) = D.finalize(command, knobs, cwd)
    assert json.loads(path.read_text(encoding="utf-8")) == {
        "per_device_train_batch_size": 1, "finetuning_type": "lora",
        "gradient_accumulation_steps": 2, "overwrite_output_dir": True}


@pytest.mark.parametrize(("keys", "effect"), [
    ("", "a shorter cutoff_len truncates the samples longer than it"),
    ("packing=true", ("packing is on: a shorter cutoff_len DROPS the samples longer than it "
                     "(they are not truncated)")),
    ("neat_packing=true", ("packing is on: a shorter cutoff_len DROPS the samples longer than "
                          "it (they are not truncated)")),
    ("stage=pt", "pre-training text is cut into blocks of cutoff_len: no sample is lost"),
])
def test_describe_says_what_a_shorter_cutoff_does(keys: str, effect: str, cwd: Path) -> None:
    """With packing, samples over the cutoff are dropped, not truncated: the report says so."""
    command = cmd(f"llamafactory-cli train sft.yaml {keys}".strip(), cwd)
    extra = " + 1 override(s)" if keys else ""
    assert D.describe(command) == f"llamafactory (sft.yaml{extra}; {effect})"


@pytest.mark.parametrize(("prefix", "env", "world"), [
    ("", {}, 1),
    ("FORCE_TORCHRUN=1 NPROC_PER_NODE=2", {}, 2),
    ("env FORCE_TORCHRUN=true NPROC_PER_NODE=4 NNODES=2", {}, 8),
    ("", {"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "3"}, 3),
    ("", {"CUDA_VISIBLE_DEVICES": "0,1"}, 2),
    ("", {"FORCE_TORCHRUN": "1", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}, 4),
    ("FORCE_TORCHRUN=0 NPROC_PER_NODE=4", {}, 1),
])
def test_world_size_comes_from_llamafactorys_own_launcher(
        prefix: str, env: dict[str, str], world: int, cwd: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """FORCE_TORCHRUN / NPROC_PER_NODE / NNODES, from argv or the environment, count ranks."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    knobs = D.read(cmd(f"{prefix} llamafactory-cli train sft.yaml", cwd))
    assert (knobs.world_size, knobs.effective_batch) == (world, 4 * 2 * world)


def test_command_env_counts_too(cwd: Path) -> None:
    """The environment a Command adds (Command.env) is read like the process environment."""
    command = Command(argv=("llamafactory-cli", "train", "sft.yaml"), cwd=str(cwd),
                      env=(("FORCE_TORCHRUN", "1"), ("NPROC_PER_NODE", "2")))
    assert D.read(command).world_size == 2


def test_detect_picks_llamafactory_for_a_config_and_argv_for_flags(cwd: Path) -> None:
    """A config file makes it this dialect; `train --flag value` stays with the argv dialect."""
    assert detect(cmd("llamafactory-cli train sft.yaml", cwd)).name == "llamafactory"
    assert detect(cmd("llamafactory-cli train --stage sft --cutoff_len 512", cwd)).name == "argv"


@pytest.mark.parametrize(("text", "message"), [
    ("llamafactory-cli train missing.yaml",
     r"cannot read the LLaMA-Factory config .*missing.yaml: No such file"),
    ("llamafactory-cli train sft.yaml --cutoff_len 512",
     "takes overrides after the config as key=value; '--cutoff_len' is not one"),
    ("llamafactory-cli train sft.yaml per_device_train_batch_size=four",
     r"per_device_train_batch_size: 'four' is not a whole number"),
    ("llamafactory-cli train sft.yaml finetuning_type=oft",
     "'oft' is not a finetuning type this tool can step down from; valid: full, lora, freeze"),
    ("llamafactory-cli train sft.yaml disable_gradient_checkpointing=maybe",
     "'maybe' is not a boolean"),
    ("env FORCE_TORCHRUN=1 NPROC_PER_NODE=gpu llamafactory-cli train sft.yaml",
     "NPROC_PER_NODE='gpu' / NNODES='1' are not whole numbers"),
])
def test_unreadable_configs_say_what_to_fix(text: str, message: str, cwd: Path) -> None:
    """One CommandError line naming the file or key and what to write instead."""
    with pytest.raises(CommandError, match=message) as caught:
        D.read(cmd(text, cwd))
    assert "\n" not in str(caught.value)


def test_bad_yaml_is_one_line(cwd: Path) -> None:
    """A YAML syntax error is reported as one line naming the file."""
    (cwd / "bad.yaml").write_text("a: [1, 2\nb: 3\n", encoding="utf-8")
    with pytest.raises(CommandError, match=r"bad.yaml is not valid YAML") as caught:
        D.read(cmd("llamafactory-cli train bad.yaml", cwd))
    assert "\n" not in str(caught.value)
