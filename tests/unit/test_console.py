"""The console's words and --log-format's place, on a journal recorded from a real demo run."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest

from supervisor import cli
from supervisor.console import Console, JsonTee

RUNS = Path(__file__).parent.parent / "data" / "runs"


@pytest.mark.parametrize(("argv", "fmt", "rest"), [
    (["--log-format", "json", "run", "--", "x"], "json", ["run", "--", "x"]),
    (["run", "--log-format=plain", "--", "x"], "plain", ["run", "--", "x"]),
    (["status", "--log-format", "json"], "json", ["status"]),
    # after `--` it is the command's own flag, never ours
    (["run", "--", "train.py", "--log-format", "json"], None,
     ["run", "--", "train.py", "--log-format", "json"]),
])
def test_log_format_is_taken_anywhere_before_the_command(
        argv: list[str], fmt: str | None, rest: list[str]) -> None:
    """`--log-format` before or after the subcommand; the command's own words are left alone."""
    assert cli.split_log_format(argv) == (fmt, rest)


def test_plain_lines_from_the_journal(tmp_path: Path) -> None:
    """Each event becomes one line for people, read from the journal, silent ones dropped."""
    run = tmp_path / "p1"
    shutil.copytree(RUNS / "demo-150", run)
    console = Console(io.StringIO(), live=False, clock=lambda: 0.0)
    console.attach(run)
    assert console.line("attempt.spawned", {"attempt": 1}) is None
    assert console.line("oom.detected", {"line": "torch.OutOfMemoryError: ..."}) is None
    started = console.line("run.started", {})
    assert started is not None
    assert started.startswith("run p1 started: full fine-tuning, batch 4, cutoff 1024")
    assert "on a 150 MiB device (--device-memory), at most 32 attempts" in started
    assert console.line("attempt.started", {"attempt": 2}) == (
        "attempt 2 of at most 32 (smaller-batch): full fine-tuning, batch 2 x 2 accumulated "
        "(effective 4), cutoff 1024, checkpointing off")
    assert console.line("attempt.finished", {"attempt": 2}) == (
        "✗ attempt 2 out of memory after 6.3 s · smaller-batch: full b2x2 cut 1024 · "
        "tried 2.0 MiB, allocated 149 MiB, capacity 150 MiB (device 150 MiB)")
    assert console.line("attempt.finished", {"attempt": 4}) == (
        "✓ attempt 4 fits after 39.7 s · gradient-checkpointing: full b1x4 cut 1024 ckpt · "
        "peak 95.5 MiB of 150 MiB (64%)")
    assert console.line("transient.retrying", {"attempt": 3, "delay_s": 2.0, "note": None},
                        "warning") == ("warning: attempt 3 failed: the same config runs again in "
                                   "2.0 s")


def test_a_skip_reason_is_said_once_a_run(tmp_path: Path) -> None:
    """A rung skipped at every step for the same reason is one console line, not one per step."""
    run = tmp_path / "p1"
    shutil.copytree(RUNS / "demo-150", run)
    console = Console(io.StringIO(), live=False, clock=lambda: 0.0)
    console.attach(run)
    reason = "expandable-segments: the OOM shows no fragmentation"
    first = console.line("ladder.stepped", {"rung": "smaller-batch", "skipped": [reason]})
    assert first == f"  not taking {reason}; next: smaller-batch"
    assert console.line("ladder.stepped", {"rung": "lora", "skipped": [reason]}) is None
    other = "qlora: bitsandbytes is not importable in the command's interpreter"
    assert console.line("ladder.stepped", {"rung": "lora", "skipped": [reason, other]}) == (
        f"  not taking {other}; next: lora")


def test_json_tee_keeps_early_events_and_writes_json_lines(tmp_path: Path) -> None:
    """Events logged before the run folder is known are written once it is."""
    tee = JsonTee()
    tee(None, "info", {"event": "estimate.unavailable", "reason": "no model"})
    tee.open(tmp_path)
    tee(None, "info", {"event": "attempt.started", "attempt": 1})
    tee.close()
    lines = (tmp_path / "supervisor.jsonl").read_text().splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["estimate.unavailable",
                                                             "attempt.started"]


