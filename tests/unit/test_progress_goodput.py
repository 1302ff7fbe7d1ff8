"""Progress as the unit of work: the trainer's progress lines, the learnt watchdog, retry
streaks and goodput, over output and journals recorded from real runs (tests/data)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from supervisor import progress, remember
from supervisor.events import AttemptFinished, RunResumed, replay
from supervisor.knobs import Knobs
from supervisor.trainer_output import Tracker, Watchdog

DATA = Path(__file__).resolve().parents[1] / "data"
NIGHT = DATA / "runs" / "night-small" / "journal.jsonl"


def _night() -> list[dict[str, Any]]:
    return [json.loads(line) for line in NIGHT.read_text(encoding="utf-8").splitlines()]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_tracker_reads_the_trainer_bar_and_ignores_the_save_bars() -> None:
    """The real Trainer stderr: steps 1..3 of 3; "Writing model shards 1/1" is not a step."""
    raw = (DATA / "tails" / "hf_trainer_progress_stderr.txt").read_bytes()
    clock = Clock()
    tracker = Tracker(clock=clock)
    for i in range(0, len(raw), 97):  # chunks cut anywhere, as a pipe delivers them
        clock.now += 0.1
        tracker.feed(raw[i:i + 97])
    summary = tracker.summary()
    assert summary is not None
    assert summary["step"] == 3
    assert summary["total"] == 3
    assert tracker.began
    first, last = summary["samples"]
    assert first[0] == 1
    assert last[0] == 3
    assert last[1] > first[1]


def test_untimed_backlog_tells_the_step_but_not_the_cadence() -> None:
    """A log read after resume says how far the trainer got, not when: no samples, no gap."""
    raw = (DATA / "tails" / "hf_trainer_progress_stderr.txt").read_bytes()
    tracker = Tracker(clock=Clock())
    tracker.feed(raw, timed=False)
    assert tracker.step == 3
    assert tracker.longest_gap_s == 0.0
    summary = tracker.summary()
    assert summary is not None
    assert summary["samples"] == []


def test_an_hf_log_dict_means_training_began() -> None:
    tracker = Tracker(clock=Clock())
    tracker.feed(b"loading weights\n")
    assert not tracker.began
    tracker.feed(b"{'loss': '8.4', 'grad_norm': '5.61', 'epoch': '0.3333'}\n")
    assert tracker.began


def test_a_trainer_without_a_bar_is_placed_at_the_step_its_log_dicts_reached(
        tmp_path: Path) -> None:
    """The real Trainer with its bar off (tests/data/tails/nobar_*): 8 log dicts, then an OOM.
    The last one's epoch times the 12 steps an epoch its checkpoint's log_history shows: the
    OOM struck after step 8, the trainer's own count, with the time each was seen."""
    from supervisor import checkpoints  # noqa: PLC0415

    clock = Clock()
    tracker = Tracker(clock=clock)
    output = (DATA / "tails" / "nobar_device_budget_oom.txt").read_bytes()
    for line in output.splitlines(keepends=True):
        clock.now += 0.5
        tracker.feed(line)
    seen = tracker.summary()
    assert seen is not None
    assert seen["step"] is None  # no bar: no step number anywhere in the output
    assert seen["log_epochs"] == [[0.08333, 1000.5], [0.6667, 1005.5]]
    folder = tmp_path / "checkpoint-8"
    folder.mkdir()
    (folder / "trainer_state.json").write_bytes(
        (DATA / "tails" / "nobar_checkpoint-8_trainer_state.json").read_bytes())
    per_epoch = checkpoints.steps_per_epoch([str(folder), None])
    assert per_epoch == pytest.approx(12.0, rel=1e-3)
    placed = checkpoints.steps_from_logs(seen, per_epoch)
    assert placed is not None
    assert placed["step"] == 8
    assert placed["samples"] == [[1, 1000.5], [8, 1005.5]]
    assert checkpoints.steps_from_logs(seen, None) == seen  # no log_history: nothing guessed


