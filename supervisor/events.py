"""The journal's schema: one frozen dataclass per event, and `replay(records) -> RunState`.

Every fact of a run is one of these events, written as one JSON line by `journal.Journal`.
`replay` is the only reader of the journal: `resume`, `report` and `status` all see a run
through the `RunState` it returns, so they cannot disagree about what happened.

The first event, `run.started`, carries the whole `RunConfig`: everything the run depends on
(the command, the dialect, the policy's full text, the device size and where it came from, the
estimator settings, the environment the supervisor added, the names of secret variables), so
that `resume` rebuilds exactly the run that was started, whatever shell it is started in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from supervisor._compat import Self
from supervisor.classify import OomKind, OomNumbers, Verdict, VerdictKind
from supervisor.knobs import Knobs, can_set, refusal
from supervisor.policy import Attempt

SCHEMA_VERSION = 1
"""Written into every record as `v`; replay refuses a journal written by a newer schema."""


class JournalError(ValueError):
    """A journal that cannot be read back; the message says which line and why."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RunConfig:
    """Everything a run depends on, frozen at its start and journaled whole."""

    run_id: str
    argv: tuple[str, ...]
    """The command as journaled: secrets replaced by `<redacted:NAME>` placeholders."""
    cwd: str | None
    dialect: str
    """The dialect's name (`argv`, `llamafactory`, ..., `knobmap`)."""
    dialect_description: str
    cutoff_drops_rows: bool = False
    """A shorter cutoff drops rows longer than it (packing), rather than truncating them."""
    knobs_file: str | None = None
    """The user's knob map (`--knobs`), when the dialect is `knobmap`."""
    policy_name: str
    policy_source: str
    policy_text: str
    """The policy's full TOML text: resume walks the same ladder even if the file changed."""
    keep_quality: bool = False
    """`--keep-quality`: stop before the first rung that costs quality."""
    start: Knobs
    start_sources: Mapping[str, str] = field(default_factory=dict)
    """Where each start value came from (command line, config file, program, default, assumed)."""
    rewritable: tuple[str, ...] | None = None
    """Knobs the program accepts a flag or key for (None: not known, every rung may run)."""
    refused: tuple[tuple[str, str], ...] = ()
    """(knob, value) pairs the program cannot take although it sets the knob."""
    refused_why: Mapping[str, str] = field(default_factory=dict)
    """The dialect's reason for a refused pair, by `knob=value` (Reading.refused_why)."""
    program_help: str | None = None
    """What the program's own --help said, in a few words."""
    program_help_text: str | None = None
    """What was parsed from its --help (flags and defaults, redacted): resume never asks again."""
    world_size_known: bool = True
    max_attempts: int
    device_mib: float | None = None
    device_source: str | None = None
    """How the device size was obtained: `--device-memory`, `nvml: <name>`, or None."""
    inject_device_memory: bool = False
    """True when the limit is injected into the command (`--device-memory`)."""
    estimate: bool = False
    """Whether configs predicted over the device may be skipped without running."""
    estimate_margin: float = 0.0
    estimate_s: float | None = None
    """Seconds the estimator's predictions took before the run started (in its wall time)."""
    gpu_note: str | None = None
    """Why GPU sampling is unavailable, if it is."""
    env_added: Mapping[str, str] = field(default_factory=dict)
    """Environment variables the supervisor added to every attempt (never secrets)."""
    secret_names: tuple[str, ...] = ()
    """Names (never values) of the secret variables the command needs, from env or argv."""
    fits_key: str | None = None
    """The remembered-fit key of this run, when the fit store is in use."""
    remembered: Knobs | None = None
    """A fit remembered for this key: the walk starts there and only goes down."""
    remembered_from: str | None = None
    """The run that found the remembered fit."""
    fits_db: str | None = None
    """The fit store the run reads and writes (None: the default one)."""
    share_output_dir: bool = False
    """--share-output-dir: the output folder is not locked for this run (another run may train
    into it); checkpoints this run did not write are still never resumed."""
    process_started_at: float | None = None
    """When the supervisor's process started (its --help probe and predictions come before
    run.started): the run's clock starts there."""
    remembered_ignored: str | None = None
    """How the remembered run's command differed from this one where the fit's key does not
    look (paths, step counts...), in words, `; `-separated (None: no difference known)."""

    def to_record(self) -> dict[str, Any]:
        """JSON-ready mapping."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["argv"] = list(self.argv)
        out["start"] = self.start.to_dict()
        out["remembered"] = self.remembered.to_dict() if self.remembered else None
        out["start_sources"] = dict(self.start_sources)
        out["env_added"] = dict(self.env_added)
        out["secret_names"] = list(self.secret_names)
        out["rewritable"] = None if self.rewritable is None else list(self.rewritable)
        out["refused"] = [list(r) for r in self.refused]
        out["refused_why"] = dict(self.refused_why)
        return out

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> Self:
        """Inverse of to_record."""
        values = dict(data)
        values["argv"] = tuple(_strings(values.get("argv"), "argv"))
        values["start"] = Knobs.from_dict(dict(_mapping(values.get("start"), "start")))
        if values.get("remembered") is not None:
            values["remembered"] = Knobs.from_dict(dict(_mapping(values["remembered"],
                                                                 "remembered")))
        values["secret_names"] = tuple(_strings(values.get("secret_names", []), "secret_names"))
        if values.get("rewritable") is not None:
            values["rewritable"] = tuple(_strings(values["rewritable"], "rewritable"))
        values["refused"] = tuple((str(k), str(v)) for k, v in values.get("refused", ()))
        values["refused_why"] = {str(k): str(v) for k, v in
                                 dict(_mapping(values.get("refused_why", {}),
                                               "refused_why")).items()}
        return cls(**_checked(cls, _known(cls, values)))

    @property
    def effective_batch(self) -> int:
        """The start config's effective batch."""
        return self.start.effective_batch

    def can_set(self, knob: str, value: object = None) -> bool:
        """True when a rung may set `knob` (to `value`) in this program's command."""
        if self.rewritable is None:
            return True
        return can_set(self.rewritable, self.refused, knob, value)

    def refusal(self, knob: str, value: object) -> str | None:
        """The dialect's reason for refusing `knob` = `value`, when it gave one."""
        return refusal(self.refused_why, knob, value)

    @property
    def walk_start(self) -> Knobs:
        """Where the ladder starts: a remembered fit when there is one, else the command's own."""
        return self.remembered if self.remembered is not None else self.start


