"""The FakeTensor estimator against peaks measured with the real reference trainer.

tests/data/peaks/{tiny,small}.json hold the reference trainer's own peak (live tensor bytes,
CPU) for every config of the default ladder's walk from the demo's start, and
lattice-{tiny,tiny-qwen2}.json a grid from the scenario suite's start with bf16 rows of both
kinds, for the Llama and for a Qwen2 with grouped-query attention; README.md there says how
they were recorded. The estimator runs in its child process, as `plan` runs it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from supervisor.command import Command
from supervisor.dialects import detect
from supervisor.estimate import Method, ModelSpec, analytic, estimate_many
from supervisor.knobs import FinetuningType, Knobs
from supervisor.plan import walk
from supervisor.policy import resolve

pytestmark = pytest.mark.process

PEAKS = Path(__file__).parent.parent / "data" / "peaks"
_MEMORY_KNOBS = ("per_device_batch", "grad_accum", "cutoff_len", "gradient_checkpointing",
                 "finetuning_type", "lora_rank", "freeze_trainable_layers")


def _knobs(data: dict[str, Any]) -> Knobs:
    return Knobs.from_dict({k: data[k] for k in _MEMORY_KNOBS})


def _record(size: str) -> tuple[Knobs, dict[Knobs, float]]:
    record = json.loads((PEAKS / f"{size}.json").read_text(encoding="utf-8"))
    measured = {_knobs(r["knobs"]): float(r["peak_live_mib"]) for r in record["rows"]}
    return _knobs(record["start"]), measured


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_fake_estimate_is_within_10_percent_for_every_config_of_the_ladder(size: str) -> None:
    """Every config the default ladder walks from full b8 x 1024: FakeTensor within +-10%.

    Measured here: within 1% everywhere (docs/memory.md); the analytic count within 25%.
    """
    start, measured = _record(size)
    # The walk `run` takes for the reference trainer: its own skip predicate (no 8-bit
    # optimizer or 4-bit base where bitsandbytes does not import), as scripts/measure_peaks.py.
    command = Command(argv=(sys.executable, "-m", "supervisor.reference_trainer",
                            "--model_name_or_path", size), cwd=str(PEAKS))
    can_set = detect(command).read_sourced(command).can_set
    walked = [_knobs(k.to_dict()) for k, _ in walk(start, resolve("default"), can_set=can_set)]
    missing = [k for k in walked if k not in measured]
    assert not missing, f"the ladder changed: record these with scripts/measure_peaks.py: {missing}"
    configs = list(measured)
    predictions = estimate_many(ModelSpec.named(size), configs, method="fake")
    errors = {}
    for knobs, prediction in zip(configs, predictions, strict=True):
        assert prediction.method is Method.FAKE
        errors[knobs] = prediction.peak_mib / measured[knobs] - 1
        counted = analytic(ModelSpec.named(size), knobs).peak_mib
        assert abs(counted / prediction.peak_mib - 1) <= 0.25, (knobs, counted)
    worst = max(errors, key=lambda k: abs(errors[k]))
    assert abs(errors[worst]) <= 0.10, (worst, errors[worst])


def test_the_recorded_peaks_are_still_what_the_trainer_measures(tmp_path: Path) -> None:
    """One recorded config rerun with the installed torch/transformers/peft: the same peak."""
    _, measured = _record("tiny")
    knobs = Knobs(per_device_batch=2, grad_accum=4, cutoff_len=1024, gradient_checkpointing=True,
                  finetuning_type=FinetuningType.LORA)
    proc = subprocess.run(  # noqa: S603 - our own trainer
        [sys.executable, "-m", "supervisor.reference_trainer", "--model_name_or_path", "tiny",
         "--max_steps", "1", "--output_dir", str(tmp_path), "--per_device_train_batch_size", "2",
         "--gradient_accumulation_steps", "4", "--cutoff_len", "1024", "--finetuning_type",
         "lora", "--gradient_checkpointing"],
        capture_output=True, text=True, check=False, timeout=300,
        env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1].split(" ", 1)[1])
    # One step instead of the recorded two: AdamW state exists only from the first step on,
    # so the peak is at most the recorded one, and within the optimizer state of it.
    assert result["peak_live_mib"] <= measured[knobs] + 0.01
    assert result["peak_live_mib"] >= measured[knobs] - 2.0


def test_a_7b_shape_matches_the_issue_numbers() -> None:
    """Llama-7B, b1 x 512: full 50.7 GiB and LoRA + gc 13.1 GiB in pure bf16; full 101.4 mixed."""
    spec = ModelSpec.from_config("llama-7b", {
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
        "vocab_size": 32000, "max_position_embeddings": 4096}, source="test")
    full = Knobs(per_device_batch=1, cutoff_len=512, precision="bf16")
    lora = Knobs(per_device_batch=1, cutoff_len=512, precision="bf16",
                 gradient_checkpointing=True, finetuning_type=FinetuningType.LORA)
    mixed = Knobs(per_device_batch=1, cutoff_len=512, precision="bf16-mixed")
    predictions = estimate_many(spec, [full, lora, mixed], method="fake")
    assert [round(p.peak_mib / 1024, 1) for p in predictions] == [50.7, 13.1, 101.4]


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_two_traced_layers_scaled_match_the_full_trace(size: str) -> None:
    """Every config of the ladder's walk, plus bf16-mixed, pure bf16 and GA variants: the
    2-layer trace extrapolated to the real depth is within 10% of the whole model's trace.

    Measured: identical to the byte on most configs, within 0.1% everywhere (docs/memory.md).
    """
    start, _ = _record(size)
    walked = [k for k, _ in walk(start, resolve("default"))]
    # Each precision with each method, checkpointing on for half of them (each (method, gc)
    # pair once over the two precisions): six traces, not twelve.
    extra = [Knobs(per_device_batch=2, grad_accum=4, cutoff_len=512, precision=p,
                   finetuning_type=f, gradient_checkpointing=(i + j) % 2 == 1)
             for j, p in enumerate(("bf16-mixed", "bf16")) for i, f in enumerate(FinetuningType)]
    configs = list(dict.fromkeys([*walked[::2], *extra]))
    spec = ModelSpec.named(size)
    scaled = estimate_many(spec, configs, method="fake", scale=True)
    whole = estimate_many(spec, configs, method="fake", scale=False)
    for knobs, part, full in zip(configs, scaled, whole, strict=True):
        deep_enough = knobs.finetuning_type is not FinetuningType.FREEZE or size == "small"
        assert (part.breakdown.get("traced_layers") is not None) == deep_enough, knobs
        assert "traced_layers" not in full.breakdown
        assert abs(part.peak_mib / full.peak_mib - 1) <= 0.10, (knobs, part.peak_mib,
                                                                 full.peak_mib)


_PRECISIONS = ("fp32", "bf16-mixed", "bf16-base-mixed")


@pytest.mark.parametrize("model", ["tiny", "tiny-qwen2"])
def test_fake_estimate_is_within_5_percent_on_both_architectures_and_precisions(
        model: str) -> None:
    """Every measured point of a lattice (the scenario suite's start, both architectures):
    fp32, bf16 mixed precision over fp32 weights (a Hugging Face script's --bf16) and
    bf16-loaded weights with the trainable ones upcast (LLaMA-Factory's bf16: true), full and
    LoRA, with and without checkpointing and accumulation: FakeTensor within +-5%.

    Measured (docs/benchmarks.md): within 0.5% on both. tiny-qwen2 (grouped-query attention,
    tied embeddings) was measured before the estimator was looked at for it; its one miss,
    -3.2% where scaled tracing added the accumulated gradients to the wrong peak, is fixed.
    """
    record = json.loads((PEAKS / f"lattice-{model}.json").read_text(encoding="utf-8"))
    rows = record["rows"]
    configs = [Knobs.from_dict(r["knobs"]) for r in rows]
    covered = {(k.precision or "fp32", k.finetuning_type) for k in configs}
    assert covered >= {(p, m) for p in _PRECISIONS
                       for m in (FinetuningType.FULL, FinetuningType.LORA)}, covered
    predictions = estimate_many(ModelSpec.named(model), configs, method="fake")
    errors = {}
    for row, knobs, prediction in zip(rows, configs, predictions, strict=True):
        assert prediction.method is Method.FAKE
        errors[knobs] = prediction.peak_mib / row["peak_live_mib"] - 1
    worst = max(errors, key=lambda k: abs(errors[k]))
    assert abs(errors[worst]) <= 0.05, (worst, errors[worst])