def test_watchdog_start_up_then_cadence_then_floor() -> None:
    """Before the first step: the start-up allowance; after: 10x the longest gap, floored."""
    clock = Clock()
    tracker = Tracker(clock=clock)
    dog = Watchdog(startup_s=1800, factor=10, floor_s=120)
    assert dog.limit(tracker) == (1800, "1800 s before the trainer showed its cadence")
    clock.now += 2.0
    tracker.feed(b"\r  0%|   | 1/240 [00:01<00:10]")
    assert dog.limit(tracker)[0] == 1800  # type: ignore[index]  # one step: no interval yet
    for step in range(2, 5):
        clock.now += 2.0
        tracker.feed(f"\r 10%|#  | {step}/240 [00:01<00:10]".encode())
    assert dog.limit(tracker) == (120, "120 s, the floor (longest gap so far 2.0 s)")
    clock.now += 30.0  # a checkpoint save: a long gap, measured
    tracker.feed(b"\r 10%|#  | 5/240 [00:01<00:10]")
    limit = dog.limit(tracker)
    assert limit is not None
    assert limit[0] == pytest.approx(300.0)
    assert "10x the longest gap" in limit[1]
    assert Watchdog(fixed_s=20).limit(tracker) == (20, "20 s (stall_timeout_s)")
    # The last step: saving the model and exiting are not steps; no cadence applies.
    tracker.feed(b"\r100%|###| 240/240 [09:59<00:00]")
    assert dog.limit(tracker) == (1800, "1800 s after the last training step")
    assert not _done(tracker)  # the last step's frame: its final save comes next
    # With the evidence on (a save writes files, an upload uses the CPU), the silence after
    # the last step is judged by the run's cadence: a hang on the way out is not 30 minutes.
    after = dog.limit(tracker, evidence=True)
    assert after is not None
    assert after[0] == pytest.approx(300.0)
    assert after[1] == "300 s after the last training step, with nothing showing work"
    clock.now += 1.0
    tracker.feed(b"{'train_runtime': '599.1', 'train_loss': '1.2', 'epoch': '1'}\n")
    assert _done(tracker)
    # A 60 s final save after the end, then a line: the steps' cadence is not learnt from it
    # (a hang after it was allowed 10x the save before: 5 min on a real HF script).
    clock.now += 60.0
    tracker.feed(b"saved\n")
    assert tracker.longest_gap_s == pytest.approx(30.0)
    assert dog.limit(tracker, evidence=True)[0] == pytest.approx(300.0)  # type: ignore[index]
    tracker.feed(b"\r100%|###| 240/240 [09:59<00:00]")  # the bar's closing frame
    assert _done(tracker)
    # A script that trains again in the same process (a second stage): not finished.
    tracker.feed(b"{'loss': '1.1', 'grad_norm': '0.5', 'learning_rate': '1e-05', 'epoch': '0.1'}")
    assert not _done(tracker)


def _done(tracker: Tracker) -> bool:
    """Read through a call, so that each assert reads the flag afresh (no narrowing)."""
    return tracker.finished


def test_goodput_of_a_recorded_night() -> None:
    """The recorded run (a real hang after step 6, a real rendezvous error after step 11):
    16 steps kept, 21 trained; every second of the wall time is in exactly one cause."""
    state = replay(_night())
    good = progress.goodput(state)
    assert good.steps_kept == 16
    assert good.steps_trained == 21
    assert good.steps_retrained == 5
    assert good.measured
    assert not good.provisional
    total = good.productive_s + sum(good.badput.values())
    assert total == pytest.approx(good.wall_s, abs=0.01)
    assert good.badput["hang"] > 5  # the silence until the learnt limit (8 s) fired
    assert good.badput["backoff"] == pytest.approx(4.0, abs=0.1)
    assert 0.05 < good.share < 0.5
    kinds = [a.what for a in good.accidents]
    assert any("hung at step 6" in k for k in kinds)
    assert any("transient failure at step 11" in k for k in kinds)
    assert any("from checkpoint-8" in k for k in kinds)


