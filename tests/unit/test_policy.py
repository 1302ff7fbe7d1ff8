"""The ladder as data: loading, validation, and whole walks over scripted OOM histories."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from supervisor._compat import tomllib
from supervisor.classify import OomKind, Verdict, VerdictKind, classify
from supervisor.knobs import FinetuningType, Knobs
from supervisor.policy import (
    Attempt,
    GiveUp,
    Ladder,
    PolicyError,
    Step,
    load,
    next_step,
    parse,
    resolve,
    shipped_policies,
)
from tests.fakes import outcome_from

DEFAULT = shipped_policies()["default"]
OOM = Verdict(kind=VerdictKind.OOM, oom_kind=OomKind.TORCH, evidence="recorded")
FULL = FinetuningType.FULL
LORA = FinetuningType.LORA
FREEZE = FinetuningType.FREEZE


def walk(start: Knobs, ladder: Ladder) -> tuple[list[tuple[object, ...]], list[Step], GiveUp]:
    """OOM on every attempt; return each config tried as a short tuple, the steps, the give-up."""
    history: list[Attempt] = [Attempt(number=1, knobs=start, rung=None, verdict=OOM)]
    steps: list[Step] = []
    while True:
        step = next_step(start, history, ladder, can_set=without_bnb)
        if isinstance(step, GiveUp):
            return [_short(a.knobs) for a in history], steps, step
        steps.append(step)
        history.append(Attempt(number=len(history) + 1, knobs=step.knobs, rung=step.rung,
                               verdict=OOM))


def without_bnb(knob: str, value: object) -> bool:
    """A program whose Python cannot import bitsandbytes (as here): no 8-bit optimizer, no QLoRA."""
    return not ((knob == "optimizer" and value == "paged_adamw_8bit")
                or (knob == "quantization_bit" and value is not None))


def _short(k: Knobs) -> tuple[object, ...]:
    return (k.per_device_batch, k.grad_accum, k.cutoff_len, k.gradient_checkpointing,
            str(k.finetuning_type))


def test_default_ladder_whole_walk_keeps_effective_batch() -> None:
    """Batch first; checkpointing (speed) restores the batch before any cut in cutoff (quality);
    each new method starts from the command's own speed settings (checkpointing off)."""
    start = Knobs(per_device_batch=4, grad_accum=2, cutoff_len=1024)
    configs, steps, give_up = walk(start, resolve("default"))
    per_method = [
        (4, 2, 1024, False), (2, 4, 1024, False), (1, 8, 1024, False),
        # before truncating samples, checkpointing at the command's batch, searched down again
        (4, 2, 1024, True), (2, 4, 1024, True), (1, 8, 1024, True),
        (1, 8, 512, True), (1, 8, 256, True),
    ]
    assert configs == [(*c, method) for method in ("full", "lora", "freeze") for c in per_method]
    assert {int(str(b)) * int(str(ga)) for b, ga, *_ in configs} == {8}
    gc_step = next(s for s in steps if s.rung == "gradient-checkpointing")
    assert gc_step.note == "tried before shorter-cutoff, which costs quality"
    assert gc_step.restored == (("per_device_batch", 1, 4), ("grad_accum", 8, 2))
    lora_step = next(s for s in steps if s.rung == "lora")
    assert lora_step.restored == (
        ("per_device_batch", 1, 4), ("grad_accum", 8, 2), ("cutoff_len", 256, 1024),
        ("gradient_checkpointing", True, False))
    assert give_up.spent == (
        "expandable-segments: not tried",
        "smaller-batch: per_device_batch at 1 (floor 1)",
        "shorter-cutoff: cutoff_len at 256 (floor 256)",
        "gradient-checkpointing: gradient_checkpointing=true tried from attempt 4",
        ("8bit-optimizer: skipped, optimizer=paged_adamw_8bit needs bitsandbytes, which the "
         "command's Python cannot import"),
        "lora: finetuning_type=lora tried from attempt 9",
        "qlora: not tried",
        "freeze: finetuning_type=freeze tried from attempt 17",
    )


