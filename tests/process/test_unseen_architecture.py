"""An architecture no suite was built on: a tiny Mistral (grouped-query attention, 2 KV heads
of 8, a sliding-window config) from a local config.json, measured live and predicted.

Nothing here is recorded: the reference trainer trains it (full and LoRA) and reports its own
peak; the estimator predicts the same configs in its child process, as `run` and `plan` do.
Measured on 2026-12-02 (2-core CPU): full b2 x 64 82.94 MiB, predicted 82.29 (-0.8 %); LoRA
r8 33.89 MiB, predicted 34.99 (+3.2 %).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.estimate import Method, ModelSpec, estimate_many
from supervisor.knobs import FinetuningType, Knobs

pytestmark = pytest.mark.process

MISTRAL = {"model_type": "mistral", "vocab_size": 4096, "hidden_size": 256,
           "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 8,
           "num_key_value_heads": 2, "max_position_embeddings": 4096, "sliding_window": 4096,
           "tie_word_embeddings": False, "pad_token_id": 0, "bos_token_id": 1,
           "eos_token_id": 2}


def _measured(cwd: Path, method: str) -> float:
    done = subprocess.run(  # noqa: S603 - the bundled trainer
        [sys.executable, "-m", "supervisor.reference_trainer", "--model_name_or_path", "m",
         "--per_device_train_batch_size", "2", "--cutoff_len", "64", "--max_steps", "1",
         "--finetuning_type", method, "--output_dir", f"out-{method}"],
        cwd=cwd, capture_output=True, text=True, timeout=600, check=False,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    line = re.search(r"^reference-trainer\.result (.*)$", done.stdout + done.stderr,
                     re.MULTILINE)
    assert line is not None
    return float(json.loads(line.group(1))["peak_live_mib"])


@pytest.mark.xdist_group("estimate")
def test_a_mistral_config_trains_and_is_predicted_within_5_percent(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(MISTRAL), encoding="utf-8")
    spec = ModelSpec.resolve("m", cwd=tmp_path)
    configs = {"full": Knobs(per_device_batch=2, cutoff_len=64, max_steps=1),
               "lora": Knobs(per_device_batch=2, cutoff_len=64, max_steps=1,
                             finetuning_type=FinetuningType.LORA, lora_rank=8)}
    predicted = dict(zip(configs, estimate_many(spec, list(configs.values())), strict=True))
    for method, prediction in predicted.items():
        assert prediction.method is Method.FAKE, prediction.note
        measured = _measured(tmp_path, method)
        assert prediction.peak_mib == pytest.approx(measured, rel=0.05), method
