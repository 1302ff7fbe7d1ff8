"""Build the LLaMA-Factory test's inputs from a config: a tiny Llama, its tokenizer, a dataset.

Run with the LLaMA-Factory venv's interpreter (it needs transformers and tokenizers):
``python tests/llamafactory/fixtures.py OUT_DIR``. Nothing is downloaded: the model's weights are
random (seeded), the tokenizer is a word-level model over a made-up vocabulary with a chat
template, and the alpaca-style dataset is generated, every sample longer than any cutoff the
test uses, so each attempt's memory depends on its config alone.
"""

# A script run in another interpreter: its output is its interface. The token names below
# are a tokenizer's special tokens, not passwords; the data needs no cryptographic randomness.
# ruff: noqa: T201, S106, S311

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# Logits (batch x cutoff x vocab, fp32, several live at once in the loss's backward) are the
# largest per-sample cost, so halving the batch halves the peak: the ladder's first rung fits.
MODEL_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 16384,
    "hidden_size": 128,
    "intermediate_size": 344,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
SAMPLES = 64
WORDS_PER_SAMPLE = 2400  # longer than any cutoff the test uses: every sample is truncated to it
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}{{ eos_token }}"
    "{% endfor %}"
)


def build(out: Path) -> None:
    """Write model/, data/dataset_info.json and data/alpaca_tiny.json under out."""
    model_dir = out / "model"
    words = [f"w{i}" for i in range(MODEL_CONFIG["vocab_size"] - len(SPECIALS) - 8)]
    vocab = {token: i for i, token in enumerate([*SPECIALS, *words])}
    for extra in ("Human", "Assistant", "user", "assistant", "system", ":", "\n", "."):
        vocab.setdefault(extra, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", model_max_length=4096)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(model_dir)

    torch.manual_seed(0)
    config = LlamaConfig(**{k: v for k, v in MODEL_CONFIG.items()
                            if k not in ("architectures", "model_type", "torch_dtype")})
    LlamaForCausalLM(config).save_pretrained(model_dir)

    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    rows = [{"instruction": " ".join(rng.choices(words, k=WORDS_PER_SAMPLE // 2)),
             "input": "",
             "output": " ".join(rng.choices(words, k=WORDS_PER_SAMPLE // 2))}
            for _ in range(SAMPLES)]
    (data_dir / "alpaca_tiny.json").write_text(json.dumps(rows), encoding="utf-8")
    info = {"alpaca_tiny": {"file_name": "alpaca_tiny.json"}}
    (data_dir / "dataset_info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    print(f"fixtures written to {out}")


if __name__ == "__main__":
    build(Path(sys.argv[1]))
