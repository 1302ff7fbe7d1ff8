"""Predicted peak training memory of a config, before running it.

Two ways, same answer type (`Prediction`):

- ``fake``: the model is built and trained for two steps under ``FakeTensorMode`` while a
  live-bytes mode counts every storage (`supervisor._estimate_child`, a child process: the
  supervisor never imports torch). Exact to the MiB on the reference trainer.
- ``analytic``: weights, gradients, AdamW state, activations per token per layer, logits,
  checkpointing and the LoRA/freeze trainable share, counted from the config's shape. For
  when torch or the model's code is not at hand; within ~25% of ``fake`` (docs/memory.md).

`Estimator` wraps both for the loop: cached, calibrated by the peaks that attempts measure.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from supervisor.classify import OomNumbers
from supervisor.knobs import FinetuningType, Knobs

_MIB = 2**20
RESULT_PREFIX = "estimate.result "
"""How the child marks its result lines (libraries may print to stdout too)."""


class Method(StrEnum):
    """How a prediction was made."""

    FAKE = "fake"
    ANALYTIC = "analytic"


class EstimateError(RuntimeError):
    """The FakeTensor estimator could not run; the message says why."""


class ModelSpecError(ValueError):
    """The model's config cannot be found without downloading; the message says where we looked."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Prediction:
    """Predicted peak device memory of one config, how it was made, and what it is made of."""

    peak_mib: float
    """The prediction, calibration included."""
    method: Method
    breakdown: Mapping[str, Any] = field(default_factory=dict)
    """MiB per part (weights, gradients, optimizer, activations...) plus where the peak is."""
    raw_peak_mib: float | None = None
    """Before calibration (None: not calibrated)."""
    note: str | None = None
    """Why this method (e.g. why the FakeTensor estimate was not available)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for the journal and report."""
        return {"peak_mib": round(self.peak_mib, 2), "method": str(self.method),
                "raw_peak_mib": None if self.raw_peak_mib is None else round(self.raw_peak_mib, 2),
                "breakdown": dict(self.breakdown), "note": self.note}


# --- the model's config ----------------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSpec:
    """A model's config.json, found without downloading, and where it came from."""

    name: str
    """What the command names (a size, a directory, a hub id)."""
    config_json: str
    """The config as sorted JSON: hashable, and what the child process receives."""
    source: str

    @property
    def config(self) -> dict[str, Any]:
        """The config as a dict."""
        loaded: dict[str, Any] = json.loads(self.config_json)
        return loaded

    @classmethod
    def from_config(cls, name: str, config: Mapping[str, Any], *, source: str) -> ModelSpec:
        """A spec from a config mapping (e.g. a config.json you have read yourself)."""
        values = dict(config)
        values.setdefault("model_type", "llama")
        return cls(name=name, config_json=json.dumps(values, sort_keys=True), source=source)

    @classmethod
    def named(cls, size: str) -> ModelSpec:
        """One of the reference trainer's sizes (`tiny`, `small`)."""
        # Torch-free: the trainer imports torch only inside its functions.
        from supervisor.reference_trainer import (  # noqa: PLC0415 - only for named sizes
            _COMMON_CONFIG,
            _NAMED_CONFIGS,
        )

        if size not in _NAMED_CONFIGS:
            msg = f"no named size {size!r}; named sizes: {', '.join(_NAMED_CONFIGS)}"
            raise ModelSpecError(msg)
        return cls.from_config(size, {**_COMMON_CONFIG, **_NAMED_CONFIGS[size]},
                               source="reference trainer named size")

    @classmethod
    def from_dir(cls, directory: Path, *, name: str | None = None) -> ModelSpec:
        """The config.json of a local model directory."""
        path = directory / "config.json"
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            msg = f"cannot read a model config from {path}: {error}"
            raise ModelSpecError(msg) from None
        if not isinstance(loaded, dict):
            msg = f"{path} holds {type(loaded).__name__}, expected a JSON object"
            raise ModelSpecError(msg)
        return cls.from_config(name or str(directory), loaded, source=str(path))

    @classmethod
    def resolve(cls, name_or_path: str, *,
                env: Mapping[str, str] | None = None) -> ModelSpec:
        """A named size, a local directory, or a hub id already in the Hugging Face cache.

        Never downloads: a hub id that is not cached raises ModelSpecError naming the cache.
        """
        env = os.environ if env is None else env
        try:
            return cls.named(name_or_path)
        except ModelSpecError:
            pass
        directory = Path(name_or_path).expanduser()
        if directory.is_dir():
            return cls.from_dir(directory, name=name_or_path)
        cache = hub_cache(env)
        snapshot = _cached_snapshot(cache, name_or_path)
        if snapshot is not None:
            return cls.from_dir(snapshot, name=name_or_path)
        msg = (f"model {name_or_path!r} is not a named size, not a local directory, and has no "
               f"config.json in the Hugging Face cache ({cache}); this never downloads: "
               "point --model_name_or_path at a local copy or fetch the config first")
        raise ModelSpecError(msg)

    def shape(self) -> Shape | None:
        """The decoder's dimensions, or None when the config lacks them."""
        return Shape.from_config(self.config)

    def parameters(self) -> int | None:
        """Parameter count from the config's shape (None when the shape is unknown)."""
        shape = self.shape()
        return None if shape is None else shape.parameters


