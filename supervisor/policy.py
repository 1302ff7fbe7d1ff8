"""The ladder as data: rungs parsed once from TOML, and next_step(), a pure walk over them."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supervisor._compat import StrEnum, tomllib
from supervisor.classify import Verdict, VerdictKind, shows_fragmentation
from supervisor.knobs import KNOB_NAMES, KNOB_TYPES, FinetuningType, Knobs, needs_module


class PolicyError(ValueError):
    """A policy file is unreadable or invalid; the message names the file, rung and choices."""


class Cost(StrEnum):
    """What a rung gives up: nothing, speed (slower steps), or quality (a different training)."""

    NONE = "none"
    SPEED = "speed"
    QUALITY = "quality"


@dataclass(frozen=True, slots=True, kw_only=True)
class Rung:
    """One step down the ladder: an action on one knob, with its floor and cost."""

    name: str
    action: str
    knob: str
    cost: Cost
    floor: int | None = None
    compensate: str | None = None
    value: Any = None
    also: tuple[tuple[str, Any], ...] = ()
    restore: bool = False
    when: str | None = None
    """A condition on the last OOM (CONDITIONS): unmet, the rung is skipped with the reason."""

    @property
    def is_structural(self) -> bool:
        """Structural rungs (checkpointing, LoRA, freeze) fire once; halving rungs repeat."""
        return self.action != "halve"


@dataclass(frozen=True, slots=True, kw_only=True)
class Ladder:
    """A parsed policy: ordered rungs plus the supervisor's bounds."""

    name: str
    description: str
    rungs: tuple[Rung, ...]
    max_attempts: int = 32
    speed_before_quality: bool = True
    """Before a rung that costs quality, try a later one that costs only speed."""
    transient_retries: int = 3
    transient_max_delay_s: float = 600.0
    attempt_timeout_s: float | None = None
    """Wall-clock limit of one attempt ([watchdog] attempt_timeout_s; none by default)."""
    stall_timeout_s: float | None = None
    """A fixed longest silence before an attempt counts as hung ([watchdog] stall_timeout_s);
    when set it wins over the limit learnt from the run's cadence."""
    startup_timeout_s: float | None = 1800.0
    """Silence allowed before the first training step ([watchdog] startup_timeout_s)."""
    stall_factor: float = 10.0
    """Once training has begun: a hang is a silence this many times the longest gap the run
    has shown ([watchdog] stall_factor; 0 turns the learnt limit off)."""
    stall_floor_s: float = 120.0
    """...and never less than this ([watchdog] stall_floor_s)."""
    release_wait_s: float = 60.0
    """How long to wait after an attempt for its GPU memory to come back ([gpu])."""
    on_held_memory: str = "continue"
    """What to do when memory is still held after the wait: continue or stop."""
    keep_quality: bool = False
    """Stop before the first rung that costs quality and say what it would try (--keep-quality)."""
    speed_compare: bool = True
    """Time a fitting config against its same-quality rival and keep the faster (speed.py;
    [speed] compare): at most once per run."""
    speed_steps: int = 3
    """Timed steps of each of the two ([speed] steps)."""
    estimate_margin: float = 0.0
    """A config counts as predicted to fit when its prediction x (1 + margin) is within the
    device ([estimate] margin): `run` skips by it and `plan` recommends by it, the same one."""
    liveness_evidence: bool = True
    """A silence past the limit is a hang only when the evidence of work says so ([liveness]
    evidence; false: silence alone, as a fixed rule)."""
    liveness_stacks: bool = True
    """Sample the main thread's frames in Python attempts ([liveness] stacks)."""
    stack_interval_s: float = 2.0
    """How often the sampler looks at the main thread ([liveness] stack_interval_s)."""
    cpu_busy: float = 0.10
    """Share of one core the attempt must use to count as working ([liveness] cpu_busy)."""
    repeat_factor: float = 4.0
    """A hang again at the same step after a retry: the next attempt's silence limit is this
    many times larger ([liveness] repeat_factor; 1 turns it off)."""
    rescue_on_oom: bool = True
    """In Hugging Face Trainer programs, save a checkpoint at the last completed optimizer step
    when a step runs out of memory ([rescue] on_oom; world size 1 only)."""
    rescue_on_stop: bool = True
    """On a polite stop (a signal, the end of a timed attempt) ask the trainer to save at the
    next step end, and wait for it ([rescue] on_stop)."""
    rescue_grace_s: float = 120.0
    """How long that save may take before any save of the run was measured
    ([rescue] stop_grace_s); once one was, the measured save plus one step."""
    rescue_on_error: bool = True
    """In Hugging Face Trainer programs, save a checkpoint at the last completed optimizer step
    when another error ends training at a step boundary ([rescue] on_error; world size 1)."""
    source: str = "<memory>"

    def rung(self, name: str) -> Rung:
        """The rung called `name`."""
        return next(r for r in self.rungs if r.name == name)


