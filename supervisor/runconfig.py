"""A new run's frozen config: everything it depends on, secrets by name, built in one place.

`build_config` is the only place a `RunConfig` is made; `resume` never builds one, it replays
the journaled one (supervisor.events), so the two cannot disagree.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from supervisor.command import Command, locate_command
from supervisor.dialects import Dialect
from supervisor.events import RunConfig
from supervisor.knobs import Knobs, Reading
from supervisor.policy import Ladder
from supervisor.program import recorded_help
from supervisor.secrets import Redactor, is_secret_name

MARKER_ENV = "OOM_SUPERVISOR_ATTEMPT"
"""The attempt marker (supervisor.runner sets it); never part of a run's kept environment."""


class MemorySetup(Protocol):
    """What the config records of the loop's memory edges."""

    @property
    def device_mib(self) -> float | None:
        """The device's size in MiB (None: unknown)."""

    @property
    def margin(self) -> float:
        """The prediction margin."""

    @property
    def predicted_s(self) -> float | None:
        """Seconds the predictions took before the run."""

    @property
    def gpu(self) -> object:
        """The GPU probe (its `unavailable` note is recorded)."""

    @property
    def predictor(self) -> object:
        """The predictor, if any."""


# Variables that shape a training run and that resume restores as the run saw them (never a
# secret: secret-named ones are checked for by name instead).
_KEPT_ENV_PREFIXES = ("CUDA_", "NVIDIA_", "HIP_", "ROCR_", "PYTORCH_", "TORCH_", "NCCL_", "HF_",
                      "TRANSFORMERS_", "ACCELERATE_", "DS_", "OMP_", "MKL_", "TOKENIZERS_",
                      "WANDB_", "MASTER_", "WORLD_", "LOCAL_", "PYTHONPATH", "VIRTUAL_ENV",
                      "SLURM_", "OOM_SUPERVISOR_")


def kept_environment(env: Mapping[str, str]) -> dict[str, str]:
    """The part of the environment a resumed run must see again (no secret-named variables)."""
    return {k: v for k, v in env.items()
            if k.startswith(_KEPT_ENV_PREFIXES) and not is_secret_name(k)
            and k != MARKER_ENV}


def build_config(  # noqa: PLR0913 - one value per field of the config
    command: Command, *, run_id: str, dialect: Dialect, ladder: Ladder, start: Knobs,
    max_attempts: int | None, memory: MemorySetup, env: Mapping[str, str],
    device_source: str | None = None, inject_device_memory: bool = False,
    sources: Mapping[str, str] | None = None, fits_key: str | None = None,
    remembered: Knobs | None = None, remembered_from: str | None = None,
    fits_db: str | None = None, reading: Reading | None = None,
    remembered_ignored: str | None = None,
) -> RunConfig:
    """The frozen config of a new run, secrets replaced by placeholders, env by what matters."""
    redactor = Redactor.for_run(command.argv, env, cwd=command.cwd)
    policy_text = ""
    if ladder.source and Path(ladder.source).is_file():
        policy_text = Path(ladder.source).read_text(encoding="utf-8")
    placeholders = {m for word in redactor.argv(command.argv)
                    for m in _placeholders(word)}
    env_secrets = {k for k, v in env.items() if is_secret_name(k) and len(v) >= 4}  # noqa: PLR2004
    return RunConfig(
        run_id=run_id, argv=tuple(redactor.argv(command.argv)), cwd=command.cwd,
        dialect=dialect.name, dialect_description=dialect.describe(command),
        # The dialect says so in its description (packing in LLaMA-Factory, axolotl's default).
        cutoff_drops_rows="DROPS" in dialect.describe(command),
        knobs_file=str(getattr(dialect, "source", None)) if dialect.name == "knobmap" else None,
        policy_name=ladder.name, policy_source=ladder.source, policy_text=policy_text,
        keep_quality=ladder.keep_quality,
        start=start, start_sources=dict(sources or {}),
        world_size_known=locate_command(command).world_size_known,
        max_attempts=max_attempts or ladder.max_attempts,
        device_mib=memory.device_mib, device_source=device_source,
        inject_device_memory=inject_device_memory, estimate=memory.predictor is not None,
        estimate_margin=memory.margin, estimate_s=memory.predicted_s,
        gpu_note=getattr(memory.gpu, "unavailable", None) if memory.gpu is not None else None,
        env_added=kept_environment(env), secret_names=tuple(sorted(placeholders | env_secrets)),
        fits_key=fits_key, remembered=remembered, remembered_from=remembered_from,
        fits_db=fits_db, remembered_ignored=remembered_ignored,
        rewritable=tuple(sorted(reading.rewritable)) if reading is not None else None,
        refused=tuple(sorted(reading.refused)) if reading is not None else (),
        refused_why=dict(reading.refused_why) if reading is not None else {},
        program_help=reading.program if reading is not None else None,
        program_help_text=recorded_help(command),
    )


def _placeholders(word: str) -> set[str]:
    return set(re.findall(r"<redacted:([A-Za-z_][A-Za-z0-9_]*)>", word))