def hub_cache(env: Mapping[str, str]) -> Path:
    """Where huggingface_hub keeps downloaded models, per its environment variables."""
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    base = Path(env.get("XDG_CACHE_HOME") or Path(env.get("HOME", "~")) / ".cache")
    return base.expanduser() / "huggingface" / "hub"


def _cached_snapshot(cache: Path, repo_id: str) -> Path | None:
    """The snapshot directory of `org/name` in the hub cache that has a config.json."""
    if repo_id.count("/") != 1 or repo_id.startswith(("/", ".")):
        return None
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    ref = repo / "refs" / "main"
    candidates: list[Path] = []
    if ref.is_file():
        candidates.append(repo / "snapshots" / ref.read_text(encoding="utf-8").strip())
    snapshots = repo / "snapshots"
    if snapshots.is_dir():
        candidates += sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    return next((c for c in candidates if (c / "config.json").is_file()), None)


def model_argument(argv: Sequence[str]) -> str | None:
    """The value of `--model_name_or_path` (or `--model-name-or-path`) in argv, if any."""
    names = ("--model_name_or_path", "--model-name-or-path")
    for i, token in enumerate(argv):
        if token in names and i + 1 < len(argv):
            return argv[i + 1]
        for name in names:
            if token.startswith(name + "="):
                return token.split("=", 1)[1]
    return None


# --- the analytic estimate -------------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class Shape:
    """A Llama-style decoder's dimensions, as config.json names them."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    qkv_bias: bool = False

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Shape | None:
        """Read the dimensions; None when a needed one is missing."""
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            return cls(hidden=hidden, intermediate=int(config["intermediate_size"]),
                       layers=int(config["num_hidden_layers"]), heads=heads,
                       kv_heads=int(config.get("num_key_value_heads") or heads),
                       vocab=int(config["vocab_size"]),
                       tied=bool(config.get("tie_word_embeddings", False)),
                       qkv_bias=bool(config.get("attention_bias", False))
                       or config.get("model_type") == "qwen2")
        except (KeyError, TypeError, ValueError):
            return None

    @property
    def kv_dim(self) -> int:
        """Width of the key (and value) projection."""
        return self.hidden // self.heads * self.kv_heads

    @property
    def layer_parameters(self) -> int:
        """Parameters of one decoder layer."""
        h, kv = self.hidden, self.kv_dim
        attention = 2 * h * h + 2 * h * kv + ((h + 2 * kv) if self.qkv_bias else 0)
        return attention + 3 * h * self.intermediate + 2 * h

    @property
    def parameters(self) -> int:
        """All parameters: embeddings, layers, final norm, and the head unless tied."""
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return embeddings + self.layers * self.layer_parameters + self.hidden

    def lora_parameters(self, rank: int) -> int:
        """LoRA A and B on every linear layer of every decoder layer (`lora_target: all`)."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        per_layer = rank * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 3)
        return self.layers * per_layer