def test_goodput_counts_the_supervisor_down_and_an_adopted_attempt_whole() -> None:
    """A resume 40 s after the last event: the gap is `down` unless an attempt ran through it."""
    records = _night()
    t_first_finish = next(r["ts"] for r in records if r["event"] == "attempt.finished")
    resumed = {"v": 1, "ts": t_first_finish + 40.0, "event": "run.resumed",
               "attempts_done": 1, "pending": None}
    shifted = []
    for original in records:
        r = dict(original)
        if r["ts"] > t_first_finish:
            r["ts"] = r["ts"] + 40.0
            for key in ("ended_at",):
                if r.get(key):
                    r[key] = r[key] + 40.0
            if r.get("progress"):
                prog = dict(r["progress"])
                prog["samples"] = [[s, t + 40.0] for s, t in prog["samples"]]
                r["progress"] = prog
            if r.get("checkpoint_times"):
                r["checkpoint_times"] = [[s, t + 40.0] for s, t in r["checkpoint_times"]]
        shifted.append(r)
    at = next(i for i, r in enumerate(shifted) if r["ts"] > t_first_finish)
    shifted.insert(at, resumed)
    base = progress.goodput(replay(_night()))
    good = progress.goodput(replay(shifted))
    assert good.badput["down"] == pytest.approx(40.0, abs=0.5)
    assert good.productive_s == pytest.approx(base.productive_s, rel=0.01)
    assert any("gone 40 s until `resume`" in a.what for a in good.accidents)


def test_the_predictions_before_the_run_are_in_its_wall_time() -> None:
    """25 s of predictions before run.started (issue 19: left out of "Total time") are part
    of the wall time, as their own cause, and the report's total says so."""
    from supervisor import report  # noqa: PLC0415

    records = _night()
    records[0] = {**records[0], "config": {**records[0]["config"], "estimate_s": 25.0}}
    base = progress.goodput(replay(_night()))
    good = progress.goodput(replay(records))
    assert good.wall_s == pytest.approx(base.wall_s + 25.0, abs=0.01)
    assert good.badput["prediction"] == pytest.approx(25.0, abs=0.01)
    assert good.productive_s == pytest.approx(base.productive_s)
    assert good.productive_s + sum(good.badput.values()) == pytest.approx(good.wall_s, abs=0.01)
    data = report.build(replay(records))
    assert data["duration_s"] == pytest.approx(report.build(replay(_night()))["duration_s"] + 25)
    assert "of which 25.0 s predicting memory before attempt 1" in report.render_markdown(data)


def test_the_runs_clock_starts_when_the_supervisor_starts() -> None:
    """9 s of the supervisor's own start (imports, the --help probe) before 25 s of
    predictions and run.started: all in the wall time, the 9 s as the supervisor's own."""
    from supervisor import report  # noqa: PLC0415

    records = _night()
    started = records[0]["ts"]
    records[0] = {**records[0], "config": {**records[0]["config"], "estimate_s": 25.0,
                                           "process_started_at": started - 34.0}}
    base = progress.goodput(replay(_night()))
    good = progress.goodput(replay(records))
    assert good.wall_s == pytest.approx(base.wall_s + 34.0, abs=0.01)
    assert good.badput["prediction"] == pytest.approx(25.0, abs=0.01)
    assert good.badput["supervisor"] == pytest.approx(base.badput["supervisor"] + 9.0, abs=0.01)
    assert good.productive_s == pytest.approx(base.productive_s)
    data = report.build(replay(records))
    assert data["duration_s"] == pytest.approx(report.build(replay(_night()))["duration_s"] + 34)


def _upto_second_failure() -> list[dict[str, Any]]:
    records = _night()
    at = next(i for i, r in enumerate(records)
              if r["event"] == "attempt.finished" and r["attempt"] == 2)
    return records[:at + 1]


def _finished(state_records: list[dict[str, Any]], number: int) -> dict[str, Any]:
    return next(r for r in state_records
                if r["event"] == "attempt.finished" and r["attempt"] == number)


def test_streak_is_reset_by_progress_and_counts_from_the_failure() -> None:
    """Two failures of one config, each after new checkpoints: two streaks of one."""
    state = replay(_upto_second_failure())
    current = progress.streak(state.attempts)
    assert current.failures == 1  # attempt 2 wrote checkpoint-8: a new streak
    second = _finished(_night(), 2)
    assert current.since == second["ended_at"]
    # Ten hours into training is no different from ten seconds in: the window counts from the
    # failure, not from the config's first start.
    assert progress.retry_refusal(current, retries=3, window_s=20,
                                  now=float(second["ended_at"]) + 5) is None
    refused = progress.retry_refusal(current, retries=3, window_s=20,
                                     now=float(second["ended_at"]) + 25)
    assert refused is not None
    assert "20 s" in refused


