"""Asking the real program: its `--help` is read, cached, and believed over its file name.

The scenario of issue 9: a Hugging Face script named `train_bash.py` (tests/data/programs/hf/)
with checkpointing off by default, on the tiny Llama under a simulated device. Read by name it
was LLaMA-Factory legacy (checkpointing "on"), so the ladder never tried checkpointing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.command import Command
from supervisor.device_memory import device_memory_env
from supervisor.dialects import detect
from supervisor.journal import read
from supervisor.loop import ExitCode, supervise
from supervisor.policy import resolve
from supervisor.program import cache_path, parse_help, run_help

pytestmark = pytest.mark.process

DATA = Path(__file__).resolve().parents[1] / "data"
HF_BASH = DATA / "programs" / "hf" / "train_bash.py"
RECORDED = {
    "hf_train_bash": (str(HF_BASH),),
    "argparse_train": (str(DATA / "programs" / "argparse_train.py"),),
    "hf_default_on": (str(DATA / "programs" / "hf_default_on.py"),),
    "hf_trainingargs": (str(DATA / "programs" / "hf_trainingargs.py"),),
    "hf_activation_only": (str(DATA / "programs" / "hf_activation_only.py"),),
    "trl_style": (str(DATA / "programs" / "trl_style.py"),),
    "reference_trainer": ("-m", "supervisor.reference_trainer"),
}


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test caches help texts under its own folder, never the user's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_recorded_help_is_what_the_program_prints(name: str) -> None:
    """tests/data/help/*.txt are the programs' real output (re-record when one changes)."""
    env = {**os.environ, "COLUMNS": "200"}
    done = subprocess.run([sys.executable, *RECORDED[name], "--help"], capture_output=True,  # noqa: S603
                          text=True, env=env, check=True, timeout=120)
    recorded = (DATA / "help" / f"{name}.txt").read_text(encoding="utf-8")
    assert parse_help(done.stdout) == parse_help(recorded)


def test_help_is_asked_once_per_script_version(tmp_path: Path) -> None:
    """The help text is cached by path and mtime: an edited script is asked again."""
    script = tmp_path / "train.py"
    script.write_text("import argparse\np = argparse.ArgumentParser()\n"
                      "p.add_argument('--per_device_train_batch_size', type=int)\n"
                      "p.parse_args()\n", encoding="utf-8")
    command = Command(argv=(sys.executable, "train.py"), cwd=str(tmp_path))
    first = run_help(command)
    assert first is not None
    assert "--per_device_train_batch_size" in first
    cached = json.loads(cache_path().read_text(encoding="utf-8"))
    assert list(cached["help"].values()) == [first]
    script.write_text(script.read_text(encoding="utf-8").replace(
        "p.parse_args()", "p.add_argument('--gradient_checkpointing', action='store_true')\n"
        "p.parse_args()"), encoding="utf-8")
    os.utime(script, ns=(script.stat().st_atime_ns, script.stat().st_mtime_ns + 10**9))
    second = run_help(command)
    assert second is not None
    assert "--gradient_checkpointing" in second


def test_help_is_asked_again_under_another_pythonpath(tmp_path: Path) -> None:
    """One script, two PYTHONPATHs importing different argument sets: two help texts."""
    script = tmp_path / "train.py"
    script.write_text("import argparse, extra\np = argparse.ArgumentParser()\n"
                      "extra.add(p)\np.parse_args()\n", encoding="utf-8")
    for name, flag in (("a", "--per_device_train_batch_size"), ("b", "--gradient_checkpointing")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "extra.py").write_text(
            f"def add(p):\n    p.add_argument('{flag}', type=int)\n", encoding="utf-8")
    texts = []
    for name in ("a", "b"):
        command = Command(argv=("env", f"PYTHONPATH={tmp_path / name}", sys.executable,
                                "train.py"), cwd=str(tmp_path))
        text = run_help(command)
        assert text is not None
        texts.append(text)
    assert "--per_device_train_batch_size" in texts[0]
    assert "--gradient_checkpointing" not in texts[0]
    assert "--gradient_checkpointing" in texts[1]
    assert len(json.loads(cache_path().read_text(encoding="utf-8"))["help"]) == 2


def test_a_program_that_fails_its_help_is_read_by_name(tmp_path: Path) -> None:
    """A script that crashes on --help gives no help text (and nothing is cached)."""
    (tmp_path / "train_bash.py").write_text("raise SystemExit(3)\n", encoding="utf-8")
    command = Command(argv=(sys.executable, "train_bash.py", "--per_device_train_batch_size",
                            "4"), cwd=str(tmp_path))
    assert run_help(command) is None
    assert not cache_path().exists()
    assert detect(command).read(command).gradient_checkpointing is True  # LLaMA-Factory's


def test_hf_train_bash_gets_the_checkpointing_rung(
        tmp_path: Path, trainer_env: dict[str, str]) -> None:
    """Issue 9's scenario, 100 MiB: read from its --help, checkpointing is tried and fits at
    cutoff 512 with full fine-tuning, where the name-read ladder cut the cutoff instead."""
    command = Command(argv=(sys.executable, str(HF_BASH), "--per_device_train_batch_size", "8",
                            "--max_seq_length", "512", "--max_steps", "1",
                            "--output_dir", str(tmp_path / "out")), cwd=str(tmp_path))
    dialect = detect(command)
    reading = dialect.read_sourced(command)
    assert (reading.knobs.gradient_checkpointing, str(reading.source("gradient_checkpointing")),
            reading.can_set("gradient_checkpointing")) == (False, "program", True)
    # Measured: b1 x GA8 x 512, full, peaks at 107.4 MiB without checkpointing, 89.0 with.
    env = device_memory_env(trainer_env, 100)
    result = supervise(command, dialect=dialect, ladder=resolve("default"),
                       run_dir=tmp_path / "run", echo=False, env=env)
    assert result.exit_code is ExitCode.FITTED
    assert result.final_knobs is not None
    final = result.final_knobs
    assert (final.gradient_checkpointing, str(final.finetuning_type), final.cutoff_len,
            final.effective_batch) == (True, "full", 512, 8)
    started = [e for e in read(tmp_path / "run" / "journal.jsonl").records
               if e["event"] == "attempt.started"]
    assert any("--gradient_checkpointing" in e["argv"] for e in started)
    assert not any("--finetuning_type" in e["argv"] for e in started)