_FP32 = 4
_PRECISION_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}


def analytic(spec: ModelSpec, knobs: Knobs, *, device: str = "cpu") -> Prediction:
    """Count the peak from the config's shape: the larger of the loss-backward and AdamW peaks.

    Assumes what the FakeTensor estimator traces: SDPA attention, no dropout, AdamW, the
    loss computed in fp32; precision "bf16"/"fp16" trains everything in that precision,
    "bf16-mixed"/"fp16-mixed" keeps the trainable parameters in fp32 under autocast.
    """
    shape = spec.shape()
    if shape is None:
        msg = (f"{spec.source}: no hidden_size / intermediate_size / num_hidden_layers / "
               "num_attention_heads / vocab_size: cannot count its memory")
        raise EstimateError(msg)
    if knobs.cutoff_len is None:
        msg = "cutoff_len unknown: the sequence length decides the activations"
        raise EstimateError(msg)
    precision = str(knobs.precision or "fp32").lower()
    mixed = precision.endswith("-mixed")
    w = _PRECISION_BYTES.get(precision.removesuffix("-mixed"), _FP32)
    # Mixed: trainable parameters, their gradients and AdamW state in fp32, the rest in w.
    tw = _FP32 if mixed else w
    h, i, v, n = shape.hidden, shape.intermediate, shape.vocab, shape.layers
    tokens = knobs.per_device_batch * knobs.cutoff_len
    total = shape.parameters
    if knobs.finetuning_type is FinetuningType.LORA:
        trainable = shape.lora_parameters(knobs.lora_rank)
        total += trainable
    elif knobs.finetuning_type is FinetuningType.FREEZE:
        trainable = min(abs(knobs.freeze_trainable_layers), n) * shape.layer_parameters
    else:
        trainable = total
    largest = max(v * h, h * i)  # the largest single parameter: embeddings or an MLP matrix
    weights = (total - trainable) * w + trainable * tw
    grads = trainable * tw
    states = 2 * trainable * tw  # AdamW: exp_avg and exp_avg_sq, in the parameters' dtype
    # Autocast keeps a half-precision copy of each trainable matrix it multiplies (not the
    # embeddings) from the forward pass until backward has used it.
    embeddings = v * h if knobs.finetuning_type is FinetuningType.FULL else 0
    casts = (trainable - embeddings) * w if mixed and w != _FP32 else 0

    # Saved activations, bytes per token of one decoder layer (SDPA, no dropout): each RMSNorm
    # keeps its fp32 input and its normalised output and hands the layer's projections their
    # input; attention keeps q, k, v, its output and o_proj's input; the MLP keeps gate,
    # silu(gate), up and their product.
    norm = 4 * h + 2 * w * h
    attention = w * (3 * h + 2 * shape.kv_dim)
    layer = 2 * norm + attention + 4 * w * i
    # After the last layer: the final norm and the head's input, then the logits: the loss's
    # log-softmax output, its incoming and its outgoing gradient (fp32) at the loss-backward
    # peak, plus the head's own half-precision logits when not fp32.
    head = norm + w * h
    logits = 12 * v + (w * v if w != _FP32 else 0)
    accumulating = knobs.grad_accum > 1  # the second micro-batch runs beside held gradients
    held = weights + states + casts + (grads if accumulating else 0)
    if knobs.gradient_checkpointing:
        # Only each layer's input is kept. Two candidate peaks: the loss's backward, and later
        # the recompute of one layer (the logits gone, its activations and their gradients).
        checkpoints = n * w * h
        per_token = max(checkpoints + head + logits, checkpoints + layer + 2 * w * h)
    elif knobs.finetuning_type is FinetuningType.FREEZE:
        # Frozen layers before the trainable ones need no activations for any gradient.
        per_token = min(abs(knobs.freeze_trainable_layers), n) * layer + head + logits
    else:
        per_token = n * layer + head + logits
    backward = held + tokens * per_token
    foreach = device == "cuda"  # foreach AdamW keeps a sqrt copy of every second moment
    temporaries = trainable * tw if foreach else 2 * min(largest, trainable) * tw
    optimizer = weights + grads + states + temporaries
    peak = max(backward, optimizer)
    breakdown = {
        "weights_mib": round(weights / _MIB, 2), "gradients_mib": round(grads / _MIB, 2),
        "optimizer_mib": round(states / _MIB, 2),
        "activations_and_temporaries_mib": round(
            (tokens * per_token if backward >= optimizer else temporaries) / _MIB, 2),
        "peak_phase": "backward" if backward >= optimizer else "optimizer",
        "total_params": total, "trainable_params": trainable,
    }
    return Prediction(peak_mib=peak / _MIB, method=Method.ANALYTIC, breakdown=breakdown)