# --- events -----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """One journaled fact. `ts` is the wall-clock time it was written (seconds since epoch)."""

    KIND: ClassVar[str] = ""
    ts: float = 0.0

    def __post_init__(self) -> None:
        # Lists (from JSON or a caller) become tuples, so events compare equal after a replay.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, _tuples(value))

    def to_record(self) -> dict[str, Any]:
        """The JSON line's content: version, time, event name, then the fields."""
        out: dict[str, Any] = {"v": SCHEMA_VERSION, "ts": self.ts, "event": self.KIND}
        for f in dataclasses.fields(self):
            if f.name != "ts":
                out[f.name] = _plain(getattr(self, f.name))
        return out

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> Self:
        """Build the event from its record; unknown keys are ignored (newer minor fields)."""
        return cls(**_checked(cls, _known(cls, data)))


@dataclass(frozen=True, slots=True, kw_only=True)
class RunStarted(Event):
    """The run began; its whole config."""

    KIND: ClassVar[str] = "run.started"
    config: RunConfig

    def to_record(self) -> dict[str, Any]:
        """The config is nested whole."""
        return {"v": SCHEMA_VERSION, "ts": self.ts, "event": self.KIND,
                "config": self.config.to_record()}

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> Self:
        """Inverse of to_record."""
        return cls(ts=_number(data.get("ts", 0.0), "ts"),
                   config=RunConfig.from_record(_mapping(data.get("config"), "config")))


@dataclass(frozen=True, slots=True, kw_only=True)
class RunResumed(Event):
    """A new supervisor took the run over after the previous one died."""

    KIND: ClassVar[str] = "run.resumed"
    attempts_done: int
    pending: int | None = None
    orphan: str = "adopt"
    torn_kept: str | None = None
    """Where a torn last journal line was kept aside (a file in the run folder)."""
    pid: int | None = None
    last_alive: float | None = None
    """When the previous supervisor was last seen alive (its heartbeat file's time)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AttemptStarted(Event):
    """An attempt is about to be spawned with these knobs."""

    KIND: ClassVar[str] = "attempt.started"
    attempt: int
    rung: str | None
    knobs: Knobs
    changed: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    """Knobs that differ from the start config: name -> (start's, this attempt's)."""
    argv: tuple[str, ...] = ()
    log_dir: str = ""
    env_set: Mapping[str, str] = field(default_factory=dict)
    """Variables this attempt's config sets in its environment (e.g. a rung's allocator
    setting), beyond the run's own environment."""
    checkpoints_before: Mapping[str, int] = field(default_factory=dict)
    """The output folder's checkpoints before the attempt (path -> trainer_state mtime, ns):
    only new or changed ones are credited to it."""

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> Self:
        """Knobs come back as Knobs."""
        values = _checked(cls, _known(cls, data))
        values["knobs"] = Knobs.from_dict(dict(_mapping(data.get("knobs"), "knobs")))
        values["argv"] = tuple(_strings(data.get("argv", []), "argv"))
        return cls(**values)


