"""estimate.py without a child process: model specs, the analytic count, cache, calibration."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
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
    command_python,
    estimate_many,
    fits,
    model_argument,
    model_name,
    oom_lower_bound_mib,
    pick_python,
)
from supervisor.knobs import FinetuningType, Knobs, precision_dtypes

PEAKS = Path(__file__).parent.parent / "data" / "peaks"
LLAMA_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
            "vocab_size": 32000, "max_position_embeddings": 4096, "torch_dtype": "bfloat16"}


@pytest.fixture(autouse=True)
def _empty_cache() -> Iterator[None]:
    # The scripted child's numbers (and scripted probes) must never reach another test.
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
    (Knobs(per_device_batch=1, cutoff_len=512, precision="bf16-base-mixed"), 101.4),
    (Knobs(per_device_batch=1, cutoff_len=512, precision="bf16-base-mixed",
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


def test_traces_are_kept_in_the_fit_store_and_reused_by_a_later_run(tmp_path: Path) -> None:
    """Issue 19: a second run of the same model and configs traces nothing; another model
    traces again, another interpreter does not (traces are kept by model shape). (The child
    is scripted: this checks the keeping, the traces' accuracy is test_estimate_accuracy's.)"""
    from supervisor.fits import FitStore  # noqa: PLC0415

    spec = ModelSpec.from_config("kept", {"model_type": "llama", "x": 2}, source="test")
    configs = [Knobs(per_device_batch=b, cutoff_len=64) for b in (1, 2)]
    first_child = FakeChild(mib_per_sample=5.0)
    with FitStore.open(tmp_path / "fits.sqlite3") as store:
        first = Estimator(spec, run=first_child, store=store).predict_many(configs)
    assert sum(len(r["requests"]) for r in first_child.requests) == 2
    clear_cache()  # a new process: only the store remembers
    later_child = FakeChild(mib_per_sample=999.0)
    with FitStore.open(tmp_path / "fits.sqlite3") as store:
        again = Estimator(spec, run=later_child, store=store).predict_many(configs)
        assert later_child.requests == []
        assert [p and p.peak_mib for p in again] == [p and p.peak_mib for p in first] == [5, 10]
        assert [p and p.breakdown for p in again] == [p and p.breakdown for p in first]
        other = ModelSpec.from_config("kept", {"model_type": "llama", "x": 3}, source="test")
        Estimator(other, run=later_child, store=store).predict_many(configs[:1])
        assert len(later_child.requests) == 1
        clear_cache()
        # Kept by model shape, not by command: another interpreter finds the same trace.
        Estimator(spec, run=later_child, store=store,
                  python="/other/python").predict_many(configs[:1])
        assert len(later_child.requests) == 1


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


def test_quantised_configs_trace_lora_and_count_the_4_bit_weights() -> None:
    """QLoRA: the bf16 LoRA trace, less each decoder linear weight's 2 - 0.52 bytes.

    On a Llama-7B shape: 6.48G linear weights, 8.9 GiB saved; plus one dequantised matrix.
    A 4-bit full config is counted as LoRA (QLoRA implies LoRA) and says so.
    """
    spec = ModelSpec.from_config("llama-7b", LLAMA_7B, source="test")
    lora = Knobs(per_device_batch=1, cutoff_len=512, precision="bf16-base-mixed",
                 gradient_checkpointing=True, finetuning_type=FinetuningType.LORA)
    qlora = dataclasses.replace(lora, quantization_bit=4)
    base, quantised, as_full = estimate_many(
        spec, [lora, qlora, dataclasses.replace(qlora, finetuning_type=FinetuningType.FULL)],
        method="analytic")
    shape = spec.shape()
    assert shape is not None
    linear = shape.layers * (shape.layer_parameters - 2 * shape.hidden)
    saved = linear * (2 - (0.5 + 1 / 64)) / 2**20
    dequant = shape.hidden * shape.intermediate * 2 / 2**20
    assert quantised.peak_mib == pytest.approx(base.peak_mib - saved + dequant)
    assert as_full.peak_mib == pytest.approx(quantised.peak_mib)
    assert any("QLoRA" in a for a in as_full.assumptions)
    assert any("4-bit" in a for a in quantised.assumptions)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_shards_what_deepspeed_says_over_the_world_size(stage: int) -> None:
    """Optimizer-step memory over 8 ranks, mixed bf16: ZeRO paper's (2 + 2 + 12)Psi split.

    Stage 1 shards the 12 B/param optimizer state, 2 adds the 2 B gradients, 3 the 2 B
    parameters (Rajbhandari et al. 2020, fig. 1); the unsharded trace's temporaries and one
    gathered layer aside, the saving against one rank is that, to 1%.
    """
    spec = ModelSpec.from_config("llama-7b", LLAMA_7B, source="test")
    knobs = Knobs(per_device_batch=1, cutoff_len=64, precision="bf16-mixed",
                  gradient_checkpointing=True)
    one, sharded = estimate_many(spec, [
        dataclasses.replace(knobs, deepspeed_stage=stage, world_size=1),
        dataclasses.replace(knobs, deepspeed_stage=stage, world_size=8)], method="analytic")
    psi = 6_738_415_616 / 2**20
    per_param = {1: 12, 2: 12 + 2, 3: 12 + 2 + 2}[stage]
    gathered = 2 * 2 * 202_383_360 / 2**20 if stage == 3 else 0
    assert one.peak_mib - sharded.peak_mib == pytest.approx(
        psi * per_param * 7 / 8 - gathered, rel=0.01)
    assert any(f"ZeRO-{stage} over 8" in a for a in sharded.assumptions)
    assert any("shards nothing" in a for a in one.assumptions)


def test_offload_takes_the_optimizer_state_off_the_device() -> None:
    """ZeRO-2 with optimizer offload on one rank: the 12 B/param optimizer state is gone."""
    spec = ModelSpec.from_config("llama-7b", LLAMA_7B, source="test")
    knobs = Knobs(per_device_batch=1, cutoff_len=64, precision="bf16-mixed",
                  gradient_checkpointing=True, deepspeed_stage=2)
    kept, offloaded = estimate_many(spec, [knobs, dataclasses.replace(
        knobs, deepspeed_offload=True)], method="analytic")
    assert kept.peak_mib - offloaded.peak_mib == pytest.approx(6_738_415_616 * 12 / 2**20,
                                                               rel=0.01)


def test_unknown_precision_is_said_to_be_assumed() -> None:
    """precision None is counted as fp32 and the prediction says so; a stated one does not."""
    spec = ModelSpec.named("tiny")
    unknown, stated = estimate_many(spec, [Knobs(per_device_batch=1, cutoff_len=64),
                                           Knobs(per_device_batch=1, cutoff_len=64,
                                                 precision="fp32")], method="analytic")
    assert unknown.peak_mib == stated.peak_mib
    assert unknown.assumptions == ("precision not given: assumed fp32",)
    assert stated.assumptions == ()


def test_a_local_folder_wins_over_a_named_size(tmp_path: Path) -> None:
    """`tiny` in the command's directory is that folder's config, not the built-in size."""
    assert ModelSpec.resolve("tiny", env={}, cwd=tmp_path).source == "reference trainer named size"
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_text(json.dumps(LLAMA_7B))
    spec = ModelSpec.resolve("tiny", env={}, cwd=tmp_path)
    assert spec.parameters() == 6_738_415_616
    assert model_name(Knobs(per_device_batch=1, model="/m"), ["--model_name_or_path", "x"]) \
        == "/m"
    assert model_name(Knobs(per_device_batch=1), ["--model_name_or_path", "x"]) == "x"


def test_the_child_runs_in_the_commands_own_interpreter(tmp_path: Path) -> None:
    """A console script's shebang names its interpreter; without torch the supervisor's own
    is tried next, and with neither the count is analytic (each said in words)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "llamafactory-cli"
    script.write_text(f"#!{sys.executable}\nimport sys\n")
    script.chmod(0o755)
    env = {"PATH": str(bin_dir)}
    assert command_python(["llamafactory-cli", "train", "x.yaml"], env=env) == sys.executable
    assert command_python(["env", "A=1", str(script)], env=env) == sys.executable
    assert command_python(["bash", "run.sh"], env=env) is None

    no_torch = subprocess.CompletedProcess([], 1, "", "No module named 'torch'")
    python, why = pick_python(["llamafactory-cli"], env=env,
                              run=lambda *_, **__: no_torch)
    assert python is None
    assert "No module named 'torch'" in why
    ok = subprocess.CompletedProcess([], 0, "", "")
    clear_cache()  # probes are cached per interpreter and mtime
    python, why = pick_python(["llamafactory-cli"], env=env, run=lambda *_, **__: ok)
    assert python == sys.executable
    assert "the command's interpreter" in why


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


