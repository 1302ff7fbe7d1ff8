"""The journal's schema: every event round-trips, replay is the one reader, bad records say so."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from supervisor.classify import Verdict, VerdictKind, classify
from supervisor.events import (
    EVENT_TYPES,
    AttemptFinished,
    AttemptSpawned,
    AttemptStarted,
    EstimateChecking,
    EstimateDistrusted,
    Event,
    JournalError,
    RunConfig,
    RunFinished,
    RungSkipped,
    RunStarted,
    from_record,
    replay,
)
from supervisor.knobs import FinetuningType, Knobs
from supervisor.loop import Finish, RunStatus, StepDown, View, decide
from tests.fakes import outcome_from

START = Knobs(per_device_batch=8, cutoff_len=512, output_dir="out", model="tiny")
CONFIG = RunConfig(run_id="r", argv=("python", "train.py", "--hub_token", "<redacted:HUB_TOKEN>"),
                   cwd="/w", dialect="argv", dialect_description="argv", policy_name="default",
                   policy_source="policies/default.toml", policy_text="name = 'default'\n",
                   start=START, max_attempts=32, device_mib=70.0,
                   device_source="--device-memory", inject_device_memory=True,
                   env_added={"CUDA_VISIBLE_DEVICES": "0"}, secret_names=("HUB_TOKEN",))


def _sample(cls: type[Event]) -> Any:  # noqa: ANN401 - one instance of each event type
    samples: dict[str, Any] = {
        "run.started": RunStarted(config=CONFIG),
        "attempt.started": AttemptStarted(attempt=1, rung=None, knobs=START,
                                          changed={"per_device_batch": [8, 4]},
                                          argv=("python",), log_dir="attempts/01",
                                          checkpoints_before={"/o/checkpoint-1": 5}),
        "attempt.spawned": AttemptSpawned(attempt=1, pid=10, create_time=2.5),
        "attempt.finished": AttemptFinished(attempt=1, verdict="oom", oom_kind="torch",
                                            numbers={"tried_mib": 4.0}, exit_code=1,
                                            checkpoints=[["/o/checkpoint-2", 2]]),
        "rung.skipped": RungSkipped(rung="smaller-batch", knobs=START, predicted_mib=90.0,
                                    method="fake", reason="predicted 90 MiB > 70 MiB"),
        "estimate.checking": EstimateChecking(knobs=START, predicted_mib=90.0,
                                              reason="every config predicted over"),
    }
    if cls.KIND in samples:
        return samples[cls.KIND]
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
            continue
        values[f.name] = {"int": 1, "str": "x", "float": 1.5, "str | None": "y",
                          "int | None": 2}.get(str(f.type), "x")
    return cls(**values)


@pytest.mark.parametrize("kind", sorted(EVENT_TYPES))
def test_every_event_round_trips_through_json(kind: str) -> None:
    """to_record -> JSON -> from_record gives the same event back, version field included."""
    event = _sample(EVENT_TYPES[kind])
    record = json.loads(json.dumps(event.to_record()))
    assert record["v"] == 1
    assert record["event"] == kind
    assert from_record(record) == event


@pytest.mark.parametrize(("record", "message"), [
    ({"event": "attempt.spawned", "attempt": 1, "pid": 2, "create_time": 1.0},
     "schema version None"),
    ({"v": 99, "event": "attempt.spawned"}, "schema version 99"),
    ({"v": 1, "event": "attempt.exploded"}, "unknown event 'attempt.exploded'"),
    ({"v": 1, "event": "attempt.spawned", "attempt": 1}, "missing or mistyped"),
    ({"v": 1, "event": "attempt.spawned", "attempt": "one", "pid": 2, "create_time": 1.0},
     "attempt is str, expected int"),
    ({"v": 1, "event": "attempt.spawned", "attempt": True, "pid": 2, "create_time": 1.0},
     "attempt is bool"),
    ({"v": 1, "event": "run.started", "config": []}, "config is not an object"),
    ({"v": 1, "event": "attempt.started", "attempt": 1, "rung": None, "knobs": {"x": 1}},
     "missing or mistyped"),
    (["not", "an", "object"], "not a JSON object"),
])
def test_bad_records_are_one_line_errors(record: Any, message: str) -> None:  # noqa: ANN401
    """A hand-edited or damaged journal says which field is wrong instead of a traceback."""
    with pytest.raises(JournalError, match=message):
        from_record(record)


def _records(*events: Any) -> list[dict[str, Any]]:  # noqa: ANN401
    return [json.loads(json.dumps(e.to_record())) for e in events]


def test_replay_builds_the_walk_the_policy_sees() -> None:
    """Finished attempts and prediction skips, in order; the unfinished attempt is pending."""
    smaller = dataclasses.replace(START, per_device_batch=4, grad_accum=2)
    state = replay(_records(
        RunStarted(config=CONFIG),
        AttemptStarted(attempt=1, rung=None, knobs=START),
        AttemptSpawned(attempt=1, pid=5, create_time=1.0),
        AttemptFinished(attempt=1, verdict="oom", oom_kind="torch",
                        checkpoints=[["/o/checkpoint-3", 3]]),
        RungSkipped(rung="smaller-batch", knobs=smaller, predicted_mib=99.0, method="fake",
                    reason="over"),
        AttemptStarted(attempt=2, rung="checkpointing",
                       knobs=dataclasses.replace(START, gradient_checkpointing=True)),
    ))
    assert [(a.number, a.rung, a.verdict.kind) for a in state.walk] == [
        (1, None, VerdictKind.OOM), (0, "smaller-batch", VerdictKind.OOM)]
    assert [a.number for a in state.history] == [1]
    assert state.pending is not None
    assert state.pending.number == 2
    assert state.pending.spawned is None
    assert [(c.path, c.step, c.knobs) for c in state.checkpoints] == [
        ("/o/checkpoint-3", 3, START)]
    assert state.config.secret_names == ("HUB_TOKEN",)
    assert state.status == "running"


def test_replay_marks_distrust_and_the_end() -> None:
    """estimate.distrusted and run.finished are part of the state, not found by string search."""
    state = replay(_records(RunStarted(config=CONFIG), EstimateDistrusted(reason="all over"),
                            AttemptStarted(attempt=1, rung=None, knobs=START),
                            AttemptFinished(attempt=1, verdict="fits"),
                            RunFinished(status="fitted", exit_code=0, attempt=1)))
    assert state.distrusted
    assert state.pending is None
    assert state.status == "fitted"


def test_replay_refuses_a_journal_that_does_not_start_with_the_config() -> None:
    """Without run.started there is no run to rebuild."""
    with pytest.raises(JournalError, match=r"does not begin with run\.started"):
        replay(_records(AttemptSpawned(attempt=1, pid=1, create_time=1.0)))


OOM = Verdict(kind=VerdictKind.OOM)
NO_DATA = classify(outcome_from("no_data_num_samples0.txt", 1))  # recorded


@pytest.mark.parametrize(("view", "verdict", "expected"), [
    (View(attempts_done=1, budget=32), Verdict(kind=VerdictKind.FITS), RunStatus.FITTED),
    (View(attempts_done=1, budget=32), OOM, None),
    (View(attempts_done=32, budget=32), OOM, RunStatus.EXHAUSTED),
    (View(attempts_done=1, budget=32, stopping=True), OOM, RunStatus.INTERRUPTED),
    (View(attempts_done=1, budget=32), Verdict(kind=VerdictKind.FATAL), RunStatus.FATAL),
    (View(attempts_done=4, budget=32, retries=3), Verdict(kind=VerdictKind.HANG),
     RunStatus.HANG),
    (View(attempts_done=1, budget=32, held="pid 9", stop_on_held=True), OOM, RunStatus.FATAL),
    (View(attempts_done=1, budget=32, held="pid 9", stop_on_held=True),
     Verdict(kind=VerdictKind.FITS), RunStatus.FITTED),
    (View(attempts_done=1, budget=32, held="pid 9"), OOM, None),
    # A rung that left the trainer no rows steps on (that rung is spent), within the budget.
    (View(attempts_done=3, budget=32), NO_DATA, None),
    (View(attempts_done=32, budget=32), NO_DATA, RunStatus.EXHAUSTED),
    (View(attempts_done=3, budget=32, stopping=True), NO_DATA, RunStatus.INTERRUPTED),
])
def test_decide_is_a_table(view: View, verdict: Verdict, expected: RunStatus | None) -> None:
    """What follows a verdict depends only on the verdict and the run's counts and flags."""
    decision = decide(view, verdict)
    if expected is None:
        assert isinstance(decision, StepDown)
    else:
        assert isinstance(decision, Finish)
        assert decision.status is expected


def test_knobs_round_trip_keeps_the_enum() -> None:
    """finetuning_type comes back as the enum, so configs compare equal after replay."""
    lora = dataclasses.replace(START, finetuning_type=FinetuningType.LORA)
    assert Knobs.from_dict(json.loads(json.dumps(lora.to_dict()))) == lora


def test_an_interrupted_run_is_running_again_once_resumed() -> None:
    """A SIGTERM (a SLURM requeue) ends a run `interrupted`; `run.resumed` reopens it."""
    from supervisor.events import RunResumed  # noqa: PLC0415

    state = replay(_records(RunStarted(config=CONFIG),
                            RunFinished(status="interrupted", exit_code=130, attempt=1),
                            RunResumed(attempts_done=1)))
    assert state.finished is None
    assert state.status == "running"
