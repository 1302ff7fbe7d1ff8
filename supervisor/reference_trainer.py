"""A real Hugging Face Trainer (+ PEFT LoRA) on a tiny causal LM built from a config.

Run as ``python -m supervisor.reference_trainer [LLaMA-Factory / HF flags]``. Nothing is
downloaded: the model is built from a named size or a local ``config.json`` and trained on
synthetic tokens, each sample exactly ``--cutoff_len`` long, so memory use is deterministic.
Under ``--device-memory`` or ``--host-memory-cap`` a too-large config fails with a real
allocator error that propagates uncaught (traceback, exit 1), as real training scripts do.
The last stdout line of a finished run is ``reference-trainer.result {json}``.
"""

# Flags are parsed before torch is imported (OMP_NUM_THREADS must be set first), so the heavy
# imports live inside functions; the result line is this script's output, hence print.
# ruff: noqa: PLC0415, T201

from __future__ import annotations

import argparse
import atexit
import dataclasses
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from supervisor import _families
from supervisor.models import MODEL_TYPES, NAMED_CONFIGS, named_config

if TYPE_CHECKING:
    from collections.abc import MutableMapping, Sequence

    import torch
    from transformers import PretrainedConfig, PreTrainedModel, TrainingArguments

    from supervisor._sim import PeakMemory

RESULT_PREFIX = "reference-trainer.result"
FAULTS_ENV = "REFERENCE_TRAINER_FAULTS"
"""A night's accidents, for tests and benchmarks/night.py: `longer@K` (from optimizer step K
on, every sample is cutoff_len long instead of half of it: the data gets longer, a real
allocator failure under a memory budget), `hang@K` (after step K, silent for good),
`transient@K` (after step K, torchelastic's RendezvousConnectionError), `frozen@K` (after step
K the loop is stuck while a display thread redraws the same progress frame twice a second),
`pause@K` (after step K, silent and idle for PAUSE_S_ENV seconds, at every attempt: a slow
phase with no sign of work), `full@K` (after step K, no file this process writes may grow past
1 MiB: RLIMIT_FSIZE, the kernel's EFBIG, as a full disk would fail a checkpoint's save),
`stuck@0` (after its result line the process never exits, at every attempt: a teardown that
hangs, as a process group's destructor can). Each
`hang`/`transient`/`frozen`/`full` fires once per output folder (remembered in
`<output_dir>/.reference-trainer-faults`), so a retry goes past it, as after a real accident."""
STEP_S_ENV = "REFERENCE_TRAINER_STEP_S"
"""Seconds each optimizer step takes at least: a time-scaled night of real steps."""
NO_BAR_ENV = "REFERENCE_TRAINER_NO_BAR"
"""`1`: no progress bar (TrainingArguments.disable_tqdm): the Trainer prints only its log
dicts, as a trainer without a bar does; what the supervisor then knows of the steps."""
EVAL_S_ENV = "REFERENCE_TRAINER_EVAL_S"
"""Seconds of real CPU work (matrix products) each evaluation takes at least (--eval_steps)."""
PAUSE_S_ENV = "REFERENCE_TRAINER_PAUSE_S"
"""How long `pause@K` lasts (seconds; 60 by default)."""

_FULL_BYTES = 2**20
"""`full@K`: the largest file the process may write from step K on."""
_TRUE = frozenset({"true", "1", "yes", "y", "on"})
_FALSE = frozenset({"false", "0", "no", "n", "off"})


def _parse_bool(text: str) -> bool:
    """Parse a command-line boolean the way HfArgumentParser does, case-insensitively."""
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    msg = f"expected true/false/1/0/yes/no, got {text!r}"
    raise argparse.ArgumentTypeError(msg)


def _positive_int(text: str) -> int:
    """Parse an integer >= 1."""
    value = _int(text)
    if value < 1:
        msg = f"expected an integer >= 1, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _non_negative_int(text: str) -> int:
    """Parse an integer >= 0."""
    value = _int(text)
    if value < 0:
        msg = f"expected an integer >= 0, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _int(text: str) -> int:
    """Parse an integer, naming the bad text on failure."""
    try:
        return int(text)
    except ValueError:
        msg = f"expected an integer, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None