def test_a_rung_that_left_no_data_is_said_as_such(tmp_path: Path) -> None:
    """Recorded run (no-data-70): the cutoff rung's attempt left the trainer no rows; the
    console says so with the trainer's own line, and that the ladder walks on."""
    run = tmp_path / "nd1"
    shutil.copytree(RUNS / "no-data-70", run)
    console = Console(io.StringIO(), live=False, clock=lambda: 0.0)
    console.attach(run)
    assert console.line("attempt.finished", {"attempt": 4}) == (
        "! attempt 4 left the trainer no data after 25.4 s · shorter-cutoff: full b1x2 cut 256 "
        "ckpt · ValueError: num_samples should be a positive integer value, but got "
        "num_samples=0 · that rung is spent, the ladder walks on")


def test_configs_skipped_in_a_row_are_one_line() -> None:
    """26 configs skipped on their predictions were 26 console lines: now one, said before
    the next event's line; a single skip keeps its own reason."""
    console = Console(io.StringIO(), live=False, clock=lambda: 0.0)
    for rung, mib in ((None, 597.0), ("smaller-batch", 349.0), ("lora", 51.0)):
        assert console.line("rung.skipped", {"rung": rung, "predicted_mib": mib,
                                             "reason": f"predicted {mib} > 10 MiB"}) is None
    said = console.line("estimate.predicted", {"configs": 3})
    assert said is not None
    first, second = said.split("\n")
    assert first == ("skipped 3 configs without running them, each predicted over the device "
                     "(51-597 MiB): the command as given ... lora; report.md lists each")
    assert second == "predicted 3 configs"
    console.line("rung.skipped", {"rung": "lora", "predicted_mib": 60.0, "reason": "why"})
    last = console.line("ladder.exhausted", {"reason": "r"}, "error")
    assert last is not None
    assert last.startswith("skipped lora without running it: why\n")


def test_a_resumed_run_says_so_first_where_it_resumes(tmp_path: Path) -> None:
    """Issue 17: a resumed run's first console line names the attempt it resumes at, and its
    report says it was resumed near the top (a recorded run, cut after attempt 2 and resumed)."""
    from supervisor import report  # noqa: PLC0415
    from supervisor.events import replay  # noqa: PLC0415

    run = tmp_path / "p2"
    run.mkdir()
    lines = (RUNS / "demo-150" / "journal.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    cut = next(i for i, r in enumerate(records)
               if r["event"] == "attempt.finished" and r["attempt"] == 2)
    kept = records[:cut + 1]
    kept.append({"v": 1, "ts": kept[-1]["ts"] + 30, "event": "run.resumed", "attempts_done": 2,
                 "pending": None})
    (run / "journal.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept),
                                       encoding="utf-8")
    console = Console(io.StringIO(), live=False, clock=lambda: 0.0)
    console.attach(run)
    first = console.line("run.resumed", kept[-1])
    assert first is not None
    assert first.startswith("run ")
    assert " resumed: at attempt 2 (" in first
    assert "after 2 finished" in first
    md = report.render_markdown(report.build(replay(kept)))
    lines = md.splitlines()
    assert "Resumed once after the supervisor died or was stopped" in lines[2]  # the headline
    assert any(line.startswith("- Resumed at ") for line in lines[:16])


def test_a_checkpoint_passed_over_is_one_line_naming_it_and_why() -> None:
    console = Console(io.StringIO(), live=False, clock=lambda: 0.0)
    line = console.line("checkpoint.passed_over", {
        "attempt": 2, "checkpoint": "/o/checkpoint-99999999", "step": 99999999,
        "reason": "it appeared during attempt 1 but step 99999999 is past the run's 8 steps"})
    assert line == ("  passing over /o/checkpoint-99999999: it appeared during attempt 1 but "
                    "step 99999999 is past the run's 8 steps")


def test_marker_lines_never_become_the_live_line(tmp_path: Path) -> None:
    """`oom-supervisor.peak {...}` at the end of the log: the live line shows the program's
    own last line before it."""
    from supervisor.console import last_output_line  # noqa: PLC0415

    (tmp_path / "stdout.log").write_text(
        'step 3 loss 1.2\noom-supervisor.inject {"limit_mib": 70}\n'
        'oom-supervisor.peak {"peak_mib": 47.9, "device": "cpu"}\n', encoding="utf-8")
    assert last_output_line(tmp_path) == "step 3 loss 1.2"