@dataclass(frozen=True, slots=True, kw_only=True)
class AttemptSpawned(Event):
    """The attempt's wrapper process exists: how to find it again (pid + start time)."""

    KIND: ClassVar[str] = "attempt.spawned"
    attempt: int
    pid: int
    create_time: float


@dataclass(frozen=True, slots=True, kw_only=True)
class AttemptFinished(Event):
    """How an attempt ended and what it showed."""

    KIND: ClassVar[str] = "attempt.finished"
    attempt: int
    verdict: str
    oom_kind: str | None = None
    evidence: str | None = None
    numbers: Mapping[str, float] | None = None
    exit_code: int | None = None
    duration_s: float = 0.0
    killed_by_supervisor: bool = False
    adopted: bool = False
    kill_s: float | None = None
    peak_mib: float | None = None
    """The attempt's measured peak (trainer's own report or the injected code's), MiB."""
    peak_source: str | None = None
    trained_steps: Mapping[str, int] | None = None
    checkpoints: Sequence[Sequence[Any]] = ()
    """[path, step] of each checkpoint this attempt wrote (new or changed during it)."""
    gpu_peak_mib: float | None = None
    gpu_release: Mapping[str, Any] | None = None
    calibration: float | None = None
    predicted_mib: float | None = None
    escaped: Sequence[str] = ()
    """Processes found only by the attempt's marker, outside its tree (left by a daemon)."""
    wrapper_died: bool = False
    ended_at: float | None = None
    """Wall time the command itself ended (before the tree kill, drain and GPU release wait;
    for an attempt that ended while no supervisor watched, when its status was written)."""
    progress: Mapping[str, Any] | None = None
    """The trainer's own progress as it streamed (progress.Tracker.summary): the highest step,
    the total, timed samples [[step, wall time]], when training began, the longest gap."""
    checkpoint_times: Sequence[Sequence[float]] = ()
    """[step, wall time] of each checkpoint this attempt wrote (its trainer_state.json mtime)."""
    watchdog: str | None = None
    """The silence limit in force when the attempt ended, and how it was chosen."""
    host_peak_mib: float | None = None
    """Peak resident (host) memory of the attempt's processes, sampled every 0.5 s."""
    host_cap_mib: float | None = None
    """The host memory limit the command ran under (RLIMIT_AS, else its cgroup's), MiB."""
    host_cap_source: str | None = None
    """`RLIMIT_AS` (prlimit --as, ulimit -v) or `cgroup memory.max`."""
    cost: Mapping[str, float] | None = None
    """What the trainer measured of its own run: runtime_s, samples_per_s, steps_per_s, loss."""
    fingerprints: Mapping[str, Mapping[str, Sequence[int]]] = field(default_factory=dict)
    """Each checkpoint this attempt wrote: path -> {relative file path: [size, mtime ns]}. A
    folder resumes only while its files still match (checkpoints.choose)."""

    def to_verdict(self) -> Verdict:
        """The verdict as the policy sees it."""
        numbers = OomNumbers(**{k: v for k, v in (self.numbers or {}).items()
                                if k in _NUMBER_FIELDS})
        return Verdict(kind=VerdictKind(self.verdict),
                       oom_kind=OomKind(self.oom_kind) if self.oom_kind else None,
                       evidence=self.evidence, numbers=numbers if self.numbers else None)


@dataclass(frozen=True, slots=True, kw_only=True)
class RungSkipped(Event):
    """A config was passed over on its predicted memory, never run."""

    KIND: ClassVar[str] = "rung.skipped"
    rung: str | None
    knobs: Knobs
    changed: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    predicted_mib: float
    method: str
    reason: str

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> Self:
        """Knobs come back as Knobs."""
        values = _checked(cls, _known(cls, data))
        values["knobs"] = Knobs.from_dict(dict(_mapping(data.get("knobs"), "knobs")))
        return cls(**values)