@dataclass(frozen=True, slots=True, kw_only=True)
class Attempt:
    """One finished attempt as the policy sees it: which knobs, from which rung, what verdict."""

    number: int
    knobs: Knobs
    rung: str | None
    verdict: Verdict


@dataclass(frozen=True, slots=True, kw_only=True)
class Step:
    """The next config to try and why: the rung taken, what it restored, what it skipped."""

    knobs: Knobs
    rung: str
    restored: tuple[tuple[str, Any, Any], ...] = ()
    """(knob, from, to) for each value a structural rung gave back."""
    skipped: tuple[str, ...] = ()
    """Rungs passed over without an attempt, each with its reason."""
    note: str | None = None
    """Why this rung came out of order, if it did."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GiveUp:
    """No rung can change the config any further; `spent` says where each one stopped."""

    reason: str
    spent: tuple[str, ...]
    skipped: tuple[str, ...] = ()


# --- actions: pure functions (knobs, rung) -> new Knobs, or None when they change nothing ---

def _halve(knobs: Knobs, rung: Rung) -> Knobs | None:
    value = getattr(knobs, rung.knob)
    floor = rung.floor or 1
    if value is None or value <= floor:
        return None
    if rung.compensate is None:
        return dataclasses.replace(knobs, **{rung.knob: max(floor, value // 2)})
    # Keep value x compensate exactly: take the largest divisor of value at or below half
    # (12 -> 6, 6 -> 3, 3 -> 1), and multiply the compensating knob by the quotient.
    # The largest divisor at or below half is value / its smallest prime factor: found by trial
    # division up to sqrt(value), so bounded even for a value nobody should give.
    factor = next((p for p in range(2, min(math.isqrt(value), _MAX_TRIAL) + 1) if value % p == 0),
                  value)
    new = value // factor
    if new < floor:
        return None
    return dataclasses.replace(knobs, **{rung.knob: new,
                                         rung.compensate: getattr(knobs, rung.compensate) * factor})


def _enable(knobs: Knobs, rung: Rung) -> Knobs | None:
    if getattr(knobs, rung.knob):
        return None
    changes: dict[str, Any] = {rung.knob: True}
    return dataclasses.replace(knobs, **changes)


def _raise(knobs: Knobs, rung: Rung) -> Knobs | None:
    """Raise an integer knob the command uses to at least `value` (ZeRO 2, then 3); never lower."""
    now = getattr(knobs, rung.knob)
    if now is None or now >= rung.value:
        return None
    return dataclasses.replace(knobs, **{rung.knob: rung.value, **dict(rung.also)})


def _set(knobs: Knobs, rung: Rung) -> Knobs | None:
    changes = {rung.knob: rung.value, **dict(rung.also)}
    if all(getattr(knobs, k) == v for k, v in changes.items()):
        return None
    return dataclasses.replace(knobs, **changes)


_MAX_TRIAL = 1 << 20
MAX_KNOB_INT = 1 << 24
"""Largest value a whole-number knob may have (batch, accumulation, cutoff, rank): beyond it
the command is a usage error, not a config to walk down."""
_POSITIVE = ("per_device_batch", "grad_accum", "cutoff_len", "lora_rank", "world_size",
             "max_steps")


def check_knobs(knobs: Knobs) -> None:
    """PolicyError (one line) for knob values no training can have: 0, negative, huge."""
    for name in KNOB_NAMES:
        value = getattr(knobs, name, None)
        if isinstance(value, bool) or not isinstance(value, int):
            continue
        if abs(value) > MAX_KNOB_INT:
            msg = (f"{name}={value} is not a size a training run can have (at most "
                   f"{MAX_KNOB_INT}); fix the command")
            raise PolicyError(msg)
        if name in _POSITIVE and value < 1:
            msg = f"{name}={value} must be at least 1; fix the command"
            raise PolicyError(msg)


ACTIONS: Mapping[str, Callable[[Knobs, Rung], Knobs | None]] = {
    "halve": _halve,
    "enable": _enable,
    "set": _set,
    "raise": _raise,
}
"""Every action a rung may name."""


def _fragmented(history: Sequence[Attempt]) -> str | None:
    """None when the last OOM's own figures show fragmentation; else why they do not."""
    numbers = history[-1].verdict.numbers if history else None
    if shows_fragmentation(numbers):
        return None
    if numbers is None or numbers.reserved_unallocated_mib is None or numbers.tried_mib is None:
        return ("the OOM shows no fragmentation: its message gives no reserved-but-unallocated "
                "figure (only CUDA's caching allocator reports one)")
    return (f"the OOM shows no fragmentation: {numbers.reserved_unallocated_mib:g} MiB reserved "
            f"but unallocated against {numbers.tried_mib:g} MiB tried")


