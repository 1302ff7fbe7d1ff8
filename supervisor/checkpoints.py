"""Checkpoints an attempt wrote, judged by what changed in its output folder, and which one the
next config may continue from.

Before each attempt the `checkpoint-N` folders (Hugging Face Trainer layout) and their
`trainer_state.json` times are listed; after it, only the folders that are new or whose state
changed are credited to it. A timestamp window would credit a checkpoint the previous attempt
wrote in its last second to the next one, with the wrong settings.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from supervisor.events import Checkpoint
from supervisor.knobs import Knobs
from supervisor.trainer_output import CHECKPOINT_NAME

Listing = Mapping[str, int]
"""checkpoint folder path -> its trainer_state.json mtime in ns."""


def folder(output_dir: str | None, cwd: str | None) -> Path | None:
    """Where the trainer writes its checkpoints (relative to the command's directory)."""
    if not output_dir:
        return None
    base = Path(output_dir)
    if not base.is_absolute() and cwd:
        base = Path(cwd) / base
    return base


def listing(output_dir: str | None, cwd: str | None) -> dict[str, int]:
    """Every `checkpoint-N` folder holding a trainer_state.json, with that file's mtime."""
    base = folder(output_dir, cwd)
    if base is None:
        return {}
    found: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for entry in base.iterdir():
            if not CHECKPOINT_NAME.match(entry.name):
                continue
            with contextlib.suppress(OSError):
                found[str(entry)] = (entry / "trainer_state.json").stat().st_mtime_ns
    return found


def written(before: Listing, after: Listing) -> list[tuple[str, int]]:
    """(path, step) of checkpoints that are new, or whose state changed, between the listings."""
    out = []
    for path, mtime in after.items():
        if before.get(path) != mtime:
            match = CHECKPOINT_NAME.match(Path(path).name)
            if match:
                out.append((path, int(match.group(1))))
    return sorted(out, key=lambda c: c[1])


def incompatible(before: Knobs, after: Knobs) -> str | None:
    """Why a checkpoint of `before` cannot start `after`, or None when it can."""
    if before.finetuning_type != after.finetuning_type:
        return (f"the parameter set changes ({before.finetuning_type} -> "
                f"{after.finetuning_type}): starting fresh")
    if (before.lora_rank, before.freeze_trainable_layers, before.quantization_bit) != (
            after.lora_rank, after.freeze_trainable_layers, after.quantization_bit):
        return ("the trainable parameters change (rank, frozen layers or quantisation): "
                "starting fresh")
    if before.effective_batch != after.effective_batch:
        return (f"the effective batch changes ({before.effective_batch} -> "
                f"{after.effective_batch}): the optimizer state and data position would not match")
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class Choice:
    """The checkpoint the next attempt continues from (None: fresh), and why not, if not."""

    checkpoint: Checkpoint | None
    passed_over: Checkpoint | None = None
    reason: str | None = None


def choose(checkpoints: Sequence[Checkpoint], new: Knobs) -> Choice:
    """The newest checkpoint still on disk whose producer's config `new` can load."""
    alive = sorted((c for c in checkpoints if (Path(c.path) / "trainer_state.json").is_file()),
                   key=lambda c: (c.step, c.attempt))
    if not alive:
        return Choice(checkpoint=None)
    compatible = [c for c in alive if incompatible(c.knobs, new) is None]
    if compatible:
        return Choice(checkpoint=compatible[-1])
    return Choice(checkpoint=None, passed_over=alive[-1],
                  reason=incompatible(alive[-1].knobs, new))
