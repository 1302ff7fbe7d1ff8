"""The order that pays: the analytic count ranks the walk, traces confirm only the config the
walk would take and its neighbour across the device line, in one warm tracing process.

The walk and its peaks are recorded (tests/data/peaks/tiny.json: every config of the default
walk from the demo's start, each peak measured by the reference trainer; README.md there).
The measured peak stands in for the FakeTensor trace (within 1 % of it on these configs,
tests/process/test_estimate_accuracy.py); the analytic count is the real one.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from supervisor.estimate import (
    EstimateError,
    Estimator,
    Method,
    ModelSpec,
    Prediction,
    analytic,
    clear_cache,
)
from supervisor.fits import FitStore
from supervisor.knobs import Knobs
from supervisor.plan import build, next_runnable, walk
from supervisor.policy import Step, resolve
from supervisor.tracer import WarmTracer
from tests.unit.test_estimate import FakeChild

PEAKS = Path(__file__).parent.parent / "data" / "peaks"
KEYS = ("per_device_batch", "grad_accum", "cutoff_len", "gradient_checkpointing",
        "finetuning_type", "lora_rank", "freeze_trainable_layers")
DEMO = Knobs(per_device_batch=8, cutoff_len=1024)
BUDGETS = (2000, 1200, 700, 400, 250, 180, 140, 110, 95, 80, 70, 60, 50, 40)


@pytest.fixture(autouse=True)
def _empty_cache() -> Iterator[None]:
    clear_cache()
    yield
    clear_cache()


def _key(knobs: Knobs) -> tuple[object, ...]:
    return tuple(getattr(knobs, k) for k in KEYS)


def _measured() -> dict[tuple[object, ...], float]:
    record = json.loads((PEAKS / "tiny.json").read_text(encoding="utf-8"))
    return {_key(Knobs.from_dict({k: r["knobs"][k] for k in KEYS})): float(r["peak_live_mib"])
            for r in record["rows"]}


def _can_set(knob: str, value: object = None) -> bool:  # noqa: ARG001
    # As the reference trainer reads on a machine without bitsandbytes.
    return knob not in ("optimizer", "quantization_bit")


class _Ranked:
    """predict: the measured peak ("traced") once confirmed, else the analytic count."""

    def __init__(self) -> None:
        self.spec = ModelSpec.named("tiny")
        self.measured = _measured()
        self.traced: list[Knobs] = []
        self.rounds = 0

    def predict(self, knobs: Knobs) -> Prediction:
        if knobs in self.traced:
            return Prediction(peak_mib=self.measured[_key(knobs)], method=Method.FAKE)
        return analytic(self.spec, knobs)

    def trace_all(self, knobs: Knobs) -> Prediction:
        return Prediction(peak_mib=self.measured[_key(knobs)], method=Method.FAKE)

    def confirm(self, configs: Sequence[Knobs]) -> None:
        self.rounds += 1
        self.traced += [k for k in configs if k not in self.traced]


@pytest.mark.parametrize("margin", [0.0, 0.10])
@pytest.mark.parametrize("device_mib", BUDGETS)
def test_two_traces_land_where_tracing_the_whole_walk_does(device_mib: float,
                                                           margin: float) -> None:
    """At every budget the first config (and every skip before it) is the one tracing all 24
    configs gives, with at most four traced (two at most budgets) instead of 30."""
    ladder = resolve("default")
    ranked = _Ranked()
    step, skips = next_runnable(DEMO, [], ladder, predict=ranked.predict,
                                confirm=ranked.confirm, device_mib=device_mib, margin=margin,
                                can_set=_can_set)
    every, every_skips = next_runnable(DEMO, [], ladder, predict=ranked.trace_all,
                                       device_mib=device_mib, margin=margin,
                                       can_set=_can_set)
    assert isinstance(step, Step)
    assert isinstance(every, Step)
    assert step.knobs == every.knobs
    assert [s.knobs for s in skips] == [s.knobs for s in every_skips]
    assert step.knobs in ranked.traced  # the config taken is confirmed by a trace
    assert len(ranked.traced) <= 4
    assert len(walk(DEMO, ladder, can_set=_can_set)) == 30


def test_the_neighbour_across_the_line_is_traced_and_moves_the_start_back() -> None:
    """Where the analytic count puts the config before the line over the device but its trace
    fits, the walk starts there: the less degraded config is not skipped on a count."""
    ladder = resolve("default")
    configs = [k for k, _ in walk(DEMO, ladder, can_set=_can_set)]
    counted = {k: float(100 * (len(configs) - i)) for i, k in enumerate(configs)}
    traced = dict(counted)
    take = next(i for i, k in enumerate(configs) if counted[k] <= 1000)
    traced[configs[take - 1]] = 990.0  # over by the count, under by the trace
    confirmed: list[list[Knobs]] = []

    def predict(k: Knobs) -> Prediction:
        seen = any(k in c for c in confirmed)
        return Prediction(peak_mib=traced[k] if seen else counted[k],
                          method=Method.FAKE if seen else Method.ANALYTIC)

    step, skips = next_runnable(DEMO, [], ladder, predict=predict,
                                confirm=lambda ks: confirmed.append(list(ks)),
                                device_mib=1000, margin=0.0, can_set=_can_set)
    assert isinstance(step, Step)
    assert step.knobs == configs[take - 1]
    assert len(skips) == take - 1
    # First the pair across the counted line, then the new pair once the trace moved it.
    assert confirmed == [[configs[take], configs[take - 1]], [configs[take - 2]]]


def test_plan_with_confirm_traces_the_pair_and_marks_the_rest_as_counted() -> None:
    """plan shares the order: its recommended row is traced, the rest counted (~)."""
    ranked = _Ranked()
    ladder = resolve("default")

    def predict(configs: Sequence[Knobs]) -> list[Prediction | None]:
        return [ranked.predict(k) for k in configs]

    plan = build(DEMO, ladder, ranked.spec, 70, predict=predict, confirm=ranked.confirm,
                 can_set=_can_set, advise=False)
    assert plan.recommended is not None
    assert plan.rows[plan.recommended].prediction is not None
    methods = [r.prediction.method for r in plan.rows if r.prediction is not None]
    assert methods.count(Method.FAKE) == len(ranked.traced) <= 4
    assert plan.rows[plan.recommended].prediction.method is Method.FAKE  # type: ignore[union-attr]


# --- the Estimator in ranked mode --------------------------------------------------------------

def test_ranked_estimator_traces_only_what_is_confirmed_and_keeps_it(tmp_path: Path) -> None:
    """predict never starts a child; confirm traces the configs asked, once; a later run
    (a new process, the same store) takes them from the store, by model shape."""
    spec = ModelSpec.named("tiny")
    configs = [Knobs(per_device_batch=b, cutoff_len=64) for b in (1, 2, 4)]
    child = FakeChild(mib_per_sample=5.0)
    with FitStore.open(tmp_path / "fits.sqlite3") as store:
        estimator = Estimator(spec, run=child, store=store, ranked=True)
        counted = estimator.predict_many(configs)
        assert child.requests == []
        assert all(p is not None and p.method is Method.ANALYTIC for p in counted)
        estimator.confirm(configs[1:])
        estimator.confirm(configs[1:])
        assert [len(r["requests"]) for r in child.requests] == [2]
        now = estimator.predict_many(configs)
        assert [p and (p.method, p.peak_mib) for p in now[1:]] == [
            (Method.FAKE, 10.0), (Method.FAKE, 20.0)]
        assert now[0] is not None
        assert now[0].method is Method.ANALYTIC
    clear_cache()
    with FitStore.open(tmp_path / "fits.sqlite3") as store:
        # Another command naming the same model shape (another path, another interpreter).
        renamed = ModelSpec.from_config("/elsewhere/tiny", {**spec.config,
                                                             "_name_or_path": "/x"},
                                        source="test")
        again = Estimator(renamed, run=child, store=store, ranked=True,
                          python="/other/python")
        again.confirm(configs[1:])
        assert len(child.requests) == 1
        assert [p and p.method for p in again.predict_many(configs[1:])] == [Method.FAKE] * 2


def test_a_failed_trace_is_kept_as_failed_and_never_retried(tmp_path: Path) -> None:
    """One config the tracer cannot trace: counted analytically with the reason, kept as
    failed in the store, and neither this run nor the next traces it again."""
    spec = ModelSpec.named("tiny")
    good, bad = (Knobs(per_device_batch=b, cutoff_len=96) for b in (1, 3))
    child = FakeChild(untraceable_batch=3)
    with FitStore.open(tmp_path / "fits.sqlite3") as store:
        estimator = Estimator(spec, run=child, store=store, ranked=True)
        estimator.confirm([good, bad])
        estimator.confirm([bad])
        assert len(child.requests) == 1
        counted = estimator.predict(bad)
        assert counted is not None
        assert counted.method is Method.ANALYTIC
        assert "no fake kernel" in (counted.note or "")
        assert estimator.untraceable is None  # one config, not the model
    clear_cache()
    with FitStore.open(tmp_path / "fits.sqlite3") as store:
        later = Estimator(spec, run=child, store=store, ranked=True)
        later.confirm([bad])
        assert len(child.requests) == 1
        assert "no fake kernel" in (later.predict(bad).note or "")  # type: ignore[union-attr]


def test_a_model_the_tracer_cannot_handle_is_counted_and_said_once() -> None:
    """Every first trace fails: the model is counted analytically from then on, said once,
    and no trace is tried again after an OOM (a later confirm starts nothing)."""
    child = FakeChild(untraceable_batch=1)
    said: list[str] = []
    estimator = Estimator(ModelSpec.named("tiny"), run=child, ranked=True, notice=said.append)
    estimator.confirm([Knobs(per_device_batch=1, cutoff_len=64)])
    estimator.confirm([Knobs(per_device_batch=1, cutoff_len=128)])
    estimator.confirm([Knobs(per_device_batch=2, cutoff_len=128)])
    assert len(child.requests) == 1
    assert len(said) == 1
    assert "counted from its shape" in said[0]
    assert "no fake kernel" in said[0]
    prediction = estimator.predict(Knobs(per_device_batch=2, cutoff_len=128))
    assert prediction is not None
    assert prediction.method is Method.ANALYTIC


# --- the warm tracer ---------------------------------------------------------------------------

_SERVER = textwrap.dedent("""
    import json, os, sys, time
    time.sleep(float(os.environ.get("SLOW_START", "0")))
    if os.environ.get("DIE_AT_START"):
        print("ImportError: no torch here", file=sys.stderr)
        sys.exit(1)
    print("estimate.ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        for index, knobs in enumerate(request["requests"]):
            if knobs["per_device_batch"] == 13:
                print("Segmentation fault in a kernel", file=sys.stderr, flush=True)
                sys.exit(139)
            result = {"index": index, "peak_bytes": knobs["per_device_batch"] * 2**20,
                      "breakdown": {}, "peak_phase": "backward", "peak_op": "aten.mm",
                      "total_params": 1, "trainable_params": 1, "seconds": 0.0,
                      "pid": os.getpid()}
            print("estimate.result " + json.dumps(result), flush=True)
        print("estimate.done", flush=True)
""")


def _fake_python(tmp_path: Path) -> str:
    """An 'interpreter' that runs the scripted server whatever it is asked to run."""
    server = tmp_path / "server.py"
    server.write_text(_SERVER, encoding="utf-8")
    python = tmp_path / "python3"
    python.write_text(f"#!/bin/sh\nexec {sys.executable} {server}\n", encoding="utf-8")
    python.chmod(0o755)
    return str(python)


def _request(*batches: int) -> dict[str, Any]:
    return {"config": {}, "device": "cpu", "scale": True,
            "requests": [{"per_device_batch": b, "cutoff_len": 64} for b in batches]}


def test_the_warm_tracer_answers_many_requests_from_one_process(tmp_path: Path) -> None:
    tracer = WarmTracer(_fake_python(tmp_path))
    try:
        seen: list[int] = []
        first = tracer.trace(_request(1, 2), on_result=lambda: seen.append(1))
        second = tracer.trace(_request(4))
        assert [r["peak_bytes"] for r in first + second] == [2**20, 2 * 2**20, 4 * 2**20]
        assert {r["pid"] for r in first + second} == {tracer.pid}
        assert seen == [1, 1]
        assert tracer.ready_s is not None
    finally:
        tracer.close()
    assert tracer.failed is not None
    with pytest.raises(EstimateError):
        tracer.trace(_request(1))


def test_a_dying_tracer_says_why_and_answers_no_more(tmp_path: Path) -> None:
    tracer = WarmTracer(_fake_python(tmp_path))
    try:
        with pytest.raises(EstimateError, match="Segmentation fault"):
            tracer.trace(_request(1, 13))
        with pytest.raises(EstimateError, match="Segmentation fault"):
            tracer.trace(_request(1))
    finally:
        tracer.close()


def test_a_tracer_that_cannot_start_makes_the_estimator_count(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              ) -> None:
    """torch missing in the tracer's interpreter: said once, counted analytically."""
    monkeypatch.setenv("DIE_AT_START", "1")
    tracer = WarmTracer(_fake_python(tmp_path))
    said: list[str] = []
    try:
        estimator = Estimator(ModelSpec.named("tiny"), ranked=True, tracer=tracer,
                              notice=said.append)
        estimator.confirm([Knobs(per_device_batch=1, cutoff_len=64)])
        estimator.confirm([Knobs(per_device_batch=2, cutoff_len=64)])
    finally:
        tracer.close()
    assert len(said) == 1
    assert "no torch here" in said[0]
    assert estimator.predict(Knobs(per_device_batch=2, cutoff_len=64)) is not None


def test_closing_the_tracer_ends_its_process(tmp_path: Path) -> None:
    tracer = WarmTracer(_fake_python(tmp_path))
    tracer.trace(_request(1))
    pid = tracer.pid
    assert pid is not None
    tracer.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


# --- progress while it predicts ----------------------------------------------------------------

def test_run_says_how_far_the_prediction_is_with_an_eta(capsys: pytest.CaptureFixture[str],
                                                         ) -> None:
    """plan's and run's progress line: configs traced of those asked, seconds, time left."""
    from supervisor.cli import _Progress  # noqa: PLC0415 - the CLI's own helper

    progress = _Progress("run", "tiny", "/venv/bin/python")
    progress(1, 2)
    progress(2, 2)
    progress.say("the memory predictions of this model are counted from its shape")
    progress.finish(24, 2)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("run: predicting tiny's memory (the analytic count ranks")
    assert lines[1].startswith("run: predicting 1/2 configs, ")
    assert "left" in lines[1]
    assert lines[2].startswith("run: predicting 2/2 configs, ")
    assert "left" not in lines[2]
    assert lines[3] == "run: the memory predictions of this model are counted from its shape"
    assert lines[4].startswith("run: done in ")
    assert lines[4].endswith("(24 configs ranked by the analytic count, 2 traced)")


def test_with_json_logs_the_progress_is_log_events(capsys: pytest.CaptureFixture[str]) -> None:
    """--log-format json: stderr stays JSON lines; each progress line is an event."""
    from structlog.testing import capture_logs  # noqa: PLC0415

    from supervisor.cli import _Progress  # noqa: PLC0415

    with capture_logs() as logs:
        progress = _Progress("run", "tiny", "/venv/bin/python", as_json=True)
        progress(1, 2)
        progress.finish(24, 2)
    assert capsys.readouterr().err == ""
    assert [e["event"] for e in logs] == ["estimate.progress"] * 3
    assert logs[1]["line"].startswith("run: predicting 1/2 configs, ")


@pytest.mark.parametrize(("estimate_s", "said"), [(5.2, True), (1.0, False), (None, False)])
def test_the_summary_names_the_prediction_when_it_is_over_a_tenth_of_the_run(
        tmp_path: Path, estimate_s: float | None, *, said: bool) -> None:
    from supervisor.console import summary  # noqa: PLC0415

    head = summary({"status": "fitted", "attempts": [{}], "oom_verdicts": 0,
                    "duration_s": 20.0, "estimate_s": estimate_s}, tmp_path)[0]
    assert head.startswith("oom-supervisor: fitted after 1 attempt (0 out of memory) in ")
    assert ("5.2 s of it predicting memory" in head) is said


# --- the blind walk listens to its OOMs (the loop) ---------------------------------------------

def test_the_blind_run_passes_over_configs_its_oom_showed_cannot_fit(tmp_path: Path) -> None:
    """No device size known (no predictor): the first OOM (recorded: `simulated device of 100
    MiB with 92.79 MiB live`) shows the device holds at most 100 MiB; every config counted
    clearly above it is journaled as skipped with that reason, and attempt 2 is the first
    config the count does not rule out. Without the count (`--no-estimate`) attempt 2 is the
    walk's next, batch 4."""
    import shlex  # noqa: PLC0415

    from supervisor.command import Command  # noqa: PLC0415
    from supervisor.dialects.argv import ArgvDialect  # noqa: PLC0415
    from supervisor.journal import read  # noqa: PLC0415
    from supervisor.loop import ExitCode, Memory, supervise  # noqa: PLC0415
    from tests.fakes import FITS, OOM, ScriptedRunner  # noqa: PLC0415

    text = ("python -m supervisor.reference_trainer --model_name_or_path tiny "
            "--per_device_train_batch_size 8 --cutoff_len 512 --max_steps 2")
    count = Estimator(ModelSpec.named("tiny"), method="analytic", python=None).predict
    argvs: dict[str, list[str]] = {}
    for label, memory in (("listening", Memory(count=count)), ("every config", Memory())):
        runner = ScriptedRunner([OOM, FITS])
        result = supervise(Command(argv=tuple(shlex.split(text)), cwd=str(tmp_path)),
                           dialect=ArgvDialect(), ladder=resolve("default"),
                           run_dir=tmp_path / label, run_attempt=runner, echo=False, env={},
                           memory=memory)
        assert result.exit_code is ExitCode.FITTED
        events = list(read(tmp_path / label / "journal.jsonl").records)
        skipped = [e for e in events if e["event"] == "rung.skipped"]
        argvs[label] = [shlex.join(s.argv) for s in runner.specs]
        if label == "every config":
            assert skipped == []
            assert "--per_device_train_batch_size 4" in argvs[label][1]
            continue
        assert skipped
        assert all("over the 100 MiB an earlier attempt's out-of-memory error showed"
                   in e["reason"] for e in skipped)
        assert all(e["predicted_mib"] > 100 * 1.05 for e in skipped)
        second = ArgvDialect().read(Command(argv=tuple(runner.specs[1].argv),
                                            cwd=str(tmp_path)))
        counted = count(second)
        assert counted is not None
        assert counted.peak_mib * 0.95 <= 100
        md = (tmp_path / label / "report.md").read_text()
        assert "an earlier attempt's out-of-memory error showed the device holds" in md


def test_a_tracer_never_asked_is_ended_at_once(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that stops before it predicts (bad input) does not wait for torch's import."""
    monkeypatch.setenv("SLOW_START", "60")
    tracer = WarmTracer(_fake_python(tmp_path))
    started = time.monotonic()
    tracer.close()
    assert time.monotonic() - started < 30  # far under the 60 s start
    assert tracer.failed is not None
