"""One warm tracing process per run: torch imported once, traces on request.

`WarmTracer` starts ``python -m supervisor._estimate_child --serve`` as soon as the run knows
which interpreter traces (before the command's ``--help`` is read and the run folder made),
so torch's import overlaps the supervisor's own start-up. Each `trace` call sends one request
line and reads its result lines; the process stays up for the traces the walk asks for after
an OOM, and `close` ends it (end of its stdin, then a kill of its pid if it lingers).

Speaks the same result lines as the one-shot child (`estimate.fake_many` reads them too).
"""

from __future__ import annotations

import contextlib
import json
import queue
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any, NoReturn

from supervisor.estimate import RESULT_PREFIX, EstimateError, child_env

READY = "estimate.ready"
DONE = "estimate.done"
"""The serve loop's marker lines (supervisor._estimate_child, which only the child imports)."""

_EOF = object()


class WarmTracer:
    """A long-lived FakeTensor child; thread-safe, one request at a time."""

    def __init__(self, python: str, *, popen: Callable[..., subprocess.Popen[str]]
                 = subprocess.Popen, start_timeout_s: float = 300.0) -> None:
        self.python = python
        self.start_timeout_s = start_timeout_s
        self.started = time.monotonic()
        self.ready_s: float | None = None
        """Seconds from the start to the child's READY line (torch imported)."""
        self.failed: str | None = None
        """Why the tracer cannot trace (it died, or never became ready); None: it can."""
        self._lock = threading.Lock()
        self._lines: queue.Queue[object] = queue.Queue()
        self._errors: deque[str] = deque(maxlen=20)
        self._ready = False
        self._pumps: list[threading.Thread] = []
        argv = [python, "-m", "supervisor._estimate_child", "--serve"]
        try:
            self._proc: subprocess.Popen[str] | None = popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True, env=child_env(), bufsize=1)
        except OSError as error:
            self._proc = None
            self.failed = f"cannot start {python} for the FakeTensor estimator: {error}"
            return
        self._pump(self._proc.stdout, self._lines.put, end=True)
        self._pump(self._proc.stderr, self._errors.append, end=False)

    @property
    def pid(self) -> int | None:
        """The child's pid (None: it never started)."""
        return None if self._proc is None else self._proc.pid

    def _pump(self, stream: IO[str] | None, put: Callable[[Any], None], *, end: bool) -> None:
        if stream is None:
            return

        def read() -> None:
            with contextlib.suppress(OSError, ValueError):
                for line in stream:
                    put(line.rstrip("\n"))
            if end:
                put(_EOF)

        pump = threading.Thread(target=read, daemon=True, name="tracer-pipe")
        pump.start()
        self._pumps.append(pump)

    def trace(self, request: Mapping[str, Any], *, timeout_s: float = 900.0,
              on_result: Callable[[], None] | None = None) -> list[dict[str, Any]]:
        """The result of each config in `request` (as the one-shot child prints them).

        Raises EstimateError when the tracer cannot answer (not started, died, timed out);
        after that it answers no more (`failed`).
        """
        with self._lock:
            if self.failed is not None or self._proc is None or self._proc.stdin is None:
                raise EstimateError(self.failed or "the FakeTensor tracer is not running")
            if not self._ready:
                self._wait_ready()
            try:
                self._proc.stdin.write(json.dumps(dict(request)) + "\n")
                self._proc.stdin.flush()
            except (OSError, ValueError) as error:
                self._fail(f"the FakeTensor tracer ({self.python}) stopped: {error}")
            deadline = time.monotonic() + timeout_s
            results: list[dict[str, Any]] = []
            while True:
                line = self._next(deadline, f"took longer than {timeout_s:.0f} s")
                if line == DONE:
                    break
                if line.startswith(RESULT_PREFIX):
                    results.append(json.loads(line[len(RESULT_PREFIX):]))
                    if on_result is not None:
                        on_result()
            wanted = len(request.get("requests", ()))
            if len(results) != wanted or any(r.get("index", -1) < 0 for r in results):
                bad = next((str(r.get("error")) for r in results if r.get("index", -1) < 0),
                           f"{len(results)} results for {wanted} configs")
                msg = f"the FakeTensor tracer ({self.python}) failed: {bad}"
                raise EstimateError(msg)
            return results

    def _wait_ready(self) -> None:
        deadline = self.started + self.start_timeout_s
        while not self._ready:
            line = self._next(deadline, f"did not start within {self.start_timeout_s:.0f} s")
            if line == READY:
                self._ready = True
                self.ready_s = round(time.monotonic() - self.started, 2)

    def _next(self, deadline: float, late: str) -> str:
        try:
            item = self._lines.get(timeout=max(deadline - time.monotonic(), 0.0))
        except queue.Empty:
            self._fail(f"the FakeTensor tracer ({self.python}) {late}")
        if item is _EOF:
            code = self._proc.wait() if self._proc is not None else None
            for pump in self._pumps:  # its last words on stderr, read to their end
                pump.join(timeout=2)
            last = next((e.strip() for e in reversed(self._errors) if e.strip()),
                        f"exit status {code}")
            self._fail(f"the FakeTensor tracer ({self.python}) failed: {last[:300]}")
        return str(item)

    def _fail(self, why: str) -> NoReturn:
        self.failed = why
        self._kill()
        raise EstimateError(why)

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(OSError):
                self._proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=5)

    def _close_pipes(self) -> None:
        """The pipes' readers have seen the end (the child is gone): close the files."""
        for pump in self._pumps:
            pump.join(timeout=2)
        if self._proc is not None:
            for stream in (self._proc.stdin, self._proc.stdout, self._proc.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError, ValueError):
                        stream.close()

    def close(self) -> None:
        """End the child: its stdin closed (it exits), killed by pid if still there after 2 s;
        one still importing torch (never asked, or asked in vain) is killed at once."""
        if self._proc is None:
            return
        if not self._ready:
            self._kill()
        if self._proc.stdin is not None:
            with contextlib.suppress(OSError, ValueError):
                self._proc.stdin.close()
        try:
            self._proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self._kill()
        self._close_pipes()
        if self.failed is None:
            self.failed = "the FakeTensor tracer was closed"


def request_for(config: Mapping[str, Any], knobs: Sequence[Mapping[str, Any]], *,
                device: str, scale: bool) -> dict[str, Any]:
    """The child's request: the model's config and the traced knobs of each config."""
    return {"config": dict(config), "device": device, "scale": scale, "requests": list(knobs)}
