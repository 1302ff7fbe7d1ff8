"""estimate.py without a child process: model specs, the analytic count, cache, calibration."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.classify import OomNumbers
from supervisor.estimate import (
    EstimateError,
    Estimator,
    Method,
    ModelSpec,
    ModelSpecError,
    Prediction,
    analytic,
    clear_cache,
    estimate_many,
    fits,
    model_argument,
    oom_lower_bound_mib,
)
from supervisor.knobs import FinetuningType, Knobs

PEAKS = Path(__file__).parent.parent / "data" / "peaks"
LLAMA_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
            "vocab_size": 32000, "max_position_embeddings": 4096, "torch_dtype": "bfloat16"}


@pytest.fixture(autouse=True)
def _empty_cache() -> Iterator[None]:
    # The scripted child's numbers must never reach another test through the cache.
    clear_cache()
    yield
    clear_cache()


class FakeChild:
    """Stands in for subprocess.run of the estimator child: a fixed peak per batch size."""

    def __init__(self, mib_per_sample: float = 100.0, *, fail: str | None = None,
                 untraceable_batch: int | None = None) -> None:
        self.mib_per_sample = mib_per_sample
        self.fail = fail
        self.untraceable_batch = untraceable_batch
        self.requests: list[dict[str, Any]] = []

    def __call__(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:  # noqa: ANN401
        request = json.loads(kwargs["input"])
        self.requests.append(request)
        if self.fail is not None:
            return subprocess.CompletedProcess(argv, 1, "", f"Traceback...\n{self.fail}\n")
        lines = []
        for index, knobs in enumerate(request["requests"]):
            if knobs["per_device_batch"] == self.untraceable_batch:
                lines.append("estimate.result " + json.dumps(
                    {"index": index, "error": "NotImplementedError: no fake kernel"}))
                continue
            peak = knobs["per_device_batch"] * self.mib_per_sample * 2**20
            result = {"index": index, "peak_bytes": peak, "breakdown": {"weights_mib": 1.0},
                      "peak_phase": "backward", "peak_op": "aten.mm", "total_params": 10,
                      "trainable_params": 10, "seconds": 0.1}
            lines.append("estimate.result " + json.dumps(result))
        return subprocess.CompletedProcess(argv, 0, "noise\n" + "\n".join(lines) + "\n", "")


def test_named_sizes_match_the_reference_trainers_parameter_counts() -> None:
    """tiny 5,261,568 and small 29,499,904 parameters; LoRA r8 adds 156,160 to tiny."""
    tiny = ModelSpec.named("tiny")
    assert tiny.parameters() == 5_261_568
    assert ModelSpec.named("small").parameters() == 29_499_904
    shape = tiny.shape()
    assert shape is not None
    assert shape.lora_parameters(8) == 156_160


def test_resolve_reads_a_local_dir_then_the_hub_cache_and_never_downloads(
        tmp_path: Path) -> None:
    """A directory's config.json; a cached hub id's snapshot; anything else is one clear error."""
    local = tmp_path / "llama-7b"
    local.mkdir()
    (local / "config.json").write_text(json.dumps(LLAMA_7B))
    spec = ModelSpec.resolve(str(local), env={})
    assert spec.parameters() == 6_738_415_616
    assert spec.source == str(local / "config.json")

    cache = tmp_path / "hf" / "hub"
    snapshot = cache / "models--meta-llama--Llama-2-7b-hf" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(LLAMA_7B))
    (cache / "models--meta-llama--Llama-2-7b-hf" / "refs").mkdir()
    (cache / "models--meta-llama--Llama-2-7b-hf" / "refs" / "main").write_text("abc123")
    cached = ModelSpec.resolve("meta-llama/Llama-2-7b-hf", env={"HF_HOME": str(tmp_path / "hf")})
    assert cached.config == spec.config
    assert cached.name == "meta-llama/Llama-2-7b-hf"

    with pytest.raises(ModelSpecError, match="never downloads") as error:
        ModelSpec.resolve("org/not-cached", env={"HF_HUB_CACHE": str(cache)})
    assert str(cache) in str(error.value)


def test_model_argument_finds_the_flag_in_either_form() -> None:
    """`--model_name_or_path X` and `--model_name_or_path=X`; None when absent."""
    assert model_argument(["python", "t.py", "--model_name_or_path", "tiny"]) == "tiny"
    assert model_argument(["t.py", "--model-name-or-path=/m/7b"]) == "/m/7b"
    assert model_argument(["t.py", "--lr", "1"]) is None


def _recorded(size: str) -> list[tuple[Knobs, float]]:
    record = json.loads((PEAKS / f"{size}.json").read_text(encoding="utf-8"))
    return [(Knobs.from_dict(r["knobs"]), r["peak_live_mib"]) for r in record["rows"]]


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_analytic_is_within_25_percent_of_the_measured_peak(size: str) -> None:
    """The fallback counts every recorded reference-trainer config to within 25%."""
    spec = ModelSpec.named(size)
    for knobs, measured in _recorded(size):
        predicted = analytic(spec, knobs).peak_mib
        assert abs(predicted / measured - 1) <= 0.25, (knobs, predicted, measured)


@pytest.mark.parametrize(("knobs", "gib"), [
    # The FakeTensor numbers of issue 4 (pure bf16, SDPA): the analytic count is close.
    (Knobs(per_device_batch=1, cutoff_len=512, precision="bf16"), 50.7),
    (Knobs(per_device_batch=1, cutoff_len=512, precision="bf16", gradient_checkpointing=True,
           finetuning_type=FinetuningType.LORA), 13.1),
    (Knobs(per_device_batch=8, cutoff_len=2048, precision="bf16"), 135.1),
    (Knobs(per_device_batch=8, cutoff_len=2048, precision="bf16", gradient_checkpointing=True),
     53.5),
    # LLaMA-Factory's bf16 (trainable parameters in fp32 under autocast): 16 B/param.
    (Knobs(per_device_batch=1, cutoff_len=512, precision="bf16-mixed"), 101.4),
    (Knobs(per_device_batch=1, cutoff_len=512, precision="bf16-mixed",
           gradient_checkpointing=True, finetuning_type=FinetuningType.LORA), 13.1),
])
def test_analytic_on_a_7b_shape_is_near_the_fake_tensor_estimate(knobs: Knobs,
                                                                 gib: float) -> None:
    """Within 10% of the FakeTensor estimate on a Llama-7B shape."""
    spec = ModelSpec.from_config("llama-7b", LLAMA_7B, source="test")
    assert analytic(spec, knobs).peak_mib / 1024 == pytest.approx(gib, rel=0.10)


def test_analytic_needs_a_shape_and_a_cutoff() -> None:
    """No shape or no cutoff: EstimateError saying which."""
    spec = ModelSpec.from_config("odd", {"model_type": "t5"}, source="test")
    with pytest.raises(EstimateError, match="hidden_size"):
        analytic(spec, Knobs(per_device_batch=1, cutoff_len=512))
    with pytest.raises(EstimateError, match="cutoff_len unknown"):
        analytic(ModelSpec.named("tiny"), Knobs(per_device_batch=1))


def test_fake_estimates_are_cached_per_memory_relevant_knobs() -> None:
    """One child run for a batch of configs; configs differing only in GA>1 or steps reuse it."""
    child = FakeChild(mib_per_sample=7.0)
    spec = ModelSpec.from_config("cache-test", {"model_type": "llama", "x": 1}, source="test")
    first = estimate_many(spec, [Knobs(per_device_batch=2, cutoff_len=64),
                                 Knobs(per_device_batch=4, cutoff_len=64, grad_accum=2)],
                          run=child, workers=1)
    assert [p.peak_mib for p in first] == [14.0, 28.0]
    assert all(p.method is Method.FAKE for p in first)
    again = estimate_many(spec, [Knobs(per_device_batch=4, cutoff_len=64, grad_accum=8,
                                       max_steps=100)], run=child, workers=1)
    assert again[0].peak_mib == 28.0
    assert len(child.requests) == 1
    assert child.requests[0]["config"] == {"model_type": "llama", "x": 1}


def test_without_torch_in_the_child_it_falls_back_to_analytic_and_says_why() -> None:
    """auto: analytic with the child's last line as the note; fake: EstimateError."""
    child = FakeChild(fail="ModuleNotFoundError: No module named 'torch'")
    knobs = Knobs(per_device_batch=1, cutoff_len=128)
    (prediction,) = estimate_many(ModelSpec.named("tiny"), [knobs], run=child)
    assert prediction.method is Method.ANALYTIC
    assert prediction.note is not None
    assert "No module named 'torch'" in prediction.note
    with pytest.raises(EstimateError, match="No module named 'torch'"):
        estimate_many(ModelSpec.named("small"), [knobs], method="fake", run=child)


