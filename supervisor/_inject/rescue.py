"""oom-supervisor's rescue hook for Hugging Face Trainer programs (injected; docs/reliability.md).

The injected sitecustomize loads this file (by path, as `_oom_supervisor_rescue`) when
OOM_SUPERVISOR_RESCUE is set, a JSON object:
`{"oom": true, "error": true, "stop_file": "/abs/path"}`.
Nothing happens until the program imports `transformers.trainer`; then `Trainer.train` is
wrapped, and for the length of each `train()` call, with world size 1 only:

- an out-of-memory error escaping `training_step` (torch.OutOfMemoryError, the CPU
  allocator's RuntimeError, MemoryError): what the failed step held is let go (its frames'
  activations, the partial gradients), so the weights and optimizer state are those of the
  last completed optimizer step; a checkpoint at `state.global_step` is saved the trainer's own
  way (`Trainer._save_checkpoint`) into a staging folder that is renamed into place only when
  whole (a failed save leaves nothing behind); then the error goes on as it would have, and the
  process exits with it;
- with `error`, any other error escaping `train()` (a dropped connection, a data source gone,
  a collective that failed) is met the same way when it struck where the weights and optimizer
  state are those of a completed optimizer step: in the step's forward or backward (then the
  failed step's partial gradients are let go), at the step's end, in the logging, saving or
  evaluation after it, or while the next batch was fetched. An error inside the optimizer's
  update itself (the weights may be half-updated) saves nothing;
- `stop_file` appears (the supervisor asks for a polite stop): at the next step end the trainer
  saves (`control.should_save`, its own periodic save) and stops
  (`control.should_training_stop`); `train()` then exits the process with status 143, as the
  SIGTERM it stands for would have.

The trainer computes nothing differently: the hook only reads the step counter and the RNG
states, and acts when the step has already failed or a stop was asked for. With several ranks
a save by one would wait for the others forever (the save has collectives), so the hook stays
off there and says so. Every action is one line on fd 2: `oom-supervisor.rescue {json}`.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.machinery
import importlib.util
import json
import os
import random
import shutil
import sys
import time
import traceback
from types import ModuleType
from typing import Any

ENV_VAR = "OOM_SUPERVISOR_RESCUE"
MARK = "oom-supervisor.rescue"
STOPPED_EXIT = 143
"""The exit status after a save asked for by the supervisor: 128 + SIGTERM, the stop it replaces."""
_STAGING = ".oom-supervisor-rescue-"
_OOM_WORDS = ("out of memory", "can't allocate memory", "CUBLAS_STATUS_ALLOC_FAILED")


def _announce(**values: object) -> None:
    # Straight to fd 2, unbuffered, one write: the line must reach the log even when the
    # program replaced sys.stderr, and not interleave with the traceback that follows.
    line = f"{MARK} {json.dumps({**values, 'pid': os.getpid()})}\n"
    with contextlib.suppress(OSError):
        os.write(2, line.encode())


def is_oom(error: BaseException) -> bool:
    """An allocator's failure: the step ran out of (device or host) memory."""
    if isinstance(error, MemoryError):
        return True
    if type(error).__name__ == "OutOfMemoryError":
        return True
    return isinstance(error, RuntimeError) and any(w in str(error)[:2000] for w in _OOM_WORDS)


def _world_size(trainer: Any) -> int:  # noqa: ANN401 - a transformers Trainer
    try:
        return int(trainer.args.world_size)
    except (AttributeError, TypeError, ValueError):
        return int(os.environ.get("WORLD_SIZE", "1") or 1)


class _Rng:
    """The random states at the start of the optimizer step in progress (read only)."""

    def __init__(self) -> None:
        self.step: int | None = None
        self.states: dict[str, Any] = {}

    def note(self, step: int) -> None:
        if step == self.step:
            return
        self.step = step
        states: dict[str, Any] = {"python": random.getstate()}
        with contextlib.suppress(Exception):
            import numpy as np  # noqa: PLC0415 - only where the program has it

            states["numpy"] = np.random.get_state()  # noqa: NPY002 - what the Trainer saves
        torch = sys.modules.get("torch")
        if torch is not None:
            with contextlib.suppress(Exception):
                states["cpu"] = torch.random.get_rng_state()
                if torch.cuda.is_available() and torch.cuda.is_initialized():
                    states["cuda"] = torch.cuda.get_rng_state_all()
        self.states = states

    def restore(self) -> None:
        """Put the step's starting states back, so the checkpoint resumes the step as it began."""
        with contextlib.suppress(Exception):
            if "python" in self.states:
                random.setstate(self.states["python"])
            if "numpy" in self.states:
                import numpy as np  # noqa: PLC0415

                np.random.set_state(self.states["numpy"])  # noqa: NPY002
            torch = sys.modules.get("torch")
            if torch is not None and "cpu" in self.states:
                torch.random.set_rng_state(self.states["cpu"])
            if torch is not None and "cuda" in self.states:
                torch.cuda.set_rng_state_all(self.states["cuda"])