@dataclass(frozen=True, slots=True, kw_only=True)
class EstimateDistrusted(Event):
    """Every config was predicted over the device: predictions stop deciding for this run."""

    KIND: ClassVar[str] = "estimate.distrusted"
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class EstimateChecking(Event):
    """Every remaining config was predicted clearly over the device: the one predicted
    smallest runs once for real; if it OOMs too, nothing fits and the run stops there."""

    KIND: ClassVar[str] = "estimate.checking"
    reason: str
    knobs: Knobs
    predicted_mib: float

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> Self:
        """Knobs come back as Knobs."""
        values = _checked(cls, _known(cls, data))
        values["knobs"] = Knobs.from_dict(dict(_mapping(data.get("knobs"), "knobs")))
        return cls(**values)


@dataclass(frozen=True, slots=True, kw_only=True)
class LadderStepped(Event):
    """The policy chose the next config after an OOM."""

    KIND: ClassVar[str] = "ladder.stepped"
    after_attempt: int
    next_attempt: int
    rung: str
    changed: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    restored: Sequence[Sequence[Any]] = ()
    skipped: Sequence[str] = ()
    note: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SpeedCompared(Event):
    """Two fitting configs of the same quality were timed (speed.py); the faster trains on."""

    KIND: ClassVar[str] = "speed.compared"
    attempts: Sequence[int]
    """The two timed attempts: the config the walk found, then its rival."""
    configs: Sequence[str]
    step_s: Sequence[float | None]
    """Seconds per optimizer step, as the trainer's own progress lines streamed past."""
    timed_steps: Sequence[int] = ()
    samples_per_s: Sequence[float | None] = ()
    samples_per_step: int = 0
    winner: int
    """The attempt whose config the run trains on."""
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SpeedSkipped(Event):
    """A same-quality rival of the fitting config was not timed, and why."""

    KIND: ClassVar[str] = "speed.skipped"
    attempt: int
    fitted: str
    """The config the run settled on (not `config`: the log leaves that name out)."""
    alternative: str | None = None
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryScheduled(Event):
    """A transient failure or hang: the same config runs again after a delay."""

    KIND: ClassVar[str] = "transient.retrying"
    attempt: int
    delay_s: float
    retry: int = 0
    """The retry's number in its failure streak (1 = the first retry after a failure)."""
    verdict: str | None = None
    """What the failure was (transient, hang, lost)."""
    checkpoint: str | None = None
    """The checkpoint the retry continues from (None: fresh)."""
    step: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointResumed(Event):
    """The next attempt continues from a checkpoint an earlier one wrote."""

    KIND: ClassVar[str] = "checkpoint.resumed"
    attempt: int
    checkpoint: str
    step: int


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointSkipped(Event):
    """A checkpoint exists but the next config cannot load it: it starts fresh."""

    KIND: ClassVar[str] = "checkpoint.skipped"
    attempt: int
    checkpoint: str
    step: int
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointRescued(Event):
    """The trainer saved a rescue checkpoint before it ended: after its step ran out of memory
    (`why` = "oom"), or when asked to stop politely ("stop")."""

    KIND: ClassVar[str] = "checkpoint.rescued"
    attempt: int
    step: int
    why: str
    seconds: float | None = None
    checkpoint: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RescueFailed(Event):
    """The trainer's rescue save failed (it left no folder): the run goes on from the newest
    checkpoint it has."""

    KIND: ClassVar[str] = "checkpoint.rescue_failed"
    attempt: int
    step: int
    why: str
    error: str
    seconds: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class GpuHeld(Event):
    """An attempt's GPU memory did not come back in time."""

    KIND: ClassVar[str] = "gpu.held"
    attempt: int
    detail: str


@dataclass(frozen=True, slots=True, kw_only=True)
class TerminalLost(Event):
    """SIGHUP: the terminal went away; the supervisor carries on, its output into the folder."""

    KIND: ClassVar[str] = "terminal.lost"
    output_to: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SignalReceived(Event):
    """SIGTERM or SIGINT reached the supervisor."""

    KIND: ClassVar[str] = "signal.received"
    signal: str
    how: str