def _positive_float(text: str) -> float:
    """Parse a float > 0."""
    try:
        value = float(text)
    except ValueError:
        msg = f"expected a number, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if not value > 0:
        msg = f"expected a number > 0, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _spellings(name: str) -> list[str]:
    """Return a flag with underscores and, where it differs, with dashes."""
    flags = [f"--{name}", f"--{name.replace('_', '-')}", f"--{name.replace('-', '_')}"]
    return list(dict.fromkeys(flags))


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser; flags follow LLaMA-Factory / HF TrainingArguments names."""
    parser = argparse.ArgumentParser(
        prog="python -m supervisor.reference_trainer",
        usage="python -m supervisor.reference_trainer [--flag value ...] (see --help)",
        description=__doc__.splitlines()[0] if __doc__ else None,
        allow_abbrev=False,  # a prefix such as --lora must not silently mean --lora_rank
    )

    def add(name: str, **kwargs: Any) -> None:  # noqa: ANN401 - forwarded to argparse as is
        parser.add_argument(*_spellings(name), dest=name.replace("-", "_"), **kwargs)

    def add_bool(name: str, help_text: str) -> None:
        add(
            name,
            type=_parse_bool,
            nargs="?",
            const=True,
            default=False,
            metavar="BOOL",
            help=f"{help_text} (bare flag: true)",
        )

    add(
        "model_name_or_path",
        default="tiny",
        help="'tiny' (Llama, ~5.3M params), 'small' (Llama, ~30M), 'tiny-qwen2' (Qwen2 with "
        "grouped-query attention, ~6.8M) or a local directory with any causal LM's config.json",
    )
    add("finetuning_type", choices=["full", "lora", "freeze"], default="full")
    add("lora_rank", type=_positive_int, default=8, help="LoRA rank; alpha is twice the rank")
    add("lora_target", default="all",
        help="comma-separated module names LoRA adapts, or 'all' (LLaMA-Factory's default): "
        "every linear layer but the output head, as peft's all-linear finds them")
    add(
        "freeze_trainable_layers",
        type=_int,
        default=2,
        help="N>0 trains the last N decoder layers, N<0 the first |N|",
    )
    add("per_device_train_batch_size", type=_positive_int, default=8)
    add("gradient_accumulation_steps", type=_positive_int, default=1)
    add("cutoff_len", type=_positive_int, default=512, help="tokens in every synthetic sample")
    add(
        "sample_len",
        type=_positive_int,
        default=None,
        help="tokens in every synthetic row before the cutoff (default: cutoff_len); rows "
        "longer than cutoff_len are DROPPED, as axolotl does (excess_length_strategy: drop)",
    )
    add_bool("gradient_checkpointing", "recompute decoder-layer activations in backward")
    add("max_steps", type=_positive_int, default=4)
    add("optim", default="adamw_torch",
        help="TrainingArguments.optim; the 8-bit and paged ones need bitsandbytes")
    add("output_dir", default="./reference-trainer-output")
    add(
        "save_steps",
        type=_non_negative_int,
        default=0,
        help="save checkpoint-N every N steps; 0 saves none",
    )
    add(
        "resume_from_checkpoint",
        default=None,
        help="a checkpoint directory, or true/latest for the newest checkpoint-N in output_dir",
    )
    add("learning_rate", type=_positive_float, default=1e-4)
    add("seed", type=_non_negative_int, default=0)
    add("logging_steps", type=_positive_int, default=1)
    add("eval_steps", type=_non_negative_int, default=0,
        help="evaluate every N steps on a few synthetic samples; 0 never evaluates")
    add_bool("disable_tqdm", "no progress bar (the Trainer then prints only its log lines)")
    add_bool("bf16", "bf16 mixed precision: autocast over the weights as loaded (fp32)")
    add_bool("load_in_bf16", "load the model in bf16 and upcast only its trainable parameters "
             "to fp32, autocast in bf16 (LLaMA-Factory's `bf16: true`; implies --bf16)")
    add_bool("fp16", "fp16 mixed precision (GPU only; ignored on CPU)")
    add_bool("enable_jit_checkpoint", "transformers' just-in-time checkpointing: on SIGTERM, "
             "save at the next step boundary and stop")
    add(
        "host-memory-cap",
        type=_positive_int,
        default=None,
        metavar="MIB",
        help="cap further address-space growth (RLIMIT_AS) right before training; "
        "sets OMP_NUM_THREADS=1 unless already set",
    )
    add(
        "device-memory",
        type=_positive_int,
        default=None,
        metavar="MIB",
        help="device memory budget: a live-bytes budget on CPU, a memory fraction on CUDA",
    )
    add(
        "memory_cap_rank",
        type=_non_negative_int,
        default=None,
        metavar="RANK",
        help="apply the memory caps on this rank only (env RANK under torchrun): one rank "
        "running out of memory while its peers wait, as in a real multi-GPU job",
    )
    return parser


def _read_model_config(parser: argparse.ArgumentParser, spec: str) -> dict[str, Any]:
    """Return the model's config dict for a named size or a local directory, or exit 2."""
    named = named_config(spec)  # a local folder of the same name wins
    if named is not None:
        return named
    directory = Path(spec)
    if not directory.is_dir():
        parser.error(
            f"--model_name_or_path {spec!r} is neither a named size ({', '.join(NAMED_CONFIGS)}) "
            "nor an existing directory; this trainer never downloads models"
        )
    config_path = directory / "config.json"
    try:
        loaded = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        parser.error(f"cannot read a model config from {config_path}: {error}")
    if not isinstance(loaded, dict):
        parser.error(f"{config_path} holds {type(loaded).__name__}, expected a JSON object")
    model_type = loaded.get("model_type", "llama")
    if not isinstance(model_type, str) or not model_type:
        parser.error(f"{config_path} has no model_type string (tested: {', '.join(MODEL_TYPES)})")
    # Any causal LM transformers builds from a config (AutoModelForCausalLM) trains here; the
    # suites measure MODEL_TYPES. An unknown type fails in _build_config.
    return loaded


