# ruff: noqa: INP001 - a standalone program the tests run, not a module of the test package
"""A plain argparse training script's front end, for tests: it prints what it parsed as JSON.

store_true switches, no printed defaults, no LoRA or freeze flags: the supervisor must read
checkpointing as off (a bare switch) and never append a flag this parser would reject.
"""

from __future__ import annotations

import argparse
import json
import sys


def main() -> int:
    """Parse the flags and print them."""
    parser = argparse.ArgumentParser(description="train a model (front end only)")
    parser.add_argument("--model_name_or_path", default="gpt2")
    parser.add_argument("--per_device_train_batch_size", type=int, default=4)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--max_length", type=int, default=1024, help="tokens per sample")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--output_dir", default="out")
    print(json.dumps(vars(parser.parse_args())))  # noqa: T201 - the script's output
    return 0


if __name__ == "__main__":
    sys.exit(main())