def test_a_refused_rung_gives_the_dialects_reason_in_skipped_and_spent() -> None:
    """A rung the program refuses is skipped in the dialect's words, and the give-up's
    account of the rungs says the same, not "not tried"."""
    start = Knobs(per_device_batch=1, cutoff_len=256, gradient_checkpointing=True,
                  finetuning_type=FinetuningType.LORA, lora_rank=8, quantization_bit=4,
                  optimizer="paged_adamw_8bit")
    history = [Attempt(number=1, knobs=start, rung=None, verdict=OOM)]

    def no_freeze(knob: str, value: object) -> bool:
        return not (knob == "finetuning_type" and value == FinetuningType.FREEZE)

    def why(knob: str, value: object) -> str | None:
        return "no such method here" if (knob, value) == ("finetuning_type", "freeze") else None

    give_up = next_step(start, history, resolve("default"), can_set=no_freeze, refusal=why)
    assert isinstance(give_up, GiveUp)
    line = "the program cannot take finetuning_type=freeze: no such method here"
    assert give_up.skipped[-1] == f"freeze: {line}"
    assert give_up.spent[-1] == f"freeze: skipped, {line}"
    plain = next_step(start, history, resolve("default"), can_set=no_freeze)
    assert isinstance(plain, GiveUp)
    assert plain.spent[-1] == "freeze: skipped, the program cannot take finetuning_type=freeze"


def test_seed_order_walk_without_speed_before_quality() -> None:
    """With speed_before_quality off, the seed's order exactly: cutoff is cut before gc."""
    data = tomllib.loads(DEFAULT.read_text(encoding="utf-8"))
    data["speed_before_quality"] = False
    start = Knobs(per_device_batch=4, grad_accum=2, cutoff_len=1024)
    configs, steps, give_up = walk(start, parse(data))
    per_method = [
        (4, 2, 1024), (2, 4, 1024), (1, 8, 1024), (1, 8, 512), (1, 8, 256),
    ]
    # gradient checkpointing restores batch 4 and cutoff 1024, then searches down again; each
    # method starts without it (as the command had it) and adds it again as memory requires
    assert configs == [(*c, ckpt, method) for method in ("full", "lora", "freeze")
                       for ckpt in (False, True) for c in per_method]
    assert {int(str(b)) * int(str(ga)) for b, ga, *_ in configs} == {8}
    gc_step = next(s for s in steps if s.rung == "gradient-checkpointing")
    assert gc_step.restored == (("per_device_batch", 1, 4), ("grad_accum", 8, 2),
                                ("cutoff_len", 256, 1024))
    assert give_up.spent == (
        "expandable-segments: not tried",
        "smaller-batch: per_device_batch at 1 (floor 1)",
        "shorter-cutoff: cutoff_len at 256 (floor 256)",
        "gradient-checkpointing: gradient_checkpointing=true tried from attempt 6",
        ("8bit-optimizer: skipped, optimizer=paged_adamw_8bit needs bitsandbytes, which the "
         "command's Python cannot import"),
        "lora: finetuning_type=lora tried from attempt 11",
        "qlora: not tried",
        "freeze: finetuning_type=freeze tried from attempt 21",
    )


def test_a_method_keeps_the_commands_own_checkpointing() -> None:
    """A command that has checkpointing on (LLaMA-Factory's default) keeps it for LoRA: the
    method rung restores the command's own speed settings, not 'off'."""
    start = Knobs(per_device_batch=2, cutoff_len=256, gradient_checkpointing=True)
    configs, steps, _ = walk(start, resolve("default"))
    assert configs == [(2, 1, 256, True, "full"), (1, 2, 256, True, "full"),
                       (2, 1, 256, True, "lora"), (1, 2, 256, True, "lora"),
                       (2, 1, 256, True, "freeze"), (1, 2, 256, True, "freeze")]
    assert all(("gradient_checkpointing", True, False) not in s.restored for s in steps)


def test_with_bitsandbytes_each_speed_rung_restores_the_batch() -> None:
    """With bitsandbytes, checkpointing and then the 8-bit optimizer each restore the batch
    before the cutoff is cut; LoRA starts again with neither (the command's own optimizer)."""
    start = Knobs(per_device_batch=2, cutoff_len=512)
    history = [Attempt(number=1, knobs=start, rung=None, verdict=OOM)]
    seen: list[tuple[object, ...]] = [(*_short(start), start.optimizer)]
    while True:
        step = next_step(start, history, resolve("default"))
        if isinstance(step, GiveUp) or step.knobs.finetuning_type is FinetuningType.FREEZE:
            break
        history.append(Attempt(number=len(history) + 1, knobs=step.knobs, rung=step.rung,
                               verdict=OOM))
        seen.append((*_short(step.knobs), step.knobs.optimizer))
    full = [(2, 1, 512, False, "full", None), (1, 2, 512, False, "full", None),
            (2, 1, 512, True, "full", None), (1, 2, 512, True, "full", None),
            (2, 1, 512, True, "full", "paged_adamw_8bit"),
            (1, 2, 512, True, "full", "paged_adamw_8bit"),
            (1, 2, 256, True, "full", "paged_adamw_8bit")]
    assert seen[:7] == full
    assert seen[7] == (2, 1, 512, False, "lora", None)


