"""Build the TRL test's inputs: the LLaMA-Factory tier's tiny Llama and tokenizer, and a text set.

Run with the TRL venv's interpreter: ``python tests/trl/fixtures.py OUT_DIR``. The model and
tokenizer come from tests/llamafactory/fixtures.py (random seeded weights, a word-level
tokenizer); the dataset is `data/train.jsonl`, one `{"text": ...}` row per sample (TRL's
language-modelling format), every row longer than any `--max_length` the test uses.
"""

# A script run in another interpreter: its output is its interface; the data needs no
# cryptographic randomness.
# ruff: noqa: T201, S311

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from tests.llamafactory.fixtures import MODEL_CONFIG, SPECIALS, build

ROWS = 64
WORDS_PER_ROW = 2400


def build_text(out: Path) -> None:
    """Write model/ (via the LLaMA-Factory fixtures) and data/train.jsonl under out."""
    build(out)
    words = [f"w{i}" for i in range(MODEL_CONFIG["vocab_size"] - len(SPECIALS) - 8)]
    rng = random.Random(1)
    data = out / "text"
    data.mkdir(parents=True, exist_ok=True)
    with (data / "train.jsonl").open("w", encoding="utf-8") as handle:
        for _ in range(ROWS):
            handle.write(json.dumps({"text": " ".join(rng.choices(words, k=WORDS_PER_ROW))})
                         + "\n")
    print(f"TRL fixtures written to {out}")


if __name__ == "__main__":
    build_text(Path(sys.argv[1]))
