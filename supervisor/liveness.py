"""Whether a silent attempt is alive or hung, judged from several kinds of evidence.

The trainer's output is one signal among several. What counts as silence is output whose step
does not advance (`trainer_output.Tracker`: a redrawn progress frame is not progress); what
counts as too long a silence is the watchdog's limit (learnt from the run's cadence). Past that
limit this module looks at what a person at the console would look at, sampled at the edge
(runner.py) every few seconds into `Sample`s:

- files written anywhere under the trainer's output folder (a DeepSpeed save goes into
  `checkpoint-N/global_stepN/`), as a bounded walk's (entries, bytes, newest mtime);
- the attempt tree's CPU time and storage I/O (psutil; the supervisor's own shim left out);
- GPU activity of the tree's processes (NVML), where a GPU is visible;
- for Python trainers, the main thread's innermost frames, written by the sampler thread of
  the injected `sitecustomize` (`_inject/stacks.py`) whenever they move somewhere new.

`Judge.observe` turns the samples into a `Reading`: alive (output moves), working (silent past
the limit, but with evidence of work, said in a sentence), or hung (silent past the limit, and
no evidence of work, or every sampled stack parked in a collective, a lock or a read). Pure:
the samples carry their own times, so recorded samples replay to the same readings.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import PurePath
from typing import Any

from supervisor.device_memory import inject_pythonpath

STACKS_ENV = "OOM_SUPERVISOR_STACKS"
"""Set in a Python attempt's environment: the folder the injected sampler writes stacks into."""
STACKS_INTERVAL_ENV = "OOM_SUPERVISOR_STACKS_S"
"""How often the injected sampler looks at the main thread (seconds)."""
STACKS_DIR = "stacks"
"""The sampler's folder inside the attempt folder: one `<pid>.json` per Python process."""
SAMPLES_FILE = "liveness-samples.jsonl"
"""Every sample taken during the attempt's silences, with the limit and the judgment."""
STATUS_FILE = "liveness.json"
"""Written into the attempt folder during a silence: what the trainer seems to be doing."""

# Where a main thread waits for someone else. Innermost Python frames only (a C call such as
# time.sleep or a socket read shows as the Python line that made it): function names from
# torch.distributed (distributed_c10d.py), threading, queue, socket, selectors, subprocess.
_COLLECTIVE = frozenset({
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_to_all",
    "all_to_all_single", "reduce", "reduce_scatter", "reduce_scatter_tensor", "broadcast",
    "broadcast_object_list", "barrier", "monitored_barrier", "gather", "scatter", "send", "recv",
    "synchronize", "_store_based_barrier", "wait_for_everyone", "_wait_for_workers",
})
_LOCK = frozenset({"acquire", "wait", "_wait_for_tstate_lock", "join", "get", "_recv_bytes",
                   "wait_for", "__enter__"})
_READ = frozenset({"read", "readline", "readlines", "readinto", "recv_into", "recvfrom",
                   "accept", "select", "poll", "communicate", "_communicate", "_recv"})
# The phase a frame's function names (HF Trainer, accelerate, DeepSpeed, datasets, torch).
_PHASES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("evaluating", re.compile(r"evaluat|predict|eval_loop|prediction_step")),
    ("saving", re.compile(r"save|checkpoint|serializ|_write|torch_save")),
    ("compiling", re.compile(r"compile|_dynamo|inductor|codegen|autotun")),
    ("preparing data", re.compile(r"tokeni|_map_single|\bmap\b|shard|_prepare_dataset|collat")),
    ("loading", re.compile(r"from_pretrained|load_state_dict|_load|load_checkpoint")),
)