def _let_go(trainer: Any, error: BaseException) -> None:  # noqa: ANN401
    """Free what the failed step held: its frames' tensors, the partial gradients, the cache."""
    # The finished frames below the wrapper hold the step's activations and graph.
    traceback.clear_frames(error.__traceback__)
    for owner in (trainer.model, getattr(trainer, "model_wrapped", None), trainer.optimizer):
        with contextlib.suppress(Exception):
            if owner is not None:
                owner.zero_grad(set_to_none=True)
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None:
        with contextlib.suppress(Exception):
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.empty_cache()


def _save_last_step(trainer: Any, error: BaseException, rng: _Rng,  # noqa: ANN401
                    why: str = "oom") -> None:
    """The rescue proper (after an OOM or, `why="error"`, another error): a whole checkpoint at
    the last completed optimizer step, or none."""
    began = time.perf_counter()
    step = int(trainer.state.global_step)
    output_dir = trainer._get_output_dir(trial=None)  # noqa: SLF001 - the Trainer's own layout
    final = os.path.abspath(os.path.join(output_dir, f"checkpoint-{step}"))  # noqa: PTH100, PTH118
    if step <= 0:
        _announce(event="skipped", why=why, step=step,
                  reason="no optimizer step had completed")
        return
    if os.path.exists(final):  # noqa: PTH110
        _announce(event="skipped", why=why, step=step, checkpoint=final,
                  reason=f"checkpoint-{step} already holds that step")
        return
    staging = os.path.join(output_dir, f"{_STAGING}{os.getpid()}")  # noqa: PTH118
    try:
        _let_go(trainer, error)
        if rng.step == step:
            # The failed step had begun (its first micro-batch noted the states): the
            # checkpoint resumes it as it began. Otherwise the states are already the next
            # step's, as the Trainer's own save at this step would have them.
            rng.restore()
        shutil.rmtree(staging, ignore_errors=True)
        # Into a staging folder: the Trainer writes its files one by one, and a save that
        # fails half-way (it can run out of memory itself) must leave no checkpoint-N.
        trainer._get_output_dir = lambda trial=None: staging  # noqa: ARG005, SLF001
        try:
            trainer._save_checkpoint(trainer.model, trial=None)  # noqa: SLF001
        finally:
            del trainer._get_output_dir  # noqa: SLF001
        os.rename(os.path.join(staging, f"checkpoint-{step}"), final)  # noqa: PTH104, PTH118
    except Exception as failure:  # noqa: BLE001 - the rescue must never replace the OOM
        what = type(failure).__name__
        text = "" if is_oom(failure) else " ".join(str(failure).split())[:200]
        _announce(event="failed", why=why, step=step, error=f"{what}: {text}" if text else what,
                  seconds=round(time.perf_counter() - began, 3))
        return
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _announce(event="saved", why=why, step=step, checkpoint=final,
              seconds=round(time.perf_counter() - began, 3))


class _Boundary:
    """Whether the weights and optimizer state are those of the completed step `global_step`:
    from the start of training and each step's end until the next optimizer update begins."""

    def __init__(self) -> None:
        self.whole = True

    def callback(self) -> Any:  # noqa: ANN401 - a TrainerCallback
        from transformers import TrainerCallback  # noqa: PLC0415 - already imported by then

        boundary = self

        class StepBoundary(TrainerCallback):
            def on_train_begin(self, args: Any, state: Any, control: Any,  # noqa: ANN401, ARG002
                               **_: Any) -> Any:  # noqa: ANN401
                boundary.whole = True
                return control

            def on_pre_optimizer_step(self, args: Any, state: Any,  # noqa: ANN401, ARG002
                                      control: Any, **_: Any) -> Any:  # noqa: ANN401
                boundary.whole = False
                return control

            def on_step_end(self, args: Any, state: Any, control: Any,  # noqa: ANN401, ARG002
                            **_: Any) -> Any:  # noqa: ANN401
                boundary.whole = True
                return control

        return StepBoundary()


class _Stop:
    """The polite stop: at a step end after `stop_file` appeared, save and stop training."""

    def __init__(self, stop_file: str | None) -> None:
        self.stop_file = stop_file
        self.asked_at: float | None = None
        self.step: int | None = None

    def requested(self) -> bool:
        return self.stop_file is not None and os.path.exists(self.stop_file)  # noqa: PTH110

    def callback(self) -> Any:  # noqa: ANN401 - a TrainerCallback
        from transformers import TrainerCallback  # noqa: PLC0415 - already imported by then

        stop = self

        class RescueOnStop(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any,  # noqa: ANN401, ARG002
                            **_: Any) -> Any:  # noqa: ANN401
                if stop.asked_at is None and stop.requested():
                    stop.asked_at = time.perf_counter()
                    stop.step = int(state.global_step)
                    control.should_save = True
                    control.should_training_stop = True
                return control

            def on_save(self, args: Any, state: Any, control: Any,  # noqa: ANN401
                        **_: Any) -> Any:  # noqa: ANN401
                if stop.asked_at is not None and stop.step == int(state.global_step):
                    _announce(event="saved", why="stop", step=stop.step,
                              checkpoint=os.path.abspath(os.path.join(  # noqa: PTH100, PTH118
                                  args.output_dir, f"checkpoint-{stop.step}")),
                              seconds=round(time.perf_counter() - stop.asked_at, 3))
                return control

        return RescueOnStop()


