"""The fit is remembered for the job, not the command line: paths, step counts, seeds and
logging do not decide memory, so they never change the key; what decides memory does."""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from pathlib import Path
from typing import Any

import pytest

from supervisor import remember
from supervisor.command import Command
from supervisor.dialects import detect
from supervisor.fits import FitStore, fit_key
from supervisor.knobs import FinetuningType, Knobs

CONFIG = {"model_type": "llama", "hidden_size": 256, "num_hidden_layers": 4}
TRAINER = (sys.executable, "-m", "supervisor.reference_trainer", "--model_name_or_path", "tiny",
           "--per_device_train_batch_size", "8", "--cutoff_len", "512")


def _start(*extra: str) -> tuple[tuple[str, ...], Knobs]:
    argv = (*TRAINER, *extra)
    command = Command(argv=argv, cwd=None)
    return argv, detect(command).read(command)


def _keys(start: Knobs, device_mib: float = 150.0) -> tuple[str, str]:
    return remember.keys_of(start=start, model_config=CONFIG, dialect="hf-args",
                            policy_text="[[rung]]", device_name="simulated",
                            device_mib=device_mib)


def _key(start: Knobs, device_mib: float = 150.0) -> str:
    return _keys(start, device_mib)[0]


def test_the_same_job_with_another_output_folder_and_step_count_finds_the_fit(
        tmp_path: Path) -> None:
    """Remembered under one command, found from another that differs in output folder, step
    count, seed and logging cadence; the fit's memory knobs come back with this command's own
    folder and steps, and the differences are said, flag by flag."""
    db = tmp_path / "fits.sqlite3"
    first_argv, first = _start("--output_dir", "out-a", "--max_steps", "100", "--seed", "1")
    again_argv, again = _start("--output_dir", "out-b", "--max_steps", "200", "--seed", "2",
                               "--logging_steps", "5")
    assert first.output_dir != again.output_dir
    assert first.max_steps != again.max_steps
    key = _key(first)
    assert _key(again) == key
    fitted = dataclasses.replace(first, per_device_batch=2, grad_accum=4,
                                 gradient_checkpointing=True)
    remember.store(db, key, final=fitted, run_id="run-a", attempts=5, argv=first_argv)

    found = remember.lookup(db, _key(again), again, fresh=False, argv=again_argv)

    assert found.knobs == dataclasses.replace(fitted, output_dir="out-b", max_steps=200)
    assert found.run_id == "run-a"
    assert found.ignored == ("--output_dir out-a -> out-b", "--max_steps 100 -> 200",
                             "--seed 1 -> 2", "--logging_steps 5 (not in that run's command)")
    assert remember.lookup(db, _key(again), again, fresh=True).knobs is None


@pytest.mark.parametrize("change", [
    {"cutoff_len": 1024},
    {"per_device_batch": 16},  # another effective batch
    {"world_size": 2},
    {"precision": "bf16-base-mixed"},
    {"quantization_bit": 4},
    {"finetuning_type": FinetuningType.LORA},
    {"lora_rank": 16},
    {"freeze_trainable_layers": 4},
    {"gradient_checkpointing": True},
    {"optimizer": "adamw_bnb_8bit"},
    {"deepspeed_stage": 2},
])
def test_what_decides_memory_changes_the_key(change: dict[str, Any]) -> None:
    """Each memory knob of the start config is in the key."""
    _, start = _start()
    assert _key(dataclasses.replace(start, **change)) != _key(start)


def test_what_does_not_decide_memory_leaves_the_key() -> None:
    """Paths, steps, checkpoints to resume, the model's name (its config is keyed) and how
    the effective batch is split are not the job's memory."""
    _, start = _start()
    same = [dataclasses.replace(start, output_dir="elsewhere"),
            dataclasses.replace(start, max_steps=7),
            dataclasses.replace(start, resume_from_checkpoint="out/checkpoint-4"),
            dataclasses.replace(start, model="/another/copy/of/tiny"),
            dataclasses.replace(start, per_device_batch=4, grad_accum=2)]
    assert {_key(knobs) for knobs in same} == {_key(start)}
    assert _key(start, device_mib=200.0) != _key(start)


def test_a_fit_kept_under_an_older_key_is_still_found(tmp_path: Path) -> None:
    """Keys made before (the whole start config) stay readable: the lookup falls back to it."""
    db = tmp_path / "fits.sqlite3"
    argv, start = _start("--output_dir", "out-a")
    new, old = _keys(start)
    assert old != new
    fitted = dataclasses.replace(start, per_device_batch=1, grad_accum=8)
    with FitStore.open(db) as store:
        store.remember(old, knobs=fitted.to_dict(), run_id="old-run", summary={"attempts": 4})

    found = remember.lookup(db, new, start, fresh=False, legacy_key=old, argv=argv)

    assert found.knobs == fitted
    assert found.run_id == "old-run"
    assert found.ignored == ()  # an old fit kept no command to compare with


def test_a_narrow_lora_target_list_is_in_the_key_and_every_linear_layer_is_not() -> None:
    """The command's own LoRA targets decide memory where they narrow it (`q_proj,v_proj`,
    in any order); `all`, said or not, keys as keys did before the list was read, so fits
    kept by older runs stay found."""
    _, start = _start("--finetuning_type", "lora")
    _, narrow = _start("--finetuning_type", "lora", "--lora_target", "q_proj,v_proj")
    _, swapped = _start("--finetuning_type", "lora", "--lora_target", "v_proj,q_proj")
    _, every = _start("--finetuning_type", "lora", "--lora_target", "all")
    assert narrow.lora_target == "q_proj,v_proj"
    assert every.lora_target is None
    assert _key(narrow) != _key(start)
    assert _key(swapped) == _key(narrow)
    assert _key(every) == _key(start)
    # The key of a command that names no narrower list is the one made before it was read.
    data = start.to_dict()
    before = fit_key(
        model_config=CONFIG, model=start.model, device_name="simulated",
        device_total_mib=150.0, dialect="hf-args",
        start_knobs={**{k: data[k] for k in remember.MEMORY_KNOBS},
                     "effective_batch": start.effective_batch},
        policy=hashlib.sha256(b"[[rung]]").hexdigest())
    assert _key(start) == before
    assert "lora_target" not in remember.MEMORY_KNOBS