class State(str, Enum):
    """What the evidence says of an attempt now."""

    ALIVE = "alive"
    """Its output advanced within the limit: nothing to judge."""
    WORKING = "working"
    """Silent past the limit, with evidence of work: not a hang."""
    HUNG = "hung"
    """Silent past the limit, and the evidence says nothing moves (or it waits on others)."""

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """The policy's [liveness] table, as the runner uses it."""

    enabled: bool = True
    """Judge a silence past the limit by evidence of work; False: silence alone is a hang."""
    stacks: bool = True
    """Inject the stack sampler into Python attempts, and read what it writes."""
    stack_interval_s: float = 2.0
    cpu_busy: float = 0.10
    sample_s: float = 2.0
    """How often the evidence is sampled during a silence."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Frame:
    """One Python frame: file, line, function, and the source text of the line."""

    file: str
    line: int
    func: str
    code: str = ""

    def where(self) -> str:
        """`func` (file.py:line)."""
        return f"`{self.func}` ({PurePath(self.file).name}:{self.line})"


@dataclass(frozen=True, slots=True, kw_only=True)
class Stack:
    """A process's main thread as the injected sampler last saw it move."""

    pid: int
    frames: tuple[Frame, ...]
    """Innermost last."""
    moved_at: float
    """Wall time the sampler last saw it somewhere it had not been recently."""
    sampled_at: float = 0.0

    @property
    def innermost(self) -> Frame | None:
        """The frame the thread is in now."""
        return self.frames[-1] if self.frames else None

    def parked(self) -> str | None:
        """What it waits in (`a collective`, `a lock`, `a read`), judged by the innermost
        frames' function names; None when it is not waiting on anyone."""
        names = [f.func for f in self.frames[-3:]]
        if any(n in _COLLECTIVE for n in names):
            return "a collective"
        if names and names[-1] in _LOCK:
            return "a lock"
        if names and names[-1] in _READ:
            return "a read"
        return None

    def waiting_frame(self) -> Frame | None:
        """The frame that names what it waits in (the collective, else the innermost)."""
        for frame in reversed(self.frames[-3:]):
            if frame.func in _COLLECTIVE:
                return frame
        return self.innermost

    def phase(self) -> str | None:
        """What the frames say it is doing (`evaluating`, `saving` ...), outermost match wins."""
        for frame in self.frames:
            for phase, pattern in _PHASES:
                if pattern.search(frame.func):
                    return phase
        return None

    def busy_frame(self) -> Frame | None:
        """The frame that best says what it is busy with: the outermost one that names a phase,
        else the innermost."""
        for frame in self.frames:
            if any(p.search(frame.func) for _, p in _PHASES):
                return frame
        return self.innermost

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> Stack | None:
        """From the sampler's JSON (`_inject/stacks.py`); None when it is not one."""
        try:
            frames = tuple(Frame(file=str(f[0]), line=int(f[1]), func=str(f[2]),
                                 code=str(f[3]) if len(f) > 3 else "")  # noqa: PLR2004
                           for f in data["frames"])
            return cls(pid=int(data["pid"]), frames=frames, moved_at=float(data["moved_at"]),
                       sampled_at=float(data.get("sampled_at", data["moved_at"])))
        except (KeyError, TypeError, ValueError, IndexError):
            return None


@dataclass(frozen=True, slots=True, kw_only=True)
class Sample:
    """What the edge saw of an attempt at one moment (wall time), and since the last sample."""

    at: float
    progress_at: float
    """When its output last advanced (a new step, or output that is not a redrawn frame)."""
    step: int | None = None
    cpu_s: float | None = None
    """CPU seconds the tree used since the previous sample (None: not measured)."""
    io_bytes: int | None = None
    """Storage bytes the tree read and wrote since the previous sample."""
    files_changed: bool | None = None
    """Files under the output folder changed since the previous sample (None: no folder)."""
    files_where: str | None = None
    """The folder whose files changed, relative to the output folder."""
    gpu_busy: bool | None = None
    """The tree's processes used a GPU since the previous sample (None: no GPU visible)."""
    stacks: tuple[Stack, ...] = ()

    def to_record(self) -> dict[str, Any]:
        """JSON-ready (recorded samples for tests)."""
        return {"at": self.at, "progress_at": self.progress_at, "step": self.step,
                "cpu_s": self.cpu_s, "io_bytes": self.io_bytes,
                "files_changed": self.files_changed, "files_where": self.files_where,
                "gpu_busy": self.gpu_busy,
                "stacks": [{"pid": s.pid, "moved_at": s.moved_at, "sampled_at": s.sampled_at,
                            "frames": [[f.file, f.line, f.func, f.code] for f in s.frames]}
                           for s in self.stacks]}

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> Sample:
        """The inverse of to_record."""
        stacks = tuple(s for s in (Stack.from_record(r) for r in data.get("stacks") or ())
                       if s is not None)
        return cls(at=float(data["at"]), progress_at=float(data["progress_at"]),
                   step=data.get("step"), cpu_s=data.get("cpu_s"), io_bytes=data.get("io_bytes"),
                   files_changed=data.get("files_changed"), files_where=data.get("files_where"),
                   gpu_busy=data.get("gpu_busy"), stacks=stacks)