@dataclass(frozen=True, slots=True, kw_only=True)
class LadderExhausted(Event):
    """No rung can change the config any further (or the attempt budget is spent)."""

    KIND: ClassVar[str] = "ladder.exhausted"
    reason: str
    spent: Sequence[str] = ()
    skipped: Sequence[str] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class FinalWritten(Event):
    """The working config's files were written into the run folder."""

    KIND: ClassVar[str] = "final.written"
    files: Sequence[str] = ()
    fresh_argv: Sequence[str] = ()
    """The working command as a fresh run (no resume from this run's checkpoints)."""
    continue_argv: Sequence[str] = ()
    """The working command continuing from this run's last checkpoint (empty when none)."""
    continue_checkpoint: str | None = None
    output_dir: str | None = None
    """Where the working command writes its model (a rung may have moved it to a sibling)."""
    env: Mapping[str, str] = field(default_factory=dict)
    """Variables the working config sets in the environment (exported by the scripts)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Notified(Event):
    """The user's --notify command ran after the run."""

    KIND: ClassVar[str] = "notify.finished"
    command: str
    exit_code: int | None
    error: str | None = None
    output: Sequence[str] = ()
    """Its last lines of output (all of it is in `<run>/notify.log`)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RunFinished(Event):
    """The run ended: how, after how many attempts, and why."""

    KIND: ClassVar[str] = "run.finished"
    status: str
    exit_code: int
    attempt: int
    """The number of the last attempt (the fitting one when status is `fitted`)."""
    reason: str | None = None
    spent: Sequence[str] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointPassedOver(Event):
    """A checkpoint folder no attempt resumes from: not whole, not this run's own, or it failed
    to load; `reason` says which."""

    KIND: ClassVar[str] = "checkpoint.passed_over"
    attempt: int
    """The attempt that was about to start (or that found it, for a folder that appeared)."""
    checkpoint: str
    step: int = 0
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeLeftoversEnded(Event):
    """A `--help` probe a killed supervisor left running was ended at this run's start."""

    KIND: ClassVar[str] = "probe.leftovers_ended"
    pids: Sequence[int] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class WatchdogExtended(Event):
    """An attempt was judged hung at the same step as the one before it: the next attempt's
    silence limit grows, so that a slow phase that is not a hang costs one retry."""

    KIND: ClassVar[str] = "watchdog.extended"
    attempt: int
    """The attempt that runs under the longer limit."""
    step: int
    """The step both hangs were judged at."""
    limit_s: float


EVENT_TYPES: Mapping[str, type[Event]] = {
    cls.KIND: cls for cls in (
        RunStarted, RunResumed, AttemptStarted, AttemptSpawned, AttemptFinished, RungSkipped,
        EstimateDistrusted, EstimateChecking, LadderStepped, SpeedCompared, SpeedSkipped,
        RetryScheduled, CheckpointResumed, CheckpointSkipped, GpuHeld, TerminalLost,
        SignalReceived, LadderExhausted, FinalWritten, Notified, RunFinished,
        CheckpointPassedOver,
        ProbeLeftoversEnded,
        WatchdogExtended,
                CheckpointRescued, RescueFailed,
    )
}
"""Every event the journal may hold, by its `event` name."""


def from_record(record: object) -> Event:
    """The typed event of one journal record; JournalError when it is not one."""
    if not isinstance(record, Mapping):
        msg = f"not a JSON object but {type(record).__name__}"
        raise JournalError(msg)
    version = record.get("v")
    if not isinstance(version, int) or version > SCHEMA_VERSION or version < 1:
        msg = (f"schema version {version!r} is not one this oom-supervisor reads "
               f"(it reads 1..{SCHEMA_VERSION}); use the version that wrote the run")
        raise JournalError(msg)
    kind = record.get("event")
    cls = EVENT_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        msg = f"unknown event {kind!r}"
        raise JournalError(msg)
    try:
        return cls.from_record(record)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        if isinstance(exc, JournalError):
            raise
        msg = f"event {kind!r} has missing or mistyped fields ({_one_line(exc)})"
        raise JournalError(msg) from None


# --- replay -----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class AttemptRecord:
    """One attempt as the journal tells it: started, maybe spawned, maybe finished."""

    started: AttemptStarted
    spawned: AttemptSpawned | None = None
    finished: AttemptFinished | None = None

    @property
    def number(self) -> int:
        """The attempt's number (1-based)."""
        return self.started.attempt

    @property
    def knobs(self) -> Knobs:
        """The config it ran."""
        return self.started.knobs


