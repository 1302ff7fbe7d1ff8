"""Remembered fits at the edge of a run: look one up before it starts, store it when it fits.

The store itself (SQLite, WAL) is supervisor.fits; this module decides the key of a run from
what decides memory (the model's config, the device, the dialect, the command's own start
config, the policy's content) and never lets the store change a run's outcome: a store that
cannot be read or written is one warning line, and the run goes on without it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import resource
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
import structlog

from supervisor.fits import FitStore, FitStoreError, fit_key
from supervisor.fits import default_path as default_fits_path
from supervisor.knobs import Knobs

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Remembered:
    """The key of this run in the store, and the fit remembered under it (if any)."""

    key: str
    knobs: Knobs | None = None
    run_id: str | None = None


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


def key_of(*, start: Knobs, model_config: dict[str, object] | None, dialect: str,  # noqa: PLR0913
           policy_text: str, device_name: str | None, device_mib: float | None) -> str:
    """The run's key: what decides whether a config fits, nothing else."""
    plain = {k: v for k, v in start.to_dict().items() if k != "resume_from_checkpoint"}
    return fit_key(model_config=model_config, model=start.model, device_name=device_name,
                   device_total_mib=device_mib, dialect=dialect, start_knobs=plain,
                   policy=hashlib.sha256(policy_text.encode("utf-8")).hexdigest())


def lookup(db: Path | None, key: str, start: Knobs, *, fresh: bool) -> Remembered:
    """The remembered fit for `key`, unless `fresh` (or the store cannot be read)."""
    if fresh:
        return Remembered(key=key)
    try:
        with FitStore.open(db or default_fits_path()) as store:
            fit = store.lookup(key)
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
    # Same model, card, command and policy: only the memory knobs come from the store; where
    # the run writes and what it resumes from stay the command's own.
    knobs = dataclasses.replace(knobs, output_dir=start.output_dir,
                                resume_from_checkpoint=start.resume_from_checkpoint,
                                model=start.model, world_size=start.world_size)
    if knobs == start:
        return Remembered(key=key)
    return Remembered(key=key, knobs=knobs, run_id=fit.run_id)


def store(db: Path | None, key: str, *, final: Knobs, run_id: str, attempts: int,  # noqa: PLR0913
          about: Mapping[str, str] | None = None) -> None:
    """Remember the working config under `key` (a failure is a warning, never an error).

    `about`: what `fits list` shows of the run (model, program, cwd, run_dir), kept beside.
    """
    try:
        with FitStore.open(db or default_fits_path()) as fits:
            fits.remember(key, knobs=final.to_dict(), run_id=run_id,
                          summary={**dict(about or {}), "attempts": attempts,
                                   "effective_batch": final.effective_batch})
    except FitStoreError as exc:
        log.warning("fits.not_stored", reason=str(exc))
