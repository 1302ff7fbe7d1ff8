"""Families the suite was not built on: a tiny GPT-2 (Conv1D projections `c_attn`/`c_proj`/
`c_fc`, learned positions, tied head, dropout) and a tiny GPT-NeoX (fused `query_key_value`,
`dense_h_to_4h`, partial rotary, untied `embed_out`), each from a config.json in a folder.

Nothing here is recorded: the reference trainer trains every finetuning type under the
live-bytes device and reports its own peak; the estimator predicts the same configs in its
child process, as `run` and `plan` do. LoRA targets and the frozen layers are found in the
model by the same rules on both sides (supervisor/_families.py). Two optimizer steps, so the
measured peak includes AdamW's state as the prediction's does. Measured on 2026-12-07 (2-core
CPU), b2 x 64: GPT-2 full 76.22 MiB (predicted 76.21), LoRA 42.63 (42.62), freeze 44.24
(44.23); GPT-NeoX full 89.22 (88.21), LoRA 36.65 (36.64), freeze 42.75 (42.75).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from supervisor.estimate import Method, ModelSpec, analytic, estimate_many
from supervisor.knobs import FinetuningType, Knobs

pytestmark = pytest.mark.process

_COMMON = {"vocab_size": 4096, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
GPT2: dict[str, Any] = {"model_type": "gpt2", "n_embd": 256, "n_layer": 4, "n_head": 8,
                        "n_positions": 1024, **_COMMON}
GPT_NEOX: dict[str, Any] = {"model_type": "gpt_neox", "hidden_size": 256,
                            "intermediate_size": 1024, "num_hidden_layers": 4,
                            "num_attention_heads": 8, "max_position_embeddings": 2048,
                            "rotary_pct": 0.25, **_COMMON}
FAMILIES = {"gpt2": GPT2, "gpt_neox": GPT_NEOX}
ROOT = Path(__file__).resolve().parents[2]


def trainer_result(cwd: Path, knobs: Knobs, *flags: str) -> dict[str, Any]:
    """The reference trainer's own result line for `knobs` (2 steps; `flags` added)."""
    done = subprocess.run(  # noqa: S603 - the bundled trainer
        [sys.executable, "-m", "supervisor.reference_trainer", "--model_name_or_path", "m",
         "--per_device_train_batch_size", str(knobs.per_device_batch),
         "--cutoff_len", str(knobs.cutoff_len), "--max_steps", "2",
         "--finetuning_type", str(knobs.finetuning_type), *flags, "--device-memory", "4096",
         "--output_dir", f"out-{knobs.finetuning_type}"],
        cwd=cwd, capture_output=True, text=True, timeout=600, check=False,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
             "PYTHONPATH": str(ROOT)})  # this checkout's trainer, not an installed one
    assert done.returncode == 0, done.stderr[-2000:]
    line = re.search(r"^reference-trainer\.result (.*)$", done.stdout + done.stderr,
                     re.MULTILINE)
    assert line is not None
    result: dict[str, Any] = json.loads(line.group(1))
    return result


@pytest.mark.xdist_group("estimate")
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_finetuning_type_of_the_family_is_predicted_within_5_percent(
        tmp_path: Path, family: str) -> None:
    """Full, LoRA and freeze on a GPT-2 and a GPT-NeoX: traced (not counted), within 5 %
    of the reference trainer's peak, and training the same number of parameters."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(FAMILIES[family]), encoding="utf-8")
    spec = ModelSpec.resolve("m", cwd=tmp_path)
    configs = [Knobs(per_device_batch=2, cutoff_len=64, finetuning_type=kind)
               for kind in FinetuningType]
    for knobs, prediction in zip(configs, estimate_many(spec, configs), strict=True):
        assert prediction.method is Method.FAKE, prediction.note
        measured = trainer_result(tmp_path, knobs)
        kind = str(knobs.finetuning_type)
        assert prediction.peak_mib == pytest.approx(measured["peak_live_mib"], rel=0.05), kind
        assert prediction.breakdown["trainable_params"] == measured["trainable_params"], kind
        # The count from the family's own parameter shapes, without torch, agrees on what
        # trains and on the total.
        counted = analytic(spec, knobs).breakdown
        assert counted["trainable_params"] == measured["trainable_params"], kind
        assert counted["total_params"] == measured["total_params"], kind
