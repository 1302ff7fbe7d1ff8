"""Build the axolotl test's inputs: the LLaMA-Factory tier's tiny Llama and tokenizer, two sets.

Run with the axolotl venv's interpreter: ``python tests/axolotl/fixtures.py OUT_DIR``. The model
and tokenizer come from tests/llamafactory/fixtures.py (random seeded weights, a word-level
tokenizer, one token per word); the dataset, `data/train.jsonl`, is axolotl
`alpaca` rows (instruction, input, output), every row 1130-1930 tokens with axolotl's alpaca
prompt: all fit a `sequence_len` of 2048 and all are longer than half of it. axolotl drops rows
longer than `sequence_len` by default (`excess_length_strategy: drop`), so a halved cutoff leaves
it no rows at all. (A `completion` row is no use here: axolotl splits a long text into chunks
of `sequence_len` instead of dropping it.)
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
MIN_WORDS, MAX_WORDS = 1100, 1900  # + ~30 tokens of the alpaca prompt


def build_axolotl(out: Path) -> None:
    """Write model/ (via the LLaMA-Factory fixtures) and data/train.jsonl under out."""
    build(out)
    words = [f"w{i}" for i in range(MODEL_CONFIG["vocab_size"] - len(SPECIALS) - 8)]
    rng = random.Random(2)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    with (data / "train.jsonl").open("w", encoding="utf-8") as handle:
        for _ in range(ROWS):
            k = rng.randint(MIN_WORDS, MAX_WORDS)
            row = {"instruction": " ".join(rng.choices(words, k=k // 2)), "input": "",
                   "output": " ".join(rng.choices(words, k=k - k // 2))}
            handle.write(json.dumps(row) + "\n")
    print(f"axolotl fixtures written to {out}")


if __name__ == "__main__":
    build_axolotl(Path(sys.argv[1]))