def _build_config(parser: argparse.ArgumentParser, values: dict[str, Any]) -> PretrainedConfig:
    """Build the model type's config, turning invalid values into a usage error."""
    from transformers import AutoConfig

    model_type = values.get("model_type", "llama")
    try:
        config = AutoConfig.for_model(
            model_type, **{k: v for k, v in values.items() if k != "model_type"})
    except Exception as error:  # noqa: BLE001 - huggingface_hub validators raise their own types
        parser.error(f"invalid {model_type} config: {' '.join(str(error).split())}")
    config.use_cache = False  # training never reuses a KV cache; checkpointing would say so
    return config


def _resolve_checkpoint(
    parser: argparse.ArgumentParser, value: str | None, output_dir: str
) -> str | None:
    """Return the checkpoint directory to resume from (None: start fresh), or exit 2."""
    if value is None or value.strip().lower() in _FALSE:
        return None
    from transformers.trainer_utils import get_last_checkpoint

    if value.strip().lower() in _TRUE | {"latest"}:
        last: str | None = None
        if Path(output_dir).is_dir():
            last = get_last_checkpoint(output_dir)  # type: ignore[no-untyped-call]
        if last is None:
            parser.error(
                f"--resume_from_checkpoint {value}: no checkpoint-N directory in {output_dir}; "
                "train with --save_steps N first or start without resuming"
            )
        return last
    if not (Path(value) / "trainer_state.json").is_file():
        parser.error(
            f"--resume_from_checkpoint {value}: not a checkpoint directory (no trainer_state.json)"
        )
    return value


