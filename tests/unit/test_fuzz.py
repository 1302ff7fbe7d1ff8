"""Hypothesis: any policy file and any command line gives a result or one clear error line."""

# Asserting on the caught error is the point: only that one type may come out, in one line.
# ruff: noqa: PT017

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor._compat import tomllib
from supervisor.command import Command, CommandError
from supervisor.dialects.argv import ArgvDialect
from supervisor.policy import PolicyError, load, parse

KEYS = ["name", "action", "knob", "floor", "compensate", "value", "with", "restore", "cost",
        "max_attempts", "transient", "watchdog", "gpu", "rung", "retries", "halve", "enable",
        "set", "per_device_batch", "cutoff_len", "finetuning_type", "gradient_checkpointing",
        "lora_rank", "stall_timeout_s", "bogus"]
scalars = st.one_of(st.booleans(), st.integers(-5, 5000), st.floats(allow_nan=False),
                    st.sampled_from(KEYS), st.text(max_size=8))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS), inner, max_size=5)),
    max_leaves=20)
tables = st.dictionaries(st.sampled_from(KEYS), values, max_size=6)
rung_tables = st.fixed_dictionaries({"rung": st.lists(tables, min_size=1, max_size=4)})


@settings(max_examples=300, deadline=None)
@given(st.one_of(tables, rung_tables))
def test_any_policy_table_parses_or_raises_policy_error(data: dict[str, Any]) -> None:
    """No policy table, however wrong, escapes as anything but a one-line PolicyError."""
    try:
        ladder = parse(data, source="fuzz.toml")
    except PolicyError as exc:
        assert "\n" not in str(exc)
        assert str(exc).startswith("fuzz.toml")
    else:
        assert ladder.rungs


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=string.printable, max_size=200))
def test_any_policy_text_loads_or_raises_policy_error(tmp_path_factory: Any, text: str) -> None:  # noqa: ANN401
    """Arbitrary bytes in a policy file: a Ladder or a PolicyError, never a traceback."""
    path = Path(tmp_path_factory.mktemp("p")) / "p.toml"
    path.write_text(text, encoding="utf-8")
    try:
        load(path)
    except PolicyError as exc:
        assert "\n" not in str(exc)
    except tomllib.TOMLDecodeError as exc:  # pragma: no cover - would be a bug
        raise AssertionError(exc) from exc


WORDS = ["python", "python3", "-m", "torchrun", "accelerate", "launch", "env", "A=1", "prlimit",
         "--as=100", "srun", "-N2", "deepspeed", "--num_gpus", "2", "train.py", "--",
         "--per_device_train_batch_size", "--per_device_train_batch_size=4", "8", "x",
         "--gradient_accumulation_steps", "--gradient_checkpointing", "true", "False",
         "--cutoff_len", "--finetuning_type", "lora", "qlora", "--no_gradient_checkpointing",
         "--disable_gradient_checkpointing", "src/train_bash.py", "--nproc_per_node", "gpu",
         "--max_steps", "-1", "taskset", "-c", "nice", "-n", "10", "supervisor.reference_trainer",
         "--output_dir", "=", "--lora_rank", "3:4"]


@settings(max_examples=500, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(WORDS), st.text(max_size=6)), max_size=14))
def test_any_command_line_reads_or_raises_command_error(words: list[str]) -> None:
    """Any argv: Knobs that round-trip byte for byte, or one clear CommandError line."""
    command = Command(argv=tuple(words))
    dialect = ArgvDialect(probe=None)  # reading only: never run a made-up program's --help
    try:
        knobs = dialect.read(command)
    except CommandError as exc:
        assert "\n" not in str(exc)
        return
    assert dialect.render(command, knobs, Path()).argv == command.argv
