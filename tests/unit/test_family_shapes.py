"""The analytic count reads each family's own parameter shapes from its config.json.

Each expected count was recorded with transformers 5.25.0: the config built with
`AutoConfig.for_model(model_type, vocab_size=4096, **dims)` and the model with
`AutoModelForCausalLM.from_config` on the meta device, `sum(p.numel() for p in
model.parameters())` (tied heads counted once, as torch does). The same dims and counts are
what the estimator sees without torch.
"""

from __future__ import annotations

from typing import Any

import pytest

from supervisor.estimate import ModelSpec

_GQA = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
        "num_attention_heads": 8, "num_key_value_heads": 2}
FAMILIES: dict[str, tuple[dict[str, Any], int]] = {
    "llama": (_GQA, 4_868_352),
    "mistral": (_GQA, 4_868_352),
    "qwen2": (_GQA, 4_869_888),  # bias on q, k, v
    "gemma": ({**_GQA, "head_dim": 32}, 3_819_776),  # tied by default
    "stablelm": (_GQA, 4_870_656),  # LayerNorm with a bias
    "phi": ({"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
             "num_attention_heads": 8}, 5_258_752),  # one norm per block, a biased head
    "gpt2": ({"n_embd": 256, "n_layer": 4, "n_head": 8}, 4_470_272),  # Conv1D, positions
    "gpt_neox": ({"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
                  "num_attention_heads": 8}, 5_256_704),
    "gptj": ({"n_embd": 256, "n_layer": 4, "n_head": 8, "rotary_dim": 16}, 5_254_656),
    "bloom": ({"hidden_size": 256, "n_layer": 4, "n_head": 8}, 4_208_640),
    "falcon": ({"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8},
               3_738_112),  # multi-query, parallel attention
    "mpt": ({"d_model": 256, "n_layers": 4, "n_heads": 8}, 4_196_608),
    "opt": ({"hidden_size": 256, "ffn_dim": 1024, "num_hidden_layers": 4,
             "num_attention_heads": 8, "word_embed_proj_dim": 256}, 4_732_928),
}


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_the_count_is_the_models_own(model_type: str) -> None:
    """Thirteen families, each named and shaped its own way: the count is exact."""
    dims, params = FAMILIES[model_type]
    spec = ModelSpec.from_config(model_type, {"model_type": model_type, "vocab_size": 4096,
                                              **dims}, source="test")
    assert spec.parameters() == params


def test_lora_counts_every_linear_layer_of_the_family() -> None:
    """GPT-2's fused c_attn (h -> 3h) is one LoRA pair, Llama's q, k, v three."""
    gpt2 = ModelSpec.from_config("g", {"model_type": "gpt2", "vocab_size": 4096,
                                       **FAMILIES["gpt2"][0]}, source="test").shape()
    llama = ModelSpec.from_config("l", {"model_type": "llama", "vocab_size": 4096,
                                        **FAMILIES["llama"][0]}, source="test").shape()
    assert gpt2 is not None
    assert llama is not None
    h = 256
    assert gpt2.lora_parameters(8) == 4 * 8 * ((h + 3 * h) + (h + h) + (h + 4 * h) + (4 * h + h))
    kv = 64
    assert llama.lora_parameters(8) == 4 * 8 * (
        (h + h) + 2 * (h + kv) + (h + h) + 2 * (h + 688) + (688 + h))
