"""Checkpoints an attempt wrote, judged by what changed in its output folder, and which one the
next config may continue from.

Before each attempt the `checkpoint-N` folders (Hugging Face Trainer layout) and their
`trainer_state.json` times are listed; after it, only the folders that are new or whose state
changed are credited to it. A timestamp window would credit a checkpoint the previous attempt
wrote in its last second to the next one, with the wrong settings.

A checkpoint is resumed only when it is whole and this run's own (`verify`, `is_own`):

- its name is `checkpoint-<positive integer>` (no leading zeros, nothing after it);
- its `trainer_state.json` parses, and its `global_step` is the folder's number and within the
  run's `max_steps` and the trainer's own total;
- it holds no `checkpoint-is-incomplete.txt` (transformers 5's just-in-time save writes it
  while the save is under way);
- the weight files the layout needs exist and are whole by their headers (safetensors: the
  header's length and data offsets cover the file exactly; an `*.index.json` names only shards
  that exist; torch zip files end with their central directory), and a saved scheduler has its
  optimizer beside it. Cheap checks: no tensor is loaded;
- an attempt of this run wrote it: the journal holds a fingerprint of each folder an attempt
  wrote (its files' relative paths, sizes and mtimes) and only a folder that still matches its
  fingerprint is a candidate.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import struct
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from supervisor._compat import Self
from supervisor.command import CommandError
from supervisor.events import Checkpoint
from supervisor.files import NotRegularFileError, open_regular
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


STATE = "trainer_state.json"
INCOMPLETE = "checkpoint-is-incomplete.txt"
"""transformers 5's just-in-time checkpoint sentinel (transformers/trainer_jit_checkpoint.py
writes it into the folder before the save and removes it after): present, the save never
finished."""
LOOKS_LIKE = re.compile(r"^checkpoint-", re.ASCII)
"""A folder a person (or a tool) may take for a checkpoint; those with another name than
CHECKPOINT_NAME are passed over with a line, never resumed."""
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json", "adapter_model.safetensors", "adapter_model.bin")
"""The weight files Trainer._load_from_checkpoint looks for (transformers 5.25), one suffices."""
_OTHER_LAYOUTS = re.compile(r"^(?:global_step\d+|pytorch_model_fsdp.*|optimizer_\d+)$")
"""DeepSpeed's `global_stepN` and FSDP's sharded folders: weights the Trainer loads elsewhere."""
_MAX_HEADER = 100_000_000
"""safetensors refuses a header over 100 MB (safetensors/src/tensor.rs, MAX_HEADER_SIZE)."""
_MAX_STATE_BYTES = 256 * 2**20
_SLACK_NS = 2_000_000_000
"""File times on some file systems are coarse (2 s on FAT, 1 s on older NFS)."""

_BAR_LAG = 10
"""Steps a progress bar may trail the trainer: tqdm redraws at most every 0.1 s, so a trainer
killed after fast steps may have saved a few steps past its last drawn one."""

Fingerprint = Mapping[str, Sequence[int]]
"""A checkpoint folder's files: relative path -> (size in bytes, mtime in ns)."""


def fingerprint(path: str | Path) -> dict[str, list[int]]:
    """Every file under a checkpoint folder, with its size and mtime (symlinks not followed)."""
    root = Path(path)
    out: dict[str, list[int]] = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            full = Path(dirpath) / name
            with contextlib.suppress(OSError):
                st = full.lstat()
                out[full.relative_to(root).as_posix()] = [st.st_size, st.st_mtime_ns]
    return out


def _same(recorded: Fingerprint, now: Fingerprint) -> bool:
    def norm(f: Fingerprint) -> dict[str, tuple[int, ...]]:
        return {str(k): tuple(int(x) for x in v) for k, v in f.items()}
    try:
        return norm(recorded) == norm(now)
    except (TypeError, ValueError, AttributeError):  # a damaged journal: it matches nothing
        return False


