"""Remembered fits at the edge of a run: look one up before it starts, store it when it fits.

The store itself (SQLite, WAL) is supervisor.fits; this module decides the key of a run from
what decides memory (the model's config, the device, the dialect, the memory knobs of the
command's own start config, the policy's content) and never lets the store change a run's
outcome: a store that cannot be read or written is one warning line, and the run goes on
without it.

The key is the job, not the command line: where the run writes, how many steps it takes, its
seed and its logging, saving, evaluation and hub flags never decide memory, so the same
training with another output folder or step count finds the fit (`memory_knobs`). A fit
remembered under the key of an older version (which held the whole start config) is still
found (`legacy_key_of`). Where the remembered run's command differs from this one, the
differences the key ignored are said (`ignored_differences`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import resource
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
import structlog

from supervisor._families import PEFT_DEFAULT, target_names
from supervisor.fits import FitStore, FitStoreError, fit_key
from supervisor.fits import default_path as default_fits_path
from supervisor.knobs import Knobs
from supervisor.secrets import Redactor

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Remembered:
    """The key of this run in the store, and the fit remembered under it (if any)."""

    key: str
    knobs: Knobs | None = None
    run_id: str | None = None
    ignored: tuple[str, ...] = ()
    """How the remembered run's command differed from this one where the key does not look
    (paths, step counts, seeds, logging...), in words: `--output_dir a -> b`."""


def host_limit(argv: Sequence[str]) -> str:
    """What bounds the command's host memory when no device size is known, for the key: a
    `prlimit --as` in its command line, the RLIMIT_AS it inherits, its cgroup's memory.max,
    else the machine's memory. A fit found under one cap is never reused under another."""
    parts: list[str] = []
    if any(Path(word).name == "prlimit" for word in argv):
        for i, word in enumerate(argv):
            if word.startswith("--as="):
                parts.append(f"prlimit-as={word.partition('=')[2]}")
            elif word == "--as" and i + 1 < len(argv):
                parts.append(f"prlimit-as={argv[i + 1]}")
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        parts.append(f"rlimit-as={soft}")
    with contextlib.suppress(OSError, ValueError, IndexError):
        relative = Path("/proc/self/cgroup").read_text().splitlines()[0].split(":", 2)[2]
        limit = (Path("/sys/fs/cgroup") / relative.lstrip("/") / "memory.max").read_text().strip()
        if limit and limit != "max":
            parts.append(f"cgroup-max={limit}")
    if not parts:
        parts.append(f"ram={round(psutil.virtual_memory().total / 2**30)}GiB")
    return "host " + " ".join(parts)


MEMORY_KNOBS = ("cutoff_len", "gradient_checkpointing", "finetuning_type", "lora_rank",
                "freeze_trainable_layers", "precision", "quantization_bit", "deepspeed_stage",
                "deepspeed_offload", "expandable_segments", "optimizer", "world_size")
"""The start config's knobs that decide memory, beside its effective batch: precision and
quantisation, the method with its rank and trainable layers, cutoff, checkpointing, the
optimizer, DeepSpeed's stage and offload, the world size. Never output_dir, max_steps,
resume_from_checkpoint or the model's name (its config is keyed instead). The LoRA target
list too, where the command names one narrower than every linear layer (`lora_target`)."""


def memory_knobs(start: Knobs) -> dict[str, object]:
    """What of the start config decides memory: the key's `start` part.

    The LoRA target list is in it only where the command narrows it (`q_proj,v_proj`, in
    sorted order: the same layers whatever the order): every linear layer, said or not, is
    what keys made before it was read assumed, so their fits stay found.
    """
    data = start.to_dict()
    part = {**{k: data[k] for k in MEMORY_KNOBS}, "effective_batch": start.effective_batch}
    names = target_names(start.lora_target)
    # (PEFT_DEFAULT is the program's own list where it names none: its dialect is keyed.)
    if names is not None and start.lora_target != PEFT_DEFAULT:
        part["lora_target"] = ",".join(sorted(names))
    return part


def key_of(*, start: Knobs, model_config: dict[str, object] | None, dialect: str,  # noqa: PLR0913
           policy_text: str, device_name: str | None, device_mib: float | None) -> str:
    """The run's key: what decides whether a config fits, nothing else."""
    return fit_key(model_config=model_config, model=start.model, device_name=device_name,
                   device_total_mib=device_mib, dialect=dialect, start_knobs=memory_knobs(start),
                   policy=hashlib.sha256(policy_text.encode("utf-8")).hexdigest())


def legacy_key_of(*, start: Knobs, model_config: dict[str, object] | None, dialect: str,  # noqa: PLR0913
                  policy_text: str, device_name: str | None, device_mib: float | None) -> str:
    """The key an older version gave the same run (its whole start config, paths and step
    counts included): its fits stay readable."""
    plain = {k: v for k, v in start.to_dict().items()
             if k not in ("resume_from_checkpoint", "lora_target")}  # (not a knob then)
    return fit_key(model_config=model_config, model=start.model, device_name=device_name,
                   device_total_mib=device_mib, dialect=dialect, start_knobs=plain,
                   policy=hashlib.sha256(policy_text.encode("utf-8")).hexdigest())


