"""Predicted peak training memory of a config, before running it.

Two ways, same answer type (`Prediction`):

- ``fake``: the model is built and trained for two steps under ``FakeTensorMode`` while a
  live-bytes mode counts every storage (`supervisor._estimate_child`, a child process: the
  supervisor never imports torch). Exact to the MiB on the reference trainer.
- ``analytic``: weights, gradients, AdamW state, activations per token per layer, logits,
  checkpointing and the LoRA/freeze trainable share, counted from the config's shape. For
  when torch or the model's code is not at hand; within ~25% of ``fake`` (docs/memory.md).

A deep model is traced as two shallow copies and extrapolated (its decoder layers are
identical): a Llama-7B config in ~2 s instead of ~15. What neither method traces is counted
on top of the unsharded, unquantised trace (`adjusted`): 4/8-bit weights (QLoRA implies
LoRA) and DeepSpeed ZeRO sharding over the world size, optimizer offload included. Each
prediction lists its assumptions (precision assumed fp32 when the command does not say...).

The child runs in the wrapped command's own interpreter when that has torch and
transformers (`pick_python`), else in the supervisor's own, else the count is analytic.

`Estimator` wraps both for the loop: cached, calibrated by the peaks that attempts measure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, Protocol

from supervisor._compat import StrEnum
from supervisor._families import (
    PEFT_DEFAULT,
    canonical_target,
    depth_key,
    target_names,
    targets,
)
from supervisor.classify import OomNumbers
from supervisor.knobs import FinetuningType, Knobs, precision_dtypes
from supervisor.models import COMMON_CONFIG, NAMED_CONFIGS, named_config

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
    assumptions: tuple[str, ...] = ()
    """What the prediction took for granted or counted on top of the trace, in words."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Prediction:
        """Back from to_dict (a trace kept by an earlier run)."""
        raw = data.get("raw_peak_mib")
        return cls(peak_mib=float(data["peak_mib"]), method=Method(str(data["method"])),
                   breakdown=dict(data.get("breakdown") or {}),
                   raw_peak_mib=None if raw is None else float(raw), note=data.get("note"),
                   assumptions=tuple(str(a) for a in data.get("assumptions") or ()))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for the journal and report."""
        return {"peak_mib": round(self.peak_mib, 2), "method": str(self.method),
                "raw_peak_mib": None if self.raw_peak_mib is None else round(self.raw_peak_mib, 2),
                "breakdown": dict(self.breakdown), "note": self.note,
                "assumptions": list(self.assumptions)}


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
        """One of the bundled sizes (`tiny`, `small`; supervisor/models.py)."""
        if size not in NAMED_CONFIGS:
            msg = f"no named size {size!r}; named sizes: {', '.join(NAMED_CONFIGS)}"
            raise ModelSpecError(msg)
        return cls.from_config(size, {**COMMON_CONFIG, **NAMED_CONFIGS[size]},
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
    def resolve(cls, name_or_path: str, *, env: Mapping[str, str] | None = None,
                cwd: str | Path | None = None) -> ModelSpec:
        """A local directory, a named size, or a hub id already in the Hugging Face cache.

        A local path (relative to `cwd`, the command's directory) always wins over a named
        size. Never downloads: a hub id that is not cached raises ModelSpecError naming the cache.
        """
        env = os.environ if env is None else env
        directory = Path(name_or_path).expanduser()
        if not directory.is_absolute() and cwd is not None:
            directory = Path(cwd) / directory
        if directory.is_dir():
            return cls.from_dir(directory, name=name_or_path)
        if directory.exists():
            msg = f"model {name_or_path!r} is a file, not a model folder with a config.json"
            raise ModelSpecError(msg)
        if named_config(name_or_path, cwd=cwd) is not None:
            return cls.named(name_or_path)
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


def model_name(knobs: Knobs, argv: Sequence[str] = ()) -> str | None:
    """The model the command trains: as its dialect read it, else `--model_name_or_path`."""
    return knobs.model or model_argument(argv)


# --- the analytic estimate -------------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class _Family:
    """How one family of causal LMs names its dimensions and builds its decoder block."""

    hidden: tuple[str, ...] = ("hidden_size",)
    intermediate: tuple[str, ...] = ("intermediate_size",)
    """config keys of the MLP's width, first found wins (none found: `mlp_ratio` x hidden)."""
    heads: tuple[str, ...] = ("num_attention_heads",)
    kv_heads: tuple[str, ...] = ("num_key_value_heads",)
    positions: tuple[str, ...] = ()
    """Keys of the learned position embeddings' length (none: rotary or ALiBi, no table)."""
    tied: bool = False
    """tie_word_embeddings when config.json does not say (the config class's default)."""
    fused_qkv: bool = False
    """One projection makes q, k and v (GPT-2's c_attn, GPT-NeoX's query_key_value)."""
    gated: bool = True
    """The MLP has three matrices (gate, up, down: SwiGLU) instead of two."""
    qkv_bias: tuple[str, ...] | bool = ("attention_bias",)
    """Bias on q, k, v: always, never, or where one of these config keys is true."""
    out_bias: tuple[str, ...] | bool = ("attention_bias",)
    """Bias on the attention output projection."""
    mlp_bias: tuple[str, ...] | bool = ("mlp_bias",)
    layer_norm: bool = False
    """LayerNorm (weight and bias) instead of RMSNorm (weight only)."""
    norms: int = 2
    """Norms per block: two, or one where attention and MLP run in parallel (Phi)."""
    head_bias: bool = False
    """The output head has a bias (Phi)."""
    mlp_ratio: int = 4
    extra_norms: int = 0
    """Norms outside the blocks beside the final one (BLOOM's embedding LayerNorm)."""
    positions_offset: int = 0
    """Rows of the position table past its length key (OPT keeps 2 more)."""
    activation_saves: int = 4
    """MLP tensors of its width kept for backward: SwiGLU's gate, silu(gate), up and their
    product (4); GELU's input and output (2); GPT-2's tanh approximation, written out as six
    elementwise ops, keeps more (5)."""
    linear_names: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                     "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                     "mlp.down_proj")
    """Each linear layer's name inside a block, in `Shape.linears`' order (q, k, v or the
    fused qkv, the attention output, the MLP's): what a LoRA target list is matched against."""
    peft_targets: tuple[str, ...] = ("q_proj", "v_proj")
    """What peft adapts when given no list (its TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_
    MAPPING for the model type): TRL's default."""


def _fused_names(attention: str) -> tuple[str, ...]:
    """GPT-NeoX's block names (`attention`), BLOOM's and Falcon's (`self_attention`)."""
    return (f"{attention}.query_key_value", f"{attention}.dense", "mlp.dense_h_to_4h",
            "mlp.dense_4h_to_h")


_LLAMA = _Family()
_FAMILIES: dict[str, _Family] = {
    "qwen2": _Family(qkv_bias=True),
    "gpt2": _Family(hidden=("n_embd",), intermediate=("n_inner",), heads=("n_head",),
                    kv_heads=(), positions=("n_positions",), tied=True, fused_qkv=True,
                    gated=False, qkv_bias=True, out_bias=True, mlp_bias=True, layer_norm=True,
                    activation_saves=5, peft_targets=("c_attn",),
                    linear_names=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")),
    "gpt_neox": _Family(kv_heads=(), fused_qkv=True, gated=False, qkv_bias=("attention_bias",),
                        out_bias=("attention_bias",), mlp_bias=True, layer_norm=True,
                        activation_saves=2, peft_targets=("query_key_value",),
                        linear_names=_fused_names("attention")),
    "phi": _Family(qkv_bias=True, out_bias=True, mlp_bias=True, gated=False, layer_norm=True,
                   norms=1, head_bias=True, activation_saves=5,
                   peft_targets=("q_proj", "v_proj", "fc1", "fc2"),
                   linear_names=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                 "self_attn.dense", "mlp.fc1", "mlp.fc2")),
    "gptj": _Family(hidden=("n_embd",), intermediate=("n_inner",), heads=("n_head",),
                    kv_heads=(), qkv_bias=False, out_bias=False, mlp_bias=True, gated=False,
                    layer_norm=True, norms=1, head_bias=True, activation_saves=5,
                    linear_names=("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj",
                                  "mlp.fc_in", "mlp.fc_out")),
    "bloom": _Family(hidden=("hidden_size", "n_embed"), heads=("n_head",), kv_heads=(),
                     tied=True, fused_qkv=True, gated=False, qkv_bias=True, out_bias=True,
                     mlp_bias=True, layer_norm=True, extra_norms=1, activation_saves=5,
                     peft_targets=("query_key_value",),
                     linear_names=_fused_names("self_attention")),
    "falcon": _Family(kv_heads=("num_kv_heads",), tied=True, fused_qkv=True, gated=False,
                      qkv_bias=("bias",), out_bias=("bias",), mlp_bias=("bias",),
                      layer_norm=True, norms=1, activation_saves=2,
                      peft_targets=("query_key_value",),
                      linear_names=_fused_names("self_attention")),
    "mpt": _Family(hidden=("d_model",), heads=("n_heads",), kv_heads=(), tied=True,
                   fused_qkv=True, gated=False, qkv_bias=False, out_bias=False, mlp_bias=False,
                   activation_saves=2, peft_targets=("Wqkv",),
                   linear_names=("attn.Wqkv", "attn.out_proj", "ffn.up_proj", "ffn.down_proj")),
    "opt": _Family(intermediate=("ffn_dim",), kv_heads=(), positions=("max_position_embeddings",),
                   positions_offset=2, tied=True, gated=False, qkv_bias=True, out_bias=True,
                   mlp_bias=True, layer_norm=True, activation_saves=2,
                   linear_names=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                 "self_attn.out_proj", "fc1", "fc2")),
    "gemma": _Family(tied=True),
    "stablelm": _Family(qkv_bias=("use_qkv_bias",), out_bias=False, layer_norm=True),
}
"""Families whose block is not Llama's (model_type -> how it is built); any other family
is counted as a Llama-style decoder (Mistral, Qwen2, Gemma... share its shapes)."""
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt_neox": {"attention_bias": True}, "gpt2": {"n_positions": 1024},
    "opt": {"max_position_embeddings": 2048}}