@dataclass(frozen=True, slots=True, kw_only=True)
class Reading:
    """The judgment at one sample, with the evidence it rests on, in words."""

    state: State
    silent_s: float
    evidence: tuple[str, ...] = ()
    """Each kind of evidence, as a clause ("CPU busy (87 % of a core)")."""
    phase: str | None = None
    stuck_in: str | None = None
    """Where a hung attempt waits: "`all_reduce` (distributed_c10d.py:2806) in pid 1234"."""

    @property
    def is_hung(self) -> bool:
        """The evidence says hung."""
        return self.state is State.HUNG

    def sentence(self) -> str:
        """One line for the console: "evaluating: no output for 3 min, CPU busy, ..."."""
        head = f"{self.phase}: " if self.phase else ""
        parts = [f"no output for {human_s(self.silent_s)}", *self.evidence]
        return head + ", ".join(parts)

    def hang_reason(self) -> str:
        """What a hang verdict adds to "printed nothing for N s": the evidence and the frame."""
        said = "; ".join(self.evidence) if self.evidence else "no sign of work"
        if self.stuck_in:
            return f"{said}; stuck in {self.stuck_in}"
        return said


@dataclass(slots=True, kw_only=True)
class Judge:
    """Reads samples in order and says, at each, whether the attempt is alive, working or hung.

    Evidence of work during the silence (any kind, within the last `limit` seconds) keeps a
    silent attempt alive, except that CPU or GPU time does not when every sampled stack sits in
    a collective (NCCL spins the CPU and the GPU while it waits for a peer that never comes).
    """

    cpu_busy: float = 0.10
    """Share of one core the tree must use to count as busy (a redraw thread uses ~0.1 %)."""
    io_busy_bytes: int = 256 * 1024
    """Storage bytes per second that count as I/O work (the sampler's own writes are far less)."""
    parked_s: float = 0.0
    """How long a stack must have stayed where it is to count as parked (0: the limit)."""
    _last: Sample | None = None
    _work_at: dict[str, float] = field(default_factory=dict)
    _work_said: dict[str, str] = field(default_factory=dict)
    _moves: dict[int, set[float]] = field(default_factory=dict)

    def reset(self) -> None:
        """Output moved again: evidence of the last silence says nothing of the next."""
        self._last = None
        self._work_at.clear()
        self._work_said.clear()
        self._moves.clear()

    def observe(self, sample: Sample, limit_s: float) -> Reading:
        """The judgment now, given the silence limit that applies now."""
        last = self._last
        if last is not None and sample.progress_at != last.progress_at:
            self.reset()  # output moved in between: a new silence, judged afresh
            last = None
        self._last = sample
        silent_s = max(0.0, sample.at - sample.progress_at)
        self._note_work(last, sample)
        stacks = sample.stacks
        for stack in stacks:
            if stack.moved_at > sample.progress_at:
                # Rounded: a wall time carried onto the monotonic clock jitters by microseconds.
                self._moves.setdefault(stack.pid, set()).add(round(stack.moved_at, 1))
        # Moving: somewhere new at least twice since the output stopped (a thread that went
        # once into a sleep or a wait and stays there has not moved), the last time lately.
        moving = [s for s in stacks if len(self._moves.get(s.pid, ())) >= 2  # noqa: PLR2004
                  and sample.at - s.moved_at <= limit_s]
        if moving:
            newest = max(moving, key=lambda s: s.moved_at)
            frame = newest.busy_frame()
            self._work(newest.moved_at, "stack",
                       "stack moving" + (f" in {frame.where()}" if frame else ""))
        phase = _phase(stacks, sample)
        if silent_s <= limit_s or last is None:
            # The first sample of a silence has measured nothing yet (CPU, I/O and files are
            # counted between two samples): a hang is judged at the next one, on evidence.
            return Reading(state=State.ALIVE, silent_s=silent_s, phase=phase,
                           evidence=self._recent(sample.at, limit_s))
        recent = self._recent(sample.at, limit_s)
        parked_for = self.parked_s or limit_s
        parked = [s for s in stacks if s.parked() is not None
                  and sample.at - s.moved_at >= parked_for]
        in_collective = [s for s in parked if s.parked() == "a collective"]
        kinds = {k for k, at in self._work_at.items() if sample.at - at <= limit_s}
        if in_collective and not kinds & {"stack", "files", "io"}:
            # CPU and GPU do not count: a rank spinning in a collective is waiting, not working.
            stuck = in_collective[0]
            said = tuple(c for c in recent if not c.startswith(("CPU", "GPU")))
            return Reading(state=State.HUNG, silent_s=silent_s, phase=phase,
                           evidence=(*said, f"every moving part waits in {stuck.parked()}"),
                           stuck_in=_stuck_text(stuck))
        if kinds:
            return Reading(state=State.WORKING, silent_s=silent_s, phase=phase, evidence=recent)
        # The thread that stopped last is the one that stopped the run (a launcher's agent has
        # sat in its polling loop since the start).
        stopped = max(parked or stacks, key=lambda s: s.moved_at) if stacks else None
        evidence: tuple[str, ...] = _no_work(sample)
        waiting = [s for s in stacks if s.parked() == "a collective"]
        if waiting:
            # One rank stopped (asleep, in its own code) while a peer waits for it in a
            # collective, however briefly yet: the collective is what hangs, the stopped
            # rank is why; both are said.
            collective = max(waiting, key=lambda s: s.moved_at)
            others = [s for s in stacks if s.parked() != "a collective"]
            peer = max(others, key=lambda s: s.moved_at) if others else None
            clause = f"pid {collective.pid} waits in a collective"
            where = _stuck_text(peer) if peer is not None else None
            if where is not None:
                clause += f" for a process that stopped in {where}"
            evidence = (*evidence, clause)
            stopped = collective
        stuck_in = _stuck_text(stopped) if stopped is not None else None
        return Reading(state=State.HUNG, silent_s=silent_s, phase=phase,
                       evidence=evidence, stuck_in=stuck_in)

    def _note_work(self, last: Sample | None, sample: Sample) -> None:
        if last is None:
            return
        dt = max(1e-3, sample.at - last.at)
        if sample.cpu_s is not None and sample.cpu_s / dt >= self.cpu_busy:
            self._work(sample.at, "cpu", f"CPU busy ({100 * sample.cpu_s / dt:.0f} % of a core)")
        if sample.io_bytes is not None and sample.io_bytes / dt >= self.io_busy_bytes:
            self._work(sample.at, "io", f"disk I/O ({human_bytes(sample.io_bytes / dt)}/s)")
        if sample.files_changed:
            where = f" in {sample.files_where}" if sample.files_where else ""
            self._work(sample.at, "files", f"files being written{where}")
        if sample.gpu_busy:
            self._work(sample.at, "gpu", "GPU busy")

    def _work(self, at: float, kind: str, said: str) -> None:
        self._work_at[kind] = at
        self._work_said[kind] = said

    def _recent(self, now: float, window_s: float) -> tuple[str, ...]:
        order = ("cpu", "gpu", "io", "files", "stack")
        return tuple(self._work_said[k] for k in order
                     if k in self._work_at and now - self._work_at[k] <= window_s)