def test_rung_that_changes_nothing_is_skipped_without_an_attempt() -> None:
    """Checkpointing already on: the gc rung is passed over, said so, and LoRA comes next."""
    start = Knobs(per_device_batch=1, cutoff_len=256, gradient_checkpointing=True)
    history = [Attempt(number=1, knobs=start, rung=None, verdict=OOM)]
    step = next_step(start, history, resolve("default"), can_set=without_bnb)
    assert isinstance(step, Step)
    assert step.rung == "lora"
    assert step.knobs.finetuning_type is LORA
    assert step.skipped[1:] == (
        "gradient-checkpointing: gradient_checkpointing is already true",
        ("8bit-optimizer: optimizer=paged_adamw_8bit needs bitsandbytes, which the command's "
        "Python cannot import"))


def test_odd_batch_keeps_exact_effective_batch() -> None:
    """Batch 6 x GA 1 halves to 3 x 2, then 1 x 6: never an effective batch other than 6."""
    start = Knobs(per_device_batch=6, cutoff_len=256)
    configs, _, _ = walk(start, resolve("default"))
    assert [(b, ga) for b, ga, _, _, ft in configs if ft == "full"][:3] == [(6, 1), (3, 2), (1, 6)]


def test_quality_first_tries_checkpointing_before_cutting_the_cutoff() -> None:
    """quality-first: after batch 1, gc at the full cutoff comes before any truncation."""
    start = Knobs(per_device_batch=2, cutoff_len=1024)
    configs, _, _ = walk(start, resolve("quality-first"))
    assert configs[:6] == [
        (2, 1, 1024, False, "full"), (1, 2, 1024, False, "full"),
        (2, 1, 1024, True, "full"), (1, 2, 1024, True, "full"),
        (1, 2, 512, True, "full"), (1, 2, 256, True, "full"),
    ]


def test_unknown_cutoff_is_not_halved() -> None:
    """A command with no cutoff flag and no default: the cutoff rung can do nothing."""
    start = Knobs(per_device_batch=1, cutoff_len=None)
    configs, _, give_up = walk(start, resolve("default"))
    assert all(c[2] is None for c in configs)
    assert any(s.startswith("shorter-cutoff: cutoff_len unknown to the command")
               for s in give_up.spent)


def test_lora_then_freeze_never_returns_to_lora() -> None:
    """Structural rungs fire once, in order: freeze is never followed by LoRA again."""
    start = Knobs(per_device_batch=1, cutoff_len=256)
    configs, _, _ = walk(start, resolve("default"))
    kinds = [c[4] for c in configs]
    assert kinds == ["full", "full", "lora", "lora", "freeze", "freeze"]


def test_rungs_never_mutate_their_input() -> None:
    """next_step returns new Knobs; the history's are untouched (frozen dataclasses)."""
    start = Knobs(per_device_batch=8, cutoff_len=512)
    before = dataclasses.asdict(start)
    next_step(start, [Attempt(number=1, knobs=start, rung=None, verdict=OOM)],
              resolve("default"))
    assert dataclasses.asdict(start) == before


@pytest.mark.parametrize(("text", "message"), [
    ("rung = [", "not valid TOML"),
    ('[[rung]]\naction = "halfe"\nknob = "per_device_batch"',
     "rung 1: unknown action 'halfe'; valid: enable, halve, raise, set"),
    ('[[rung]]\naction = "halve"\nknob = "per_device_batch"\nfloor = -2',
     "rung 1: floor must be >= 1, not -2"),
    ('[[rung]]\naction = "halve"\nknob = "batch"',
     "cannot act on knob 'batch'; valid: per_device_batch"),
    ('[[rung]]\nname = "x"\naction = "set"\nknob = "finetuning_type"\nvalue = "qlora"',
     "rung 1 ('x'): 'qlora' is not a finetuning type; valid: full, lora, freeze"),
    ('[[rung]]\naction = "enable"\nknob = "gradient_checkpointing"\ncost = "cheap"',
     "unknown cost 'cheap'; valid: none, speed, quality"),
    ('[[rung]]\naction = "enable"\nknob = "gradient_checkpointing"\nrestre = true',
     "unknown key 'restre'"),
    ('name = "empty"', "no [[rung]] tables"),
    ('max_attempts = 0\n[[rung]]\naction = "enable"\nknob = "gradient_checkpointing"',
     "max_attempts must be >= 1, not 0"),
])
def test_bad_policy_files_fail_with_one_line_naming_file_and_rung(
        tmp_path: Path, text: str, message: str) -> None:
    """Every invalid policy is one PolicyError line naming the file and what to fix."""
    path = tmp_path / "mine.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(PolicyError) as info:
        load(path)
    assert str(path) in str(info.value)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_shipped_policies_load() -> None:
    """Every policy in policies/ parses and the default is the seed's order."""
    assert [r.name for r in resolve("default").rungs] == [
        "expandable-segments", "smaller-batch", "shorter-cutoff", "gradient-checkpointing",
        "8bit-optimizer", "lora", "qlora", "freeze"]
    assert [r.name for r in resolve("multi-gpu").rungs][2:5] == [
        "zero-2", "zero-3", "zero-offload"]
    assert resolve("quality-first").rungs[1].name == "gradient-checkpointing"


