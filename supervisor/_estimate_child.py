"""The FakeTensor estimator: two real training steps traced without allocating anything.

Run as ``python -m supervisor._estimate_child`` with one JSON request on stdin::

    {"config": {...config.json...}, "device": "cpu" | "cuda", "scale": true,
     "requests": [{knobs}, ...]}

For each request it builds the model under ``FakeTensorMode`` (tensors with shapes, dtypes
and storages but no data), runs forward -> backward -> gradient clipping -> AdamW step twice,
as the Hugging Face Trainer does, while a live-bytes ``TorchDispatchMode`` counts every
storage from the op that makes it until it is freed. It prints one line per request,
``estimate.result {json}``, as soon as that request is done. Only this child imports torch:
the supervisor stays torch-free.

With ``"scale": true`` (the default) a deep model is not traced whole: its decoder layers are
identical, so every phase's peak (and every part of the breakdown) is linear in the number of
layers. Two shallow copies are traced (1 and 2 layers, or k+1 and k+2 when freeze trains the
last k) and each phase is extrapolated to the real depth; the peak is the largest phase.
Within 1% of the full trace on the bundled models (tests/process/test_estimate_accuracy.py).
Runs on Python 3.10 and later: it may run in the wrapped command's own interpreter.
"""

# The result lines are this module's output, hence print; torch is imported here on purpose.
# ruff: noqa: T201

from __future__ import annotations

import contextlib
import json
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from supervisor import _families
from supervisor._sim import LiveBytesBudget
from supervisor.knobs import precision_dtypes

RESULT_PREFIX = "estimate.result"
_MIB = 2**20
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
# Keys of a hub config.json that would make transformers load remote code, quantise, or pick
# a dtype behind our back: the precision comes from the knobs.
_DROPPED_KEYS = ("quantization_config", "auto_map", "torch_dtype", "dtype")


