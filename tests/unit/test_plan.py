"""plan.py: sizes, the walk, the table, and skipping configs predicted not to fit."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from supervisor.estimate import Method, ModelSpec, Prediction, analytic, estimate_many
from supervisor.knobs import FinetuningType, Knobs
from supervisor.plan import (
    START,
    Skip,
    build,
    costs,
    describe_reading,
    next_runnable,
    parse_size_mib,
    recommended_start,
    render,
    walk,
)
from supervisor.policy import Attempt, GiveUp, Step, next_step, resolve
from tests.unit.test_policy import OOM, without_bnb

DEMO = Knobs(per_device_batch=8, cutoff_len=1024)


@pytest.mark.parametrize(("text", "mib"), [
    ("24GiB", 24_576), ("24GB", 24_576), ("80G", 81_920), ("512MiB", 512), ("512M", 512),
    ("512", 512), ("1.5GiB", 1_536), ("1TiB", 1_048_576), (" 70 mib ", 70), ("2048KiB", 2),
])
def test_sizes_parse_into_mib(text: str, mib: int) -> None:
    """Binary and decimal spellings both read as binary units; a bare number is MiB."""
    assert parse_size_mib(text) == mib


@pytest.mark.parametrize("text", ["", "GiB", "24 gigs", "-1GiB", "24iB", "512B", "0.1", "1e3"])
def test_bad_sizes_are_one_clear_error(text: str) -> None:
    """Anything else is a ValueError whose one line shows what to write."""
    with pytest.raises(ValueError, match=r"24GiB") as error:
        parse_size_mib(text)
    assert "\n" not in str(error.value)


def test_walk_is_the_policy_walk_assuming_every_config_oom() -> None:
    """The same configs next_step gives over an all-OOM history with the same skip predicate,
    start first, then GiveUp."""
    ladder = resolve("default")
    configs = walk(DEMO, ladder, can_set=without_bnb)
    assert configs[0] == (DEMO, None)
    history = [Attempt(number=i + 1, knobs=k, rung=r, verdict=OOM)
               for i, (k, r) in enumerate(configs)]
    for i in range(1, len(history)):
        step = next_step(DEMO, history[:i], ladder, can_set=without_bnb)
        assert isinstance(step, Step)
        assert (step.knobs, step.rung) == configs[i]
    assert isinstance(next_step(DEMO, history, ladder, can_set=without_bnb), GiveUp)
    assert {k.effective_batch for k, _ in configs} == {8}
    assert all(k.optimizer is None and k.quantization_bit is None for k, _ in configs)


def test_plan_walks_only_what_run_can_take_and_says_what_it_skips() -> None:
    """Without bitsandbytes the 8-bit optimizer and QLoRA rungs are skipped with the reason run
    gives, never recommended; with it they are walked (and the walk meets the attempt budget)."""
    spec = ModelSpec.named("tiny")
    with_bnb = build(DEMO, resolve("default"), spec, 70, predict=lambda cs: [None] * len(cs))
    assert any(r.knobs.optimizer == "paged_adamw_8bit" for r in with_bnb.rows)
    assert len(with_bnb.rows) == resolve("default").max_attempts
    assert with_bnb.walk_end == "the policy's attempt budget (32) ends the walk"
    plan = build(DEMO, resolve("default"), spec, 70, predict=lambda cs: [None] * len(cs),
                 can_set=without_bnb)
    assert all(r.knobs.optimizer is None and r.knobs.quantization_bit is None
               for r in plan.rows)
    assert plan.walk_end == "the ladder is spent after 30 configs"
    assert plan.skipped[1:] == (
        ("8bit-optimizer: optimizer=paged_adamw_8bit needs bitsandbytes, which the command's "
         "Python cannot import"),
        "qlora: quantization_bit=4 needs bitsandbytes, which the command's Python cannot import")
    words = " ".join(render(plan).split())
    assert "skipped, as `run` would skip them: - expandable-segments: taken only after" in words
    assert "run cannot try it here: quantization_bit=4 needs bitsandbytes" in words


def test_plan_names_the_recommended_config_in_full() -> None:
    """A recommended 8-bit optimizer (bitsandbytes there) is named: never a config that reads
    as one that OOMs."""
    spec = ModelSpec.named("tiny")

    def predict(configs: Sequence[Knobs]) -> list[Prediction | None]:
        return [Prediction(peak_mib=10.0 if k.optimizer else 500.0, method=Method.FAKE)
                for k in configs]

    plan = build(DEMO, resolve("default"), spec, 70, predict=predict)
    row = plan.rows[plan.recommended or 0]
    assert row.knobs.optimizer == "paged_adamw_8bit"
    words = " ".join(render(plan).split())
    assert ("gradient_checkpointing=true finetuning_type=full optimizer=paged_adamw_8bit), "
            "predicted 10 MiB") in words
    assert "full 8bit-opt" in render(plan)


def test_plan_recommends_the_first_config_that_fits_with_the_margin() -> None:
    """On a 70 MiB device, under a policy with a 10 % margin, the first row whose
    prediction x 1.1 fits is LoRA + gc at 512."""
    spec = ModelSpec.named("tiny")

    def predict(configs: Sequence[Knobs]) -> list[Prediction | None]:
        return list(estimate_many(spec, configs, method="analytic"))

    ladder = dataclasses.replace(resolve("default"), estimate_margin=0.10)
    plan = build(DEMO, ladder, spec, 70, predict=predict, can_set=without_bnb)
    assert plan.recommended is not None
    first = plan.rows[plan.recommended]
    assert first.fits
    assert first.prediction is not None
    assert first.prediction.peak_mib * 1.1 <= 70
    assert all(r.fits is False for r in plan.rows[:plan.recommended])
    knobs = recommended_start(plan)
    assert knobs is not None
    assert (knobs.finetuning_type, knobs.gradient_checkpointing, knobs.cutoff_len) == (
        FinetuningType.LORA, True, 512)
    assert first.effective_batch == 8
    assert first.rule_mib == pytest.approx(5_261_568 * 10 / 2**20)

    table = render(plan)
    assert table.startswith("model tiny (5.3M params); device 70 MiB, safety margin 10%")
    assert f"recommended first config: #{plan.recommended + 1} " in table
    words = " ".join(table.split())  # lines wrap at 100 columns
    assert "rule of thumb: LLaMA-Factory's community rule" in words
    assert "x 20 B (full), x 10 (LoRA), x 6 (freeze)" in words
    assert "full 100 MiB, lora 50 MiB, freeze 30 MiB" in words
    assert "~ marks the analytic fallback" in table
    assert all(len(line) <= 100 for line in table.splitlines()), table
    # Each lever alone on the start, by what it saves on this model, the guide's word beside.
    names = [lever.name for lever in plan.levers]
    assert names == ["bf16 mixed precision", "LoRA + checkpointing", "QLoRA (4-bit) + ckpt",
                     "ZeRO-2 + CPU offload", "cutoff 1024 -> 512"]
    start = plan.rows[0].prediction
    assert start is not None
    for lever in plan.levers:
        assert lever.prediction is not None
        assert lever.prediction.peak_mib < start.peak_mib, lever.name
        assert f"{lever.name}  " in table
    assert "LLaMA-Factory guide: LoRA ~ params x 10 B" in words
    assert "precision not given: assumed fp32" in words


def test_describe_reading_says_what_was_read_and_what_assumed() -> None:
    """Each memory knob with its value and source; one the dialect did not name is assumed."""
    knobs = Knobs(per_device_batch=2, cutoff_len=1024, precision="bf16-mixed", model="m")
    line = describe_reading(knobs, {"precision": "config_file", "model": "command_line"})
    assert line.startswith("read: model m (command line), precision bf16-mixed (config file), "
                           "quantisation none (assumed)")
    assert "world size 1 (assumed)" in line


def test_plan_without_predictions_recommends_nothing_and_says_unknown() -> None:
    """No prediction: '?' in the fits column, no recommendation, nothing skipped."""
    spec = ModelSpec.named("tiny")
    plan = build(DEMO, resolve("default"), spec, 70, predict=lambda cs: [None] * len(cs))
    assert plan.recommended is None
    assert all(r.fits is None for r in plan.rows)
    assert "nothing `run` can try is predicted to fit this device (`run` would exhaust" in \
        " ".join(render(plan).split())


def test_costs_name_what_each_config_gives_up() -> None:
    """Batch halving costs speed (GA kept), cutoff and LoRA cost quality."""
    ladder = resolve("default")
    knobs = Knobs(per_device_batch=2, grad_accum=4, cutoff_len=512,
                  gradient_checkpointing=True, finetuning_type=FinetuningType.LORA)
    assert [(str(c), what) for c, what in costs(knobs, DEMO, ladder)] == [
        ("speed", "batch 8->2 (GA 1->4)"), ("quality", "cutoff 1024->512"),
        ("speed", "checkpointing"), ("quality", "lora")]
    assert costs(DEMO, DEMO, ladder) == ()


def _fixed(peaks: dict[tuple[int, int | None, bool, str], float | None],
           ) -> Callable[[Knobs], Prediction | None]:
    def predict(k: Knobs) -> Prediction | None:
        peak = peaks.get((k.per_device_batch, k.cutoff_len, k.gradient_checkpointing,
                          str(k.finetuning_type)))
        return None if peak is None else Prediction(peak_mib=peak, method=Method.FAKE)

    return predict


def test_next_runnable_skips_configs_predicted_far_over_and_says_why() -> None:
    """Start and the batch halvings are predicted over 70 MiB: skipped, each with its reason."""
    start = Knobs(per_device_batch=4, grad_accum=1, cutoff_len=256)
    predict = _fixed({(4, 256, False, "full"): 400.0, (2, 256, False, "full"): 200.0,
                      (1, 256, False, "full"): 60.0})
    step, skips = next_runnable(start, [], resolve("default"), predict=predict,
                                device_mib=70)
    assert isinstance(step, Step)
    assert (step.knobs.per_device_batch, step.knobs.grad_accum, step.rung) == (1, 4,
                                                                                "smaller-batch")
    assert [(s.knobs.per_device_batch, s.rung) for s in skips] == [(4, None), (2, "smaller-batch")]
    assert skips[0].reason == "predicted 400 MiB (FakeTensor trace) > 70 MiB device"  # policy: 0 %
    assert all(isinstance(s, Skip) and s.attempt.number == 0 for s in skips)
    assert skips[1].attempt.verdict.evidence == f"skipped: {skips[1].reason}"


def test_next_runnable_never_skips_without_a_prediction() -> None:
    """No prediction for the start: it is run as given."""
    start = Knobs(per_device_batch=4, cutoff_len=256)
    step, skips = next_runnable(start, [], resolve("default"),
                                predict=lambda _: None, device_mib=1)
    assert isinstance(step, Step)
    assert (step.knobs, step.rung, skips) == (start, START, ())


def test_next_runnable_after_a_real_oom_continues_from_the_history() -> None:
    """After attempt 1 OOMed for real, the next config predicted to fit is returned."""
    start = Knobs(per_device_batch=2, cutoff_len=256)
    history = [Attempt(number=1, knobs=start, rung=None, verdict=OOM)]
    step, skips = next_runnable(start, history, resolve("default"),
                                predict=_fixed({(1, 256, False, "full"): 10.0}),
                                device_mib=70)
    assert isinstance(step, Step)
    assert step.knobs.per_device_batch == 1
    assert skips == ()


def test_next_runnable_gives_up_when_everything_is_predicted_over() -> None:
    """Every config predicted over the device: GiveUp, with every config listed as skipped."""
    start = Knobs(per_device_batch=2, cutoff_len=256)
    ladder = resolve("default")
    step, skips = next_runnable(
        start, [], ladder, device_mib=1,
        predict=lambda _: Prediction(peak_mib=1000.0, method=Method.ANALYTIC))
    assert isinstance(step, GiveUp)
    assert len(skips) == len(walk(start, ladder))


def test_skipping_on_predictions_reaches_the_fit_in_fewer_attempts() -> None:
    """Tiny, full b8 x 1024 on a 70 MiB device, every attempt's peak as really measured.

    Without predictions the ladder runs 18 configs that OOM before LoRA + checkpointing
    b1 x 512 fits (docs/ladder.md lists them: checkpointing restores the batch, LoRA starts
    without it); with the analytic estimate it skips them and its first attempt fits.
    """
    record = json.loads((PEAKS / "tiny.json").read_text(encoding="utf-8"))
    measured = {_memory(Knobs.from_dict({k: r["knobs"][k] for k in KEYS})): r["peak_live_mib"]
                for r in record["rows"]}
    ladder, device = resolve("default"), 70.0
    spec = ModelSpec.named("tiny")

    def can_set(knob: str, value: object = None) -> bool:  # noqa: ARG001
        # As the reference trainer reads on a machine without bitsandbytes: no 8-bit optimizer,
        # no 4-bit base.
        return knob not in ("optimizer", "quantization_bit")

    def attempts(*, skipping: bool) -> tuple[int, Knobs]:
        history: list[Attempt] = []
        step: Step | GiveUp = Step(knobs=DEMO, rung=START)
        while True:
            if skipping:
                step, skips = next_runnable(DEMO, history, ladder, device_mib=device,
                                            predict=lambda k: analytic(spec, k),
                                            can_set=can_set)
                history += [s.attempt for s in skips]
            elif history:
                step = next_step(DEMO, history, ladder, can_set=can_set)
            assert isinstance(step, Step)
            ran = [a for a in history if a.number > 0]
            if measured[_memory(step.knobs)] <= device:
                return len(ran) + 1, step.knobs
            history.append(Attempt(number=len(ran) + 1, knobs=step.knobs, rung=step.rung,
                                   verdict=OOM))

    without, fitted = attempts(skipping=False)
    with_estimate, fitted_too = attempts(skipping=True)
    assert (without, with_estimate) == (19, 1)
    assert fitted == fitted_too
    assert (fitted.finetuning_type, fitted.cutoff_len, fitted.gradient_checkpointing) == (
        FinetuningType.LORA, 512, True)


KEYS = ("per_device_batch", "grad_accum", "cutoff_len", "gradient_checkpointing",
        "finetuning_type", "lora_rank", "freeze_trainable_layers")
PEAKS = Path(__file__).parent.parent / "data" / "peaks"


def _memory(knobs: Knobs) -> tuple[object, ...]:
    return tuple(getattr(knobs, k) for k in KEYS)


def test_plan_breaks_the_start_down_with_the_dtype_of_each_part() -> None:
    """The start row by part, each in the dtype the program holds it in: LoRA under a Hugging
    Face --bf16 keeps its frozen base fp32 and computes in bf16; an unsaid precision is shown
    as assumed fp32."""
    spec = ModelSpec.named("tiny")

    def predict(configs: Sequence[Knobs]) -> list[Prediction | None]:
        return list(estimate_many(spec, configs, method="analytic"))

    lora = Knobs(per_device_batch=1, cutoff_len=512, precision="bf16-mixed",
                 finetuning_type=FinetuningType.LORA)
    words = " ".join(render(build(lora, resolve("default"), spec, 70, predict=predict,
                                  can_set=without_bnb)).split())
    assert "start (#1), " in words
    assert "(trainable fp32, frozen fp32), gradients " in words
    assert "(computed in bf16)" in words
    words = " ".join(render(build(DEMO, resolve("default"), spec, 70, predict=predict,
                                  can_set=without_bnb)).split())
    assert "gradients 20 MiB (fp32, assumed)" in words
    assert '如何选择最佳的微调方法"), not a prediction' in words


def test_zero_rungs_are_named() -> None:
    """The multi-GPU ladder's ZeRO rungs read as ZeRO stages and offload, once each, not as
    `speed: 3, 3`."""
    ladder = resolve("multi-gpu")
    start = dataclasses.replace(DEMO, deepspeed_stage=0, deepspeed_offload=False, world_size=2)
    zero3 = dataclasses.replace(start, deepspeed_stage=3, deepspeed_offload=True)
    assert [(str(c), what) for c, what in costs(zero3, start, ladder)] == [
        ("speed", "ZeRO-3"), ("speed", "ZeRO offload to CPU")]
    zero2 = dataclasses.replace(start, deepspeed_stage=2)
    assert [what for _, what in costs(zero2, dataclasses.replace(start, deepspeed_stage=1),
                                      ladder)] == ["ZeRO-2 (was ZeRO-1)"]