def _phase(stacks: Sequence[Stack], sample: Sample) -> str | None:
    for stack in stacks:
        phase = stack.phase()
        if phase is not None:
            return phase
    if sample.files_changed:
        return "saving"
    return None


def _stuck_text(stack: Stack) -> str | None:
    frame = stack.waiting_frame()
    if frame is None:
        return None
    code = f": {frame.code}" if frame.code else ""
    return f"{frame.where()}{code} in pid {stack.pid}"


def _no_work(sample: Sample) -> tuple[str, ...]:
    said = []
    if sample.cpu_s is not None:
        said.append("no CPU")
    if sample.files_changed is not None:
        said.append("no file written")
    if sample.io_bytes is not None:
        said.append("no disk I/O")
    if sample.gpu_busy is not None:
        said.append("no GPU activity")
    if sample.stacks:
        said.append("stack not moving")
    return tuple(said) or ("no sign of work",)


def human_s(seconds: float) -> str:
    """37 s, 3 min, 1 h 5 min: how long a silence has lasted, in words."""
    if seconds < 90:  # noqa: PLR2004
        return f"{seconds:.0f} s"
    if seconds < 5400:  # noqa: PLR2004
        return f"{seconds / 60:.0f} min"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"


def human_bytes(count: float) -> str:
    """1.5 MiB, 300 KiB."""
    if count >= 2**20:
        return f"{count / 2**20:.1f} MiB"
    return f"{count / 1024:.0f} KiB"


