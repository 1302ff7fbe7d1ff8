"""The estimator against the reference trainer, per model family: predicted / measured peak.

    .venv/bin/python benchmarks/families.py            # every family, fp32 and bf16
    .venv/bin/python benchmarks/families.py gpt2 neox  # some

For each family (a tiny config from transformers, built from its config.json in a temporary
folder: Llama, Qwen2 with grouped-query attention and tied embeddings, GPT-2 with Conv1D
projections and dropout, GPT-NeoX with fused query_key_value), each precision (fp32, and
LLaMA-Factory's bf16: weights loaded in bf16, trainable parameters upcast to fp32) and each
finetuning type, the reference trainer runs two optimizer steps under the live-bytes device and
reports its peak; the estimator predicts the same configs in its child process (traced), and
counts them from the family's parameter shapes (analytic). Prints a markdown table.
"""

# A benchmark prints its table.
# ruff: noqa: T201

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from supervisor.estimate import ModelSpec, analytic, estimate_many  # noqa: E402
from supervisor.knobs import FinetuningType, Knobs  # noqa: E402

_IDS = {"vocab_size": 4096, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688,
              "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 8,
              "max_position_embeddings": 4096, "tie_word_embeddings": False, **_IDS},
    "qwen2": {"model_type": "qwen2", "hidden_size": 256, "intermediate_size": 1024,
              "num_hidden_layers": 6, "num_attention_heads": 8, "num_key_value_heads": 2,
              "max_position_embeddings": 4096, "tie_word_embeddings": True, **_IDS},
    "gpt2": {"model_type": "gpt2", "n_embd": 256, "n_layer": 4, "n_head": 8,
             "n_positions": 1024, **_IDS},
    "neox": {"model_type": "gpt_neox", "hidden_size": 256, "intermediate_size": 1024,
             "num_hidden_layers": 4, "num_attention_heads": 8, "max_position_embeddings": 2048,
             "rotary_pct": 0.25, **_IDS},
}
PRECISIONS = {"fp32": (None, []), "bf16": ("bf16-base-mixed", ["--load_in_bf16"])}
SHAPES = ((2, 128, False), (2, 256, True))
"""(per-device batch, cutoff, checkpointing) of each measured config."""


def _measure(cwd: Path, knobs: Knobs, flags: list[str]) -> float:
    argv = [sys.executable, "-m", "supervisor.reference_trainer", "--model_name_or_path", "m",
            "--per_device_train_batch_size", str(knobs.per_device_batch),
            "--cutoff_len", str(knobs.cutoff_len), "--max_steps", "2",
            "--finetuning_type", str(knobs.finetuning_type), "--device-memory", "8192",
            "--output_dir", str(cwd / "out"), *flags]
    if knobs.gradient_checkpointing:
        argv.append("--gradient_checkpointing")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env=env,  # noqa: S603
                          timeout=900, check=False)
    line = re.search(r"^reference-trainer\.result (.*)$", done.stdout, re.MULTILINE)
    if done.returncode != 0 or line is None:
        msg = f"{' '.join(argv)} failed: {done.stderr[-800:]}"
        raise RuntimeError(msg)
    return float(json.loads(line.group(1))["peak_live_mib"])


def main(names: list[str]) -> int:
    """Measure, predict and print one table row per config."""
    print("| family | precision | config | measured MiB | traced MiB | ratio "
          "| analytic MiB | ratio |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for family in names or list(FAMILIES):
        with tempfile.TemporaryDirectory() as tmp:
            cwd = Path(tmp)
            (cwd / "m").mkdir()
            (cwd / "m" / "config.json").write_text(json.dumps(FAMILIES[family]),
                                                   encoding="utf-8")
            spec = ModelSpec.resolve("m", cwd=cwd)
            for precision, (knob, flags) in PRECISIONS.items():
                configs = [Knobs(per_device_batch=b, cutoff_len=c, gradient_checkpointing=g,
                                 finetuning_type=kind, precision=knob)
                           for kind in FinetuningType for b, c, g in SHAPES]
                traced = estimate_many(spec, configs, method="fake")
                for knobs, prediction in zip(configs, traced, strict=True):
                    measured = _measure(cwd, knobs, flags)
                    counted = analytic(spec, knobs).peak_mib
                    what = (f"{knobs.finetuning_type} b{knobs.per_device_batch}x"
                            f"{knobs.cutoff_len}{' gc' if knobs.gradient_checkpointing else ''}")
                    print(f"| {family} | {precision} | {what} | {measured:.2f} "
                          f"| {prediction.peak_mib:.2f} | {prediction.peak_mib / measured:.4f} "
                          f"| {counted:.2f} | {counted / measured:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
