"""The bundled tiny configs (Llama, and a Qwen2 with grouped-query attention), shared by the
reference trainer and the estimator.

Torch-free: the estimator (supervisor side) reads these without importing the trainer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Named sizes. A 4096-token vocabulary keeps the logits (and the three logits-sized tensors
# the loss's backward holds at once) the largest per-sample cost without drowning the
# decoder-layer activations: peak live bytes then order batch, cutoff, checkpointing, LoRA and
# freeze as on a real model. Untied embeddings; tiny has 5.26M parameters, small 29.5M.
#
# tiny-qwen2 is a second architecture for the scenario suite, one the estimator and the
# ladder were not built on: Qwen2's decoder (bias on q/k/v, grouped-query
# attention: 2 key/value heads for 8 query heads, so k_proj and v_proj are a quarter of
# q_proj), its wider MLP (4x hidden; Qwen2-0.5B has 5.4x), 6 layers instead of 4, and tied
# embeddings as Qwen2-0.5B and 1.5B have them (the sizes one fine-tunes on a small card): the
# head is the embedding matrix, so LoRA's frozen base and full fine-tuning's gradients and
# AdamW state hold one vocab x hidden matrix, not two. 6.76M parameters, the same 4096 vocab.
NAMED_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": {
        "vocab_size": 4096,
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
    },
    "small": {
        "vocab_size": 4096,
        "hidden_size": 512,
        "intermediate_size": 1376,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
    },
    "tiny-qwen2": {
        "model_type": "qwen2",
        "vocab_size": 4096,
        "hidden_size": 256,
        "intermediate_size": 1024,
        "num_hidden_layers": 6,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
    },
}
MODEL_TYPES = ("llama", "qwen2", "gpt2", "gpt_neox")
"""The architectures the suites measure (tests/process/test_families.py, benchmarks/
families.py); the reference trainer builds any causal LM from a local config.json."""
COMMON_CONFIG: dict[str, Any] = {
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def named_config(name: str, *, cwd: str | Path | None = None) -> dict[str, Any] | None:
    """The config of a built-in size, or None: unknown, or a local folder of that name exists.

    A local path always wins: a folder named `tiny` in the working directory is a model
    folder, not the built-in tiny config.
    """
    if name not in NAMED_CONFIGS:
        return None
    local = Path(name) if cwd is None else Path(cwd) / name
    if local.exists():
        return None
    return {"model_type": "llama", **COMMON_CONFIG, **NAMED_CONFIGS[name]}