def keys_of(*, start: Knobs, model_config: dict[str, object] | None, dialect: str,  # noqa: PLR0913
            policy_text: str, device_name: str | None, device_mib: float | None,
            ) -> tuple[str, str]:
    """(key_of, legacy_key_of) of the same run: look up the first, then the second."""
    new = key_of(start=start, model_config=model_config, dialect=dialect,
                 policy_text=policy_text, device_name=device_name, device_mib=device_mib)
    old = legacy_key_of(start=start, model_config=model_config, dialect=dialect,
                        policy_text=policy_text, device_name=device_name, device_mib=device_mib)
    return new, old


def _flags(argv: Sequence[str]) -> dict[str, tuple[str, str]]:
    """`--flag value`, `--flag=value` and bare `--switch` words by flag (dashes and
    underscores alike), other words by place: name -> (as written, value)."""
    out: dict[str, tuple[str, str]] = {}
    words = list(argv)
    i = 0
    while i < len(words):
        word = words[i]
        if word.startswith("--") and len(word) > 2:  # noqa: PLR2004 - `--` alone ends options
            name, eq, value = word.partition("=")
            if not eq and i + 1 < len(words) and not words[i + 1].startswith("-"):
                value, i = words[i + 1], i + 1
            out[name.replace("-", "_")] = (name, value)
        else:
            out[f"word {i + 1}"] = (f"word {i + 1}", word)
        i += 1
    return out


def ignored_differences(remembered: Sequence[str], now: Sequence[str]) -> tuple[str, ...]:
    """How `now` differs from the remembered run's command, flag by flag, in words."""
    before, after = _flags(remembered), _flags(now)
    out = []
    for name in dict.fromkeys([*before, *after]):
        old, new = before.get(name), after.get(name)
        if old is not None and new is not None and old[1] == new[1]:
            continue
        if old is None and new is not None:
            out.append(f"{new[0]} {new[1]}".strip() + " (not in that run's command)")
        elif new is None and old is not None:
            out.append(f"{old[0]} {old[1]}".strip() + " (not in this command)")
        elif old is not None and new is not None:
            out.append(f"{new[0]} {old[1]} -> {new[1]}")
    return tuple(out)


def lookup(db: Path | None, key: str, start: Knobs, *, fresh: bool,  # noqa: PLR0913
           legacy_key: str | None = None, argv: Sequence[str] = ()) -> Remembered:
    """The remembered fit for `key` (else `legacy_key`), unless `fresh` (or the store cannot
    be read); `argv`, this command, is compared with the remembered run's."""
    if fresh:
        return Remembered(key=key)
    try:
        with FitStore.open(db or default_fits_path()) as store:
            fit = store.lookup(key)
            if fit is None and legacy_key is not None:
                fit = store.lookup(legacy_key)
    except FitStoreError as exc:
        log.warning("fits.unavailable", reason=str(exc))
        return Remembered(key=key)
    if fit is None:
        return Remembered(key=key)
    try:
        knobs = Knobs.from_dict(dict(fit.knobs))
    except (TypeError, ValueError):
        log.warning("fits.unreadable", key=key[:12], reason="the stored knobs do not parse")
        return Remembered(key=key)
    # Same job: only the memory knobs come from the store; where the run writes, what it
    # resumes from and how long it trains stay the command's own.
    knobs = dataclasses.replace(knobs, output_dir=start.output_dir,
                                resume_from_checkpoint=start.resume_from_checkpoint,
                                model=start.model, world_size=start.world_size,
                                max_steps=start.max_steps)
    if knobs == start:
        return Remembered(key=key)
    stored = fit.summary.get("argv")
    ignored: tuple[str, ...] = ()
    if isinstance(stored, list) and argv:
        ignored = ignored_differences([str(w) for w in stored], _redacted(argv))
    return Remembered(key=key, knobs=knobs, run_id=fit.run_id, ignored=ignored)


def _redacted(argv: Sequence[str], env: Mapping[str, str] | None = None) -> list[str]:
    """argv with its secrets replaced by placeholders (what the store may keep)."""
    return Redactor.for_run(argv, os.environ if env is None else env).argv(argv)


def store(db: Path | None, key: str, *, final: Knobs, run_id: str, attempts: int,  # noqa: PLR0913
          about: Mapping[str, str] | None = None, argv: Sequence[str] = ()) -> None:
    """Remember the working config under `key` (a failure is a warning, never an error).

    `about`: what `fits list` shows of the run (model, program, cwd, run_dir), kept beside.
    `argv`: the command (its secrets replaced), so a later run of the same job can say how its
    command differs.
    """
    summary: dict[str, object] = {**dict(about or {}), "attempts": attempts,
                                  "effective_batch": final.effective_batch}
    if argv:
        summary["argv"] = _redacted(argv)
    try:
        with FitStore.open(db or default_fits_path()) as fits:
            fits.remember(key, knobs=final.to_dict(), run_id=run_id, summary=summary)
    except FitStoreError as exc:
        log.warning("fits.not_stored", reason=str(exc))
