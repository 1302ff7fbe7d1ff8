"""The wider ladder: each new rung walked from recorded OOMs, skipped where the program lacks it.

Verdicts come from `classify` over tails recorded from real runs (tests/data/tails/); the
bitsandbytes condition is the real probe (`program.can_import`): bitsandbytes is not installed
in this project's environment, so the 8-bit and QLoRA rungs are skipped with that reason here.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from supervisor.classify import Outcome, Verdict, classify
from supervisor.command import Command
from supervisor.dialects.argv import ArgvDialect
from supervisor.dialects.llamafactory import LlamaFactoryDialect
from supervisor.knobs import ALLOC_CONF, FinetuningType, Knobs, Reading
from supervisor.policy import Attempt, GiveUp, PolicyError, Step, next_step, parse, resolve
from supervisor.program import can_import

TAILS = Path(__file__).resolve().parents[1] / "data" / "tails"
HAS_BNB = can_import(Command(argv=(sys.executable, "-c", "pass")), "bitsandbytes")


def _verdict(path: Path) -> Verdict:
    tail = tuple(path.read_text(encoding="utf-8").splitlines())
    return classify(Outcome(exit_code=1, duration_s=1.0, tail=tail))


# Quoted (tests/data/tails/quoted/README.md): a torch 2.2 CUDA OOM with 696.75 MiB reserved
# by PyTorch but unallocated against a 30 MiB request: fragmentation.
FRAGMENTED = _verdict(TAILS / "quoted" / "cuda_oom_torch22.txt")
# Recorded on an H200 (tests/data/tails/README.md): 3.69 MiB unallocated, 20 MiB tried.
NOT_FRAGMENTED = _verdict(TAILS / "cuda_device_budget_oom.txt")
# Recorded on CPU: the live-bytes budget's message has no allocator figures at all.
NO_FIGURES = _verdict(TAILS / "device_budget_oom.txt")

START = Knobs(per_device_batch=4, cutoff_len=512)


def _history(*steps: tuple[Knobs, str | None, Verdict]) -> list[Attempt]:
    return [Attempt(number=i + 1, knobs=k, rung=r, verdict=v) for i, (k, r, v) in enumerate(steps)]


def _all(knob: str, value: object = None) -> bool:  # noqa: ARG001 - a program that takes all
    return True


def test_recorded_tails_are_ooms_with_the_figures_the_rung_reads() -> None:
    """The fixtures are what they claim: two CUDA OOMs with figures, one without."""
    assert FRAGMENTED.is_oom
    assert NOT_FRAGMENTED.is_oom
    assert NO_FIGURES.is_oom
    assert FRAGMENTED.numbers is not None
    assert FRAGMENTED.numbers.reserved_unallocated_mib == pytest.approx(696.75)
    assert NOT_FRAGMENTED.numbers is not None
    assert NOT_FRAGMENTED.numbers.reserved_unallocated_mib == pytest.approx(3.69)


def test_fragmented_oom_takes_expandable_segments_first() -> None:
    """An OOM whose own figures show fragmentation: expandable segments, before any batch cut."""
    step = next_step(START, _history((START, None, FRAGMENTED)), resolve("default"),
                     can_set=_all)
    assert isinstance(step, Step)
    assert step.rung == "expandable-segments"
    assert step.knobs == dataclasses.replace(START, expandable_segments=True)


@pytest.mark.parametrize(("verdict", "why"), [
    (NOT_FRAGMENTED, ("the OOM shows no fragmentation: 3.69 MiB reserved but unallocated "
                     "against 20 MiB tried")),
    (NO_FIGURES, ("the OOM shows no fragmentation: its message gives no reserved-but-"
                 "unallocated figure")),
])
def test_unfragmented_oom_skips_expandable_segments_with_the_reason(verdict: Verdict,
                                                                    why: str) -> None:
    """No fragmentation in the numbers: the rung is skipped, saying why; the batch is halved."""
    step = next_step(START, _history((START, None, verdict)), resolve("default"), can_set=_all)
    assert isinstance(step, Step)
    assert step.rung == "smaller-batch"
    assert step.knobs == dataclasses.replace(START, per_device_batch=2, grad_accum=2)
    assert step.skipped[0].startswith(f"expandable-segments: {why}")


def test_expandable_segments_fires_later_when_a_later_oom_shows_fragmentation() -> None:
    """The conditional rung is never spent by order: a fragmented OOM after LoRA still takes it."""
    lora = dataclasses.replace(START, finetuning_type=FinetuningType.LORA)
    step = next_step(START, _history((START, None, NOT_FRAGMENTED),
                                     (lora, "lora", FRAGMENTED)), resolve("default"),
                     can_set=_all)
    assert isinstance(step, Step)
    assert step.rung == "expandable-segments"
    assert step.knobs.expandable_segments


_FLOORED = Knobs(per_device_batch=1, grad_accum=4, cutoff_len=256, gradient_checkpointing=True)


def test_8bit_optimizer_follows_checkpointing_where_the_program_takes_it() -> None:
    """At batch and cutoff floors with checkpointing on: the 8-bit optimizer, before LoRA."""
    step = next_step(_FLOORED, _history((_FLOORED, None, NO_FIGURES)), resolve("default"),
                     can_set=_all)
    assert isinstance(step, Step)
    assert step.rung == "8bit-optimizer"
    assert step.knobs.optimizer == "paged_adamw_8bit"


def test_qlora_follows_lora() -> None:
    """LoRA still OOMs: QLoRA (4-bit base, LoRA on top) before freeze."""
    lora = dataclasses.replace(_FLOORED, optimizer="paged_adamw_8bit",
                               finetuning_type=FinetuningType.LORA)
    step = next_step(_FLOORED, _history((lora, "lora", NO_FIGURES)), resolve("default"),
                     can_set=_all)
    assert isinstance(step, Step)
    assert step.rung == "qlora"
    assert (step.knobs.quantization_bit, step.knobs.finetuning_type) == (4, FinetuningType.LORA)


def test_freeze_after_qlora_drops_the_4bit_base() -> None:
    """Freeze tuning of a quantised model is refused by LLaMA-Factory: the rung unsets it.

    QLoRA starts from the command's own optimizer; the 8-bit one is added again (a speed rung,
    once per method) before the walk gives QLoRA up for freeze, which starts without it."""
    qlora = dataclasses.replace(_FLOORED, finetuning_type=FinetuningType.LORA, quantization_bit=4)
    step = next_step(_FLOORED, _history((qlora, "qlora", NO_FIGURES)), resolve("default"),
                     can_set=_all)
    assert isinstance(step, Step)
    assert (step.rung, step.knobs.optimizer) == ("8bit-optimizer", "paged_adamw_8bit")
    step = next_step(_FLOORED, _history((qlora, "qlora", NO_FIGURES),
                                        (step.knobs, step.rung, NO_FIGURES)),
                     resolve("default"), can_set=_all)
    assert isinstance(step, Step)
    assert step.rung == "freeze"
    assert (step.knobs.finetuning_type, step.knobs.quantization_bit, step.knobs.optimizer) == (
        FinetuningType.FREEZE, None, None)


def _reference_trainer(tmp_path: Path, *flags: str) -> Command:
    return Command(argv=(sys.executable, "-m", "supervisor.reference_trainer", *flags,
                         "--output_dir", str(tmp_path / "out")), cwd=str(tmp_path))


def test_real_program_takes_optim_and_the_probe_decides_the_8bit_rung(tmp_path: Path) -> None:
    """The reference trainer's --help lists --optim; the 8-bit rung runs only with bitsandbytes."""
    command = _reference_trainer(tmp_path, "--per_device_train_batch_size", "1",
                                 "--cutoff_len", "256", "--gradient_checkpointing")
    dialect = ArgvDialect()
    reading = dialect.read_sourced(command)
    assert reading.can_set("optimizer")
    rendered = dialect.render(command, dataclasses.replace(reading.knobs, optimizer="adafactor"),
                              tmp_path)
    assert rendered.argv[-2:] == ("--optim", "adafactor")
    step = next_step(reading.knobs, _history((reading.knobs, None, NO_FIGURES)),
                     resolve("default"), can_set=reading.can_set)
    if HAS_BNB:
        assert isinstance(step, Step)
        assert step.rung == "8bit-optimizer"
        return
    # bitsandbytes is not installed here: skipped with that reason; the reference trainer
    # also has no quantisation flag, so QLoRA is skipped for that.
    assert isinstance(step, Step)
    assert step.rung == "lora"
    assert ("8bit-optimizer: optimizer=paged_adamw_8bit needs bitsandbytes, which the "
            "command's Python cannot import") in step.skipped