def verify(path: str | Path, *, max_steps: int | None = None) -> str | None:
    """Why the checkpoint folder is not whole, in a few words; None when it is.

    Cheap checks only: the name, trainer_state.json, the incomplete-save sentinel, and the
    weight and optimizer files by their headers (never a tensor loaded).
    """
    folder_path = Path(path)
    match = CHECKPOINT_NAME.match(folder_path.name)
    if match is None:
        return "its name is not checkpoint-<number> (a positive number, no leading zeros)"
    step = int(match.group(1))
    if folder_path.is_symlink() or not folder_path.is_dir():
        return "it is not a folder (a link or a file)"
    if (folder_path / INCOMPLETE).exists():
        return f"it holds {INCOMPLETE}: its save never finished"
    state, why = _read_state(folder_path / STATE)
    if state is None:
        return why
    global_step = state.get("global_step")
    if not isinstance(global_step, int) or isinstance(global_step, bool):
        return f"its {STATE} has no global_step"
    if global_step != step:
        return f"its {STATE} says step {global_step}, its name step {step}"
    own_total = state.get("max_steps")
    if isinstance(own_total, int) and not isinstance(own_total, bool) and 0 < own_total < step:
        return f"step {step} is past the {own_total} steps its own {STATE} plans"
    if max_steps and step > max_steps:
        return f"step {step} is past the run's {max_steps} steps"
    return _weights_whole(folder_path)


def _read_state(path: Path) -> tuple[dict[str, object] | None, str]:
    """trainer_state.json as a dict, or None and why not."""
    try:
        if path.is_symlink() or not path.is_file():
            return None, f"it has no {STATE}"
        if path.stat().st_size > _MAX_STATE_BYTES:
            return None, f"its {STATE} is over {_MAX_STATE_BYTES // 2**20} MiB"
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        return None, f"its {STATE} cannot be read ({exc.strerror or exc})"
    except (ValueError, UnicodeDecodeError) as exc:
        return None, f"its {STATE} does not parse ({_short(exc)})"
    if not isinstance(data, dict):
        return None, f"its {STATE} is not a JSON object"
    return data, ""


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__


def _weights_whole(folder_path: Path) -> str | None:
    """Why the folder's weights (and optimizer) would not load, by their headers; None: whole."""
    try:
        entries = {e.name: e for e in os.scandir(folder_path)}
    except OSError as exc:
        return f"it cannot be listed ({exc.strerror or exc})"
    other = any(_OTHER_LAYOUTS.match(n) or (e.is_dir(follow_symlinks=False) and any(
        (Path(e.path) / w).is_file() for w in ("adapter_model.safetensors", "adapter_model.bin")))
        for n, e in entries.items())
    if not other and not any(w in entries for w in WEIGHT_FILES):
        return ("it holds no weight files (" + ", ".join(WEIGHT_FILES[::2]) + " or an index)")
    for name in sorted(entries):
        if not entries[name].is_file(follow_symlinks=False):
            continue
        file = folder_path / name
        why: str | None = None
        if name.endswith(".safetensors"):
            why = safetensors_whole(file)
        elif name.endswith(".index.json"):
            why = _index_whole(file)
        elif name.endswith((".bin", ".pt", ".pth")):
            why = zip_whole(file)
        if why is not None:
            return why
    if "scheduler.pt" in entries and "optimizer.pt" not in entries and not other:
        return "its scheduler was saved but not its optimizer (optimizer.pt is missing)"
    return None


def safetensors_whole(file: Path) -> str | None:
    """Why a .safetensors file would not load, from its header alone; None when it would.

    The format: 8 bytes (little-endian header length N), N bytes of JSON naming each tensor's
    data_offsets within the data that follows; the data must cover the rest of the file exactly
    (what safetensors' own "file not fully covered" refuses).
    """
    try:
        size = file.stat().st_size
        with file.open("rb") as handle:
            head = handle.read(8)
            if len(head) < 8:  # noqa: PLR2004 - the header length's own 8 bytes
                return f"{file.name} is cut short ({size} bytes)"
            (length,) = struct.unpack("<Q", head)
            if length > _MAX_HEADER or 8 + length > size:
                return (f"{file.name} is cut short: its header alone would take {length} bytes "
                        f"of its {size}")
            header = json.loads(handle.read(length))
    except OSError as exc:
        return f"{file.name} cannot be read ({exc.strerror or exc})"
    except (ValueError, UnicodeDecodeError):
        return f"{file.name} has a header that does not parse"
    if not isinstance(header, dict):
        return f"{file.name} has a header that is not a JSON object"
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2  # noqa: PLR2004 - [begin, end]
                or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            return f"{file.name} has a header entry without valid data offsets ({key})"
        end = max(end, offsets[1])
    covered = 8 + length + end
    if covered != size:
        what = "cut short" if covered > size else "longer than its header says"
        return f"{file.name} is {what}: its header covers {covered} bytes, the file has {size}"
    return None