def test_streak_without_progress_counts_every_failure() -> None:
    """The same failure again with no new step or checkpoint: the budget runs down."""
    state = replay(_upto_second_failure())
    last = state.attempts[-1]
    assert last.finished is not None
    stuck = dataclasses.replace(last.finished, checkpoints=(), checkpoint_times=(),
                                progress={"step": 8, "samples": []}, trained_steps=None)
    again = dataclasses.replace(last, finished=stuck)
    attempts = (*state.attempts, dataclasses.replace(again, started=dataclasses.replace(
        again.started, attempt=9)), dataclasses.replace(again, started=dataclasses.replace(
            again.started, attempt=10)))
    current = progress.streak(attempts)
    assert current.failures == 3
    assert progress.retry_refusal(current, retries=2, window_s=0, now=0.0) == (
        "still failing after 2 retries on the same config")


def test_a_lost_attempt_is_always_retried_and_not_counted() -> None:
    state = replay(_upto_second_failure())
    last = state.attempts[-1]
    assert last.finished is not None
    lost = dataclasses.replace(last, finished=dataclasses.replace(
        last.finished, verdict="lost", checkpoints=(), checkpoint_times=(), progress=None))
    current = progress.streak((*state.attempts[:-1], lost))
    assert current.lost == 1
    assert current.failures == 0
    assert progress.retry_refusal(current, retries=0, window_s=1, now=1e12, lost=True) is None


def test_attempt_finished_keeps_the_new_fields() -> None:
    record = _finished(_night(), 1)
    event = AttemptFinished.from_record(record)
    assert event.progress is not None
    assert event.progress["step"] == 6
    assert event.ended_at is not None
    assert event.watchdog is not None
    assert "longest gap" in event.watchdog


def test_the_window_leaves_out_the_retries_own_running_time() -> None:
    """A retry that ran 30 s before failing again does not use up a 20 s window: the window
    bounds the time between attempts (backoff, waiting), not the attempts themselves."""
    records = _upto_second_failure()
    state = replay(records)
    first = state.attempts[-1]
    assert first.finished is not None
    stuck = dataclasses.replace(first.finished, checkpoints=(), checkpoint_times=(),
                                progress={"step": 8, "samples": []}, trained_steps=None)
    base = first.finished.ended_at or 0.0
    retry = dataclasses.replace(
        first, started=dataclasses.replace(first.started, attempt=9, ts=base + 2.0),
        finished=dataclasses.replace(stuck, attempt=9, ended_at=base + 32.0, ts=base + 32.5))
    current = progress.streak((*state.attempts, retry))
    assert current.failures == 2
    assert current.running_s == pytest.approx(30.0)
    assert progress.retry_refusal(current, retries=3, window_s=20, now=base + 33.0) is None
    assert progress.retry_refusal(current, retries=3, window_s=20, now=base + 55.0) is not None


def test_the_host_limit_is_part_of_a_fit_key() -> None:
    """No device size: two prlimit caps never share a remembered fit."""
    small = remember.host_limit(["prlimit", "--as=4000000000", "--", "trl", "sft"])
    large = remember.host_limit(["prlimit", "--as", "9200000000", "trl", "sft"])
    assert "prlimit-as=4000000000" in small
    assert "prlimit-as=9200000000" in large
    start = Knobs(per_device_batch=8)
    keys = {remember.key_of(start=start, model_config=None, dialect="trl", policy_text="",
                            device_name=name, device_mib=None) for name in (small, large)}
    assert len(keys) == 2


