"""What a program trains in a model of any family, found from the model itself.

Two rules, shared by the estimator's child (what it traces) and the reference trainer (what it
measures), so that prediction and measurement train the same parameters:

- LoRA targets: what the program says it targets, else every linear layer the way peft
  resolves ``target_modules="all-linear"`` (``nn.Linear`` and transformers' ``Conv1D``, the
  output head excluded): on a Llama ``q_proj`` ... ``down_proj``, on a GPT-2 ``c_attn``,
  ``c_proj``, ``c_fc``, on a GPT-NeoX ``query_key_value``, ``dense``, ``dense_h_to_4h``,
  ``dense_4h_to_h``. LLaMA-Factory's ``lora_target: all`` and axolotl's
  ``lora_target_linear: true`` resolve to the same set.
- Freeze: LLaMA-Factory's ``freeze_trainable_layers`` over the model's repeated blocks, found
  by structure (the ModuleList of decoder blocks: ``model.layers``, ``transformer.h``,
  ``gpt_neox.layers``...), not by a family's prefix: N>0 trains the last N blocks, N<0 the
  first |N|, everything else (embeddings, final norm, head) frozen.

The module itself is torch-free (the supervisor may read `depth_key`); the functions that
touch a model import torch and peft where they run, in the child or the trainer.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DEPTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
"""How config.json names the number of decoder blocks, per family (Llama, GPT-2, ...)."""
ALL_LINEAR = "all-linear"
"""peft's shorthand for every linear layer but the output head."""
_ALL = frozenset({"all", "all-linear", "all_linear"})
PEFT_DEFAULT = "peft-default"
"""No list given to peft (`target_modules=None`): peft adapts its own list for the model type
(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING: `q_proj`, `v_proj` on a Llama, `c_attn`
on a GPT-2). TRL's ModelConfig.lora_target_modules defaults to None, so that is TRL's own."""


def depth_key(config: Mapping[str, Any]) -> str | None:
    """The key holding the number of decoder blocks in this config.json (None: none)."""
    return next((k for k in DEPTH_KEYS if isinstance(config.get(k), int)), None)


def depth(config: Mapping[str, Any]) -> int:
    """The number of decoder blocks this config.json builds (0: it does not say)."""
    key = depth_key(config)
    return int(config[key]) if key is not None else 0


def with_depth(config: Mapping[str, Any], layers: int) -> dict[str, Any]:
    """The same config with `layers` decoder blocks, under the key the family uses."""
    return {**config, depth_key(config) or "num_hidden_layers": layers}


def target_names(target: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """The module names a program's LoRA target list names (None: every linear layer).

    Commas and spaces separate names (LLaMA-Factory's `q_proj,v_proj`, TRL's nargs list);
    `all` / `all-linear` anywhere, or no name at all, is every linear layer.
    """
    if target is None:
        return None
    if target == PEFT_DEFAULT:
        return (PEFT_DEFAULT,)  # the model type's own list: the model decides (see PEFT_DEFAULT)
    parts = [target] if isinstance(target, str) else [str(t) for t in target]
    # (A list printed as Python writes it, `['q_proj', 'v_proj']`, reads the same.)
    names = tuple(dict.fromkeys(n for part in parts for n in re.split(r"[,\s\[\]'\"]+", part)
                                if n))
    if not names or any(n.lower() in _ALL for n in names):
        return None
    return names


def canonical_target(target: str | Sequence[str] | None) -> str | None:
    """The target list as the knob holds it: names joined by commas, None for every linear
    layer (`all`, `all-linear`, or nothing said: the same layers, the same memory)."""
    names = target_names(target)
    return None if names is None else ",".join(names)


def targets(name: str, names: Sequence[str]) -> bool:
    """peft's rule for a list: the module's name is a target or ends with `.target`."""
    return any(name == t or name.endswith(f".{t}") for t in names)


def lora_target_modules(target: str | Sequence[str] | None) -> str | list[str] | None:
    """peft's `target_modules` for what the program targets (None, "all": every linear;
    PEFT_DEFAULT: None, peft's own list for the model type)."""
    if target == PEFT_DEFAULT:
        return None
    names = target_names(target)
    return ALL_LINEAR if names is None else list(names)


def decoder_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """(qualified name, blocks) of the model's repeated decoder blocks.

    The ModuleList whose children are all of one class, as many as the config has layers;
    among several such (an encoder's, a vision tower's), the one with the most parameters.
    """
    import torch  # noqa: PLC0415 - only where a model is built

    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", None)
    candidates: list[tuple[int, int, str, torch.nn.ModuleList]] = []
    for name, module in model.named_modules():
        if (isinstance(module, torch.nn.ModuleList) and len(module) > 0
                and len({type(block) for block in module}) == 1):
            size = sum(p.numel() for p in module.parameters())
            candidates.append((int(len(module) == layers), size, name, module))
    if not candidates:
        msg = (f"{type(model).__name__} has no list of repeated blocks to freeze: "
               "freeze tuning cannot pick its trainable layers")
        raise ValueError(msg)
    _, _, name, blocks = max(candidates, key=lambda c: (c[0], c[1]))
    return name, blocks


def trainable_block_ids(layers: int, n: int) -> range:
    """LLaMA-Factory's freeze rule: N>0 the last N of `layers` blocks, N<0 the first |N|."""
    if n > 0:
        return range(max(0, layers - n), layers)
    return range(min(-n, layers))


def freeze(model: torch.nn.Module, n: int) -> int:
    """Train only the blocks `trainable_block_ids` picks; return how many blocks there are."""
    name, blocks = decoder_blocks(model)
    prefix = f"{name}." if name else ""
    trained = tuple(f"{prefix}{i}." for i in trainable_block_ids(len(blocks), n))
    for parameter_name, parameter in model.named_parameters():
        parameter.requires_grad_(parameter_name.startswith(trained))
    return len(blocks)


def apply_lora(model: torch.nn.Module, *, rank: int,
               target: str | Sequence[str] | None = None) -> torch.nn.Module:
    """The model wrapped in peft LoRA adapters (alpha twice the rank, no dropout)."""
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415 - only where a model is built

    lora = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                      target_modules=lora_target_modules(target), task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        # peft sets fan_in_fan_out itself on Conv1D (GPT-2) and says so; transformers' renamed
        # is_gradient_checkpointing property warns too: noise that says nothing about a run.
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        return get_peft_model(model, lora)