def _resumed_step(checkpoint: str | None) -> int:
    """Return the global step recorded in a checkpoint, 0 when not resuming."""
    if checkpoint is None:
        return 0
    try:
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
        return int(state.get("global_step", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        # A torn state: the Trainer's own load says so in its own words, a moment later.
        return 0


def _apply_finetuning_type(
    parser: argparse.ArgumentParser, model: PreTrainedModel, args: argparse.Namespace
) -> torch.nn.Module:
    """Make only the parameters the finetuning type trains require grad; wrap LoRA in PEFT."""
    # The same rules as the estimator's child (supervisor._families), for every family.
    if args.finetuning_type == "lora":
        return _families.apply_lora(model, rank=args.lora_rank, target=args.lora_target)
    if args.finetuning_type == "freeze":
        try:
            _, blocks = _families.decoder_blocks(model)
        except ValueError as error:
            parser.error(str(error))
        n = args.freeze_trainable_layers
        if n == 0 or abs(n) > len(blocks):
            parser.error(
                f"--freeze_trainable_layers {n}: expected a non-zero value within "
                f"±{len(blocks)}, the model's number of decoder layers"
            )
        # LLaMA-Factory: N>0 trains the last N decoder layers, N<0 the first |N|.
        _families.freeze(model, n)
    return model


class _SyntheticTokens:
    """A map-style dataset of random token ids, each sample exactly cutoff_len long (half of it
    while `short`: see FAULTS_ENV's `longer@K`)."""

    def __init__(self, *, size: int, cutoff_len: int, vocab_size: int, seed: int,
                 short: bool = False) -> None:
        self._size = size
        self._cutoff_len = cutoff_len
        self._vocab_size = vocab_size
        self._seed = seed
        self.short = short

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        import torch

        generator = torch.Generator().manual_seed(self._seed * 1_000_003 + index)
        # Ids start at 3: 0-2 are pad/bos/eos in the config.
        length = max(1, self._cutoff_len // 2) if self.short else self._cutoff_len
        ids = torch.randint(3, self._vocab_size, (length,), generator=generator)
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class _Result:
    """What one run reports on its last stdout line."""

    steps: int
    tokens_per_s: float
    peak_live_bytes: int
    peak_live_mib: float
    max_rss_mib: float
    device: str
    finetuning_type: str
    trainable_params: int
    total_params: int
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    cutoff_len: int
    gradient_checkpointing: bool
    resumed_from_step: int


def _training_arguments(args: argparse.Namespace, *, cuda: bool) -> TrainingArguments:
    """Build TrainingArguments; checkpointing is enabled on the model itself, not here."""
    from transformers import TrainingArguments

    bf16 = bool(args.bf16 or args.load_in_bf16)
    fp16 = bool(args.fp16) and cuda
    # Only when asked: transformers before 5 has no such argument.
    jit: dict[str, Any] = {"enable_jit_checkpoint": True} if args.enable_jit_checkpoint else {}
    if args.fp16 and not cuda:
        print("reference-trainer: --fp16 needs a GPU; training in fp32 on CPU", file=sys.stderr)
    return TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        seed=args.seed,
        logging_steps=args.logging_steps,
        save_strategy="steps" if args.save_steps > 0 else "no",
        save_steps=max(args.save_steps, 1),  # unused when save_strategy is "no"
        eval_strategy="steps" if args.eval_steps > 0 else "no",
        eval_steps=max(args.eval_steps, 1),  # unused when eval_strategy is "no"
        per_device_eval_batch_size=1,
        disable_tqdm=bool(args.disable_tqdm) or os.environ.get(NO_BAR_ENV) == "1",
        bf16=bf16,
        fp16=fp16,
        optim=args.optim,
        report_to=[],
        use_cpu=not cuda,
        dataloader_num_workers=0,
        # An OOM must reach the supervisor: never let the Trainer shrink the batch itself.
        auto_find_batch_size=False,
        **jit,
    )


def _enable_checkpointing(model: PreTrainedModel) -> None:
    """Turn on non-reentrant activation checkpointing under either transformers spelling."""
    kwargs = {"use_reentrant": False}
    # transformers 5 renamed gradient_checkpointing_enable (now a FutureWarning alias); both
    # also make the embeddings' output require grad, which PEFT and freeze need.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(  # type: ignore[no-untyped-call]
            gradient_checkpointing_kwargs=kwargs
        )


def _faults(text: str) -> dict[str, int]:
    """`hang@110,transient@150,longer@71` -> {"hang": 110, ...}; bad items are ignored."""
    faults: dict[str, int] = {}
    for item in text.split(","):
        kind, _, step = item.strip().partition("@")
        if (kind in ("hang", "transient", "longer", "frozen", "pause", "full", "stuck")
                and step.isdigit()):
            faults[kind] = int(step)
    return faults


def _night_callback(dataset: _SyntheticTokens, output_dir: str) -> Any:  # noqa: ANN401
    """The accidents of FAULTS_ENV and the step time of STEP_S_ENV, as a TrainerCallback."""
    from transformers import TrainerCallback

    faults = _faults(os.environ.get(FAULTS_ENV, ""))
    step_s = float(os.environ.get(STEP_S_ENV, "0") or 0)
    eval_s = float(os.environ.get(EVAL_S_ENV, "0") or 0)
    pause_s = float(os.environ.get(PAUSE_S_ENV, "60") or 60)
    fired_file = Path(output_dir) / ".reference-trainer-faults"

    def fire_once(kind: str) -> bool:
        fired = fired_file.read_text(encoding="utf-8").split() if fired_file.is_file() else []
        if kind in fired:
            return False
        fired_file.parent.mkdir(parents=True, exist_ok=True)
        with fired_file.open("a", encoding="utf-8") as handle:
            handle.write(kind + "\n")
        return True

    class Night(TrainerCallback):
        def __init__(self) -> None:
            self.began = time.monotonic()
            self.evaluating = False

        def on_step_begin(self, *_: Any, **__: Any) -> None:  # noqa: ANN401 - HF's signature
            self.began = time.monotonic()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:  # noqa: ANN401, ARG002
            spent = time.monotonic() - self.began
            if step_s > spent:
                time.sleep(step_s - spent)
            step = state.global_step
            if "longer" in faults:
                dataset.short = step < faults["longer"]
            if faults.get("hang") == step and fire_once("hang"):
                time.sleep(10**7)  # silent for good: the supervisor's watchdog must see it
            if faults.get("pause") == step:
                time.sleep(pause_s)  # a slow phase with no sign of work, at every attempt
            if faults.get("frozen") == step and fire_once("frozen"):
                _redraw_forever(step, state.max_steps)
            if faults.get("full") == step and fire_once("full"):
                # Python ignores SIGXFSZ: a write past the limit fails with OSError (EFBIG).
                hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
                soft = _FULL_BYTES if hard == resource.RLIM_INFINITY else min(_FULL_BYTES, hard)
                resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            if faults.get("transient") == step and fire_once("transient"):
                from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError

                msg = "The connection to the C10d store has failed. See inner exception."
                raise RendezvousConnectionError(msg)

        def on_prediction_step(self, *_: Any, **__: Any) -> None:  # noqa: ANN401 - HF's signature
            # All of it in the first batch: the evaluation's bar (if any) says 1/N, then nothing.
            if eval_s and not self.evaluating:
                self.evaluating = True
                _burn(eval_s)

        def on_evaluate(self, *_: Any, **__: Any) -> None:  # noqa: ANN401 - HF's signature
            self.evaluating = False

    return Night() if faults or step_s or eval_s else None


_EVAL_SAMPLES = 4


def _burn(seconds: float) -> None:
    """Real CPU work for `seconds`: what a long evaluation of a large model does to a core."""
    import torch

    end = time.monotonic() + seconds
    product = torch.full((64, 64), 0.01)
    while time.monotonic() < end:
        product = torch.tanh(product @ product + 0.01)


def _redraw_forever(step: int, total: int) -> None:
    """The loop is stuck; a display thread keeps redrawing the same frame (a frozen bar)."""
    import threading

    share = 100 * step // max(1, total)
    frame = (f"\r{share:3d}%|{'#' * (share // 10):<10}| {step}/{total} "
             f"[00:{step:02d}<00:30,  1.00it/s]")

    def redraw() -> None:
        while True:
            sys.stderr.write(frame)
            sys.stderr.flush()
            time.sleep(0.5)

    threading.Thread(target=redraw, daemon=True).start()
    time.sleep(10**7)


def _count_params(model: torch.nn.Module) -> tuple[int, int]:
    """Return (trainable, total) parameter counts."""
    total = trainable = 0
    for parameter in model.parameters():
        total += parameter.numel()
        if parameter.requires_grad:
            trainable += parameter.numel()
    return trainable, total


def _ranks_from_slurm(env: MutableMapping[str, str]) -> None:
    """Under `srun` (no torchrun): take rank, world size and rendezvous from SLURM's task env.

    As Lightning's SLURMEnvironment does: the port is derived from the job and step ids, so
    every step (every attempt) gets its own and all its tasks agree on it.
    """
    if "RANK" in env or "SLURM_PROCID" not in env or "SLURM_STEP_ID" not in env:
        return
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1"))
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")  # one-host steps; multi-node sets MASTER_ADDR
    job, step = env.get("SLURM_JOB_ID", "0"), env["SLURM_STEP_ID"]
    if job.isdigit() and step.isdigit():
        env.setdefault("MASTER_PORT", str(20000 + (int(job) * 64 + int(step)) % 20000))


def main(argv: Sequence[str] | None = None) -> int:
    """Train as the flags say and print the result line; usage errors exit 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _ranks_from_slurm(os.environ)
    if args.host_memory_cap is not None:
        # Each OpenMP worker reserves its own stack and malloc arena: address space that would
        # make an RLIMIT_AS cap depend on the core count. Must be set before torch is imported.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    config_values = _read_model_config(parser, args.model_name_or_path)

    import torch
    from transformers import AutoModelForCausalLM, Trainer, default_data_collator

    from supervisor._sim import install_device_budget, set_host_memory_cap

    config = _build_config(parser, config_values)
    checkpoint = _resolve_checkpoint(parser, args.resume_from_checkpoint, args.output_dir)
    cuda = torch.cuda.is_available()
    rank = int(os.environ.get("RANK", "0"))
    capped = args.memory_cap_rank is None or rank == args.memory_cap_rank
    # Entered before the model exists, so weights, gradients and optimizer state all count.
    peak: PeakMemory = install_device_budget(args.device_memory if capped else None)

    torch.manual_seed(args.seed)
    # --load_in_bf16: the weights are made in bf16 from the start, as from_pretrained with
    # torch_dtype=bfloat16 loads them (no fp32 copy ever exists).
    dtype = torch.bfloat16 if args.load_in_bf16 else torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)  # type: ignore[no-untyped-call]
    if args.gradient_checkpointing:
        _enable_checkpointing(model)
    trainable_model = _apply_finetuning_type(parser, model, args)
    if args.load_in_bf16:
        # LLaMA-Factory's cast_trainable_params_to_fp32 (model/adapter.py): what trains is
        # fp32, with its gradients and AdamW state; the frozen base stays bf16.
        for parameter in trainable_model.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.to(torch.float32)
    trainable_params, total_params = _count_params(trainable_model)

    samples = args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps
    # Rows longer than the cutoff are dropped, not cut (axolotl's drop_long_seq): a cutoff
    # under --sample_len leaves the Trainer no rows, and it fails as axolotl then does.
    kept = samples if (args.sample_len or args.cutoff_len) <= args.cutoff_len else 0
    longer_at = _faults(os.environ.get(FAULTS_ENV, "")).get("longer")
    dataset = _SyntheticTokens(
        size=kept, cutoff_len=args.cutoff_len, vocab_size=config.vocab_size, seed=args.seed,
        short=longer_at is not None and _resumed_step(checkpoint) < longer_at,
    )
    night = _night_callback(dataset, args.output_dir)
    evaluation = _SyntheticTokens(size=_EVAL_SAMPLES, cutoff_len=args.cutoff_len,
                                  vocab_size=config.vocab_size, seed=args.seed + 1)
    trainer = Trainer(
        model=trainable_model,
        args=_training_arguments(args, cuda=cuda),
        train_dataset=dataset,
        eval_dataset=evaluation if args.eval_steps > 0 else None,
        data_collator=default_data_collator,
        callbacks=[night] if night is not None else None,
    )

    if args.host_memory_cap is not None and capped:
        set_host_memory_cap(args.host_memory_cap)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=checkpoint)
    elapsed_s = time.perf_counter() - started

    resumed = _resumed_step(checkpoint)
    steps = trainer.state.global_step
    tokens_per_step = (
        args.per_device_train_batch_size * args.gradient_accumulation_steps * args.cutoff_len
    )
    tokens = (steps - resumed) * tokens_per_step
    result = _Result(
        steps=steps,
        tokens_per_s=round(tokens / elapsed_s, 1) if elapsed_s > 0 else 0.0,
        peak_live_bytes=peak.peak_bytes,
        peak_live_mib=round(peak.peak_bytes / 2**20, 2),
        max_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        device="cuda" if cuda else "cpu",
        finetuning_type=args.finetuning_type,
        trainable_params=trainable_params,
        total_params=total_params,
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        cutoff_len=args.cutoff_len,
        gradient_checkpointing=bool(args.gradient_checkpointing),
        resumed_from_step=resumed,
    )
    print(f"{RESULT_PREFIX} {json.dumps(dataclasses.asdict(result))}", flush=True)
    if "stuck" in _faults(os.environ.get(FAULTS_ENV, "")):
        threading.Event().wait()  # on its way out, waits for good (idle, no output)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # A finished rank must not die or hang in the process group's teardown. Left to the
        # interpreter's exit, gloo ended a rank with `terminate called without an active
        # exception` (SIGABRT); destroyed here, the DDP reducer's release at the return still
        # joined gloo's worker thread while holding the GIL, and that thread waited for the GIL
        # to free a finished all-gather's tensors: both ranks hung for good after printing
        # their results (2 runs in 12 on the 2-core machine; torch 2.13). So a rank ends
        # here, its exit handlers run and its output flushed, without the C++ teardown.
        torch.distributed.destroy_process_group()
        atexit._run_exitfuncs()  # noqa: SLF001 - the exit handlers os._exit would skip
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _entry() -> int:
    if "TORCHELASTIC_ERROR_FILE" in os.environ:
        # Under torchrun: write the failure to the error file torchrun's "Root Cause" reads.
        from torch.distributed.elastic.multiprocessing.errors import record

        result = record(main)()
        return 0 if result is None else int(result)
    return main()


if __name__ == "__main__":
    sys.exit(_entry())