"""Config keys whose class default decides a shape when config.json leaves them out."""


def _first(config: Mapping[str, Any], keys: Sequence[str]) -> Any:  # noqa: ANN401 - JSON
    return next((config[k] for k in keys if config.get(k) is not None), None)


def _kv_heads(model_type: str, config: Mapping[str, Any], family: _Family, heads: int) -> int:
    """Key/value heads: the config's, else all of them (Falcon: one, multi-query, unless its
    new decoder architecture says how many)."""
    if model_type == "falcon" and not config.get("new_decoder_architecture"):
        return 1 if config.get("multi_query", True) else heads
    return int(_first(config, family.kv_heads) or heads)


@dataclass(frozen=True, slots=True, kw_only=True)
class Shape:
    """A decoder's dimensions and block layout, read from config.json per family."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    qkv_bias: bool = False
    family: str = "llama"
    positions: int = 0
    fused_qkv: bool = False
    gated: bool = True
    out_bias: bool = False
    mlp_bias: bool = False
    layer_norm: bool = False
    norms: int = 2
    head_bias: bool = False
    activation_saves: int = 4
    head_dim: int = 0
    """Width of one attention head where the config sets it apart from hidden / heads."""
    extra_norms: int = 0
    linear_names: tuple[str, ...] = _LLAMA.linear_names
    """Each of `linears`' name inside a block (what LoRA's target names are matched against)."""
    peft_targets: tuple[str, ...] = _LLAMA.peft_targets
    """What peft adapts in this family when given no list (PEFT_DEFAULT)."""

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Shape | None:
        """Read the dimensions; None when a needed one is missing."""
        model_type = str(config.get("model_type") or "llama")
        family = _FAMILIES.get(model_type, _LLAMA)
        values = {**_FAMILY_DEFAULTS.get(model_type, {}), **config}

        def flag(rule: tuple[str, ...] | bool) -> bool:  # noqa: FBT001 - the rule's own type
            return rule if isinstance(rule, bool) else any(bool(values.get(k)) for k in rule)

        try:
            hidden = int(_first(values, family.hidden))
            heads = int(_first(values, family.heads))
            intermediate = _first(values, family.intermediate)
            tied = values.get("tie_word_embeddings")
            return cls(hidden=hidden,
                       intermediate=int(intermediate if intermediate is not None
                                        else family.mlp_ratio * hidden),
                       layers=int(values[depth_key(values) or "num_hidden_layers"]),
                       heads=heads,
                       kv_heads=_kv_heads(model_type, values, family, heads),
                       head_dim=int(values.get("head_dim") or 0),
                       extra_norms=family.extra_norms,
                       vocab=int(values["vocab_size"]),
                       tied=bool(family.tied if tied is None else tied),
                       qkv_bias=flag(family.qkv_bias), family=model_type,
                       positions=int(_first(values, family.positions) or 0) + (
                           family.positions_offset if family.positions else 0),
                       fused_qkv=family.fused_qkv, gated=family.gated,
                       out_bias=flag(family.out_bias), mlp_bias=flag(family.mlp_bias),
                       layer_norm=family.layer_norm,
                       norms=2 if model_type == "falcon" and (
                           values.get("new_decoder_architecture")
                           or values.get("parallel_attn") is False) else family.norms,
                       head_bias=family.head_bias, activation_saves=family.activation_saves,
                       linear_names=family.linear_names, peft_targets=family.peft_targets)
        except (KeyError, TypeError, ValueError):
            return None

    @property
    def kv_dim(self) -> int:
        """Width of the key (and value) projection."""
        return (self.head_dim or self.hidden // self.heads) * self.kv_heads

    @property
    def q_dim(self) -> int:
        """Width of the query projection (the hidden size unless head_dim says otherwise)."""
        return self.head_dim * self.heads if self.head_dim else self.hidden

    @property
    def linears(self) -> tuple[tuple[int, int], ...]:
        """(in, out) of each linear layer of one block: LoRA's targets (peft's all-linear)."""
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        qkv = ((h, q + 2 * kv),) if self.fused_qkv else ((h, q), (h, kv), (h, kv))
        mlp = ((h, i), (h, i), (i, h)) if self.gated else ((h, i), (i, h))
        return (*qkv, (q, h), *mlp)

    @property
    def layer_linear_parameters(self) -> int:
        """The weights of one block's linear layers (what 4/8-bit quantisation stores)."""
        return sum(a * b for a, b in self.linears)

    @property
    def layer_parameters(self) -> int:
        """Parameters of one decoder block: its linear layers, their biases and its norms."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        biases = ((self.q_dim + 2 * kv) if self.qkv_bias else 0) + (h if self.out_bias else 0) + (
            ((2 * i if self.gated else i) + h) if self.mlp_bias else 0)
        return self.layer_linear_parameters + biases + self.norms * self.norm_parameters

    @property
    def norm_parameters(self) -> int:
        """Parameters of one norm: a weight, and a bias for LayerNorm."""
        return 2 * self.hidden if self.layer_norm else self.hidden

    @property
    def parameters(self) -> int:
        """All parameters: embeddings (and positions), blocks, final norm, head unless tied."""
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2) + (
            self.positions * self.hidden) + (self.vocab if self.head_bias else 0)
        return embeddings + self.layers * self.layer_parameters + (
            1 + self.extra_norms) * self.norm_parameters

    def lora_adapted(self, target: str | None = None) -> tuple[bool, ...]:
        """Whether LoRA adapts each of `linears`: those whose name peft matches against the
        program's target list; every one for `all` or unsaid, or where the list names none of
        this family's layers (the program's own count is then unknown: counted as all)."""
        names = target_names(target)
        if names == (PEFT_DEFAULT,):
            names = self.peft_targets
        every = (True,) * len(self.linears)
        if names is None or len(self.linear_names) != len(self.linears):
            return every
        adapted = tuple(targets(name, names) for name in self.linear_names)
        return adapted if any(adapted) else every

    def lora_linears(self, target: str | None = None) -> tuple[tuple[int, int], ...]:
        """(in, out) of each linear layer of one block that LoRA adapts (`lora_adapted`)."""
        return tuple(dims for dims, adapted in zip(self.linears, self.lora_adapted(target),
                                                   strict=True) if adapted)

    def lora_parameters(self, rank: int, target: str | None = None) -> int:
        """LoRA A and B on each targeted linear layer of every block (`lora_target`)."""
        return self.layers * rank * sum(a + b for a, b in self.lora_linears(target))


_FP32 = 4
_PRECISION_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}


def analytic(spec: ModelSpec, knobs: Knobs, *, device: str = "cpu") -> Prediction:
    """Count the peak from the config's shape: the larger of the loss-backward and AdamW peaks.

    Assumes what the FakeTensor estimator traces: SDPA attention, no dropout, AdamW, the
    loss computed in fp32. Each part is held in the dtype `precision_dtypes` gives: pure
    "bf16"/"fp16" trains everything in that precision; "bf16-mixed" (a Hugging Face script's
    --bf16) is autocast over fp32 weights, frozen and trainable; "bf16-base-mixed"
    (LLaMA-Factory's bf16) loads the model in bf16 and upcasts only the trainable parameters.
    """
    shape = spec.shape()
    if shape is None:
        msg = (f"{spec.source}: no hidden_size / intermediate_size / num_hidden_layers / "
               "num_attention_heads / vocab_size: cannot count its memory")
        raise EstimateError(msg)
    if knobs.cutoff_len is None:
        msg = "cutoff_len unknown: the sequence length decides the activations"
        raise EstimateError(msg)
    frozen_dtype, trainable_dtype, compute_dtype = precision_dtypes(knobs.precision)
    fw = _PRECISION_BYTES[frozen_dtype]  # frozen weights
    tw = _PRECISION_BYTES[trainable_dtype]  # trainable weights, their gradients, AdamW state
    w = _PRECISION_BYTES[compute_dtype]  # activations (autocast computes in this)
    mixed = w != tw
    h, i, v, n = shape.hidden, shape.intermediate, shape.vocab, shape.layers
    tokens = knobs.per_device_batch * knobs.cutoff_len
    total = shape.parameters
    if knobs.finetuning_type is FinetuningType.LORA:
        trainable = shape.lora_parameters(knobs.lora_rank, knobs.lora_target)
        total += trainable
    elif knobs.finetuning_type is FinetuningType.FREEZE:
        trainable = min(abs(knobs.freeze_trainable_layers), n) * shape.layer_parameters
    else:
        trainable = total
    largest = max(v * h, h * i)  # the largest single parameter: embeddings or an MLP matrix
    weights = (total - trainable) * fw + trainable * tw
    grads = trainable * tw
    states = 2 * trainable * tw  # AdamW: exp_avg and exp_avg_sq, in the parameters' dtype
    # Autocast keeps a half-precision copy of each trainable matrix it multiplies (not the
    # embeddings) from the forward pass until backward has used it.
    embeddings = v * h if knobs.finetuning_type is FinetuningType.FULL else 0
    casts = (trainable - embeddings) * w if mixed else 0
    if mixed and fw != w and knobs.finetuning_type is not FinetuningType.FULL:
        # Frozen fp32 matrices under autocast are cast again at every use; backward needs the
        # copy of each one whose input needs a gradient (every layer's with LoRA, the head's),
        # so the copies live until backward. With checkpointing only one layer's at a time.
        layer_matrices = shape.layer_linear_parameters  # its norms are not multiplied
        copied_layers = (1 if knobs.gradient_checkpointing
                         or knobs.finetuning_type is FinetuningType.FREEZE else n)
        casts += (copied_layers * layer_matrices + v * h) * w

    # Saved activations, bytes per token of one decoder layer (SDPA, no dropout): each RMSNorm
    # keeps its fp32 input and its normalised output and hands the layer's projections their
    # input (a LayerNorm its input and output); attention keeps q, k, v, its output and
    # o_proj's input; the MLP keeps its family's share (SwiGLU: gate, silu(gate), up and
    # their product). Dropout keeps a one-byte mask of each dropped tensor.
    norm = 2 * w * h if shape.layer_norm else 4 * h + 2 * w * h
    attention = w * (3 * h + 2 * shape.kv_dim)
    masks = 2 * h + h if _dropout(spec.config) else 0  # after attention, after the MLP; embeddings
    scores = 0
    if _dropout(spec.config, attention=True) and device == "cpu":
        # Attention dropout sends SDPA down its math path on a CPU: the scores, their softmax,
        # the mask and the dropped probabilities, heads x cutoff per token.
        scores = shape.heads * knobs.cutoff_len
        masks += scores * (3 * w + 1)
    layer = shape.norms * norm + attention + shape.activation_saves * w * i + masks
    first_layer_kept = 0  # what the first layer keeps beside `layer` (negative: less)
    if knobs.finetuning_type is FinetuningType.LORA:
        # A frozen projection needs no input for backward; an adapted one keeps it for its
        # A matrix. The attention output projection's input and the MLP's last one's are
        # kept for nothing else: a target list without them saves their width per token.
        adapted = shape.lora_adapted(knobs.lora_target)
        out = 1 if shape.fused_qkv else 3  # the attention output projection's index
        layer -= (0 if adapted[out] else w * shape.q_dim) + (0 if adapted[-1] else w * i)
        # Nothing before the first adapted projection needs a gradient: in the first layer,
        # a list without q, k, v keeps nothing of attention's own (nor of its norm), and one
        # that adapts only the MLP's last projection nothing of the MLP's first ones either.
        # (One norm shared by attention and MLP, Phi's, is the MLP side's to drop.)
        own_norm = norm if shape.norms > 1 else 0
        if not any(adapted[:out]):
            first_layer_kept -= own_norm + attention - w * shape.q_dim + scores * (3 * w + 1)
            if not any(adapted[out:-1]):
                first_layer_kept -= (shape.activation_saves - 1) * w * i + norm
    head = norm + w * h
    logits = 12 * v + (w * v if w != _FP32 else 0)
    accumulating = knobs.grad_accum > 1  # the second micro-batch runs beside held gradients
    held = weights + states + casts + (grads if accumulating else 0)
    recomputed = False
    if knobs.gradient_checkpointing:
        # Only each layer's input is kept. Two candidate peaks: the loss's backward, and later
        # the recompute of one layer (the logits gone, its activations and their gradients,
        # and where SDPA took its math path the scores' gradient). The first layer's recompute
        # comes last, with every other gradient held.
        checkpoints = n * w * h
        recompute = (checkpoints + layer + 2 * w * h + w * scores
                     + (0 if accumulating else grads / tokens))
        per_token = max(checkpoints + head + logits, recompute)
        recomputed = recompute >= checkpoints + head + logits
    elif knobs.finetuning_type is FinetuningType.FREEZE:
        # Frozen layers before the trainable ones need no activations for any gradient.
        per_token = min(abs(knobs.freeze_trainable_layers), n) * layer + head + logits
    else:
        per_token = n * layer + first_layer_kept + head + logits
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
        "phase_peaks_mib": {"backward": round(backward / _MIB, 2),
                            "optimizer": round(optimizer / _MIB, 2)},
        "phase_gradients_mib": {"backward": round(
                                    (grads if accumulating or recomputed else 0) / _MIB, 2),
                                "optimizer": round(grads / _MIB, 2)},
        "total_params": total, "trainable_params": trainable,
    }
    return Prediction(peak_mib=peak / _MIB, method=Method.ANALYTIC, breakdown=breakdown)


def _dropout(config: Mapping[str, Any], *, attention: bool = False) -> bool:
    """Whether the config drops out anything in training (GPT-2's 0.1 by default), or, with
    `attention`, the attention probabilities."""
    keys = ("attn_pdrop", "attention_dropout") if attention else (
        "resid_pdrop", "embd_pdrop", "attn_pdrop", "hidden_dropout", "attention_dropout",
        "resid_dropout", "embed_dropout")
    if config.get("model_type") == "gpt2" and not any(k in config for k in keys):
        return True
    return any(isinstance(config.get(k), (int, float)) and config[k] > 0 for k in keys)


# --- the FakeTensor estimate (child process) -------------------------------------------------

Run = Callable[..., "subprocess.CompletedProcess[str]"]


def fake_many(spec: ModelSpec, configs: Sequence[Knobs], *, device: str = "cpu",  # noqa: PLR0913 - keyword-only edges
              python: str = sys.executable, workers: int | None = None,
              timeout_s: float = 900.0, scale: bool = True, run: Run = subprocess.run,
              progress: Callable[[int, int], None] | None = None,
              ) -> list[Prediction | EstimateError]:
    """FakeTensor estimates of many configs, in `workers` child processes (default: CPUs, max 4).

    `scale`: trace two shallow copies and extrapolate to the real depth (see the child).
    Raises EstimateError when the child cannot run at all (no torch there, a crash, a
    timeout); a config the child could not trace comes back as an EstimateError naming it.
    """
    if not configs:
        return []
    count = max(1, min(workers or min(os.cpu_count() or 1, 4), len(configs)))
    chunks = [list(range(len(configs)))[j::count] for j in range(count)]

    def one(indices: list[int]) -> dict[int, dict[str, Any]]:
        request = {"config": spec.config, "device": device, "scale": scale,
                   "requests": [_child_knobs(configs[k]) for k in indices]}
        results = _run_child(request, python=python, timeout_s=timeout_s, run=run,
                             on_result=None if progress is None else one_done)
        return {indices[r["index"]]: r for r in results}

    merged: dict[int, dict[str, Any]] = {}
    lock = threading.Lock()
    done = [0]

    def one_done() -> None:
        with lock:
            done[0] += 1
            if progress is not None:
                progress(done[0], len(configs))

    with ThreadPoolExecutor(max_workers=count) as pool:
        for part in pool.map(one, chunks):
            merged.update(part)
    return [prediction_of(merged[k], knobs) for k, knobs in enumerate(configs)]


def prediction_of(result: Mapping[str, Any], knobs: Knobs) -> Prediction | EstimateError:
    """One result line of the child (one-shot or warm) as a Prediction, or why it failed."""
    if "error" in result:
        return EstimateError(f"FakeTensor estimate of {_short(knobs)} failed: {result['error']}")
    breakdown = {**result["breakdown"], "peak_phase": result["peak_phase"],
                 "peak_op": result["peak_op"], "total_params": result["total_params"],
                 "trainable_params": result["trainable_params"],
                 "seconds": result["seconds"]}
    if "phase_peaks" in result:
        breakdown["phase_peaks_mib"] = {p: round(v / _MIB, 2)
                                        for p, v in result["phase_peaks"].items()}
        breakdown["phase_gradients_mib"] = {p: round(v / _MIB, 2) for p, v
                                            in result.get("phase_grads", {}).items()}
    if "traced_layers" in result:
        breakdown["traced_layers"] = result["traced_layers"]
    return Prediction(peak_mib=result["peak_bytes"] / _MIB, method=Method.FAKE,
                      breakdown=breakdown)


def child_knobs(knobs: Knobs) -> dict[str, Any]:
    """The knobs the child traces, as it reads them."""
    return _child_knobs(knobs)


def _child_knobs(knobs: Knobs) -> dict[str, Any]:
    data = knobs.to_dict()
    return {k: data[k] for k in _MEMORY_KNOBS}


def _run_child(request: Mapping[str, Any], *, python: str, timeout_s: float,
               run: Run, on_result: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    env = _child_env()
    argv = [python, "-m", "supervisor._estimate_child"]
    try:
        if run is subprocess.run and on_result is not None:
            returncode, stdout, stderr = _stream(argv, json.dumps(request), env=env,
                                                 timeout_s=timeout_s, on_result=on_result)
        else:
            proc = run(argv, input=json.dumps(request), capture_output=True, text=True,
                       env=env, timeout=timeout_s, check=False)
            returncode, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired:
        msg = f"the FakeTensor estimator took longer than {timeout_s:.0f} s"
        raise EstimateError(msg) from None
    except OSError as error:
        msg = f"cannot start {python} for the FakeTensor estimator: {error}"
        raise EstimateError(msg) from None
    results = [json.loads(line[len(RESULT_PREFIX):]) for line in stdout.splitlines()
               if line.startswith(RESULT_PREFIX)]
    if returncode != 0 or len(results) != len(request["requests"]):
        last = next((line for line in reversed(stderr.splitlines()) if line.strip()),
                    f"exit status {returncode}")
        msg = f"the FakeTensor estimator ({python}) failed: {last.strip()[:300]}"
        raise EstimateError(msg)
    return results


def _stream(argv: list[str], text: str, *, env: Mapping[str, str], timeout_s: float,
            on_result: Callable[[], None]) -> tuple[int, str, str]:
    """subprocess.run's answer, calling on_result as each result line arrives."""
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,  # noqa: S603 - our own child
                          stderr=subprocess.PIPE, text=True, env=dict(env)) as proc:
        stdin, stdout, stderr = proc.stdin, proc.stdout, proc.stderr
        if stdin is None or stdout is None or stderr is None:
            msg = "the FakeTensor estimator's pipes did not open"
            raise OSError(msg)
        errors: list[str] = []
        reader = threading.Thread(target=lambda: errors.append(stderr.read()), daemon=True)
        reader.start()
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            proc.kill()

        timer = threading.Timer(timeout_s, expire)
        timer.start()
        lines = []
        try:
            stdin.write(text)
            stdin.close()
            for line in stdout:
                lines.append(line)
                if line.startswith(RESULT_PREFIX):
                    on_result()
            returncode = proc.wait()
        except BaseException:
            proc.kill()  # a stop (SIGTERM before the run) must not wait for the whole trace
            raise
        finally:
            timer.cancel()
        reader.join()
    if expired.is_set():
        raise subprocess.TimeoutExpired(argv, timeout_s)
    return returncode, "".join(lines), "".join(errors)


def child_env() -> dict[str, str]:
    """The child's environment (one-shot or warm): this package first on its path, one
    thread per op, the hub offline, no simulated device."""
    return _child_env()


def _child_env() -> dict[str, str]:
    here = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    # The child must import this very package, whichever interpreter runs it.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.pop("OOM_SUPERVISOR_DEVICE_MIB", None)  # never estimate under a simulated device
    return env


# --- which interpreter runs the child --------------------------------------------------------

_PROBED: dict[tuple[str, float], str | None] = {}
"""probe_python's answers, per (interpreter, its mtime)."""

_PYTHON_NAME = re.compile(r"^python(\d+(\.\d+)?)?$")


_PROBE = ("import importlib.util as u, sys; "
          "sys.exit(0 if u.find_spec('torch') and u.find_spec('transformers') else 3)")
"""Finds torch and transformers without importing them (an import costs seconds)."""


def probe_python(python: str, *, run: Run = subprocess.run,
                 timeout_s: float = 60.0) -> str | None:
    """None when `python` has torch and transformers; else why not. Cached by path+mtime."""
    try:
        key = (python, Path(python).stat().st_mtime)
    except OSError as error:
        return f"{python}: {error.strerror or error}"
    if key in _PROBED:
        return _PROBED[key]
    try:
        proc = run([python, "-c", _PROBE], capture_output=True, text=True,
                   env=_child_env(), timeout=timeout_s, check=False)
        why = None if proc.returncode == 0 else f"{python}: " + (
            "no torch or no transformers" if proc.returncode == 3 else  # noqa: PLR2004 - _PROBE's
            next((line.strip() for line in reversed(proc.stderr.splitlines()) if line.strip()),
                 f"exit status {proc.returncode}")[:200])
    except subprocess.TimeoutExpired:
        why = f"{python}: looking for torch and transformers took over {timeout_s:.0f} s"
    except OSError as error:
        why = f"{python}: {error.strerror or error}"
    _PROBED[key] = why
    return why


def command_python(argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                   cwd: str | None = None) -> str | None:
    """The interpreter the command's program runs in: its `python` word, or a shebang's.

    `env VAR=x` prefixes are skipped; a console script (`llamafactory-cli`, `torchrun`,
    `accelerate`) is read for its `#!` line. None when there is no Python to be seen.
    """
    env = os.environ if env is None else env
    words = list(argv)
    while words and (PurePath(words[0]).name == "env" or "=" in words[0]):
        words.pop(0)
        while words and words[0].startswith("-"):
            words.pop(0)
    if not words:
        return None
    found = _which(words[0], env=env, cwd=cwd)
    if found is None:
        return None
    if _PYTHON_NAME.match(PurePath(found).name):
        return found
    try:
        with Path(found).open("rb") as handle:
            first = handle.readline(512).decode("utf-8", "replace").strip()
    except OSError:
        return None
    if not first.startswith("#!"):
        return None
    parts = first[2:].split()
    if parts and PurePath(parts[0]).name == "env":
        parts = [p for p in parts[1:] if not p.startswith("-")]
    if not parts or not _PYTHON_NAME.match(PurePath(parts[0]).name):
        return None
    return _which(parts[0], env=env, cwd=cwd)


def _which(word: str, *, env: Mapping[str, str], cwd: str | None) -> str | None:
    if os.sep in word:
        path = Path(word) if Path(word).is_absolute() or cwd is None else Path(cwd) / word
        return str(path) if path.is_file() else None
    return shutil.which(word, path=env.get("PATH"))


def pick_python(argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                cwd: str | None = None, run: Run = subprocess.run) -> tuple[str | None, str]:
    """(the interpreter for the FakeTensor child, in words why) — None: count analytically.

    The command's own interpreter first (it has the model's code and the versions that will
    train), then the supervisor's own; each must import torch and transformers.
    """
    own = command_python(argv, env=env, cwd=cwd)
    reasons = []
    for python, whose in ((own, "the command's interpreter"),
                          (sys.executable, "the supervisor's interpreter")):
        if python is None:
            reasons.append("the command names no Python interpreter")
            continue
        why = probe_python(python, run=run)
        if why is None:
            return python, f"traced in {whose} ({python})"
        reasons.append(why)
    return None, ("no interpreter with torch and transformers (" + "; ".join(reasons)
                  + "): counted analytically")


# --- what the trace does not see: quantisation and ZeRO --------------------------------------

QUANT_BYTES_PER_PARAM = {4: 0.5 + 1 / 64, 8: 1.0}
"""Bytes per quantised weight: 4-bit NF4 with double-quantised absmax (bitsandbytes, per 64
weights one int8 scale plus an fp32 per 256 scales), LLM.int8 (one byte, row scales aside)."""


def trace_knobs(knobs: Knobs) -> Knobs:
    """What is traced for `knobs`: unquantised, unsharded; a quantised model trains LoRA."""
    values = {name: getattr(knobs, name) for name in _MEMORY_KNOBS}
    values["grad_accum"] = min(knobs.grad_accum, 2)
    if knobs.quantization_bit is not None:
        values["finetuning_type"] = FinetuningType.LORA
    if values["finetuning_type"] is not FinetuningType.LORA:
        del values["lora_rank"]
        del values["lora_target"]
    else:
        values["lora_target"] = canonical_target(values["lora_target"])
    if values["finetuning_type"] is not FinetuningType.FREEZE:
        del values["freeze_trainable_layers"]
    return Knobs(**values)


def _half(precision: str) -> int:
    """Bytes per value of the compute dtype (autocast's, or the weights' own when pure)."""
    return _PRECISION_BYTES[precision_dtypes(precision)[2]]


def adjusted(spec: ModelSpec, knobs: Knobs, base: Prediction) -> Prediction:
    """`base` (the unquantised, unsharded trace of trace_knobs) made `knobs`' own, with its
    assumptions: quantised weights, ZeRO sharding over the world size, optimizer offload."""
    notes: list[str] = list(base.assumptions)
    if knobs.precision is None:
        notes.append("precision not given: assumed fp32")
    breakdown = dict(base.breakdown)
    phases = {k: float(v) for k, v in dict(breakdown.get("phase_peaks_mib") or {}).items()} \
        or {"peak": base.peak_mib}
    shape = spec.shape()
    w = _half(str(knobs.precision or "fp32").lower())
    if knobs.quantization_bit is not None:
        if knobs.finetuning_type is not FinetuningType.LORA:
            notes.append(f"{knobs.quantization_bit}-bit weights train LoRA adapters only (QLoRA): "
                         f"counted as LoRA r{knobs.lora_rank}")
        q = QUANT_BYTES_PER_PARAM.get(knobs.quantization_bit)
        if q is None or shape is None:
            notes.append(f"{knobs.quantization_bit}-bit quantisation not counted "
                         + ("(unknown width)" if q is None else "(the config's shape is unknown)"))
        else:
            linear = shape.layers * shape.layer_linear_parameters
            loaded = _PRECISION_BYTES[precision_dtypes(knobs.precision)[0]]  # as loaded
            saved = linear * (loaded - q) / _MIB
            # Each quantised matmul dequantises its weight into the compute dtype, one at a time.
            dequant = max(shape.hidden * shape.intermediate, shape.hidden ** 2) * w / _MIB
            # Over fp32 weights the unquantised trace held autocast's copy of each frozen
            # matrix for backward (every layer's, one with checkpointing); 4-bit ones keep none.
            copies = 0.0
            if loaded != w:
                layers = 1 if knobs.gradient_checkpointing else shape.layers
                copies = linear / shape.layers * layers * w / _MIB
            phases = {p: v - saved + (dequant - copies if p != "optimizer" else 0.0)
                      for p, v in phases.items()}
            breakdown["weights_mib"] = round(float(breakdown.get("weights_mib", 0)) - saved, 2)
            notes.append(f"{knobs.quantization_bit}-bit base weights at {q:.2f} B/param "
                         "(bitsandbytes); embeddings, head and LoRA adapters as counted")
    optimizer = knobs.optimizer or ""
    if "8bit" in optimizer:
        # bitsandbytes keeps each moment in one byte plus a float per 2048-value block.
        states = float(breakdown.get("optimizer_mib") or 0)
        trainable = float(breakdown.get("trainable_params") or 0)
        saved = max(states - trainable * 2 * (1 + 4 / 2048) / _MIB, 0.0)
        phases = {p: v - saved for p, v in phases.items()}
        breakdown["optimizer_mib"] = round(states - saved, 2)
        notes.append(f"{optimizer}: AdamW moments in 8 bits (bitsandbytes), 2 B/param; "
                     "paging to host under pressure not counted")
    elif optimizer and not optimizer.startswith(("adamw", "adam")):
        notes.append(f"optimizer {optimizer} counted as AdamW (two moments per parameter)")
    if knobs.deepspeed_stage is not None or knobs.deepspeed_offload:
        phases, note = _zero(knobs, breakdown, phases, shape, w)
        notes.append(note)
    peak_phase = max(phases, key=lambda p: phases[p])
    if "phase_peaks_mib" in breakdown:
        breakdown["phase_peaks_mib"] = {p: round(v, 2) for p, v in phases.items()}
        breakdown["peak_phase"] = peak_phase
    if phases[peak_phase] == base.peak_mib and not notes:
        return base
    return dataclasses.replace(base, peak_mib=phases[peak_phase], breakdown=breakdown,
                               assumptions=tuple(dict.fromkeys(notes)))


def _zero(knobs: Knobs, breakdown: Mapping[str, Any], phases: dict[str, float],
          shape: Shape | None, w: int) -> tuple[dict[str, float], str]:
    """ZeRO's saving per phase, counted from the unsharded trace's parts (MiB)."""
    stage = knobs.deepspeed_stage or 0
    ranks = max(knobs.world_size, 1)
    share = 1 - 1 / ranks
    trainable = float(breakdown.get("trainable_params") or 0)
    mixed = str(knobs.precision or "").endswith("-mixed")
    states = float(breakdown.get("optimizer_mib") or 0)
    grads = float(breakdown.get("gradients_mib") or 0)
    weights = float(breakdown.get("weights_mib") or 0)
    # Under mixed precision DeepSpeed keeps a half-precision working copy of the trainable
    # weights and moves their fp32 master copy into the (sharded) optimizer partition.
    master = trainable * _FP32 / _MIB if mixed else 0.0
    working = trainable * w / _MIB if mixed else 0.0
    optimizer = states + master
    saved_static = (optimizer if knobs.deepspeed_offload else share * optimizer
                    if stage >= 1 else 0.0) - working
    if stage >= 3:  # noqa: PLR2004 - ZeRO stage 3
        saved_static += share * (weights - master + working)
        if shape is not None:  # the layer being gathered (and the next, prefetched)
            saved_static -= 2 * shape.layer_parameters * w / _MIB
    # Gradients held at each phase's peak (all of them at the optimizer step; in backward
    # only those already produced, or the accumulated ones): DeepSpeed keeps them in the
    # model's half precision under mixed precision, and ZeRO-2 keeps 1/ranks of them.
    held = dict(breakdown.get("phase_gradients_mib") or {})
    kept = (w / _FP32 if mixed else 1.0) * (1 / ranks if stage >= 2 else 1.0)  # noqa: PLR2004 - ZeRO stage 2

    def saved_grads(phase: str) -> float:
        return (1 - kept) * float(held.get(phase, grads if phase == "optimizer" else 0))

    # Nor does DeepSpeed autocast: the model computes in its half-precision copy, so the
    # per-matrix casts the trace holds in forward and backward do not exist.
    out = {p: v - saved_static - saved_grads(p) - (working if p != "optimizer" else 0.0)
           for p, v in phases.items()}
    what = {1: "optimizer state", 2: "optimizer state and gradients",
            3: "optimizer state, gradients and parameters"}.get(stage, "nothing")
    note = (f"ZeRO-{stage} over {ranks} rank(s): {what} sharded 1/{ranks}"
            + ("; optimizer state offloaded to CPU" if knobs.deepspeed_offload else "")
            + " (counted on the unsharded trace)")
    if ranks == 1 and not knobs.deepspeed_offload:
        note = f"ZeRO-{stage} on 1 rank shards nothing"
    return out, note


# --- both, cached, with fallback -------------------------------------------------------------

_MEMORY_KNOBS = ("per_device_batch", "grad_accum", "cutoff_len", "gradient_checkpointing",
                 "finetuning_type", "lora_rank", "lora_target", "freeze_trainable_layers",
                 "precision")
"""The knobs the trace sees; quantisation, ZeRO and the world size are counted on top."""

_CACHE: dict[tuple[str, Knobs, str, str], Prediction] = {}
"""Traces made in this process, per (config, trace_knobs, device, method)."""


class Tracer(Protocol):
    """A warm tracing process (supervisor.tracer.WarmTracer)."""

    def trace(self, request: Mapping[str, Any], *, timeout_s: float = 900.0,
              on_result: Callable[[], None] | None = None) -> list[dict[str, Any]]:
        """The child's result of each config of `request`; EstimateError when it cannot."""
        ...


class TraceStore(Protocol):
    """Where traces outlive the process (the fit store's `traces` table, fits.FitStore)."""

    def trace(self, key: str) -> Mapping[str, Any] | None:
        """The prediction kept under `key`, or None."""

    def keep_trace(self, key: str, prediction: Mapping[str, object]) -> None:
        """Keep `prediction` under `key`."""


_NOT_SHAPE = frozenset({"_name_or_path", "transformers_version", "torch_dtype", "dtype",
                        "bos_token_id", "eos_token_id", "pad_token_id", "use_cache",
                        "auto_map", "quantization_config", "_commit_hash"})
"""config.json keys that say where a model came from or how it generates, not its shape
(the child drops the dtype and quantisation keys too: the knobs give the precision)."""


def trace_key(spec: ModelSpec, knobs: Knobs, *, device: str, tag: str,
              python: str | None = None) -> str:
    """A trace's key across runs: by model shape, not by command.

    The model's architecture and dimensions (its config without names, paths and token ids),
    the traced knobs (precision, method and rank or trainable layers, cutoff, micro-batch,
    checkpointing, up to two micro-batches), the device, the method and the estimator's own
    code (a change to it must not reuse traces made before). Not the interpreter, the paths
    or anything else of the command: the same model shape traced from another command or
    interpreter is the same trace. (`python` is accepted and ignored.)
    """
    del python
    shape = {k: v for k, v in spec.config.items() if k not in _NOT_SHAPE}
    blob = json.dumps({"v": 2, "config": shape, "knobs": knobs.to_dict(),
                       "device": device, "tag": tag, "code": _code_hash()},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


@functools.cache
def _code_hash() -> str:
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for name in ("estimate.py", "_estimate_child.py", "_sim.py"):
        with contextlib.suppress(OSError):
            digest.update((here / name).read_bytes())
    return digest.hexdigest()[:16]


def clear_cache() -> None:
    """Forget every estimate and interpreter probe made in this process (tests)."""
    _CACHE.clear()
    _PROBED.clear()


def estimate_many(spec: ModelSpec, configs: Sequence[Knobs], *, method: str = "auto",  # noqa: PLR0913 - keyword-only edges
                  device: str = "cpu", python: str | None = sys.executable,
                  workers: int | None = None, scale: bool = True,
                  run: Run = subprocess.run) -> list[Prediction]:
    """Predictions for many configs: FakeTensor where it can ("auto"), else analytic.

    `method` is "auto", "fake" (no fallback) or "analytic". Estimates are cached in this
    process. Raises EstimateError for the first config nothing could predict.
    """
    out = []
    for result in predict_all(spec, configs, method=method, device=device, python=python,
                              workers=workers, scale=scale, run=run):
        if isinstance(result, EstimateError):
            raise result
        out.append(result)
    return out


def predict_all(spec: ModelSpec, configs: Sequence[Knobs], *, method: str = "auto",  # noqa: PLR0913 - keyword-only edges
                device: str = "cpu", python: str | None = sys.executable,
                workers: int | None = None, scale: bool = True, run: Run = subprocess.run,
                progress: Callable[[int, int], None] | None = None,
                store: TraceStore | None = None,
                ) -> list[Prediction | EstimateError]:
    """As estimate_many, with each config's failure returned in its place instead of raised.

    `store`: traces kept by earlier runs are taken from it, new ones kept in it.

    `python` None: no interpreter has torch and transformers (pick_python), so "auto" counts
    analytically and "fake" fails.
    """
    if method not in {"auto", "fake", "analytic"}:
        msg = f"unknown estimate method {method!r}; valid: auto, fake, analytic"
        raise ValueError(msg)
    traced = [trace_knobs(k) for k in configs]
    wanted = "analytic" if method == "analytic" or (python is None and method == "auto") \
        else "fake"
    tag = f"fake{'-scaled' if scale else ''}" if wanted == "fake" else "analytic"
    failed: dict[Knobs, EstimateError] = {}
    if wanted == "fake":
        todo = [k for k in dict.fromkeys(traced)
                if (spec.config_json, k, device, tag) not in _CACHE and k.cutoff_len is not None]
        if store is not None:
            todo = _from_store(store, spec, todo, device=device, tag=tag, python=python)
        try:
            if python is None:
                msg = "no interpreter with torch and transformers for the FakeTensor estimator"
                raise EstimateError(msg)  # noqa: TRY301 - the same path as a failed child
            results = fake_many(spec, todo, device=device, python=python, workers=workers,
                                scale=scale, run=run, progress=progress)
        except EstimateError as error:
            results = [error] * len(todo)
        for k, result in zip(todo, results, strict=True):
            if isinstance(result, EstimateError):
                failed[k] = result
            else:
                _CACHE[(spec.config_json, k, device, tag)] = result
                if store is not None:
                    with contextlib.suppress(Exception):  # a cache: never fails a prediction
                        store.keep_trace(trace_key(spec, k, device=device, tag=tag,
                                                   python=python), result.to_dict())
    out: list[Prediction | EstimateError] = []
    for knobs, k in zip(configs, traced, strict=True):
        base = _CACHE.get((spec.config_json, k, device, tag))
        if base is None:
            if method == "fake" and k in failed:
                out.append(failed[k])
                continue
            try:
                base = analytic(spec, k, device=device)
            except EstimateError as error:
                out.append(error)
                continue
            if k in failed:
                base = dataclasses.replace(base, note=f"{failed[k]}; analytic estimate instead")
            elif python is None and method == "auto":
                base = dataclasses.replace(base, note="no interpreter with torch and "
                                           "transformers: analytic estimate")
        out.append(adjusted(spec, knobs, base))
    return out


def _from_store(store: TraceStore, spec: ModelSpec, todo: Sequence[Knobs], *, device: str,  # noqa: PLR0913 - keyword-only
                tag: str, python: str | None) -> list[Knobs]:
    """Fill the process cache from traces kept by earlier runs; what is still to trace."""
    left = []
    for k in todo:
        kept = None
        with contextlib.suppress(Exception):  # a damaged or foreign row: trace again
            row = store.trace(trace_key(spec, k, device=device, tag=tag, python=python))
            kept = Prediction.from_dict(row) if row is not None else None
        if kept is None:
            left.append(k)
        else:
            _CACHE[(spec.config_json, k, device, tag)] = kept
    return left


def estimate(spec: ModelSpec, knobs: Knobs, *, method: str = "auto", device: str = "cpu",
             python: str | None = sys.executable) -> Prediction:
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
    python: str | None = sys.executable
    """The FakeTensor child's interpreter (pick_python); None: count analytically."""
    scale: bool = True
    """Trace two shallow copies of a deep model and extrapolate (False: the whole model)."""
    progress: Callable[[int, int], None] | None = None
    """Called with (done, total) as predictions of a batch come in (plan's progress line)."""
    run: Run = subprocess.run
    ratio: float = 1.0
    """measured / predicted, from the latest calibration."""
    errors: list[str] = field(default_factory=list)
    """Why predictions failed (for the journal)."""
    store: TraceStore | None = None
    """Traces kept across runs (the fit store); None: this process's only."""
    ranked: bool = False
    """The analytic count ranks, traces confirm: `predict` answers with a trace already made
    (this run's, or kept in the store) and else with the analytic count, and only `confirm`
    traces (plan.next_runnable asks it for the config the walk would take and its neighbour
    across the device line). False: `predict` traces every config it is asked about."""
    tracer: Tracer | None = None
    """The run's warm tracing process (supervisor.tracer); None: one child per `confirm`."""
    notice: Callable[[str], None] | None = None
    """Told once, in words, when this model cannot be traced and is counted instead."""
    untraceable: str | None = None
    """Why this model is not traced at all in this run (said once through `notice`)."""
    traced_s: float = 0.0
    """Seconds spent tracing in `confirm`."""
    traced: int = 0
    """Configs traced by `confirm` (made, not taken from the store)."""
    _failed: dict[Knobs, str] = field(default_factory=dict, init=False, repr=False)
    _looked: set[Knobs] = field(default_factory=set, init=False, repr=False)

    def predict(self, knobs: Knobs) -> Prediction | None:
        """The calibrated prediction for `knobs`, or None when none can be made."""
        return self.predict_many([knobs])[0]

    def predict_many(self, configs: Sequence[Knobs]) -> list[Prediction | None]:
        """Calibrated predictions for many configs (one child process run for all)."""
        if self.ranked:
            return [self._ranked(knobs) for knobs in configs]
        out: list[Prediction | None] = []
        for result in predict_all(self.spec, configs, method=self.method, device=self.device,
                                  python=self.python, scale=self.scale, run=self.run,
                                  progress=self.progress, store=self.store):
            if isinstance(result, EstimateError):
                self.errors.append(str(result))
                out.append(None)
            else:
                out.append(calibrated(result, self.ratio))
        return out

    @property
    def _tag(self) -> str:
        return "analytic" if self.method == "analytic" else \
            f"fake{'-scaled' if self.scale else ''}"

    def _ranked(self, knobs: Knobs) -> Prediction | None:
        """A trace already made for `knobs`, else its analytic count (None: neither)."""
        k = trace_knobs(knobs)
        base = self._kept(k)
        if base is None:
            try:
                base = analytic(self.spec, k, device=self.device)
            except EstimateError as error:
                self.errors.append(str(error))
                return None
            why = self._failed.get(k) or self.untraceable
            if why is not None:
                base = dataclasses.replace(base, note=f"{why}; analytic estimate instead")
        return calibrated(adjusted(self.spec, knobs, base), self.ratio)

    def _kept(self, k: Knobs) -> Prediction | None:
        """This run's trace of the traced knobs `k`, or one an earlier run kept in the store
        (a failure kept there is remembered as failed: never traced again)."""
        if self.method == "analytic":
            return None
        cached = _CACHE.get((self.spec.config_json, k, self.device, self._tag))
        if cached is not None or k in self._failed or k in self._looked \
                or self.store is None:
            return cached
        self._looked.add(k)
        row: Mapping[str, Any] | None = None
        with contextlib.suppress(Exception):  # a damaged or foreign row: as if not kept
            row = self.store.trace(trace_key(self.spec, k, device=self.device, tag=self._tag))
        if row is None:
            return None
        if "failed" in row:
            self._failed[k] = str(row["failed"])
            return None
        try:
            kept = Prediction.from_dict(row)
        except (KeyError, TypeError, ValueError):
            return None
        _CACHE[(self.spec.config_json, k, self.device, self._tag)] = kept
        return kept

    def confirm(self, configs: Sequence[Knobs]) -> None:
        """Trace those of `configs` that have no trace yet, in the warm tracer (or one child).

        Each trace is kept (in this process and the store); a config the tracer cannot trace
        is kept as failed, never traced again, and counted analytically. When the first
        traces of a run all fail, or the tracer cannot run at all, the model is counted
        analytically from then on, said once through `notice`.
        """
        if not self.ranked or self.method == "analytic" or self.untraceable is not None:
            return
        todo = [k for k in dict.fromkeys(trace_knobs(c) for c in configs)
                if k.cutoff_len is not None and self._kept(k) is None
                and k not in self._failed]  # _kept learns of failures kept by earlier runs
        if not todo:
            return
        if self.python is None:
            self._give_up("no interpreter with torch and transformers for the FakeTensor "
                          "estimator")
            return
        started = time.monotonic()
        try:
            results = self._trace(todo)
        except EstimateError as error:  # the tracer itself: not these configs' fault
            self.traced_s += time.monotonic() - started
            self._give_up(str(error))
            return
        self.traced_s += time.monotonic() - started
        made = 0
        for k, result in zip(todo, results, strict=True):
            key = trace_key(self.spec, k, device=self.device, tag=self._tag)
            if isinstance(result, EstimateError):
                self._failed[k] = str(result)
                self.errors.append(str(result))
                kept: dict[str, object] = {"failed": str(result)}
            else:
                made += 1
                _CACHE[(self.spec.config_json, k, self.device, self._tag)] = result
                kept = result.to_dict()
            if self.store is not None:
                with contextlib.suppress(Exception):  # a cache: never fails a prediction
                    self.store.keep_trace(key, kept)
        self.traced += made
        if not made and self.traced == 0:
            first = next(str(r) for r in results if isinstance(r, EstimateError))
            self._give_up(first)

    def _trace(self, todo: Sequence[Knobs]) -> list[Prediction | EstimateError]:
        if self.tracer is None:
            return fake_many(self.spec, todo, device=self.device,
                             python=self.python or sys.executable, workers=1,
                             scale=self.scale, run=self.run, progress=self.progress)
        done = [0]

        def one_done() -> None:
            done[0] += 1
            if self.progress is not None:
                self.progress(done[0], len(todo))

        request = {"config": self.spec.config, "device": self.device, "scale": self.scale,
                   "requests": [child_knobs(k) for k in todo]}
        results = {int(r["index"]): r for r in self.tracer.trace(request, on_result=one_done)}
        return [prediction_of(results[i], k) for i, k in enumerate(todo)]

    def _give_up(self, why: str) -> None:
        self.untraceable = why
        self.errors.append(why)
        if self.notice is not None:
            self.notice(f"the memory predictions of this model are counted from its shape, "
                        f"not traced: {why}")

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