def test_real_llamafactory_config_renders_optim_and_quantization(tmp_path: Path) -> None:
    """LLaMA-Factory keys: `optim=` and `quantization_bit=` overrides; refused without bnb."""
    config = tmp_path / "sft.yaml"
    config.write_text("model_name_or_path: m\nstage: sft\nfinetuning_type: lora\n"
                      "per_device_train_batch_size: 2\ncutoff_len: 512\n", encoding="utf-8")
    command = Command(argv=("llamafactory-cli", "train", str(config)), cwd=str(tmp_path))
    dialect = LlamaFactoryDialect()
    reading = dialect.read_sourced(command)
    knobs = dataclasses.replace(reading.knobs, optimizer="paged_adamw_8bit", quantization_bit=4)
    rendered = dialect.render(command, knobs, tmp_path)
    assert "optim=paged_adamw_8bit" in rendered.argv
    assert "quantization_bit=4" in rendered.argv
    assert reading.can_set("quantization_bit", 4) is HAS_BNB
    assert reading.can_set("optimizer", "paged_adamw_8bit") is HAS_BNB
    assert reading.can_set("optimizer", "adamw_torch")


def test_expandable_segments_renders_into_the_environment_merged(tmp_path: Path) -> None:
    """The variable is merged with the command's own setting, never replacing it."""
    command = dataclasses.replace(_reference_trainer(tmp_path, "--cutoff_len", "256"),
                                  env=((ALLOC_CONF, "max_split_size_mb:128"),))
    dialect = ArgvDialect()
    reading = dialect.read_sourced(command)
    assert reading.can_set("expandable_segments")
    assert reading.knobs.expandable_segments is False
    rendered = dialect.render(command, dataclasses.replace(reading.knobs,
                                                           expandable_segments=True), tmp_path)
    assert dict(rendered.env)[ALLOC_CONF] == "max_split_size_mb:128,expandable_segments:True"
    assert rendered.argv == command.argv
    assert dialect.read(rendered).expandable_segments is True