def test_one_untraceable_config_falls_back_alone() -> None:
    """A config the child cannot trace is counted analytically; the others keep FakeTensor."""
    child = FakeChild(untraceable_batch=3)
    spec = ModelSpec.named("tiny")
    configs = [Knobs(per_device_batch=b, cutoff_len=96) for b in (1, 3)]
    fake, counted = estimate_many(spec, configs, run=child, workers=1)
    assert (fake.method, counted.method) == (Method.FAKE, Method.ANALYTIC)
    assert counted.note is not None
    assert "no fake kernel" in counted.note
    with pytest.raises(EstimateError, match="no fake kernel"):
        estimate_many(spec, [Knobs(per_device_batch=3, cutoff_len=97)], method="fake",
                      run=child)


def test_quantised_configs_are_counted_analytically() -> None:
    """A 4-bit config is not traced: analytic, with the reason in the note."""
    child = FakeChild()
    knobs = Knobs(per_device_batch=1, cutoff_len=128, quantization_bit=4)
    (prediction,) = estimate_many(ModelSpec.named("tiny"), [knobs], run=child)
    assert prediction.method is Method.ANALYTIC
    assert prediction.note is not None
    assert "quantised" in prediction.note
    assert child.requests == []


def test_calibration_scales_later_predictions() -> None:
    """A measured peak 20% over the prediction raises every later prediction by 20%."""
    spec = ModelSpec.from_config("calib", {"model_type": "llama", "y": 2}, source="test")
    estimator = Estimator(spec, run=FakeChild(mib_per_sample=100.0))
    b2 = Knobs(per_device_batch=2, cutoff_len=64)
    b1 = Knobs(per_device_batch=1, cutoff_len=64)
    assert estimator.calibrate(b2, 240.0) == pytest.approx(1.2)
    prediction = estimator.predict(b1)
    assert prediction is not None
    assert prediction.peak_mib == pytest.approx(120.0)
    assert prediction.raw_peak_mib == 100.0
    # An OOM's lower bound can only raise the ratio.
    assert estimator.calibrate(b1, 110.0, lower_bound=True) == pytest.approx(1.2)
    assert estimator.calibrate(b1, 150.0, lower_bound=True) == pytest.approx(1.5)
    # A measurement 10x off is another program, not a calibration: the ratio is bounded.
    assert estimator.calibrate(b1, 10_000.0) == 4.0


def test_estimator_returns_none_when_nothing_can_predict() -> None:
    """Unknown cutoff: no prediction (the loop then never skips), and the reason is kept."""
    estimator = Estimator(ModelSpec.named("tiny"), method="analytic")
    assert estimator.predict(Knobs(per_device_batch=1)) is None
    assert estimator.errors
    assert "cutoff_len unknown" in estimator.errors[-1]


def test_fits_and_lower_bound() -> None:
    """fits: prediction x (1 + margin) within the device; None without a prediction."""
    prediction = Prediction(peak_mib=90.0, method=Method.FAKE)
    assert fits(prediction, 100.0, margin=0.10)
    assert not fits(prediction, 98.0, margin=0.10)
    assert fits(None, 1.0) is None
    assert oom_lower_bound_mib(OomNumbers(tried_mib=20.0, capacity_mib=100.0,
                                          allocated_mib=82.31)) == pytest.approx(102.31)
    assert oom_lower_bound_mib(OomNumbers(tried_mib=10.75, capacity_mib=100.0)) == 100.0
    assert oom_lower_bound_mib(OomNumbers()) is None
    assert oom_lower_bound_mib(None) is None