def zip_whole(file: Path) -> str | None:
    """Why a torch.save file (a zip archive) would not open; None when its directory is whole.

    zipfile reads the end record and the central directory only. A file in torch's legacy
    (pre-1.6, non-zip) format cannot be checked cheaply and passes.
    """
    try:
        with file.open("rb") as handle:
            if handle.read(4) != b"PK\x03\x04":
                return None
            with zipfile.ZipFile(handle):
                pass
    except OSError as exc:
        return f"{file.name} cannot be read ({exc.strerror or exc})"
    except (zipfile.BadZipFile, ValueError, EOFError):
        return f"{file.name} is cut short or damaged: its zip directory does not read"
    return None


def _index_whole(file: Path) -> str | None:
    """Why a sharded checkpoint's index would not load: it parses, and names only shards that
    exist beside it and are whole."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        return f"{file.name} cannot be read ({exc.strerror or exc})"
    except (ValueError, UnicodeDecodeError):
        return f"{file.name} does not parse"
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        return f"{file.name} has no weight_map"
    for shard in sorted({str(v) for v in weight_map.values()}):
        path = file.parent / shard
        if "/" in shard or "\\" in shard or shard in (".", "..") or not path.is_file():
            return f"{file.name} names a shard that is not there ({shard})"
        why = safetensors_whole(path) if shard.endswith(".safetensors") else zip_whole(path)
        if why is not None:
            return why
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class Seen:
    """What the attempt's own trainer said of its steps: where it began, how far it got, and
    its total (None where it did not say)."""

    resumed: int = 0
    reached: int | None = None
    total: int | None = None


def _not_ours(path: str, *, since_ns: int, max_steps: int | None,
              seen: Seen | None = None) -> str | None:
    """Why a checkpoint that appeared during an attempt was not written by it; None: it was.

    Its trainer_state.json was written before the attempt began (copied in with its times),
    or it names another step than the folder, or a step past the run's steps (planted), or a
    step the attempt's own trainer never was at, or another plan than its (another run in a
    shared output folder). A torn state says nothing of who wrote it: the folder is credited
    and `verify` judges it.
    """
    folder_path = Path(path)
    try:
        mtime = (folder_path / STATE).stat().st_mtime_ns
    except OSError:
        return f"it has no {STATE}"
    if mtime < since_ns - _SLACK_NS:
        return "its files are older than the attempt (copied in, not written by it)"
    state, _ = _read_state(folder_path / STATE)
    if state is None:
        return None
    match = CHECKPOINT_NAME.match(folder_path.name)
    step = int(match.group(1)) if match else 0
    global_step = state.get("global_step")
    if isinstance(global_step, int) and global_step != step:
        return f"its {STATE} says step {global_step}, its name step {step}"
    if max_steps and step > max_steps:
        return f"step {step} is past the run's {max_steps} steps"
    seen = seen or Seen()
    if step < seen.resumed:
        return f"step {step} is before the step the attempt resumed from ({seen.resumed})"
    if seen.reached is not None and step > seen.reached + max(_BAR_LAG, seen.reached // 10):
        return f"step {step} is past the step the attempt's trainer reached ({seen.reached})"
    planned = state.get("max_steps")
    if (seen.total and isinstance(planned, int) and not isinstance(planned, bool)
            and planned > 0 and planned != seen.total):
        return f"it plans {planned} steps, the attempt's trainer {seen.total}"
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class Credit:
    """What an attempt wrote into the output folder: its checkpoints, with their fingerprints,
    and the new folders it did not write (path, why)."""

    wrote: list[tuple[str, int]]
    fingerprints: dict[str, dict[str, list[int]]]
    foreign: list[tuple[str, str]]


def credit(before: Listing, after: Listing, *, since_s: float,
           max_steps: int | None = None, seen: Seen | None = None) -> Credit:
    """The checkpoints an attempt begun at `since_s` wrote, each fingerprinted; the new folders
    that appeared meanwhile but were not written by it are named with the reason."""
    wrote, foreign = [], []
    for path, step in written(before, after):
        why = _not_ours(path, since_ns=int(since_s * 1e9), max_steps=max_steps, seen=seen)
        if why is None:
            wrote.append((path, step))
        else:
            foreign.append((path, why))
    return Credit(wrote=wrote, fingerprints={p: fingerprint(p) for p, _ in wrote},
                  foreign=foreign)


def steps_per_epoch(paths: Iterable[str | None]) -> float | None:
    """Optimizer steps per epoch in the trainer's own words: the latest (step, epoch) entry of
    the log_history in these checkpoints' trainer_state.json (None: none says)."""
    best: tuple[int, float] | None = None
    for path in paths:
        state = _read_state(Path(path) / STATE)[0] if path else None
        history = state.get("log_history") if state else None
        for entry in history if isinstance(history, list) else ():
            step = entry.get("step") if isinstance(entry, dict) else None
            epoch = entry.get("epoch") if isinstance(entry, dict) else None
            if (isinstance(step, int) and isinstance(epoch, int | float) and step > 0
                    and epoch > 0 and (best is None or step > best[0])):
                best = (step, float(epoch))
    return best[0] / best[1] if best else None