def test_unknown_policy_name_lists_shipped_ones() -> None:
    """A name that is neither shipped nor a file says which names exist."""
    with pytest.raises(PolicyError, match="shipped: default, multi-gpu, quality-first"):
        resolve("fastest")


def test_a_cutoff_that_leaves_no_data_is_spent_and_the_walk_goes_on() -> None:
    """Every row is 1024 tokens and dropped under a shorter cutoff (axolotl's default): the
    cutoff rung's `no_data` verdict (recorded: torch's RandomSampler over the empty dataset)
    spends that rung; the walk goes on from the last config with data, to LoRA and freeze,
    never trying a shorter cutoff again, and the give-up says why."""
    no_data = classify(outcome_from("no_data_num_samples0.txt", 1))
    assert no_data.kind is VerdictKind.NO_DATA
    start = Knobs(per_device_batch=4, grad_accum=2, cutoff_len=1024)
    ladder = resolve("default")
    history = [Attempt(number=1, knobs=start, rung=None, verdict=OOM)]
    skipped: list[str] = []
    while True:
        step = next_step(start, history, ladder, can_set=without_bnb)
        if isinstance(step, GiveUp):
            break
        skipped += step.skipped
        verdict = no_data if (step.knobs.cutoff_len or 0) < 1024 else OOM
        history.append(Attempt(number=len(history) + 1, knobs=step.knobs, rung=step.rung,
                               verdict=verdict))
    # Each speed rung restores the batch and each method rung the command's speed settings
    # (the issue-19 walk); the cutoff rung is tried once, leaves no data, and is never again.
    assert [_short(a.knobs) for a in history] == [
        (4, 2, 1024, False, "full"), (2, 4, 1024, False, "full"), (1, 8, 1024, False, "full"),
        (4, 2, 1024, True, "full"), (2, 4, 1024, True, "full"), (1, 8, 1024, True, "full"),
        (1, 8, 512, True, "full"),  # no data: spent
        (4, 2, 1024, False, "lora"), (2, 4, 1024, False, "lora"), (1, 8, 1024, False, "lora"),
        (4, 2, 1024, True, "lora"), (2, 4, 1024, True, "lora"), (1, 8, 1024, True, "lora"),
        (4, 2, 1024, False, "freeze"), (2, 4, 1024, False, "freeze"),
        (1, 8, 1024, False, "freeze"),
        (4, 2, 1024, True, "freeze"), (2, 4, 1024, True, "freeze"), (1, 8, 1024, True, "freeze"),
    ]
    assert ("shorter-cutoff: cutoff_len=512 leaves the trainer no data: attempt 7 at "
            "cutoff_len=512 failed with 'ValueError: num_samples should be a positive integer "
            "value, but got num_samples=0'") in skipped
    assert "shorter-cutoff: cutoff_len=512 left the trainer no data (attempt 7)" in step.spent


def test_no_data_on_the_commands_own_config_gives_up_at_once() -> None:
    """The start config itself has no rows: no rung adds any, so the walk stops and says so."""
    no_data = classify(outcome_from("no_data_num_samples0.txt", 1))
    start = Knobs(per_device_batch=4, grad_accum=2, cutoff_len=1024)
    step = next_step(start, [Attempt(number=1, knobs=start, rung=None, verdict=no_data)],
                     resolve("default"))
    assert isinstance(step, GiveUp)
    assert step.reason.startswith("the command's own config leaves the trainer no data (Value")