def test_expandable_segments_rewrites_an_env_assignment_on_the_command_line(
        tmp_path: Path) -> None:
    """`env PYTORCH_CUDA_ALLOC_CONF=... python ...` would win over the environment: rewritten."""
    base = _reference_trainer(tmp_path, "--cutoff_len", "256")
    command = dataclasses.replace(base, argv=("env", (f"{ALLOC_CONF}=garbage_collection_threshold"
                                              ":0.6"), *base.argv))
    dialect = ArgvDialect()
    knobs = dataclasses.replace(dialect.read(command), expandable_segments=True)
    rendered = dialect.render(command, knobs, tmp_path)
    assert rendered.argv[1] == (f"{ALLOC_CONF}=garbage_collection_threshold:0.6,"
                                "expandable_segments:True")


def _ds_command(tmp_path: Path, stage: int) -> Command:
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2,
                              "zero_optimization": {"stage": stage}}), encoding="utf-8")
    return _reference_trainer(tmp_path, "--per_device_train_batch_size", "2",
                              "--deepspeed", str(ds))


def test_zero_rungs_raise_the_stage_then_offload_in_the_ds_json(tmp_path: Path) -> None:
    """ZeRO-1 -> 2 -> 3 -> optimizer offload, each written into a consistent DS JSON copy."""
    command = _ds_command(tmp_path, 1)
    dialect = ArgvDialect(probe=None)
    reading = dialect.read_sourced(command)
    ladder = resolve("multi-gpu")
    floor = dataclasses.replace(reading.knobs, per_device_batch=1, grad_accum=2)
    history = _history((floor, None, NO_FIGURES))
    seen = []
    for _ in range(3):
        step = next_step(reading.knobs, history, ladder, can_set=reading.can_set)
        assert isinstance(step, Step)
        seen.append((step.rung, step.knobs.deepspeed_stage, step.knobs.deepspeed_offload))
        floored = dataclasses.replace(step.knobs, per_device_batch=1, grad_accum=2)
        history = [*history, Attempt(number=len(history) + 1, knobs=floored, rung=step.rung,
                                     verdict=NO_FIGURES)]
    assert seen == [("zero-2", 2, False), ("zero-3", 3, False), ("zero-offload", 3, True)]
    rendered = dialect.render(command, history[-1].knobs, tmp_path / "attempt")
    copy = Path(rendered.argv[rendered.argv.index("--deepspeed") + 1])
    data = json.loads(copy.read_text(encoding="utf-8"))
    assert data["zero_optimization"]["stage"] == 3
    assert data["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert data["train_micro_batch_size_per_gpu"] == 1


def test_zero_rungs_never_lower_a_stage(tmp_path: Path) -> None:
    """A ZeRO-3 command skips the ZeRO-2 and ZeRO-3 rungs: the stage is already there."""
    reading = ArgvDialect(probe=None).read_sourced(_ds_command(tmp_path, 3))
    floor = dataclasses.replace(reading.knobs, per_device_batch=1, grad_accum=2)
    step = next_step(reading.knobs, _history((floor, None, NO_FIGURES)), resolve("multi-gpu"),
                     can_set=reading.can_set)
    assert isinstance(step, Step)
    assert step.rung == "zero-offload"


def test_zero_rungs_are_skipped_without_deepspeed(tmp_path: Path) -> None:
    """No DeepSpeed config: every ZeRO rung is skipped, saying so; checkpointing comes next."""
    command = _reference_trainer(tmp_path, "--per_device_train_batch_size", "1")
    reading = ArgvDialect(probe=None).read_sourced(command)
    step = next_step(reading.knobs, _history((reading.knobs, None, NO_FIGURES)),
                     resolve("multi-gpu"), can_set=reading.can_set)
    assert isinstance(step, Step)
    assert step.rung == "gradient-checkpointing"
    assert "zero-2: the command does not use deepspeed_stage" in step.skipped
    assert ("zero-offload: the command uses no DeepSpeed config (--deepspeed ds.json) to write "
            "deepspeed_offload=true into") in step.skipped


def test_keep_quality_stops_before_the_first_quality_rung_and_names_it() -> None:
    """--keep-quality: no LoRA; the GiveUp says which rung would come, at which cost."""
    ladder = dataclasses.replace(resolve("default"), keep_quality=True)
    step = next_step(_FLOORED, _history((_FLOORED, None, NO_FIGURES)), ladder,
                     can_set=lambda k, v: (k, v) != ("optimizer", "paged_adamw_8bit"))
    assert isinstance(step, GiveUp)
    assert step.reason.startswith("--keep-quality: would try lora (cost quality) next, with "
                                  "finetuning_type=lora")
    assert "rerun without --keep-quality to allow it" in step.reason


def test_keep_quality_still_takes_speed_rungs_before_giving_up() -> None:
    """Before the quality rung a later speed-only rung is tried, even with speed_before_quality
    off."""
    ladder = dataclasses.replace(resolve("default"), keep_quality=True,
                                 speed_before_quality=False)
    start = Knobs(per_device_batch=1, cutoff_len=512)
    step = next_step(start, _history((start, None, NO_FIGURES)), ladder, can_set=_all)
    assert isinstance(step, Step)
    assert step.rung == "gradient-checkpointing"


@pytest.mark.parametrize(("table", "message"), [
    ({"action": "enable", "knob": "expandable_segments", "when": "sometimes"},
     "unknown condition when = 'sometimes'; valid: fragmented"),
    ({"action": "raise", "knob": "deepspeed_stage"}, "action 'raise' needs a value"),
])
def test_bad_new_rung_keys_fail_at_load(table: dict[str, object], message: str) -> None:
    """A mistake in the new keys is one PolicyError line, before anything runs."""
    with pytest.raises(PolicyError, match=message):
        parse({"rung": [table]})


def test_reading_round_trips_the_new_knobs() -> None:
    """The new knobs survive the journal (Knobs.to_dict / from_dict)."""
    knobs = Knobs(per_device_batch=2, expandable_segments=True, optimizer="adafactor")
    reading = Reading(knobs=knobs, rewritable=frozenset({"optimizer"}))
    assert Reading.from_dict(reading.to_dict()).knobs == knobs