def steps_from_logs(seen: Mapping[str, object] | None, per_epoch: float | None,
                    ) -> dict[str, object] | None:
    """The trainer's progress with the step its log dicts reached, where it showed no bar.

    An HF Trainer without a progress bar prints only its log dicts; each says the epoch it is
    in, and the checkpoints' log_history says how many steps an epoch holds: their product is
    the step (the OOM at step 71 is placed at 71, not at checkpoint-60).
    """
    if not seen or seen.get("step") is not None or not per_epoch:
        return dict(seen) if seen else None
    epochs = seen.get("log_epochs")
    if not isinstance(epochs, list | tuple) or not epochs:
        return dict(seen)
    samples = [[round(float(e) * per_epoch), t] for e, t in epochs if t is not None]
    return {**seen, "step": round(float(epochs[-1][0]) * per_epoch), "samples": samples,
            "step_source": (f"the trainer's log dicts: epoch x {per_epoch:g} steps per epoch "
                            "(its trainer_state.json)")}


@dataclass(frozen=True, slots=True, kw_only=True)
class Choice:
    """The checkpoint the next attempt continues from (None: fresh), and why not, if not."""

    checkpoint: Checkpoint | None
    passed_over: Checkpoint | None = None
    reason: str | None = None
    unusable: tuple[tuple[Checkpoint, str], ...] = ()
    """Newer checkpoints of this run passed over on the way: not whole, or changed since."""


def own(checkpoints: Sequence[Checkpoint]) -> list[Checkpoint]:
    """The latest record of each checkpoint folder this run wrote that is still on disk."""
    latest: dict[str, Checkpoint] = {}
    for c in checkpoints:
        latest[c.path] = c
    return sorted((c for c in latest.values() if (Path(c.path) / STATE).is_file()),
                  key=lambda c: (c.step, c.attempt))


def _changed(checkpoint: Checkpoint) -> str | None:
    if checkpoint.fingerprint is None:  # journaled before fingerprints were
        return None
    if _same(checkpoint.fingerprint, fingerprint(checkpoint.path)):
        return None
    return (f"it changed after attempt {checkpoint.attempt} wrote it (its files' sizes or "
            "times differ): another process wrote into it")


