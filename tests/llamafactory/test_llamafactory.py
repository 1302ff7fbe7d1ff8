"""The real `llamafactory-cli train` under the supervisor, on CPU under a host-memory cap.

Measured here (llamafactory 0.9.5, torch 2.13.0 CPU, OMP_NUM_THREADS=1, the fixtures' tiny
Llama: vocab 16384, 2 layers, full fine-tuning, cutoff 1024, peak address space (VmPeak):
batch 4: 3685 MiB, batch 2: 3195 MiB, batch 1: 2987 MiB. Under a 3400 MiB RLIMIT_AS
(`prlimit --as`) batch 4 fails in the CPU allocator and batch 2 x GA 2 fits with 205 MiB to
spare; each run takes ~16 s.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from supervisor.command import Command
from supervisor.dialects import detect
from supervisor.knobs import FinetuningType
from supervisor.loop import supervise
from supervisor.policy import resolve

# One xdist worker builds and uses the tier's venv (make test runs pytest -n 2).
pytestmark = [pytest.mark.llamafactory, pytest.mark.xdist_group("llamafactory")]

CAP_MIB = 3400

SFT_YAML = """\
### model
model_name_or_path: {inputs}/model

### method
stage: sft
do_train: true
finetuning_type: full   # all parameters train

### dataset
dataset: alpaca_tiny
dataset_dir: {inputs}/data
template: default
cutoff_len: 1024        # every sample is longer: all are truncated to this
overwrite_cache: true
preprocessing_num_workers: 1

### output
output_dir: saves/tiny-full
logging_steps: 1
save_steps: 1000
plot_loss: false
report_to: none

### train
per_device_train_batch_size: 4
gradient_accumulation_steps: 1
learning_rate: 1.0e-4
max_steps: 2
"""


def _cli(lf_venv: Path) -> str:
    return str(lf_venv / "bin" / "llamafactory-cli")


def _capped(lf_venv: Path, *args: str) -> tuple[str, ...]:
    prlimit = shutil.which("prlimit")
    assert prlimit is not None, "prlimit (util-linux) caps the host memory of the run"
    return (prlimit, f"--as={CAP_MIB * 2**20}", _cli(lf_venv), "train", *args)


def test_supervisor_fits_real_llamafactory_and_final_yaml_runs_as_is(
        lf_venv: Path, lf_env: dict[str, str], lf_inputs: Path, tmp_path: Path) -> None:
    """batch 4 OOMs for real; batch 2 x GA 2 fits; final.yaml trains as is under the same cap."""
    user_yaml = SFT_YAML.format(inputs=lf_inputs)
    (tmp_path / "sft.yaml").write_text(user_yaml, encoding="utf-8")
    command = Command(argv=_capped(lf_venv, "sft.yaml"), cwd=str(tmp_path))
    dialect = detect(command)
    assert dialect.name == "llamafactory"

    run_dir = tmp_path / "runs" / "lf"
    result = supervise(command, dialect=dialect, ladder=resolve("default"), run_dir=run_dir,
                       env=lf_env, echo=False)

    report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    assert [(a["verdict"], a["oom_kind"]) for a in report["attempts"]] == [
        ("oom", "cpu"), ("fits", None)], report["attempts"]
    assert "DefaultCPUAllocator: can't allocate memory" in report["attempts"][0]["evidence"]
    assert result.status == "fitted"
    assert result.final_knobs is not None
    final = result.final_knobs
    assert (final.per_device_batch, final.grad_accum, final.effective_batch) == (2, 2, 4)
    assert report["effective_batch"] == {"start": 4, "final": 4, "world_size_known": True}
    assert report["final_command"] == [
        *_capped(lf_venv, "sft.yaml"), "per_device_train_batch_size=2",
        "gradient_accumulation_steps=2", "overwrite_output_dir=true"]
    assert report["final_files"] == ["final.yaml"]
    assert (tmp_path / "sft.yaml").read_text(encoding="utf-8") == user_yaml  # untouched

    final_yaml = run_dir / "final.yaml"
    assert final_yaml.read_text(encoding="utf-8") == (
        f"# The working config found by oom-supervisor (run lf).\n"
        f"# Run it from {tmp_path}: llamafactory-cli train {final_yaml}\n"
        + user_yaml.replace("per_device_train_batch_size: 4", "per_device_train_batch_size: 2")
        .replace("gradient_accumulation_steps: 1", "gradient_accumulation_steps: 2")
        + "overwrite_output_dir: true\n")

    # final.yaml, as is, trains again from scratch under the same cap.
    (tmp_path / "saves" / "tiny-full" / "train_results.json").unlink()
    again = subprocess.run(_capped(lf_venv, str(final_yaml)), cwd=tmp_path, env=lf_env,  # noqa: S603
                           capture_output=True, text=True, check=False, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    results = json.loads((tmp_path / "saves" / "tiny-full" / "train_results.json").read_text(
        encoding="utf-8"))
    assert results["epoch"] > 0
    assert "Resuming training" not in again.stderr + again.stdout


def test_another_parameter_set_trains_in_its_own_folder(
        lf_venv: Path, lf_env: dict[str, str], lf_inputs: Path, tmp_path: Path) -> None:
    """LoRA leftovers break a later full run after training (AttributeError, exit 1); the
    dialect's sibling folder for the new parameter set does not meet them."""
    user_yaml = (SFT_YAML.format(inputs=lf_inputs)
                 .replace("finetuning_type: full", "finetuning_type: lora")
                 .replace("per_device_train_batch_size: 4", "per_device_train_batch_size: 1")
                 .replace("cutoff_len: 1024 ", "cutoff_len: 256  "))
    (tmp_path / "lora.yaml").write_text(user_yaml, encoding="utf-8")
    cli = _cli(lf_venv)
    first = subprocess.run([cli, "train", "lora.yaml"], cwd=tmp_path, env=lf_env,  # noqa: S603
                           capture_output=True, text=True, check=False, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "saves" / "tiny-full" / "adapter_config.json").is_file()

    naive = subprocess.run([cli, "train", "lora.yaml", "finetuning_type=full",  # noqa: S603
                            "overwrite_output_dir=true"], cwd=tmp_path, env=lf_env,
                           capture_output=True, text=True, check=False, timeout=300)
    assert naive.returncode == 1
    assert "AttributeError" in naive.stderr

    command = Command(argv=(cli, "train", "lora.yaml"), cwd=str(tmp_path))
    dialect = detect(command)
    full = dataclasses.replace(dialect.read(command), finetuning_type=FinetuningType.FULL)
    rendered = dialect.render(command, full, tmp_path / "attempt")
    assert rendered.argv == (cli, "train", "lora.yaml", "finetuning_type=full",
                             "overwrite_output_dir=true", "output_dir=saves/tiny-full-full")
    fresh = subprocess.run(rendered.argv, cwd=tmp_path, env=lf_env, capture_output=True,  # noqa: S603
                           text=True, check=False, timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert (tmp_path / "saves" / "tiny-full-full" / "model.safetensors").is_file()