@dataclass(frozen=True, slots=True, kw_only=True)
class Checkpoint:
    """A checkpoint folder an attempt of this run wrote, and the config that wrote it."""

    path: str
    step: int
    knobs: Knobs
    attempt: int
    fingerprint: Mapping[str, Sequence[int]] | None = None
    """Its files as the attempt left them (None: journaled before fingerprints were)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RunState:
    """A run as its journal tells it; the one picture resume, report and status share."""

    config: RunConfig
    started_at: float
    events: tuple[Event, ...]
    attempts: tuple[AttemptRecord, ...]
    """Every attempt in order, finished or not."""
    walk: tuple[Attempt, ...]
    """What the policy has seen: finished attempts, and configs skipped on a prediction
    (number 0, a synthetic OOM verdict), in the order they happened."""
    skipped: tuple[RungSkipped, ...] = ()
    steps: tuple[LadderStepped, ...] = ()
    checkpoints: tuple[Checkpoint, ...] = ()
    progress: tuple[CheckpointResumed | CheckpointSkipped, ...] = ()
    passed_over: tuple[CheckpointPassedOver, ...] = ()
    """Checkpoint folders passed over (not whole, not this run's, failed to load), in order."""
    distrusted: bool = False
    checking: EstimateChecking | None = None
    """The check of the config predicted smallest, when every remaining one was predicted
    clearly over the device."""
    held: str | None = None
    final: FinalWritten | None = None
    finished: RunFinished | None = None
    resumes: tuple[RunResumed, ...] = ()
    last_ts: float = 0.0
    foreign_lines: int = 0
    """Lines of journal.jsonl that were not the supervisor's (a trainer wrote there): skipped."""

    @property
    def history(self) -> tuple[Attempt, ...]:
        """Finished attempts as the policy sees them."""
        return tuple(a for a in self.walk if a.number > 0)

    @property
    def pending(self) -> AttemptRecord | None:
        """The attempt that started and never finished (the supervisor died), if any."""
        unfinished = [a for a in self.attempts if a.finished is None]
        return unfinished[-1] if unfinished else None

    @property
    def done(self) -> int:
        """How many attempts finished."""
        return sum(1 for a in self.attempts if a.finished is not None)

    @property
    def status(self) -> str:
        """`running` until run.finished, then its status."""
        return self.finished.status if self.finished else "running"

    def attempt(self, number: int) -> AttemptRecord | None:
        """The record of attempt `number`."""
        return next((a for a in self.attempts if a.number == number), None)


SKIPPED_VERDICT = Verdict(kind=VerdictKind.OOM, evidence="predicted not to fit")
"""What the policy sees for a config skipped on its prediction."""


def replay(records: Iterable[Mapping[str, Any]]) -> RunState:
    """Rebuild the run from its records; JournalError names the first record that is not valid."""
    events: list[Event] = []
    for number, record in enumerate(records, start=1):
        try:
            events.append(from_record(record))
        except JournalError as exc:
            msg = (f"journal event {number}: {exc}; the journal was edited or damaged: restore "
                   "it, or start a new run (the folder's logs and configs are left as they are)")
            raise JournalError(msg) from None
    return replay_events(events)


def replay_events(events: Sequence[Event]) -> RunState:
    """The same as replay, from typed events."""
    if not events or not isinstance(events[0], RunStarted):
        msg = "the journal does not begin with run.started; it is not an oom-supervisor journal"
        raise JournalError(msg)
    first = events[0]
    attempts: dict[int, AttemptRecord] = {}
    walk: list[Attempt] = []
    skipped: list[RungSkipped] = []
    steps: list[LadderStepped] = []
    checkpoints: list[Checkpoint] = []
    progress: list[CheckpointResumed | CheckpointSkipped] = []
    resumes: list[RunResumed] = []
    passed_over: list[CheckpointPassedOver] = []
    distrusted = False
    checking: EstimateChecking | None = None
    held: str | None = None
    final: FinalWritten | None = None
    finished: RunFinished | None = None
    for event in events[1:]:
        match event:
            case AttemptStarted():
                attempts[event.attempt] = AttemptRecord(started=event)
            case AttemptSpawned() if event.attempt in attempts:
                attempts[event.attempt] = dataclasses.replace(attempts[event.attempt],
                                                              spawned=event)
            case AttemptFinished() if event.attempt in attempts:
                record = dataclasses.replace(attempts[event.attempt], finished=event)
                attempts[event.attempt] = record
                walk.append(Attempt(number=event.attempt, knobs=record.knobs,
                                    rung=record.started.rung, verdict=event.to_verdict()))
                if event.verdict == VerdictKind.CHECKPOINT_UNUSABLE:
                    # It failed to load: never a candidate again (unless written anew later).
                    bad = record.knobs.resume_from_checkpoint
                    checkpoints = [c for c in checkpoints if c.path != bad]
                checkpoints.extend(Checkpoint(path=str(p), step=int(s), knobs=record.knobs,
                                              attempt=event.attempt,
                                              fingerprint=_fingerprint(event, str(p)))
                                   for p, s in event.checkpoints)
            case RungSkipped():
                skipped.append(event)
                walk.append(Attempt(number=0, knobs=event.knobs, rung=event.rung,
                                    verdict=SKIPPED_VERDICT))
            case EstimateDistrusted():
                distrusted = True
            case EstimateChecking():
                checking = event
            case LadderStepped():
                steps.append(event)
            case CheckpointResumed() | CheckpointSkipped():
                progress.append(event)
            case CheckpointPassedOver():
                passed_over.append(event)
            case GpuHeld():
                held = event.detail
            case FinalWritten():
                final = event
            case RunFinished():
                finished = event
            case RunResumed():
                resumes.append(event)
                finished = None  # only an interrupted run is resumed: it is running again
            case RunStarted():
                msg = "the journal holds a second run.started; two runs were written into it"
                raise JournalError(msg)
            case _:
                pass
    return RunState(config=first.config, started_at=first.ts, events=tuple(events),
                    attempts=tuple(attempts[n] for n in sorted(attempts)), walk=tuple(walk),
                    skipped=tuple(skipped), steps=tuple(steps), checkpoints=tuple(checkpoints),
                    progress=tuple(progress), passed_over=tuple(passed_over),
                    distrusted=distrusted, checking=checking,
                    held=held, final=final,
                    finished=finished, resumes=tuple(resumes), last_ts=events[-1].ts)


# --- helpers ----------------------------------------------------------------------------------

_NUMBER_FIELDS = frozenset(f.name for f in dataclasses.fields(OomNumbers))


def numbers_of(verdict: Verdict) -> dict[str, float] | None:
    """An OOM's figures as a plain mapping (None where the message gave none)."""
    if verdict.numbers is None:
        return None
    return {k: v for k in sorted(_NUMBER_FIELDS)
            if isinstance(v := getattr(verdict.numbers, k), int | float)}


_SIMPLE: Mapping[str, tuple[type, ...]] = {
    "int": (int,), "float": (int, float), "str": (str,), "bool": (bool,),
}


def _checked(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Reject values whose JSON type cannot be the field's (a hand-edited or damaged journal)."""
    for f in dataclasses.fields(cls):
        if f.name not in values or not isinstance(f.type, str):
            continue
        value = values[f.name]
        options = [t.strip() for t in f.type.split("|")]
        if value is None and "None" in options:
            continue
        simple = [_SIMPLE[t] for t in options if t in _SIMPLE]
        if len(simple) != len(options) - options.count("None"):
            continue  # a container or a class: its own from_record checks it
        allowed = tuple(t for group in simple for t in group)
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            msg = f"{f.name} is {type(value).__name__}, expected {f.type}"
            raise JournalError(msg)
    return values


def _fingerprint(event: AttemptFinished, path: str) -> Mapping[str, Sequence[int]] | None:
    """A checkpoint's journaled fingerprint; a damaged one reads as {} (it matches no folder)."""
    found = event.fingerprints.get(path) if isinstance(event.fingerprints, Mapping) else None
    if found is None:
        return None
    return found if isinstance(found, Mapping) else {}


def _tuples(value: object) -> object:
    if isinstance(value, list | tuple):
        return tuple(_tuples(v) for v in value)
    return value


def _known(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def _plain(value: object) -> object:
    if isinstance(value, Knobs):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _mapping(value: object, name: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        msg = f"{name} is not an object"
        raise JournalError(msg)
    return value


def _strings(value: object, name: str) -> list[str]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        msg = f"{name} is not a list of strings"
        raise JournalError(msg)
    return list(value)


def _number(value: object, name: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        msg = f"{name} is not a number"
        raise JournalError(msg)
    return float(value)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]