def test_without_an_interpreter_that_has_torch_the_count_is_analytic() -> None:
    """python=None (pick_python found none): auto counts analytically and says so; fake fails."""
    knobs = Knobs(per_device_batch=1, cutoff_len=128, precision="bf16-mixed")
    (prediction,) = estimate_many(ModelSpec.named("tiny"), [knobs], python=None)
    assert prediction.method is Method.ANALYTIC
    assert prediction.note is not None
    assert "no interpreter with torch" in prediction.note
    with pytest.raises(EstimateError, match="no interpreter with torch"):
        estimate_many(ModelSpec.named("tiny"), [knobs], python=None, method="fake")


def test_the_supervisor_imports_without_torch() -> None:
    """With torch, transformers and peft unimportable, the CLI, estimator and plan import."""
    code = ("import sys\n"
            "for name in ('torch', 'transformers', 'peft', 'accelerate'):\n"
            "    sys.modules[name] = None  # any import of it now raises ImportError\n"
            "import supervisor.cli, supervisor.estimate, supervisor.plan, supervisor.models\n"
            "import supervisor.device_memory\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,  # noqa: S603
                          check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "ok"


def test_an_8_bit_optimizer_keeps_two_bytes_of_state_per_parameter() -> None:
    """paged_adamw_8bit on a 7B full bf16-mixed config: fp32 moments (8 B/param) become ~2."""
    spec = ModelSpec.from_config("llama-7b", LLAMA_7B, source="test")
    knobs = Knobs(per_device_batch=1, cutoff_len=512, precision="bf16-mixed",
                  gradient_checkpointing=True)
    adamw, eight = estimate_many(spec, [knobs, dataclasses.replace(
        knobs, optimizer="paged_adamw_8bit")], method="analytic")
    assert adamw.peak_mib - eight.peak_mib == pytest.approx(
        6_738_415_616 * (8 - 2 * (1 + 4 / 2048)) / 2**20)
    assert any("8 bits" in a for a in eight.assumptions)


@pytest.mark.parametrize(("precision", "dtypes"), [
    (None, ("fp32", "fp32", "fp32")),
    ("fp32", ("fp32", "fp32", "fp32")),
    ("bf16-mixed", ("fp32", "fp32", "bf16")),
    ("bf16-base-mixed", ("bf16", "fp32", "bf16")),
    ("fp16-base-mixed", ("fp16", "fp32", "fp16")),
    ("bf16", ("bf16", "bf16", "bf16")),
])
def test_each_precision_holds_each_part_in_its_own_dtype(
        precision: str | None, dtypes: tuple[str, str, str]) -> None:
    """(frozen weights, trainable weights and their state, compute) per precision."""
    assert precision_dtypes(precision) == dtypes


def test_lora_frozen_base_is_fp32_under_hf_bf16_and_bf16_under_llamafactorys() -> None:
    """The analytic count sizes LoRA's frozen base by the dtype it is loaded in: 4 B/param
    under a Hugging Face --bf16, 2 under LLaMA-Factory's bf16; adapters fp32 in both."""
    spec = ModelSpec.from_config("llama-7b", LLAMA_7B, source="test")
    lora = Knobs(per_device_batch=1, cutoff_len=512, gradient_checkpointing=True,
                 finetuning_type=FinetuningType.LORA)
    hf = analytic(spec, dataclasses.replace(lora, precision="bf16-mixed")).breakdown
    lf = analytic(spec, dataclasses.replace(lora, precision="bf16-base-mixed")).breakdown
    frozen = int(str(hf["total_params"])) - int(str(hf["trainable_params"]))
    assert float(str(hf["weights_mib"])) - float(str(lf["weights_mib"])) == pytest.approx(
        frozen * 2 / 2**20, abs=0.02)
    assert hf["optimizer_mib"] == lf["optimizer_mib"]