def _down_while(records: list[dict[str, Any]], *, cut_after: str, gone_s: float,
                alive_after_s: float) -> tuple[list[dict[str, Any]], float]:
    """The night's journal cut after the first `cut_after` event of attempt 2, the supervisor
    dead from `alive_after_s` after that event until a `resume` `gone_s` after attempt 2 ended;
    attempt 2's end (as resume settles it) journaled after the resume. Returns (records, the
    resume's time)."""
    second = _finished(records, 2)
    at = next(i for i, r in enumerate(records)
              if r["event"] == cut_after and r["attempt"] == 2)
    resumed_at = float(second["ended_at"]) + gone_s
    resumed = {"v": 1, "event": "run.resumed", "ts": resumed_at, "attempts_done": 1, "pending": 2,
               "orphan": "adopt", "pid": 4242,
               "last_alive": float(records[at]["ts"]) + alive_after_s}
    if cut_after == "attempt.spawned":  # died while attempt 2 ran: it failed while nobody watched
        settled = {**second, "ts": resumed_at + 0.2, "adopted": True}
        return [*records[:at + 1], resumed, settled], resumed_at
    return [*records[:at + 1], resumed], resumed_at  # died in the backoff after the failure


def test_a_failure_while_the_supervisor_was_down_is_retried_however_long_it_was_down() -> None:
    """Attempt 2 failed after its supervisor was SIGKILLed; `resume` ten minutes later: the
    downtime is not time between attempts, so the 20 s window is not used up."""
    records, resumed_at = _down_while(_night(), cut_after="attempt.spawned", gone_s=600.0,
                                      alive_after_s=2.0)
    state = replay(records)
    current = progress.streak(state.attempts, state.events)
    second = _finished(_night(), 2)
    assert current.since == second["ended_at"]
    assert current.down_s == pytest.approx(600.0)
    assert progress.retry_refusal(current, retries=3, window_s=20, now=resumed_at + 1) is None
    # Without the journal's account of the downtime the same streak is refused (the bug).
    blind = progress.streak(state.attempts)
    assert progress.retry_refusal(blind, retries=3, window_s=20, now=resumed_at + 1) is not None
    # The window still runs once the supervisor is back.
    late = progress.retry_refusal(current, retries=3, window_s=20, now=resumed_at + 25)
    assert late is not None
    assert "not counting 600 s the supervisor was down" in late


def test_a_backoff_cut_short_by_the_supervisors_death_is_not_time_between_attempts() -> None:
    """The supervisor died 1 s into its backoff after attempt 2's failure; `resume` ten
    minutes later: only the failure-to-backoff time (about 0 s) counts, not the backoff's
    remaining wait nor the downtime."""
    records, resumed_at = _down_while(_night(), cut_after="transient.retrying", gone_s=600.0,
                                      alive_after_s=1.0)
    state = replay(records)
    current = progress.streak(state.attempts, state.events)
    retrying = next(r for r in records
                    if r["event"] == "transient.retrying" and r["attempt"] == 2)
    assert current.down_s == pytest.approx(resumed_at - retrying["ts"])
    assert progress.retry_refusal(current, retries=3, window_s=20, now=resumed_at + 1) is None



def test_downtime_during_a_retry_is_not_left_out_twice() -> None:
    """The retry was running when the supervisor died and failed while it was down: its own
    running time and the downtime overlap, and the window leaves out their union once."""
    records = _upto_second_failure()
    state = replay(records)
    first = state.attempts[-1]
    assert first.finished is not None
    stuck = dataclasses.replace(first.finished, checkpoints=(), checkpoint_times=(),
                                progress={"step": 8, "samples": []}, trained_steps=None)
    base = first.finished.ended_at or 0.0
    retry = dataclasses.replace(  # started 2 s after the failure, failed 30 s later
        first, started=dataclasses.replace(first.started, attempt=9, ts=base + 2.0),
        finished=dataclasses.replace(stuck, attempt=9, ended_at=base + 32.0, ts=base + 700.5))
    last_event = dataclasses.replace(state.events[-1], ts=base + 2.0)
    resumed = RunResumed(ts=base + 700.0, attempts_done=1, pending=9, last_alive=base + 10.0)
    current = progress.streak((*state.attempts, retry), (last_event, resumed))
    assert current.running_s == pytest.approx(30.0)
    assert current.down_s == pytest.approx(700.0 - 32.0)  # not 690: 10..32 was running time
    # 2 s of backoff and 1 s since the resume: well inside a 20 s window.
    assert progress.retry_refusal(current, retries=3, window_s=20, now=base + 701.0) is None
    assert progress.retry_refusal(current, retries=3, window_s=20, now=base + 720.0) is not None