CONDITIONS: Mapping[str, Callable[[Sequence[Attempt]], str | None]] = {
    "fragmented": _fragmented,
}
"""Every `when` a rung may name: each returns None when met, else the reason it is not."""

_RESTORABLE = (("per_device_batch", "grad_accum"), ("cutoff_len",))


def _restore(knobs: Knobs, start: Knobs, also: Sequence[str] = (),
             ) -> tuple[Knobs, tuple[tuple[str, Any, Any], ...]]:
    """Give back the batch and cutoff that earlier rungs took, so the search starts again high.

    `also` names further knobs set back to the command's own value (a new method starts from
    the command's own speed settings: checkpointing as it had it, its optimizer).
    """
    restored: list[tuple[str, Any, Any]] = []
    changes: dict[str, Any] = {}
    for group in _RESTORABLE:
        lead = group[0]
        now, then = getattr(knobs, lead), getattr(start, lead)
        if now is not None and then is not None and then > now:
            for name in group:
                restored.append((name, getattr(knobs, name), getattr(start, name)))
                changes[name] = getattr(start, name)
    for name in also:
        now, then = getattr(knobs, name), getattr(start, name)
        if now != then:
            restored.append((name, now, then))
            changes[name] = then
    return dataclasses.replace(knobs, **changes), tuple(restored)


def _is_method(rung: Rung) -> bool:
    """A rung that changes what is trained (LoRA, QLoRA, freeze): it fires once, in order."""
    return rung.is_structural and rung.cost is Cost.QUALITY


def _speed_knobs(ladder: Ladder, rung: Rung) -> tuple[str, ...]:
    """The knobs of the ladder's speed-only structural rungs that `rung` itself leaves alone.

    A method rung sets these back to the command's own values: its method starts from the
    command's speed settings, and the speed rungs add them again only as memory requires.
    """
    own = {rung.knob, *(k for k, _ in rung.also)}
    found: list[str] = []
    for other in ladder.rungs:
        if other.is_structural and other.cost is Cost.SPEED:
            for knob in (other.knob, *(k for k, _ in other.also)):
                if knob not in own and knob not in found:
                    found.append(knob)
    return tuple(found)


def _spent_rungs(history: Sequence[Attempt], ladder: Ladder) -> frozenset[int]:
    """Indices of the structural rungs that cannot fire again after this history.

    Method rungs (structural, cost quality) fire once and in order: one that fired, and every
    method rung before it, is spent. The other structural rungs (checkpointing, the 8-bit
    optimizer, ZeRO, offload) are spent per method: within the history since the last method
    rung fired, one that fired, and every such rung before it, is spent; once a new method
    starts they are available again.
    """
    index = {r.name: i for i, r in enumerate(ladder.rungs)}
    fired = [(n, index[a.rung]) for n, a in enumerate(history)
             if a.rung in index and ladder.rungs[index[a.rung]].is_structural]
    method = max((i for _, i in fired if _is_method(ladder.rungs[i])), default=-1)
    since = max((n for n, i in fired if _is_method(ladder.rungs[i])), default=-1)
    speed = max((i for n, i in fired if n > since and not _is_method(ladder.rungs[i])),
                default=-1)
    return frozenset(i for i, r in enumerate(ladder.rungs) if r.is_structural and (
        i <= method if _is_method(r) else i <= speed))


CanSet = Callable[[str, Any], bool]
"""Whether the command's program can take `knob` = `value` (Reading.can_set)."""

Refusal = Callable[[str, Any], str | None]
"""The dialect's own reason for refusing `knob` = `value` (Reading.refusal), if it gave one."""


def blocked(last: Knobs, new: Knobs, can_set: CanSet | None,
            refusal: Refusal | None = None) -> str | None:
    """Why the program cannot take the first change from `last` to `new` (None: it can all)."""
    return _blocked(last, new, can_set, refusal)


def _blocked(last: Knobs, new: Knobs, can_set: CanSet | None,
             refusal: Refusal | None = None) -> str | None:
    """Why the program cannot take the first change in `new` it cannot (None: all fine)."""
    if can_set is None:
        return None
    for knob, (_, value) in last.diff(new).items():
        if can_set(knob, value):
            continue
        if knob in ("deepspeed_stage", "deepspeed_offload") and not can_set(knob, None):
            return ("the command uses no DeepSpeed config (--deepspeed ds.json) to write "
                    f"{knob}={_show(value)} into")
        module = needs_module(knob, value)
        if module is not None and can_set(knob, None):
            return (f"{knob}={_show(value)} needs {module}, which the command's Python "
                    "cannot import")
        if can_set(knob, None):
            why = refusal(knob, value) if refusal is not None else None
            return f"the program cannot take {knob}={_show(value)}" + (f": {why}" if why else "")
        return f"the program takes no flag or key for {knob}={_show(value)}"
    return None