def _patch(module: ModuleType, settings: dict[str, Any]) -> None:
    trainer_cls = getattr(module, "Trainer", None)
    if trainer_cls is None or getattr(trainer_cls.train, "_oom_supervisor", False):
        return
    original_train = trainer_cls.train
    on_oom = bool(settings.get("oom", True))
    on_error = bool(settings.get("error", False))
    stop_file = settings.get("stop_file") or None

    def train(self: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        world = _world_size(self)
        if world > 1:
            _announce(event="off", world_size=world,
                      reason="several ranks: a save by one rank would wait for the others")
            return original_train(self, *args, **kwargs)
        rng = _Rng()
        stop = _Stop(stop_file)
        callback = stop.callback() if stop_file else None
        boundary = _Boundary()
        # First in line: its step end runs before a callback of the program's that may fail.
        marker = boundary.callback() if on_error else None
        step = self.training_step  # bound: a subclass's own training_step included

        def training_step(*step_args: Any, **step_kwargs: Any) -> Any:  # noqa: ANN401
            rng.note(int(self.state.global_step))
            try:
                return step(*step_args, **step_kwargs)
            except BaseException as error:
                # With auto_find_batch_size the Trainer catches the OOM and starts over itself.
                if on_oom and is_oom(error) and not getattr(self.args, "auto_find_batch_size",
                                                            False):
                    _save_last_step(self, error, rng)
                raise

        self.training_step = training_step
        if callback is not None:
            self.add_callback(callback)
        if marker is not None:
            self.callback_handler.callbacks.insert(0, marker)
        _announce(event="armed", oom=on_oom, error=on_error, stop=bool(stop_file),
                  world_size=world)
        try:
            result = original_train(self, *args, **kwargs)
        except Exception as error:
            # An out-of-memory error is on_oom's (in the step) or left alone (elsewhere).
            if on_error and not is_oom(error):
                if boundary.whole:
                    _save_last_step(self, error, rng, why="error")
                else:
                    _announce(event="skipped", why="error", step=int(self.state.global_step),
                              reason="the error struck inside the optimizer's update")
            raise
        finally:
            with contextlib.suppress(AttributeError):
                del self.training_step
            for added in (callback, marker):
                if added is not None:
                    with contextlib.suppress(Exception):
                        self.remove_callback(added)
        if stop.asked_at is not None and self.state.global_step < self.state.max_steps:
            _announce(event="stopped", step=int(self.state.global_step))
            raise SystemExit(STOPPED_EXIT)
        return result

    train._oom_supervisor = True  # type: ignore[attr-defined]  # noqa: SLF001 - our own mark
    trainer_cls.train = train


class _AfterTrainer:
    """A meta-path finder that lets `transformers.trainer` load as usual, then wraps Trainer."""

    NAME = "transformers.trainer"

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings
        self.done = False
        self._looking = False

    def find_spec(self, fullname: str, path: object = None,  # noqa: ARG002 - the finder protocol
                  target: object = None) -> importlib.machinery.ModuleSpec | None:  # noqa: ARG002
        if fullname != self.NAME or self.done or self._looking:
            return None
        self._looking = True
        try:
            spec = importlib.util.find_spec(self.NAME)
        finally:
            self._looking = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader: Any = spec.loader
        original = loader.exec_module
        finder = self

        def exec_module(module: ModuleType) -> None:
            original(module)
            if not finder.done:
                finder.done = True
                try:
                    _patch(module, finder.settings)
                except Exception as error:  # noqa: BLE001 - never break the program
                    _announce(event="off", reason=f"{type(error).__name__}: {error}")

        loader.exec_module = exec_module
        return spec


def install(raw: str) -> None:
    """Arm the hook as OOM_SUPERVISOR_RESCUE says (called by the injected sitecustomize)."""
    try:
        settings = json.loads(raw)
    except ValueError:
        settings = None
    if not isinstance(settings, dict):
        sys.stderr.write(f"oom-supervisor rescue: {ENV_VAR}={raw!r} is not a JSON object; "
                         "no rescue checkpoint in this process\n")
        return
    loaded = sys.modules.get(_AfterTrainer.NAME)
    if loaded is not None:
        _patch(loaded, settings)
    else:
        sys.meta_path.insert(0, _AfterTrainer(settings))
