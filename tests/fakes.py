"""Test doubles for the edges: a scripted runner fed with output recorded from real runs."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from supervisor.classify import Outcome
from supervisor.runner import AttemptSpec

TAILS = Path(__file__).parent / "data" / "tails"


def recorded(name: str) -> tuple[str, ...]:
    """The lines of a tail recorded from a real run (see tests/data/tails/README.md)."""
    return tuple((TAILS / name).read_text(encoding="utf-8").splitlines())


def outcome_from(name: str, exit_code: int, *, duration_s: float = 1.0) -> Outcome:
    """An Outcome as the runner would report a recorded run."""
    return Outcome(exit_code=exit_code, duration_s=duration_s, tail=recorded(name))


OOM = ("device_budget_oom.txt", 1)
FITS = ("fits.txt", 0)
FATAL = ("bad_flag.txt", 2)


@dataclass
class ScriptedRunner:
    """Plays back outcomes in order (torchelastic's `monres` idea) and records each spec."""

    script: list[tuple[str, int]]
    specs: list[AttemptSpec] = field(default_factory=list)

    def __call__(self, spec: AttemptSpec) -> Outcome:
        """Return the next scripted outcome, writing its tail where the runner would."""
        self.specs.append(spec)
        if not self.script:
            msg = f"the script ran out after {len(self.specs) - 1} attempts"
            raise AssertionError(msg)
        name, code = self.script.pop(0)
        spec.log_dir.mkdir(parents=True, exist_ok=True)
        (spec.log_dir / "stdout.log").write_text("\n".join(recorded(name)) + "\n",
                                                 encoding="utf-8")
        return outcome_from(name, code)


@dataclass
class RunnerByKnob:
    """Decides each attempt from its argv, like a device with a fixed capacity would."""

    fits: Iterable[str]
    """Substrings of the joined argv; an attempt whose argv contains all of them fits."""
    specs: list[AttemptSpec] = field(default_factory=list)

    def __call__(self, spec: AttemptSpec) -> Outcome:
        """OOM unless every `fits` substring is in the argv."""
        self.specs.append(spec)
        joined = " ".join(spec.argv)
        name, code = FITS if all(s in joined for s in self.fits) else OOM
        return outcome_from(name, code)