def choose(checkpoints: Sequence[Checkpoint], new: Knobs, *,
           max_steps: int | None = None) -> Choice:
    """The newest whole checkpoint of this run, unchanged since, whose config `new` can load."""
    alive = own(checkpoints)
    if not alive:
        return Choice(checkpoint=None)
    whole: list[Checkpoint] = []
    passed: list[tuple[Checkpoint, str]] = []
    for c in alive:
        why = _changed(c) or verify(c.path, max_steps=max_steps)
        if why is None:
            whole.append(c)
        else:
            passed.append((c, why))
    compatible = [c for c in whole if incompatible(c.knobs, new) is None]
    if compatible:
        chosen = compatible[-1]
        return Choice(checkpoint=chosen, unusable=tuple(
            (c, why) for c, why in passed if c.step > chosen.step))
    if whole:
        return Choice(checkpoint=None, passed_over=whole[-1],
                      reason=incompatible(whole[-1].knobs, new), unusable=tuple(passed))
    return Choice(checkpoint=None, unusable=tuple(passed))


def strays(output_dir: Path | None, own_paths: Iterable[str]) -> list[tuple[str, str]]:
    """(path, why) of each checkpoint-like folder in the output folder that this run did not
    write (or whose name is not a checkpoint's): never resumed, named once."""
    if output_dir is None:
        return []
    mine = {os.path.normpath(p) for p in own_paths}
    found: list[tuple[str, str]] = []
    with contextlib.suppress(OSError):
        for entry in sorted(os.scandir(output_dir), key=lambda e: e.name):
            if not LOOKS_LIKE.match(entry.name) or os.path.normpath(entry.path) in mine:
                continue
            if not entry.is_dir(follow_symlinks=False) and not entry.is_symlink():
                continue
            if CHECKPOINT_NAME.match(entry.name) is None:
                why = "its name is not checkpoint-<number> (a positive number, no leading zeros)"
            else:
                why = verify(entry.path) or "no attempt of this run wrote it"
            found.append((entry.path, why))
    return found


OUTPUT_LOCK = ".oom-supervisor.lock"
"""Held (flock) in the output folder by the run that trains into it, for the run's lifetime."""


class OutputFolderBusyError(CommandError):
    """Another run trains into the same output folder; the message names it."""


class OutputLock:
    """One output folder, one run: an exclusive flock on `<output>/.oom-supervisor.lock`.

    The file says who holds it (pid and run folder). It is opened without following a link
    and only as a regular file. The kernel lets go when the supervisor dies, so `resume` of
    the same run takes it again. With `share` (--share-output-dir) nothing is locked: the
    user said the folder is shared, and checkpoints another run writes there are still never
    resumed (they are not this run's own).
    """

    def __init__(self, *, run_dir: Path, share: bool = False) -> None:
        self.run_dir = run_dir
        self.share = share
        self._held: dict[str, int] = {}

    def take(self, output: Path | None) -> None:
        """Hold the lock of `output` (created if missing) from now to `release`."""
        if output is None or self.share:
            return
        key = os.path.realpath(output)
        if key in self._held:
            return
        path = output / OUTPUT_LOCK
        try:
            output.mkdir(parents=True, exist_ok=True)
            fd = open_regular(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW)
        except NotRegularFileError as exc:
            raise OutputFolderBusyError(str(exc)) from None
        except OSError as exc:
            msg = (f"cannot lock the output folder {output} ({exc.strerror or exc}; a link "
                   f"named {OUTPUT_LOCK} is not followed): remove it or choose another output "
                   "folder")
            raise OutputFolderBusyError(msg) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = os.pread(fd, 4096, 0).decode("utf-8", errors="replace").strip()
            os.close(fd)
            msg = (f"output folder {output} is in use by another run ({who or 'a process'}): "
                   "its checkpoints would mix with this run's; wait for it to end, give this "
                   "run its own output folder, or pass --share-output-dir")
            raise OutputFolderBusyError(msg) from None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}, run folder {self.run_dir}\n".encode(), 0)
        self._held[key] = fd

    def held(self, output: Path | None) -> bool:
        """True when this run holds the output folder's lock (or shares it by the user's word)."""
        return self.share or (output is not None and os.path.realpath(output) in self._held)

    def release(self) -> None:
        """Let go of every output folder (the run ended)."""
        for fd in self._held.values():
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
        self._held.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()