def next_step(start: Knobs, history: Sequence[Attempt], ladder: Ladder, *,
              can_set: CanSet | None = None, refusal: Refusal | None = None) -> Step | GiveUp:
    """Return the next cheaper Knobs after the last attempt's OOM, or GiveUp naming spent rungs.

    `can_set` (the command's Reading.can_set) skips a rung whose change the program cannot
    take, e.g. a LoRA rung on a script with no LoRA flag, with a one-line reason in `skipped`
    (the dialect's own words where `refusal` has them); a give-up's `spent` repeats it.

    Configs are compared without the checkpoint they continued from: a retry from a newer
    checkpoint is the same config (the loop sets the checkpoint of the next attempt itself).
    """
    start = start.without_progress()
    history = [dataclasses.replace(a, knobs=a.knobs.without_progress()) for a in history]
    dry = [a for a in history if a.verdict.kind is VerdictKind.NO_DATA]
    if dry and dry[-1].rung not in {r.name for r in ladder.rungs}:  # the start config
        return GiveUp(reason=(f"the command's own config leaves the trainer no data "
                              f"({dry[-1].verdict.evidence}); no rung adds rows"),
                      spent=(), skipped=())
    # A config that left no rows is not a base to walk from: the last one that had data is.
    with_data = [a for a in history if a.verdict.kind is not VerdictKind.NO_DATA]
    last = with_data[-1].knobs if with_data else start
    tried = {a.knobs for a in history}
    spent = _spent_rungs(history, ladder)
    skipped: list[str] = []
    refused: dict[str, str] = {}  # rung name -> why the program cannot take it
    for index, rung in enumerate(ladder.rungs):
        # A conditional rung answers to its condition, not to the order: it is never spent.
        if index in spent and rung.when is None:
            continue
        new = ACTIONS[rung.action](last, rung)
        if new is None:
            if rung.is_structural and getattr(last, rung.knob) is None:
                skipped.append(f"{rung.name}: the command does not use {rung.knob}")
            elif rung.is_structural:
                skipped.append(f"{rung.name}: {rung.knob} is already "
                               f"{_show(getattr(last, rung.knob))}")
            continue
        unmet = CONDITIONS[rung.when](history) if rung.when is not None else None
        if unmet is not None:
            skipped.append(f"{rung.name}: {unmet}")
            continue
        new, restored = _restored(new, start, ladder, rung)
        no_data = _leaves_no_data(new, dry, ladder)
        if no_data is not None:
            skipped.append(f"{rung.name}: {no_data}")
            continue
        if new in tried:
            skipped.append(f"{rung.name}: that config was already tried")
            continue
        blocked = _blocked(last, new, can_set, refusal)
        if blocked is not None:
            skipped.append(f"{rung.name}: {blocked}")
            refused[rung.name] = blocked
            continue
        if ((ladder.speed_before_quality or ladder.keep_quality)
                and rung.cost is Cost.QUALITY):
            speed = _speed_first(start, last, tried, ladder, after=index, spent=spent,
                                 can_set=can_set, history=history)
            if speed is not None:
                return dataclasses.replace(speed, skipped=tuple(skipped),
                                           note=f"tried before {rung.name}, which costs quality")
        if ladder.keep_quality and rung.cost is Cost.QUALITY:
            spent_text = tuple(_spent(r, last, history) for r in ladder.rungs)
            return _kept_quality(rung, last, new, spent=spent_text, skipped=tuple(skipped))
        return Step(knobs=new, rung=rung.name, restored=restored, skipped=tuple(skipped))
    spent_text = tuple(f"{rung.name}: skipped, {refused[rung.name]}" if rung.name in refused
                       else _spent(rung, last, history) for rung in ladder.rungs)
    reason = (f"every rung of the '{ladder.name}' ladder is spent and the smallest config "
              f"still runs out of memory ({_summary(last)})")
    return GiveUp(reason=reason, spent=spent_text, skipped=tuple(skipped))


def _restored(new: Knobs, start: Knobs, ladder: Ladder,
              rung: Rung) -> tuple[Knobs, tuple[tuple[str, Any, Any], ...]]:
    """`new` after the rung's restore (none unless the rung says `restore = true`)."""
    if not rung.restore:
        return new, ()
    return _restore(new, start, _speed_knobs(ladder, rung) if _is_method(rung) else ())


def _kept_quality(rung: Rung, last: Knobs, new: Knobs, *, spent: tuple[str, ...],
                  skipped: tuple[str, ...]) -> GiveUp:
    """The walk stops before `rung` (--keep-quality): say what it would try, at which cost."""
    change = ", ".join(f"{k}={_show(v)}" for k, (_, v) in last.diff(new).items())
    reason = (f"--keep-quality: would try {rung.name} (cost quality) next, with {change}; "
              f"rerun without --keep-quality to allow it. Smallest config tried without "
              f"giving up quality still runs out of memory ({_summary(last)})")
    return GiveUp(reason=reason, spent=spent, skipped=skipped)


