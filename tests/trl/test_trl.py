"""The real `trl sft` under the supervisor, on CPU under a host-memory cap.

Measured here (trl 1.16.0, torch 2.13.0 CPU, OMP_NUM_THREADS=1, the fixtures' tiny Llama, full
fine-tuning, max_length 1024, no checkpointing, fp32), peak address space (VmPeak) of the
training process that `trl sft` starts through accelerate: batch 4: 4790 MiB, batch 2 x GA 2:
3577 MiB, batch 1 x GA 4: 2963 MiB (the `trl` launcher itself: 717 MiB). Under a 4200 MiB
RLIMIT_AS (`prlimit --as`, inherited by the worker) batch 4 fails in the CPU allocator and
batch 2 x GA 2 fits with ~600 MiB to spare; each run takes ~80 s on 2 cores.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from supervisor.command import Command
from supervisor.dialects import detect
from supervisor.journal import read
from supervisor.knobs import FinetuningType
from supervisor.loop import ExitCode, RunResult, supervise
from supervisor.policy import resolve
from supervisor.runner import StopRequest
from tests.faults.conftest import wait_for

# One xdist worker builds and uses the tier's venv (make test runs pytest -n 2).
pytestmark = [pytest.mark.trl, pytest.mark.xdist_group("trl")]

CAP_MIB = 4200


def _sft(trl_venv: Path, inputs: Path, *flags: str) -> tuple[str, ...]:
    return (str(trl_venv / "bin" / "trl"), "sft", "--model_name_or_path", str(inputs / "model"),
            "--dataset_name", str(inputs / "text"), "--output_dir", "out", "--max_steps", "1",
            "--report_to", "none", "--save_strategy", "no", "--bf16", "false",
            "--dataloader_num_workers", "0", *flags)


def test_supervisor_fits_real_trl_sft(trl_venv: Path, trl_env: dict[str, str],
                                      trl_inputs: Path, tmp_path: Path) -> None:
    """batch 4 OOMs for real; batch 2 x GA 2 fits; read and rendered in TRL's own flags."""
    prlimit = shutil.which("prlimit")
    assert prlimit is not None, "prlimit (util-linux) caps the host memory of the run"
    command = Command(argv=(prlimit, f"--as={CAP_MIB * 2**20}",
                            *_sft(trl_venv, trl_inputs, "--per_device_train_batch_size", "4",
                                  "--max_length", "1024", "--gradient_checkpointing", "false")),
                      cwd=str(tmp_path))
    dialect = detect(command)
    assert dialect.name == "trl"
    reading = dialect.read_sourced(command)
    assert (reading.knobs.per_device_batch, reading.knobs.cutoff_len,
            reading.knobs.gradient_checkpointing, reading.knobs.precision) == (4, 1024, False,
                                                                              "fp32")
    result = supervise(command, dialect=dialect, ladder=resolve("default"),
                       run_dir=tmp_path / "run", echo=False, env=trl_env)
    assert result.exit_code is ExitCode.FITTED
    events = read(tmp_path / "run" / "journal.jsonl").records
    finished = [e for e in events if e["event"] == "attempt.finished"]
    assert finished[0]["verdict"] == "oom"
    assert finished[-1]["verdict"] == "fits"
    assert result.final_knobs is not None
    assert (result.final_knobs.per_device_batch, result.final_knobs.grad_accum) == (2, 2)
    # The morning after, under prlimit (no device figure): each attempt's host memory, and the
    # fitting attempt's throughput as TRL's Trainer measured it.
    report = (tmp_path / "run" / "report.md").read_text()
    assert report.count("host memory peak") >= len(finished)
    assert "## Measured speed" in report
    assert finished[-1]["cost"]["samples_per_s"] > 0
    assert finished[-1]["host_peak_mib"] > 100