class _PhasedLiveBytes(LiveBytesBudget):  # type: ignore[no-untyped-call]
    """LiveBytesBudget that also remembers the phase and the op at the peak."""

    def __init__(self) -> None:
        super().__init__(None)
        self.phase = "build"
        self.peak_phase = "build"
        self.peak_op = ""
        self.phase_peaks: dict[str, int] = {}
        self.phase_ops: dict[str, str] = {}
        self.phase_grads: dict[str, int] = {}
        """Gradient bytes held at each phase's peak (what ZeRO-2 would shard there)."""
        self.params: Sequence[torch.Tensor] = ()

    def __torch_dispatch__(
        self,
        func: Callable[..., Any],
        types: object,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:  # noqa: ANN401 - an op returns whatever its schema says
        before = self.peak_bytes
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if self.peak_bytes > before:
            self.peak_phase, self.peak_op = self.phase, str(func)
        if self.live_bytes > self.phase_peaks.get(self.phase, -1):
            self.phase_peaks[self.phase] = self.live_bytes
            self.phase_ops[self.phase] = str(func)
            self.phase_grads[self.phase] = sum(
                p.grad.nbytes for p in self.params if p.grad is not None)
        return out


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    # Under FakeTensorMode `.to(dtype)` on a built model swaps parameters, which fake tensors
    # refuse: build the model in its dtype from the start instead.
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@contextlib.contextmanager
def _module_to_is_identity() -> Iterator[None]:
    # PEFT moves each new adapter to its base layer's device and dtype with Module.to, which
    # swaps parameters; fake parameters refuse to be swapped. Everything is already in place.
    original = torch.nn.Module.to

    def identity(self: torch.nn.Module, *_: object, **__: object) -> torch.nn.Module:
        return self

    torch.nn.Module.to = identity  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        torch.nn.Module.to = original  # type: ignore[method-assign]


def _never_packed() -> None:
    # transformers cannot read a fake position_ids tensor, so it assumes packed sequences and
    # builds a 4-D float mask per layer that a real run (unpacked samples) never has. Our
    # samples are never packed: tell it so, and it uses SDPA's is_causal as a real run does.
    with contextlib.suppress(ImportError):
        from transformers import masking_utils  # noqa: PLC0415 - only once transformers is needed

        if hasattr(masking_utils, "find_packed_sequence_indices"):
            masking_utils.find_packed_sequence_indices = lambda *_, **__: None


def _build_model(config_values: dict[str, Any], knobs: dict[str, Any]) -> torch.nn.Module:
    """The model as the trainer would train it: checkpointing, then LoRA or freeze."""
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: PLC0415

    values = {k: v for k, v in config_values.items() if k not in _DROPPED_KEYS}
    config = AutoConfig.for_model(**values)
    config.use_cache = False
    model: Any = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    if knobs.get("gradient_checkpointing"):
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    kind = knobs.get("finetuning_type", "full")
    if kind == "lora":
        # What the reference trainer and the programs target (supervisor._families).
        rank = int(knobs.get("lora_rank") or 8)
        with _module_to_is_identity(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _families.apply_lora(model, rank=rank, target=knobs.get("lora_target"))
    if kind == "freeze":
        _families.freeze(model, int(knobs.get("freeze_trainable_layers") or 2))
    return model  # type: ignore[no-any-return]


def _mark_layer_backward(model: torch.nn.Module, live: _PhasedLiveBytes) -> None:
    """Name the backward through the decoder blocks its own phase, "backward-layers".

    The backward has two peaks: at the loss (the logits' gradients) and, with checkpointing,
    at the last block's recompute with every other gradient held. Each is linear in the depth,
    but which one is higher can change with it (tiny-qwen2, full + checkpointing b2 x 256: the
    loss's at 1 and 2 layers, the recompute's at 6): two phases extrapolate each on its own.
    """
    try:
        _, blocks = _families.decoder_blocks(model)
    except ValueError:
        return  # no blocks (a zero-layer copy): one backward phase

    def entered(_: torch.Tensor) -> None:
        if live.phase == "backward":
            live.phase = "backward-layers"

    def watch(_: torch.nn.Module, __: object, output: object) -> None:
        first = output[0] if isinstance(output, tuple) else output
        if isinstance(first, torch.Tensor) and first.requires_grad:
            first.register_hook(entered)  # type: ignore[no-untyped-call]

    blocks[-1].register_forward_hook(watch)


def estimate_one(config_values: dict[str, Any], knobs: dict[str, Any], *,
                 device: str = "cpu") -> dict[str, Any]:
    """Peak live bytes of two training steps of `knobs`, with a breakdown."""
    batch = int(knobs["per_device_batch"])
    cutoff = knobs.get("cutoff_len")
    if cutoff is None:
        msg = "cutoff_len unknown: the sequence length decides the activations"
        raise ValueError(msg)
    micro_batches = min(int(knobs.get("grad_accum") or 1), 2)
    # Each part in the dtype the program holds it in (supervisor.knobs.precision_dtypes):
    # the model built in its load dtype, trainable parameters upcast where the program does
    # (LLaMA-Factory's bf16), autocast where compute differs from the trainable weights.
    frozen, trainable_dtype, compute = precision_dtypes(knobs.get("precision"))
    dtype = _DTYPES[frozen]
    # On CUDA AdamW and clipping use the foreach kernels (fake tensors would not pick them).
    foreach = device == "cuda"
    started = time.perf_counter()
    live = _PhasedLiveBytes()
    with _default_dtype(dtype), FakeTensorMode(allow_non_fake_inputs=True), live:
        model = _build_model(config_values, knobs)
        model.train()
        _mark_layer_backward(model, live)
        params = [p for p in model.parameters() if p.requires_grad]
        live.params = params
        if trainable_dtype != frozen:
            for p in params:
                p.data = p.data.to(_DTYPES[trainable_dtype])
        autocast = (torch.autocast("cpu", dtype=_DTYPES[compute]) if compute != trainable_dtype
                    else contextlib.nullcontext())
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, foreach=foreach)
        vocab = int(config_values.get("vocab_size", 32000))
        # Step 1 peaks below step 2 (no AdamW state yet): all it leaves behind is the state,
        # made here as AdamW's first step makes it, and step 2 is traced in full.
        live.phase = "optimizer"
        keep = torch.preserve_format
        for p in params:
            optimizer.state[p] = {"step": torch.tensor(1.0, dtype=torch.float32),
                                  "exp_avg": torch.zeros_like(p, memory_format=keep),
                                  "exp_avg_sq": torch.zeros_like(p, memory_format=keep)}
        # With accumulation, the second micro-batch runs while the first one's gradients are
        # held: two micro-batches show the peak of any number of them.
        for _ in range(micro_batches):
            ids = torch.randint(3, vocab, (batch, int(cutoff)))
            live.phase = "forward"
            with autocast:
                loss = model(input_ids=ids, labels=ids).loss / micro_batches
            live.phase = "backward"
            loss.backward()
            del loss, ids
        live.phase = "optimizer"
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=foreach)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in params)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        grads = sum(p.numel() * p.element_size() for p in params)
        states = sum(v.numel() * v.element_size() for s in optimizer.state.values()
                     for v in s.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    fixed = weights + states + (grads if live.peak_phase == "optimizer" or micro_batches > 1
                                else 0)
    return {
        "peak_bytes": live.peak_bytes,
        "phase_peaks": {k: v for k, v in live.phase_peaks.items() if k != "build"},
        "phase_ops": live.phase_ops,
        "phase_grads": {k: v for k, v in live.phase_grads.items() if k != "build"},
        "parts": {"weights": weights, "gradients": grads, "optimizer": states},
        "breakdown": {
            "weights_mib": round(weights / _MIB, 2),
            "gradients_mib": round(grads / _MIB, 2),
            "optimizer_mib": round(states / _MIB, 2),
            "activations_and_temporaries_mib": round(max(live.peak_bytes - fixed, 0) / _MIB, 2),
        },
        "peak_phase": live.peak_phase,
        "peak_op": live.peak_op,
        "total_params": total,
        "trainable_params": trainable,
        "micro_batches": micro_batches,
        "seconds": round(time.perf_counter() - started, 2),
    }


def scaled_depths(layers: int, knobs: dict[str, Any]) -> tuple[int, int] | None:
    """The two shallow depths to trace for a `layers`-deep model (None: trace it whole)."""
    kept = 0
    if knobs.get("finetuning_type") == "freeze":
        # Freeze trains k layers at one end: keep all k, vary the frozen ones.
        kept = abs(int(knobs.get("freeze_trainable_layers") or 2))
    # One layer beside two: the backward through the layers is a phase of its own
    # (_mark_layer_backward), which a copy with no layer lacks.
    first = kept + 1
    depths = (first, first + 1)
    return depths if depths[1] < layers else None


def extrapolate(shallow: dict[str, Any], deeper: dict[str, Any], depths: tuple[int, int],
                layers: int) -> dict[str, Any]:
    """A `layers`-deep result from two shallow ones: each phase and part, linearly."""
    a, b = depths

    def line(x: float, y: float) -> float:
        return x + (y - x) * (layers - a) / (b - a)

    phases = {k: round(line(v, deeper["phase_peaks"][k]))
              for k, v in shallow["phase_peaks"].items() if k in deeper["phase_peaks"]}
    grads = {k: round(line(v, deeper["phase_grads"][k]))
             for k, v in shallow["phase_grads"].items() if k in deeper["phase_grads"]}
    parts = {k: round(line(v, deeper["parts"][k])) for k, v in shallow["parts"].items()}
    return _summed({
        "phase_peaks": phases,
        "phase_grads": grads,
        "phase_ops": deeper["phase_ops"],
        "parts": parts,
        "micro_batches": deeper["micro_batches"],
        "total_params": round(line(shallow["total_params"], deeper["total_params"])),
        "trainable_params": round(line(shallow["trainable_params"],
                                       deeper["trainable_params"])),
        "seconds": round(shallow["seconds"] + deeper["seconds"], 2),
        "traced_layers": list(depths),
    })


def _summed(result: dict[str, Any]) -> dict[str, Any]:
    """The peak, its phase and the breakdown, from the phases and parts."""
    phases, parts = result["phase_peaks"], result["parts"]
    peak_phase = max(phases, key=lambda k: phases[k])
    fixed = parts["weights"] + parts["optimizer"] + (
        parts["gradients"] if peak_phase == "optimizer" or result["micro_batches"] > 1 else 0)
    return {
        **result,
        "peak_bytes": phases[peak_phase],
        "peak_phase": peak_phase,
        "peak_op": result["phase_ops"].get(peak_phase, ""),
        "breakdown": {
            "weights_mib": round(parts["weights"] / _MIB, 2),
            "gradients_mib": round(parts["gradients"] / _MIB, 2),
            "optimizer_mib": round(parts["optimizer"] / _MIB, 2),
            "activations_and_temporaries_mib": round(
                max(phases[peak_phase] - fixed, 0) / _MIB, 2),
        },
    }


def estimate(config_values: dict[str, Any], knobs: dict[str, Any], *, device: str = "cpu",
             scale: bool = True) -> dict[str, Any]:
    """estimate_one, on two shallow copies extrapolated to the real depth where `scale`.

    Scaled, each shallow copy traces the micro-batches too (two when accumulating). Adding
    all gradients to a one-micro-batch trace's phase peaks instead is wrong where the shallow
    backward peaks elsewhere than the deep one: on tiny-qwen2 (tied embeddings), full +
    checkpointing b1 x GA8 x 256 the shallow backward peaked at its end, the real one at the
    loss's backward with every gradient held: 113.7 MiB predicted, 117.5 measured.
    """
    layers = _families.depth(config_values)
    depths = scaled_depths(layers, knobs) if scale else None
    if depths is None:
        return estimate_one(config_values, knobs, device=device)
    shallow, deeper = (estimate_one(_families.with_depth(config_values, d), knobs,
                                    device=device) for d in depths)
    return extrapolate(shallow, deeper, depths, layers)


def _answer(request: dict[str, Any]) -> None:
    """One result line per config of `request`, each as soon as it is traced."""
    config_values = request["config"]
    device = request.get("device", "cpu")
    scale = bool(request.get("scale", True))
    for index, knobs in enumerate(request["requests"]):
        try:
            result: dict[str, Any] = estimate(config_values, knobs, device=device, scale=scale)
        except Exception as error:  # noqa: BLE001 - every failure goes back as data
            last = traceback.format_exception_only(error)[-1].strip()
            result = {"error": " ".join(last.split())[:500]}
        result["index"] = index
        print(f"{RESULT_PREFIX} {json.dumps(result)}", flush=True)


READY = "estimate.ready"
"""The warm tracer's first line: torch and transformers are imported, requests are welcome."""
DONE = "estimate.done"
"""The warm tracer's line after the last result of one request."""


def serve() -> int:
    """The warm tracer (supervisor.tracer): torch imported once, one JSON request per line.

    Prints READY once transformers is imported, then for each request line its result lines
    and DONE; ends at the end of stdin.
    """
    _never_packed()
    with contextlib.suppress(ImportError):
        import transformers  # noqa: F401, PLC0415 - imported now, not at the first request
    print(READY, flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            _answer(json.loads(line))
        except Exception as error:  # noqa: BLE001 - a bad request must not end the tracer
            last = traceback.format_exception_only(error)[-1].strip()
            print(f"{RESULT_PREFIX} {json.dumps({'error': last[:500], 'index': -1})}",
                  flush=True)
        print(DONE, flush=True)
    return 0


def main() -> int:
    """Read the request from stdin, print one result line per config (`--serve`: many)."""
    if sys.argv[1:] == ["--serve"]:
        return serve()
    request = json.loads(sys.stdin.read())
    _never_packed()
    _answer(request)
    return 0


if __name__ == "__main__":
    sys.exit(main())