def _speed_first(start: Knobs, last: Knobs, tried: set[Knobs], ladder: Ladder,  # noqa: PLR0913
                 *, after: int, spent: frozenset[int], can_set: CanSet | None = None,
                 history: Sequence[Attempt] = ()) -> Step | None:
    """A later structural rung that costs only speed, taken before a rung that costs quality.

    Before the run gives up quality (truncating samples, changing the method), it checks
    whether a speed-only rung further down (gradient checkpointing, the 8-bit optimizer)
    fits instead, on the config as it stands: same cutoff, same method. The rung restores
    the batch the earlier rungs took (its `restore = true`) and the search goes down again:
    a speed rung can save more than halving the batch did (measured on the tiny Llama: full
    fine-tuning with checkpointing at b2xGA4 peaks at 190.7 MiB, without it b1xGA8 at
    214.9; tests/data/peaks/tiny.json), so the larger batches under it may fit.
    """
    for later_index, later in enumerate(ladder.rungs):
        if (later_index <= after or later_index in spent or not later.is_structural
                or later.cost is Cost.QUALITY):
            continue
        if later.when is not None and CONDITIONS[later.when](history) is not None:
            continue
        candidate = ACTIONS[later.action](last, later)
        if candidate is None:
            continue
        candidate, restored = _restored(candidate, start, ladder, later)
        if candidate not in tried and _blocked(last, candidate, can_set) is None:
            return Step(knobs=candidate, rung=later.name, restored=restored)
    return None


