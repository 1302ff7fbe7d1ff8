"""`plan` on a Llama-7B config.json, for every way a command names its model and precision.

The config is written by the test (no download). The LoRA row is checked against the
FakeTensor trace of the whole model (all 32 layers) of the same config: what a bf16 LoRA with
checkpointing really needs, as traced op by op (docs/memory.md: the trace matches the
reference trainer's measured peaks within 1%).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.estimate import ModelSpec, clear_cache, estimate_many
from supervisor.knobs import FinetuningType, Knobs

# One worker runs the three forms: the module's full 7B trace (~40 s) is then computed once.
pytestmark = [pytest.mark.process, pytest.mark.xdist_group("plan-7b")]

LLAMA_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
            "vocab_size": 32000, "max_position_embeddings": 4096, "torch_dtype": "bfloat16"}
COMMON = {"model_name_or_path": "llama-7b", "per_device_train_batch_size": 2,
          "gradient_accumulation_steps": 4, "cutoff_len": 1024, "finetuning_type": "full",
          "output_dir": "out"}
_ROW = re.compile(r"^\s*(\d+)\*?\s+(\S+)\s+(\d+)x(\d+)\s+(\d+)\s+(on|off)\s+(.+?)\s{2,}"
                  r"([\d.]+) (GiB|MiB)")


def _write_forms(tmp: Path) -> dict[str, list[str]]:
    (tmp / "llama-7b").mkdir()
    (tmp / "llama-7b" / "config.json").write_text(json.dumps(LLAMA_7B))
    yaml_lines = [f"{k}: {v}" for k, v in COMMON.items()]
    (tmp / "sft.yaml").write_text("\n".join([*yaml_lines, "stage: sft", "do_train: true",
                                             "bf16: true"]) + "\n")
    (tmp / "args.json").write_text(json.dumps({**COMMON, "max_seq_length": 1024, "bf16": True}))
    (tmp / "train.py").write_text("import sys\nprint(sys.argv)\n")
    flags = [w for k, v in COMMON.items() for w in (f"--{k}", str(v))]
    return {
        "llamafactory-yaml": ["llamafactory-cli", "train", "sft.yaml"],
        "argv": [sys.executable, "-m", "supervisor.reference_trainer", *flags, "--bf16", "true"],
        "args-json": [sys.executable, "train.py", "args.json"],
    }


def _plan(tmp: Path, *argv: str, device: str = "24GiB",
          method: str = "auto") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(  # noqa: S603 - our own CLI
        [sys.executable, "-m", "supervisor", "plan", "--device-memory", device,
         "--method", method, "--", *argv],
        capture_output=True, text=True, cwd=tmp, env=env, check=False, timeout=600)


# LLaMA-Factory loads the model in bf16 (a bf16 frozen base under LoRA); a Hugging Face
# script's --bf16 is autocast over the fp32 weights it loaded.
PRECISION = {"llamafactory-yaml": "bf16-base-mixed", "argv": "bf16-mixed",
             "args-json": "bf16-mixed"}
# An fp32 frozen base alone is 25 GiB on a 7B model: nothing fits 24 GiB under a Hugging Face
# --bf16 (plan exits 3, rightly), so those forms plan for a 48 GiB device.
DEVICE = {"llamafactory-yaml": "24GiB", "argv": "48GiB", "args-json": "48GiB"}


@pytest.fixture(scope="module")
def lora_reference() -> dict[str, float]:
    """The full trace (no layer scaling) of LoRA r8 + checkpointing, b2 x 1024, under each
    form's bf16 (one child process for both)."""
    clear_cache()
    spec = ModelSpec.from_config("llama-7b", LLAMA_7B, source="test")
    precisions = sorted(set(PRECISION.values()))
    configs = [Knobs(per_device_batch=2, grad_accum=4, cutoff_len=1024, precision=p,
                     gradient_checkpointing=True, finetuning_type=FinetuningType.LORA)
               for p in precisions]
    predictions = estimate_many(spec, configs, method="fake", scale=False)
    return {p: r.peak_mib for p, r in zip(precisions, predictions, strict=True)}


@pytest.mark.parametrize("form", ["llamafactory-yaml", "argv", "args-json"])
def test_plan_answers_for_a_7b_bf16_command_and_its_lora_row_is_right(
        tmp_path: Path, form: str, lora_reference: dict[str, float]) -> None:
    """Exit 0; every line within 100 columns; bf16 read from the command (not assumed), as the
    program holds it; the LoRA + checkpointing row at b2 x 1024 within 15% of the full trace."""
    argv = _write_forms(tmp_path)[form]
    result = _plan(tmp_path, *argv, device=DEVICE[form])
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert all(len(line) <= 100 for line in out.splitlines()), out
    flat = " ".join(out.split())  # the assumptions wrap at 100 columns wherever a path ends
    precision = PRECISION[form]
    assert f"precision {precision} (" in flat
    assert f"precision {precision} (assumed)" not in flat
    assert "plan: done in" in result.stderr
    rows = [m.groups() for m in map(_ROW.match, out.splitlines()) if m]
    lora = [r for r in rows if r[6].startswith("lora") and r[5] == "on"
            and (r[2], r[3], r[4]) == ("2", "4", "1024")]
    assert lora, out
    gib = float(lora[0][7]) * (1024 if lora[0][8] == "GiB" else 1)
    assert abs(gib / lora_reference[precision] - 1) <= 0.15, (gib, lora_reference)
    assert "LoRA + checkpointing" in out
    assert "QLoRA" in out


def test_plan_exits_3_when_nothing_fits(tmp_path: Path) -> None:
    """A 7B model on a 2 GiB device: no row fits, exit 3, and the levers are still shown."""
    argv = _write_forms(tmp_path)["llamafactory-yaml"]
    result = _plan(tmp_path, *argv, device="2GiB", method="analytic")
    assert result.returncode == 3, result.stderr[-3000:]
    assert "nothing `run` can try is predicted to fit" in " ".join(result.stdout.split())
    assert "levers" in result.stdout