def grown_limit(floor_s: float, hangs_at_step: Iterable[tuple[int | None, float | None]], *,
                factor: float) -> tuple[float, int] | None:
    """A hang that recurs at the same step: the next attempt's silence limit grows.

    `hangs_at_step`: (step, limit) of each hang of the current streak, oldest first. When the
    last two hung at the same step, the limit becomes `factor` times the largest limit those
    hangs at that step were judged under (and never less than `factor` x the floor): a
    deterministic slow phase costs retries, not the night. None when nothing recurs.
    Returns (limit, step).
    """
    hangs = list(hangs_at_step)
    if len(hangs) < 2 or factor <= 1:  # noqa: PLR2004
        return None
    step = hangs[-1][0]
    if step is None or hangs[-2][0] != step:
        return None
    same: list[float] = []
    for at, limit in reversed(hangs):
        if at != step:
            break
        same.append(limit or 0.0)
    return factor * max(*same, floor_s), step


# --- the injected sampler: which attempts get it ---------------------------------------------

_PYTHON = re.compile(r"^(python|pypy)[\d.]*$")
# Launchers and trainers that are Python programs (console scripts): their workers inherit
# the environment, and with it the sampler.
_PYTHON_PROGRAMS = frozenset({"torchrun", "accelerate", "deepspeed", "llamafactory-cli", "trl",
                              "axolotl", "lmf", "tune", "composer", "lightning"})
_PREFIXES = frozenset({"env", "srun", "mpirun", "nohup", "stdbuf", "timeout", "numactl",
                       "taskset", "nice", "ionice", "uv", "pixi", "conda", "poetry"})
_SHEBANG_BYTES = 256


def is_python_command(argv: Sequence[str], *, path: str | None = None) -> bool:
    """Whether the command runs Python (directly, as a Python console script, or behind a
    prefix such as `env`, `srun` or `uv run`): only then can the sampler be injected."""
    for word in argv[:12]:
        if word.startswith("-") or ("=" in word and not word.startswith("/")):
            continue  # a prefix's option or an `env` assignment
        name = PurePath(word).name
        if _PYTHON.match(name) or name in _PYTHON_PROGRAMS or name.endswith(".py"):
            return True
        if name not in _PREFIXES and name not in {"run", "exec"}:
            return _has_python_shebang(word, path)
    return False


def _has_python_shebang(word: str, path: str | None) -> bool:
    found = shutil.which(word, path=path)
    if found is None:
        return False
    try:
        with open(found, "rb") as handle:  # noqa: PTH123
            head = handle.read(_SHEBANG_BYTES)
    except OSError:
        return False
    return head.startswith(b"#!") and b"python" in head.split(b"\n", 1)[0]


def inject_decision(argv: Sequence[str], env: Mapping[str, str], *, enabled: bool) -> bool:
    """Whether an attempt gets the injected sitecustomize for the stack sampler.

    One small function, so that other injected hooks can share the decision: the policy
    turns the sampler on, and the command must run Python.
    """
    return enabled and is_python_command(argv, path=env.get("PATH"))


def sampler_env(env: Mapping[str, str], folder: str, *, interval_s: float) -> dict[str, str]:
    """`env` with the injected sitecustomize first on PYTHONPATH and the sampler switched on."""
    out = dict(env)
    out["PYTHONPATH"] = inject_pythonpath(out.get("PYTHONPATH", ""))
    out[STACKS_ENV] = folder
    out[STACKS_INTERVAL_ENV] = f"{interval_s:g}"
    return out