def _show(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _leaves_no_data(new: Knobs, dry: Sequence[Attempt], ladder: Ladder) -> str | None:
    """Why `new` would leave the trainer no rows, as an earlier attempt showed, or None.

    A halving rung (the cutoff) that left no data at value V leaves none at any value <= V:
    a shorter cutoff drops at least the rows the longer one dropped.
    """
    halving = {r.name: r.knob for r in ladder.rungs if r.action == "halve"}
    for attempt in dry:
        knob = halving.get(attempt.rung or "")
        if knob is None:
            continue
        value, empty_at = getattr(new, knob), getattr(attempt.knobs, knob)
        if value is not None and empty_at is not None and value <= empty_at:
            return (f"{knob}={value} leaves the trainer no data: attempt {attempt.number} at "
                    f"{knob}={empty_at} failed with '{attempt.verdict.evidence}'")
    return None


def _spent(rung: Rung, knobs: Knobs, history: Sequence[Attempt]) -> str:
    value = getattr(knobs, rung.knob)
    dry = next((a for a in reversed(history)
                if a.rung == rung.name and a.verdict.kind is VerdictKind.NO_DATA), None)
    if dry is not None:
        return (f"{rung.name}: {rung.knob}={_show(getattr(dry.knobs, rung.knob))} left the "
                f"trainer no data (attempt {dry.number})")
    if rung.action == "halve":
        if value is None:
            return f"{rung.name}: {rung.knob} unknown to the command, nothing to halve"
        return f"{rung.name}: {rung.knob} at {value} (floor {rung.floor or 1})"
    first = next((a.number for a in history if a.rung == rung.name), None)
    target = _show(True if rung.action == "enable" else rung.value)
    if first is None and _show(value) != target:
        return f"{rung.name}: not tried"
    if first is None:
        return f"{rung.name}: not needed, {rung.knob} was already {target}"
    return f"{rung.name}: {rung.knob}={target} tried from attempt {first}"


def _summary(knobs: Knobs) -> str:
    parts = [f"per_device_batch={knobs.per_device_batch}", f"grad_accum={knobs.grad_accum}",
             f"cutoff_len={knobs.cutoff_len}",
             f"gradient_checkpointing={_show(knobs.gradient_checkpointing)}",
             f"finetuning_type={knobs.finetuning_type}"]
    return ", ".join(parts)


# --- loading ---------------------------------------------------------------------------------

_TOP_KEYS = frozenset({"name", "description", "max_attempts", "speed_before_quality",
                       "keep_quality", "transient", "watchdog", "gpu", "speed", "rung",
                       "estimate", "liveness", "rescue"})
_SPEED_KEYS = frozenset({"compare", "steps"})
_WATCHDOG_KEYS = frozenset({"attempt_timeout_s", "stall_timeout_s", "startup_timeout_s",
                            "stall_factor", "stall_floor_s"})
_GPU_KEYS = frozenset({"release_wait_s", "on_held_memory"})
_ESTIMATE_KEYS = frozenset({"margin"})
_LIVENESS_KEYS = frozenset({"evidence", "stacks", "stack_interval_s", "cpu_busy",
                            "repeat_factor"})
_RUNG_KEYS = frozenset({"name", "action", "knob", "floor", "compensate", "value", "with",
                        "restore", "cost", "when"})
_TRANSIENT_KEYS = frozenset({"retries", "max_delay_s"})
_RESCUE_KEYS = frozenset({"on_oom", "on_stop", "stop_grace_s", "on_error"})
_HALVABLE = tuple(k for k, t in KNOB_TYPES.items() if t == "int" and k != "world_size")
_READ_ONLY = ("world_size", "output_dir")
_BOOLEAN = tuple(k for k, t in KNOB_TYPES.items() if t == "bool")
_SETTABLE = tuple(k for k in KNOB_NAMES
                  if k not in ("world_size", "resume_from_checkpoint", "output_dir", "lora_target"))


def policy_dirs() -> tuple[Path, ...]:
    """Where named policies live: inside the installed package, or the source tree's policies/."""
    here = Path(__file__).resolve().parent
    return tuple(p for p in (here / "policies", here.parent / "policies") if p.is_dir())


def shipped_policies() -> dict[str, Path]:
    """Named policies that ship with oom-supervisor."""
    found: dict[str, Path] = {}
    for directory in policy_dirs():
        for path in sorted(directory.glob("*.toml")):
            found.setdefault(path.stem, path)
    return found


def resolve(name_or_path: str) -> Ladder:
    """Load a policy by file path or by the name of a shipped one."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            msg = f"policy file {path} does not exist; give a .toml path or one of: " + \
                ", ".join(shipped_policies())
            raise PolicyError(msg)
        return load(path)
    shipped = shipped_policies()
    if name_or_path not in shipped:
        msg = (f"no policy named {name_or_path!r}; shipped: {', '.join(shipped)} "
               "(or give the path of a .toml file)")
        raise PolicyError(msg)
    return load(shipped[name_or_path])


def load(path: Path) -> Ladder:
    """Parse and validate a policy file; every problem is one PolicyError line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        msg = f"{path}: cannot read policy file ({exc})"
        raise PolicyError(msg) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = f"{path}: not valid TOML ({exc}); fix the syntax or start from policies/default.toml"
        raise PolicyError(msg) from None
    except ValueError:  # Python refuses to read an integer of over 4300 digits
        msg = (f"{path}: not valid TOML (it holds a number too long to read); fix the number or "
               "start from policies/default.toml")
        raise PolicyError(msg) from None
    except RecursionError:
        msg = f"{path}: nested too deeply to be a policy; start from policies/default.toml"
        raise PolicyError(msg) from None
    return parse(data, source=str(path))


def parse(data: Mapping[str, Any], *, source: str = "<memory>") -> Ladder:
    """Validate a decoded policy table into a Ladder."""
    _check_keys(data, _TOP_KEYS, f"{source}: top level")
    raw_rungs = data.get("rung")
    if not isinstance(raw_rungs, list) or not raw_rungs:
        msg = f"{source}: no [[rung]] tables; a policy needs at least one rung"
        raise PolicyError(msg)
    rungs = tuple(_parse_rung(r, i + 1, source) for i, r in enumerate(raw_rungs))
    seen: set[str] = set()  # linear: a 10 MB policy must load in seconds
    duplicate = None
    for rung in rungs:
        if rung.name in seen:
            duplicate = rung.name
            break
        seen.add(rung.name)
    if duplicate is not None:
        msg = f"{source}: two rungs are named {duplicate!r}; give each rung its own name"
        raise PolicyError(msg)
    transient = _table(data, "transient", _TRANSIENT_KEYS, source)
    watchdog = _table(data, "watchdog", _WATCHDOG_KEYS, source)
    gpu = _table(data, "gpu", _GPU_KEYS, source)
    speed = _table(data, "speed", _SPEED_KEYS, source)
    estimate = _table(data, "estimate", _ESTIMATE_KEYS, source)
    alive = _table(data, "liveness", _LIVENESS_KEYS, source)
    rescue = _table(data, "rescue", _RESCUE_KEYS, source)
    on_held = gpu.get("on_held_memory", "continue")
    if on_held not in ("continue", "stop"):
        msg = f"{source}: [gpu] on_held_memory must be 'continue' or 'stop', not {on_held!r}"
        raise PolicyError(msg)
    name = data.get("name", Path(source).stem)
    description = data.get("description", "")
    if not isinstance(name, str) or not isinstance(description, str):
        msg = f"{source}: name and description must be strings"
        raise PolicyError(msg)
    return Ladder(
        name=name,
        description=description,
        rungs=rungs,
        max_attempts=_whole(data.get("max_attempts", 32), f"{source}: max_attempts", minimum=1),
        speed_before_quality=_flag(data, "speed_before_quality", source),
        keep_quality=_flag(data, "keep_quality", source, default=False),
        transient_retries=_whole(transient.get("retries", 3), f"{source}: transient.retries",
                                 minimum=0),
        transient_max_delay_s=float(_whole(transient.get("max_delay_s", 600),
                                           f"{source}: transient.max_delay_s", minimum=0)),
        attempt_timeout_s=_optional_seconds(watchdog, "attempt_timeout_s", source),
        stall_timeout_s=_optional_seconds(watchdog, "stall_timeout_s", source),
        startup_timeout_s=_optional_seconds({"startup_timeout_s": 1800, **watchdog},
                                            "startup_timeout_s", source),
        stall_factor=_non_negative(watchdog.get("stall_factor", 10), "stall_factor", source),
        stall_floor_s=_non_negative(watchdog.get("stall_floor_s", 120), "stall_floor_s", source),
        release_wait_s=float(_whole(gpu.get("release_wait_s", 60), f"{source}: gpu.release_wait_s",
                                    minimum=0)),
        on_held_memory=on_held,
        speed_compare=_flag(speed, "compare", f"{source}: [speed]"),
        speed_steps=_whole(speed.get("steps", 3), f"{source}: [speed] steps", minimum=1),
        estimate_margin=_margin(estimate.get("margin", 0.0), source),
        **_liveness(alive, f"{source}: [liveness]"),
        rescue_on_oom=_flag(rescue, "on_oom", f"{source}: [rescue]"),
        rescue_on_stop=_flag(rescue, "on_stop", f"{source}: [rescue]"),
        rescue_grace_s=float(_whole(rescue.get("stop_grace_s", 120),
                                    f"{source}: [rescue] stop_grace_s", minimum=0)),
        rescue_on_error=_flag(rescue, "on_error", f"{source}: [rescue]"),
        source=source,
    )


def _liveness(table: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The [liveness] table: how a silence is judged (supervisor/liveness.py)."""
    out: dict[str, Any] = {"liveness_evidence": _flag(table, "evidence", where),
                           "liveness_stacks": _flag(table, "stacks", where)}
    for key, default, low, high in (("stack_interval_s", 2.0, 0.2, 3600.0),
                                    ("cpu_busy", 0.10, 0.0, 64.0),
                                    ("repeat_factor", 4.0, 1.0, 1000.0)):
        value = table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not low <= value <= high:
            msg = f"{where} {key} must be a number from {low:g} to {high:g}, not {value!r}"
            raise PolicyError(msg)
        out[key] = float(value)
    return out


def _table(data: Mapping[str, Any], key: str, valid: frozenset[str],
           source: str) -> Mapping[str, Any]:
    table = data.get(key, {})
    if not isinstance(table, dict):
        msg = f"{source}: [{key}] must be a table with keys {', '.join(sorted(valid))}"
        raise PolicyError(msg)
    _check_keys(table, valid, f"{source}: [{key}]")
    return table


def _flag(table: Mapping[str, Any], key: str, source: str, *, default: bool = True) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        msg = f"{source}: {key} must be true or false, not {value!r}"
        raise PolicyError(msg)
    return value


def _margin(value: object, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        msg = (f"{source}: [estimate] margin must be a fraction from 0 to under 1 (0.05 is "
               f"5 %), not {value!r}")
        raise PolicyError(msg)
    return float(value)


def _non_negative(value: object, key: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0 \
            or not value < _MAX_WHOLE:
        msg = f"{source}: [watchdog] {key} must be a number >= 0, not {value!r}"
        raise PolicyError(msg)
    return float(value)


def _optional_seconds(table: Mapping[str, Any], key: str, source: str) -> float | None:
    """A duration in seconds; 0 or absent turns the watchdog off."""
    value = _whole(table.get(key, 0), f"{source}: {key}", minimum=0)
    return float(value) if value else None


def _parse_rung(raw: object, number: int, source: str) -> Rung:
    where = f"{source}: rung {number}"
    if not isinstance(raw, dict):
        msg = f"{where}: must be a [[rung]] table"
        raise PolicyError(msg)
    if isinstance(raw.get("name"), str):
        where = f"{where} ({raw['name']!r})"
    _check_keys(raw, _RUNG_KEYS, where)
    action = raw.get("action")
    if not isinstance(action, str) or action not in ACTIONS:
        msg = f"{where}: unknown action {action!r}; valid: {', '.join(sorted(ACTIONS))}"
        raise PolicyError(msg)
    knob = raw.get("knob")
    action = str(action)
    valid_knobs = {"halve": _HALVABLE, "enable": _BOOLEAN, "set": _SETTABLE,
                   "raise": _HALVABLE}[action]
    if not isinstance(knob, str) or knob not in valid_knobs:
        msg = f"{where}: action {action!r} cannot act on knob {knob!r}; valid: " + \
            ", ".join(valid_knobs)
        raise PolicyError(msg)
    cost = raw.get("cost", "none")
    if not isinstance(cost, str) or cost not in {c.value for c in Cost}:
        msg = f"{where}: unknown cost {cost!r}; valid: {', '.join(c.value for c in Cost)}"
        raise PolicyError(msg)
    restore = raw.get("restore", False)
    if not isinstance(restore, bool):
        msg = f"{where}: restore must be true or false, not {restore!r}"
        raise PolicyError(msg)
    floor = compensate = None
    value: Any = None
    also: tuple[tuple[str, Any], ...] = ()
    if action == "halve":
        floor = _whole(raw.get("floor", 1), f"{where}: floor", minimum=1)
        compensate = raw.get("compensate")
        if compensate is not None and (not isinstance(compensate, str)
                                       or compensate not in _HALVABLE):
            msg = f"{where}: cannot compensate with {compensate!r}; valid: {', '.join(_HALVABLE)}"
            raise PolicyError(msg)
        if compensate == knob:
            msg = (f"{where}: compensate = {knob!r} is the knob this rung halves (it would "
                   "double it back); compensate with another knob, e.g. grad_accum")
            raise PolicyError(msg)
    else:
        for key in ("floor", "compensate"):
            if key in raw:
                msg = f"{where}: {key!r} only applies to action 'halve'"
                raise PolicyError(msg)
    if action in ("set", "raise"):
        if "value" not in raw:
            msg = f"{where}: action {action!r} needs a value for {knob}"
            raise PolicyError(msg)
        value = _knob_value(knob, raw["value"], where)
        extra = raw.get("with", {})
        if not isinstance(extra, dict):
            msg = f"{where}: 'with' must be a table of knob = value"
            raise PolicyError(msg)
        for key in extra:
            if key not in _SETTABLE:
                msg = f"{where}: 'with' names unknown knob {key!r}; valid: {', '.join(_SETTABLE)}"
                raise PolicyError(msg)
        also = tuple((k, _knob_value(k, v, f"{where}: with.{k}")) for k, v in extra.items())
    elif "value" in raw or "with" in raw:
        msg = f"{where}: 'value' and 'with' only apply to actions 'set' and 'raise'"
        raise PolicyError(msg)
    when = raw.get("when")
    if when is not None and (not isinstance(when, str) or when not in CONDITIONS):
        msg = f"{where}: unknown condition when = {when!r}; valid: {', '.join(CONDITIONS)}"
        raise PolicyError(msg)
    name = raw.get("name", f"{action}-{knob}")
    if not isinstance(name, str) or not name:
        msg = f"{where}: name must be a non-empty string"
        raise PolicyError(msg)
    return Rung(name=name, action=action, knob=knob, cost=Cost(cost), floor=floor,
                compensate=compensate, value=value, also=also, restore=restore, when=when)


def _knob_value(knob: str, value: object, where: str) -> Any:  # noqa: ANN401
    kind = KNOB_TYPES[knob]
    if kind == "finetuning_type":
        if not isinstance(value, str) or value not in {t.value for t in FinetuningType}:
            msg = (f"{where}: {value!r} is not a finetuning type; valid: "
                   f"{', '.join(t.value for t in FinetuningType)}")
            raise PolicyError(msg)
        return FinetuningType(str(value))
    if kind == "bool":
        if not isinstance(value, bool):
            msg = f"{where}: {knob} must be true or false, not {value!r}"
            raise PolicyError(msg)
        return value
    if kind == "int" and value == "none" and knob not in _POSITIVE:
        return None  # unset an optional knob (freeze after QLoRA: no 4-bit base)
    if kind == "int":
        # A batch of 0 or -4 "fits" and trains nothing: every settable count is at least 1.
        number = _whole(value, f"{where}: {knob}", minimum=1 if knob in _POSITIVE else None)
        if abs(number) > MAX_KNOB_INT:
            msg = f"{where}: {knob} must be at most {MAX_KNOB_INT}, not {number}"
            raise PolicyError(msg)
        return number
    if not isinstance(value, str):
        msg = f"{where}: {knob} must be a string, not {value!r}"
        raise PolicyError(msg)
    return value


def _whole(value: object, where: str, *, minimum: int | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        msg = f"{where} must be a whole number, not {value!r}"
        raise PolicyError(msg)
    if abs(value) >= _MAX_WHOLE:  # a size, a count or seconds: 2**40 is beyond all of them
        msg = f"{where} must be below {_MAX_WHOLE}, not a number that large"
        raise PolicyError(msg)
    if minimum is not None and value < minimum:
        msg = f"{where} must be >= {minimum}, not {value}"
        raise PolicyError(msg)
    return value


_MAX_WHOLE = 2 ** 40


def _check_keys(table: Mapping[str, Any], valid: frozenset[str], where: str) -> None:
    unknown = sorted(set(table) - valid)
    if unknown:
        msg = f"{where}: unknown key {unknown[0]!r}; valid: {', '.join(sorted(valid))}"
        raise PolicyError(msg)