# --- the FakeTensor estimate (child process) -------------------------------------------------

Run = Callable[..., "subprocess.CompletedProcess[str]"]


def fake_many(spec: ModelSpec, configs: Sequence[Knobs], *, device: str = "cpu",  # noqa: PLR0913 - keyword-only edges
              python: str = sys.executable, workers: int | None = None,
              timeout_s: float = 900.0,
              run: Run = subprocess.run) -> list[Prediction | EstimateError]:
    """FakeTensor estimates of many configs, in `workers` child processes (default: CPUs, max 4).

    Raises EstimateError when the child cannot run at all (no torch there, a crash, a
    timeout); a config the child could not trace comes back as an EstimateError naming it.
    """
    if not configs:
        return []
    count = max(1, min(workers or min(os.cpu_count() or 1, 4), len(configs)))
    chunks = [list(range(len(configs)))[j::count] for j in range(count)]

    def one(indices: list[int]) -> dict[int, dict[str, Any]]:
        request = {"config": spec.config, "device": device,
                   "requests": [_child_knobs(configs[k]) for k in indices]}
        results = _run_child(request, python=python, timeout_s=timeout_s, run=run)
        return {indices[r["index"]]: r for r in results}

    merged: dict[int, dict[str, Any]] = {}
    with ThreadPoolExecutor(max_workers=count) as pool:
        for part in pool.map(one, chunks):
            merged.update(part)
    predictions: list[Prediction | EstimateError] = []
    for k, knobs in enumerate(configs):
        result = merged[k]
        if "error" in result:
            predictions.append(EstimateError(
                f"FakeTensor estimate of {_short(knobs)} failed: {result['error']}"))
            continue
        breakdown = {**result["breakdown"], "peak_phase": result["peak_phase"],
                     "peak_op": result["peak_op"], "total_params": result["total_params"],
                     "trainable_params": result["trainable_params"],
                     "seconds": result["seconds"]}
        predictions.append(Prediction(peak_mib=result["peak_bytes"] / _MIB, method=Method.FAKE,
                                      breakdown=breakdown))
    return predictions


def _child_knobs(knobs: Knobs) -> dict[str, Any]:
    data = knobs.to_dict()
    return {k: data[k] for k in _MEMORY_KNOBS}