def test_lora_rung_renders_flags_real_trl_accepts(trl_venv: Path, trl_env: dict[str, str],
                                                  trl_inputs: Path, tmp_path: Path) -> None:
    """The LoRA rung adds `--use_peft --lora_r 8`, and the real `trl sft` trains with them."""
    command = Command(argv=_sft(trl_venv, trl_inputs, "--per_device_train_batch_size", "1",
                                "--max_length", "128"), cwd=str(tmp_path))
    dialect = detect(command)
    knobs = dataclasses.replace(dialect.read(command), finetuning_type=FinetuningType.LORA,
                                lora_rank=4)
    rendered = dialect.render(command, knobs, tmp_path / "attempt")
    assert rendered.argv[-3:] == ("--use_peft", "--lora_r", "4")
    done = subprocess.run(rendered.argv, cwd=tmp_path, env=trl_env, capture_output=True,  # noqa: S603
                          text=True, check=False, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert dialect.read(rendered).finetuning_type is FinetuningType.LORA


def test_qlora_rung_renders_load_in_4bit_that_real_trl_takes(
        trl_venv: Path, trl_env: dict[str, str], trl_inputs: Path, tmp_path: Path) -> None:
    """QLoRA on `trl sft` is `--load_in_4bit`: real TRL parses it and asks for bitsandbytes.

    This venv has no bitsandbytes, so the supervisor's reading refuses 4-bit here (the rung is
    skipped with that reason); the rendered command, run anyway, fails on the missing package,
    never on an argument TRL does not know.
    """
    command = Command(argv=_sft(trl_venv, trl_inputs, "--per_device_train_batch_size", "1",
                                "--max_length", "128", "--use_peft", "--lora_r", "4"),
                      cwd=str(tmp_path))
    dialect = detect(command)
    reading = dialect.read_sourced(command)
    assert "quantization_bit" in reading.rewritable
    assert not reading.can_set("quantization_bit", 4)  # bitsandbytes is not importable here
    assert ("quantization_bit", "4") in reading.refused
    knobs = dataclasses.replace(reading.knobs, quantization_bit=4)
    rendered = dialect.render(command, knobs, tmp_path / "attempt")
    assert rendered.argv[-1] == "--load_in_4bit"
    assert dialect.read(rendered).quantization_bit == 4
    done = subprocess.run(rendered.argv, cwd=tmp_path, env=trl_env, capture_output=True,  # noqa: S603
                          text=True, check=False, timeout=600)
    assert done.returncode != 0
    assert "bitsandbytes" in done.stderr
    assert "unrecognized arguments" not in done.stderr


def test_a_stop_saves_a_rescue_checkpoint_in_real_trl(
        trl_venv: Path, trl_env: dict[str, str], trl_inputs: Path, tmp_path: Path) -> None:
    """A stop asked of the supervisor while the real `trl sft` trains (in the process it starts
    through accelerate): the injected hook has the SFTTrainer save at its next step end and
    stop, the rescue is journaled with its seconds, and the folder is a whole checkpoint of
    that step, credited to the attempt."""
    argv = (str(trl_venv / "bin" / "trl"), "sft", "--model_name_or_path",
            str(trl_inputs / "model"), "--dataset_name", str(trl_inputs / "text"),
            "--output_dir", "out", "--max_steps", "400", "--report_to", "none",
            "--save_strategy", "steps", "--save_steps", "200", "--bf16", "false",
            "--dataloader_num_workers", "0", "--per_device_train_batch_size", "1",
            "--max_length", "128", "--logging_steps", "1")
    command = Command(argv=argv, cwd=str(tmp_path))
    stop = StopRequest()
    done: list[RunResult] = []
    worker = threading.Thread(target=lambda: done.append(supervise(
        command, dialect=detect(command), ladder=resolve("default"), run_dir=tmp_path / "run",
        echo=False, env=trl_env, stop=stop)))
    worker.start()
    log = tmp_path / "run" / "attempts" / "01" / "stderr.log"

    def training() -> bool:
        text = log.read_text(errors="replace") if log.exists() else ""
        return '"armed"' in text and "| 5/400 [" in text
    try:
        wait_for(training, timeout_s=600)
    finally:
        stop.request()
        worker.join(timeout=600)
    assert done
    assert done[0].status == "interrupted"
    records = read(tmp_path / "run" / "journal.jsonl").records
    [rescued] = [e for e in records if e["event"] == "checkpoint.rescued"]
    assert rescued["why"] == "stop"
    assert rescued["seconds"] > 0
    step = rescued["step"]
    assert 5 <= step < 200
    folder = tmp_path / "out" / f"checkpoint-{step}"
    assert json.loads((folder / "trainer_state.json").read_text())["global_step"] == step
    assert (folder / "model.safetensors").is_file()
    assert (folder / "optimizer.pt").is_file()
    [finished] = [e for e in records if e["event"] == "attempt.finished"]
    assert [str(folder.resolve()), step] in [[str(Path(p).resolve()), s]
                                             for p, s in finished["checkpoints"]]
