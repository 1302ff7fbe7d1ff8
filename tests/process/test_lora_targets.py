"""LoRA on the modules the program names: `lora_target: q_proj,v_proj` on a tiny Llama, `c_attn`
on a tiny GPT-2, predicted as the program trains them, not as if every linear layer were
adapted.

Nothing here is recorded: the reference trainer trains LoRA with `--lora_target` under the
live-bytes device and reports its own peak and trainable parameters; the estimator predicts
the same configs in its child process (traced) and counts them from the config's shape
(analytic), as `run` and `plan` do. Two optimizer steps, so the measured peak holds AdamW's
state as the prediction's does. Measured on 2026-12-08 (2-core CPU), b2 x 64, fp32: Llama
`q_proj,v_proj` 34.05 MiB (traced 34.05, counted 35.98; every linear layer traced 37.38),
GPT-2 `c_attn` 38.45 MiB (traced 38.45, counted 39.43; every linear layer 42.62).
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from supervisor._families import PEFT_DEFAULT, decoder_blocks
from supervisor.estimate import Method, ModelSpec, analytic, estimate_many
from supervisor.knobs import FinetuningType, Knobs
from supervisor.models import COMMON_CONFIG, NAMED_CONFIGS
from tests.process.test_families import trainer_result
from tests.unit.test_family_shapes import FAMILIES as FAMILY_SHAPES

pytestmark = pytest.mark.process

ROOT = Path(__file__).resolve().parents[2]
GPT2: dict[str, Any] = {"model_type": "gpt2", "n_embd": 256, "n_layer": 4, "n_head": 8,
                        "n_positions": 1024, "vocab_size": 4096, "bos_token_id": 1,
                        "eos_token_id": 2, "pad_token_id": 0}
LLAMA: dict[str, Any] = {"model_type": "llama", **COMMON_CONFIG, **NAMED_CONFIGS["tiny"]}
CASES = {"llama": (LLAMA, "q_proj,v_proj"), "gpt2": (GPT2, "c_attn")}


@pytest.mark.xdist_group("estimate")
@pytest.mark.parametrize("family", list(CASES))
def test_a_narrow_target_list_is_predicted_within_5_percent(tmp_path: Path,
                                                            family: str) -> None:
    """The program's own target list, traced and counted: within 5 % of the trainer's peak,
    the same trainable parameters, and less than LoRA on every linear layer predicts."""
    config, target = CASES[family]
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(config), encoding="utf-8")
    spec = ModelSpec.resolve("m", cwd=tmp_path)
    narrow = Knobs(per_device_batch=2, cutoff_len=64, finetuning_type=FinetuningType.LORA,
                   lora_target=target)
    every = Knobs(per_device_batch=2, cutoff_len=64, finetuning_type=FinetuningType.LORA)
    # TRL's default (no list): peft's own for the model type, which is this list here.
    peft = dataclasses.replace(narrow, lora_target=PEFT_DEFAULT)
    predicted, predicted_all, predicted_peft = estimate_many(spec, [narrow, every, peft])
    assert predicted.method is Method.FAKE, predicted.note
    measured = trainer_result(tmp_path, narrow, "--lora_target", narrow.lora_target or "all")
    assert predicted.peak_mib == pytest.approx(measured["peak_live_mib"], rel=0.05)
    assert predicted.breakdown["trainable_params"] == measured["trainable_params"]
    # The count from the shape, without torch, that ranks the ladder: the same trainable
    # parameters, and no further from the peak than it is for LoRA on every linear layer of
    # these tiny models (1.05 on the Llama, 1.01 on the GPT-2; 1.057 and 1.025 here).
    counted = analytic(spec, narrow)
    assert counted.breakdown["trainable_params"] == measured["trainable_params"]
    assert counted.peak_mib == pytest.approx(measured["peak_live_mib"], rel=0.08)
    # Fewer adapters than every linear layer's: fewer trainable parameters, a lower peak.
    assert predicted.breakdown["trainable_params"] < predicted_all.breakdown["trainable_params"]
    assert predicted.peak_mib < predicted_all.peak_mib
    assert counted.peak_mib < analytic(spec, every).peak_mib
    assert predicted_peft.breakdown["trainable_params"] == measured["trainable_params"]
    assert analytic(spec, peft).peak_mib == counted.peak_mib


@pytest.mark.parametrize("model_type", list(FAMILY_SHAPES))
def test_the_counts_layer_names_are_the_models_own(model_type: str) -> None:
    """Each family's block as transformers builds it (on the meta device): the linear layers
    LoRA can adapt have the names and shapes the count matches target lists against, and
    peft's own list for the model type (TRL's default) is the count's."""
    import torch  # noqa: PLC0415 - a process test: torch only here
    from peft.utils.constants import (  # noqa: PLC0415
        TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_LISTS,
    )
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: PLC0415
    from transformers.pytorch_utils import Conv1D  # noqa: PLC0415

    dims, _ = FAMILY_SHAPES[model_type]
    config = AutoConfig.for_model(model_type, vocab_size=4096, **dims)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    _, blocks = decoder_blocks(model)
    built = {name: ((module.in_features, module.out_features)
                    if isinstance(module, torch.nn.Linear) else tuple(module.weight.shape))
             for name, module in blocks[0].named_modules()
             if isinstance(module, torch.nn.Linear | Conv1D)}
    shape = ModelSpec.from_config(model_type, {"model_type": model_type, "vocab_size": 4096,
                                               **dims}, source="test").shape()
    assert shape is not None
    assert dict(zip(shape.linear_names, shape.linears, strict=True)) == built
    assert shape.peft_targets == tuple(PEFT_LISTS[model_type])


def _plan_start_mib(cwd: Path, *overrides: str) -> tuple[float, str]:
    done = subprocess.run(  # noqa: S603 - our own CLI
        [sys.executable, "-m", "supervisor", "plan", "--device-memory", "200MiB", "--method",
         "analytic", "--", "llamafactory-cli", "train", "sft.yaml", *overrides],
        cwd=cwd, capture_output=True, text=True, timeout=300, check=False,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    row = re.search(r"^1\*\s+\(start\).*?\s([\d.]+) MiB", done.stdout, re.MULTILINE)
    assert row is not None, done.stdout
    return float(row.group(1)), " ".join(done.stdout.split())


def test_plan_reads_the_list_from_the_command(tmp_path: Path) -> None:
    """`plan` on a LLaMA-Factory YAML that says `lora_target: q_proj,v_proj`: the start is
    predicted with those adapters (less than with `lora_target=all` on its command line), and
    the plan says where the list was read."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(LLAMA), encoding="utf-8")
    (tmp_path / "sft.yaml").write_text(
        "model_name_or_path: m\nstage: sft\ndo_train: true\nfinetuning_type: lora\n"
        "lora_target: q_proj,v_proj\nper_device_train_batch_size: 2\ncutoff_len: 64\n"
        "output_dir: out\n", encoding="utf-8")
    narrow, said = _plan_start_mib(tmp_path)
    every, said_all = _plan_start_mib(tmp_path, "lora_target=all")
    assert narrow < every
    assert "LoRA targets q_proj v_proj (config file)" in said
    assert "LoRA targets every linear layer (command line)" in said_all