def _run_child(request: Mapping[str, Any], *, python: str, timeout_s: float,
               run: Run) -> list[dict[str, Any]]:
    here = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    # The child must import this very package, whichever interpreter runs it.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.pop("OOM_SUPERVISOR_DEVICE_MIB", None)  # never estimate under a simulated device
    try:
        proc = run([python, "-m", "supervisor._estimate_child"], input=json.dumps(request),
                   capture_output=True, text=True, env=env, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        msg = f"the FakeTensor estimator took longer than {timeout_s:.0f} s"
        raise EstimateError(msg) from None
    except OSError as error:
        msg = f"cannot start {python} for the FakeTensor estimator: {error}"
        raise EstimateError(msg) from None
    results = [json.loads(line[len(RESULT_PREFIX):]) for line in proc.stdout.splitlines()
               if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or len(results) != len(request["requests"]):
        last = next((line for line in reversed(proc.stderr.splitlines()) if line.strip()),
                    f"exit status {proc.returncode}")
        msg = f"the FakeTensor estimator ({python}) failed: {last.strip()[:300]}"
        raise EstimateError(msg)
    return results


# --- both, cached, with fallback -------------------------------------------------------------

_MEMORY_KNOBS = ("per_device_batch", "grad_accum", "cutoff_len", "gradient_checkpointing",
                 "finetuning_type", "lora_rank", "freeze_trainable_layers", "precision",
                 "quantization_bit", "deepspeed_stage")
"""The knobs that change a single device's peak; the rest (steps, paths, ranks) do not."""

_CACHE: dict[tuple[str, Knobs, str, str], Prediction] = {}
"""Estimates made in this process, per (config, memory-relevant knobs, device, method)."""


def clear_cache() -> None:
    """Forget every estimate made in this process (tests; a changed model directory)."""
    _CACHE.clear()


def _key_knobs(knobs: Knobs) -> Knobs:
    """Only the memory-relevant knobs (GA only as 1 or >1; rank and layers where they apply)."""
    values = {name: getattr(knobs, name) for name in _MEMORY_KNOBS}
    values["grad_accum"] = min(knobs.grad_accum, 2)
    if knobs.finetuning_type is not FinetuningType.LORA:
        del values["lora_rank"]
    if knobs.finetuning_type is not FinetuningType.FREEZE:
        del values["freeze_trainable_layers"]
    return Knobs(**values)


def _needs_analytic(knobs: Knobs) -> str | None:
    if knobs.quantization_bit is not None:
        return "quantised weights are not traced; counted analytically (unquantised)"
    if knobs.deepspeed_stage is not None:
        return "DeepSpeed sharding is not traced; counted analytically for one unsharded rank"
    return None


def estimate_many(spec: ModelSpec, configs: Sequence[Knobs], *, method: str = "auto",  # noqa: PLR0913 - keyword-only edges
                  device: str = "cpu", python: str = sys.executable,
                  workers: int | None = None, run: Run = subprocess.run) -> list[Prediction]:
    """Predictions for many configs: FakeTensor where it can ("auto"), else analytic.

    `method` is "auto", "fake" (no fallback) or "analytic". Estimates are cached in this
    process. Raises EstimateError for the first config nothing could predict.
    """
    out = []
    for result in predict_all(spec, configs, method=method, device=device, python=python,
                              workers=workers, run=run):
        if isinstance(result, EstimateError):
            raise result
        out.append(result)
    return out


def predict_all(spec: ModelSpec, configs: Sequence[Knobs], *, method: str = "auto",  # noqa: PLR0913 - keyword-only edges
                device: str = "cpu", python: str = sys.executable, workers: int | None = None,
                run: Run = subprocess.run) -> list[Prediction | EstimateError]:
    """As estimate_many, with each config's failure returned in its place instead of raised."""
    if method not in {"auto", "fake", "analytic"}:
        msg = f"unknown estimate method {method!r}; valid: auto, fake, analytic"
        raise ValueError(msg)
    keyed = [_key_knobs(k) for k in configs]
    wanted = "analytic" if method == "analytic" else "fake"
    failed: dict[Knobs, EstimateError] = {}
    if wanted == "fake":
        todo = [k for k in dict.fromkeys(keyed)
                if (spec.config_json, k, device, "fake") not in _CACHE
                and not _needs_analytic(k) and k.cutoff_len is not None]
        try:
            results = fake_many(spec, todo, device=device, python=python, workers=workers,
                                run=run)
        except EstimateError as error:
            results = [error] * len(todo)
        for k, result in zip(todo, results, strict=True):
            if isinstance(result, EstimateError):
                failed[k] = result
            else:
                _CACHE[(spec.config_json, k, device, "fake")] = result
    out: list[Prediction | EstimateError] = []
    for k in keyed:
        cached = _CACHE.get((spec.config_json, k, device, wanted))
        if cached is not None:
            out.append(cached)
            continue
        if method == "fake" and k in failed:
            out.append(failed[k])
            continue
        try:
            counted = analytic(spec, k, device=device)
        except EstimateError as error:
            out.append(error)
            continue
        why = _needs_analytic(k) if wanted == "fake" else None
        if why is None and k in failed:
            why = f"{failed[k]}; analytic estimate instead"
        out.append(counted if why is None else dataclasses.replace(counted, note=why))
    return out


def estimate(spec: ModelSpec, knobs: Knobs, *, method: str = "auto", device: str = "cpu",
             python: str = sys.executable) -> Prediction:
    """Predicted peak of one config (see estimate_many)."""
    return estimate_many(spec, [knobs], method=method, device=device, python=python)[0]


# --- calibration -----------------------------------------------------------------------------

CALIBRATION_BOUNDS = (0.25, 4.0)
"""A measured/predicted ratio outside these is a different program, not a calibration."""


def calibrated(prediction: Prediction, ratio: float) -> Prediction:
    """The prediction scaled by a measured/predicted ratio (1.0: unchanged)."""
    if ratio == 1.0:
        return prediction
    raw = prediction.raw_peak_mib if prediction.raw_peak_mib is not None else prediction.peak_mib
    return dataclasses.replace(prediction, peak_mib=raw * ratio, raw_peak_mib=raw)


@dataclass
class Estimator:
    """Predictions for the loop: cached, never raising, calibrated by measured peaks.

    `predict` returns None when no prediction can be made (unknown shape or cutoff): the loop
    must then never skip a rung on a prediction. `calibrate` takes an attempt's measured
    peak (or an OOM's lower bound) and scales every later prediction by measured/predicted.
    """

    spec: ModelSpec
    method: str = "auto"
    device: str = "cpu"
    python: str = sys.executable
    run: Run = subprocess.run
    ratio: float = 1.0
    """measured / predicted, from the latest calibration."""
    errors: list[str] = field(default_factory=list)
    """Why predictions failed (for the journal)."""

    def predict(self, knobs: Knobs) -> Prediction | None:
        """The calibrated prediction for `knobs`, or None when none can be made."""
        return self.predict_many([knobs])[0]

    def predict_many(self, configs: Sequence[Knobs]) -> list[Prediction | None]:
        """Calibrated predictions for many configs (one child process run for all)."""
        out: list[Prediction | None] = []
        for result in predict_all(self.spec, configs, method=self.method, device=self.device,
                                  python=self.python, run=self.run):
            if isinstance(result, EstimateError):
                self.errors.append(str(result))
                out.append(None)
            else:
                out.append(calibrated(result, self.ratio))
        return out

    def calibrate(self, knobs: Knobs, measured_mib: float, *,
                  lower_bound: bool = False) -> float:
        """Learn measured/predicted from an attempt; return the ratio now in force.

        `lower_bound`: the measurement is only "at least" (an OOM's allocated + tried to
        allocate), so it can raise the ratio but never lower it.
        """
        prediction = self.predict(knobs)
        if prediction is None or measured_mib <= 0:
            return self.ratio
        raw = prediction.raw_peak_mib if prediction.raw_peak_mib is not None else \
            prediction.peak_mib
        ratio = min(max(measured_mib / raw, CALIBRATION_BOUNDS[0]), CALIBRATION_BOUNDS[1])
        if lower_bound and ratio <= self.ratio:
            return self.ratio
        self.ratio = ratio
        return ratio


def oom_lower_bound_mib(numbers: OomNumbers | None) -> float | None:
    """What an OOM message proves the attempt needed at least (None: it says too little).

    Allocated plus what it tried to allocate, or the capacity it ran into, whichever is more.
    """
    if numbers is None:
        return None
    bound = max(numbers.capacity_mib or 0.0,
                (numbers.allocated_mib or 0.0) + (numbers.tried_mib or 0.0))
    return bound or None


def fits(prediction: Prediction | None, device_mib: float, *,
         margin: float = 0.10) -> bool | None:
    """Whether the predicted peak x (1 + margin) is within the device; None: no prediction.

    The loop skips a config only on False; on None it runs it (never skip on no prediction).
    """
    if prediction is None or not math.isfinite(prediction.peak_mib):
        return None
    return prediction.peak_mib * (1 + margin) <= device_mib


def _short(knobs: Knobs) -> str:
    return (f"batch {knobs.per_device_batch} x {knobs.cutoff_len} tokens, "
            f"gc={'on' if knobs.gradient_checkpointing else 'off'}, {knobs.finetuning_type}")
