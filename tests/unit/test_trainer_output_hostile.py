"""The trainer's output, read at the edge: whatever it prints, the parsers return something or
nothing, never an exception, never a number that is not finite and bounded, never unbounded
memory. The hostile shapes come from tests/data/programs/hostile_trainer.py."""

from __future__ import annotations

import math
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor import bounds, runner
from supervisor.classify import Outcome, VerdictKind, classify, is_oom_line, parse_numbers
from supervisor.device_memory import read_inject_lines
from supervisor.journal import parse_line
from supervisor.plan import parse_size_mib
from supervisor.runner import AttemptSpec
from supervisor.trainer_output import Tracker, measure

HUGE = "9" * 400
OOM = ("torch.OutOfMemoryError: Simulated device out of memory. Tried to allocate 10.75 MiB; "
       "simulated device of 70 MiB with 60.58 MiB live (oom-supervisor live-bytes budget).")
"""The last line of a real OOM of the reference trainer under a 70 MiB budget (tests/data/
tails/device_budget_oom.txt holds the whole recorded tail)."""


def _sane(value: object) -> bool:
    """A number the report can do arithmetic on: finite and bounded (or no number at all)."""
    if value is None:
        return True
    if isinstance(value, dict):
        return all(_sane(v) for v in value.values())
    if isinstance(value, int | float) and not isinstance(value, bool):
        return math.isfinite(value) and abs(value) < 1e16
    return True


# --- the hostile cases, one by one ---------------------------------------------------------

def test_final_metrics_that_are_not_finite_are_ignored() -> None:
    """`train_runtime: 1e999`, `'nan'`, a 400-digit rate, `-inf`: none becomes a number."""
    line = ("{'train_runtime': 1e999, 'train_samples_per_second': 'nan', "
            f"'train_steps_per_second': {HUGE}, 'train_loss': -inf, 'epoch': 1.0}}")
    assert measure([line]).cost is None
    good = "{'train_runtime': '2.807', 'train_samples_per_second': 5.7, 'train_loss': 1e999}"
    assert measure([good]).cost == {"runtime_s": 2.807, "samples_per_s": 5.7}


def test_a_400_digit_step_is_text_not_progress() -> None:
    """tqdm and LLaMA-Factory frames with steps no trainer reaches leave the tracker as it was."""
    tracker = Tracker(clock=lambda: 100.0)
    tracker.feed(f"  40%|████      | {HUGE}/{HUGE} [03:10<04:45,  1.98s/it]\n".encode())
    tracker.feed(b"  50%|#####     | inf/nan [03:10<04:45,  1.98s/it]\n")
    tracker.feed(f"{{'current_steps': {HUGE}, 'total_steps': {HUGE}}}\n".encode())
    assert (tracker.step, tracker.total) == (None, None)
    tracker.feed(b"  40%|####      | 96/240 [03:10<04:45,  1.98s/it]\n")
    assert tracker.summary() == {"step": 96, "total": 240, "samples": [[96, 100.0]],
                                 "began_at": 100.0, "longest_gap_s": 0.0}


def test_malformed_markers_are_text_not_commands() -> None:
    """A list, a string limit, a 400-digit pid, NaN and 1e999 peaks, a torn line: ignored; a
    well-formed marker beside them still counts."""
    lines = [
        'oom-supervisor.inject {"pid": 12, "limit_mib": "abc"}',
        'oom-supervisor.inject {"pid": 12, "limit_mib": [1, 2]}',
        f'oom-supervisor.inject {{"pid": {HUGE}, "limit_mib": {HUGE}}}',
        'oom-supervisor.inject {"pid": "x", "limit_mib": 1e999}',
        'oom-supervisor.peak {"pid": 12, "peak_mib": NaN}',
        'oom-supervisor.peak {"pid": 12, "peak_mib": 1e999}',
        'oom-supervisor.peak {"pid": 12, "peak_mib": -5}',
        "oom-supervisor.peak not json at all",
        'oom-supervisor.inject {"pid": 1, "limit_mib"',
        "oom-supervisor.inject [1, 2, 3]",
    ]
    report = read_inject_lines(lines)
    assert not report.announced
    assert report.peak_mib is None
    ours = read_inject_lines([*lines,
                              'oom-supervisor.inject {"limit_mib": 70, "device": "cpu", "pid": 7}',
                              'oom-supervisor.peak {"pid": 7, "peak_mib": 61.5}'])
    assert ours.announced
    assert (ours.limit_mib, ours.peak_mib, ours.pids) == (70, 61.5, (7,))


def test_a_result_line_with_insane_numbers_measures_nothing() -> None:
    """The reference trainer's result line with a NaN peak and a 400-digit step."""
    line = f'reference-trainer.result {{"peak_live_mib": NaN, "steps": {HUGE}}}'
    got = measure([line])
    assert got.peak_mib is None
    assert got.steps is None


def test_oom_sizes_that_are_no_sizes_are_left_out() -> None:
    """`Tried to allocate 1.2.3 GiB`, 400 digits: no number; the real figures still parse."""
    assert parse_numbers(["Tried to allocate 1.2.3 GiB", f"Tried to allocate {HUGE} GiB"]) is None
    numbers = parse_numbers([OOM])
    assert numbers is not None
    assert (numbers.tried_mib, numbers.capacity_mib, numbers.allocated_mib) == (10.75, 70.0,
                                                                                 60.58)


def test_device_sizes_over_an_exbibyte_are_refused() -> None:
    """`99999999999999999999999TiB` and 400 digits: refused in one line, never a huge int."""
    for text in ("99999999999999999999999TiB", HUGE, "1048576TiB"):
        with pytest.raises(ValueError, match="over 1 EiB") as caught:
            parse_size_mib(text)
        assert "\n" not in str(caught.value)
    assert parse_size_mib("1023TiB") == 1023 * 2**20


def _sink() -> runner._Sink:
    return runner._Sink(AttemptSpec(argv=("x",), env={}, log_dir=Path("/nonexistent"),  # noqa: SLF001
                                    echo=False), is_oom_line)


def test_an_oom_at_the_end_of_a_line_that_never_ends_is_seen() -> None:
    """200 MB would do the same: a progress bar, megabytes, then the real OOM's message and a
    last tqdm redraw, with no newline anywhere: the OOM line is found, whatever the cut."""
    for filler in (1, 65536 - 40, 65536, 3 * 65536 + 17, 2_000_000):
        sink = _sink()
        data = (b"  0%|          | 0/1 [00:00<?, ?it/s]" + b"x" * filler
                + b"\r  0%|          | 0/1 [00:00<?, ?it/s]" + OOM.encode()
                + b"\r  0%|          | 0/1 [00:00<?, ?it/s]")
        for at in range(0, len(data), 65536):
            sink.feed(1, data[at:at + 65536])
        sink.finish()
        assert sink.oom_line == OOM, filler
        outcome = Outcome(exit_code=1, duration_s=1.0, tail=tuple(sink.tail),
                          oom_line=sink.oom_line)
        assert classify(outcome).kind is VerdictKind.OOM


def test_an_oom_the_program_caught_and_exited_0_is_a_fit_that_says_so() -> None:
    """Exit 0 after an OOM line (not killed): a fit, with the OOM as its evidence."""
    verdict = classify(Outcome(exit_code=0, duration_s=1.0, tail=(OOM, "carrying on"),
                               oom_line=OOM))
    assert verdict.kind is VerdictKind.FITS
    assert verdict.evidence is not None
    assert "recovered by itself" in verdict.evidence
    assert classify(Outcome(exit_code=0, duration_s=1.0, tail=("done",))).evidence is None


def test_ten_megabyte_lines_keep_the_readers_memory_bounded() -> None:
    """30 MB without a newline through the sink and the tracker: memory stays under a bound
    that does not grow with the line (the tail keeps at most its lines of at most 64 KiB)."""
    sink = _sink()
    tracker = Tracker()
    chunk = b"x" * 65536
    tracemalloc.start()
    try:
        for _ in range(30 * 16):
            sink.feed(1, chunk)
            tracker.feed(chunk)
        sink.finish()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < runner.TAIL_LINES * 65536 * 1.5 + 4 * 2**20
    assert all(len(line) <= 65536 for line in sink.tail)


# --- the property: any bytes, any shape --------------------------------------------------

numbers = st.one_of(
    st.integers(), st.floats(), st.just(HUGE), st.just("1e999"), st.just("-1e308"),
    st.just("nan"), st.just("NaN"), st.just("inf"), st.just("-inf"), st.just("1.2.3"),
    st.text(alphabet="0123456789.eE+-", max_size=30))
line_shapes = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda s, t: f"  40%|####      | {s}/{t} [03:10<04:45,  1.98s/it]", numbers,
              numbers),
    st.builds(lambda s, t: f"{{'current_steps': {s}, 'total_steps': {t}}}", numbers, numbers),
    st.builds(lambda r, v, loss: (f"{{'train_runtime': {r}, 'train_samples_per_second': '{v}', "
                                  f"'train_loss': {loss}}}"), numbers, numbers, numbers),
    st.builds(lambda p, lim: f'oom-supervisor.inject {{"pid": {p}, "limit_mib": {lim}}}',
              numbers, numbers),
    st.builds(lambda p, peak: f'oom-supervisor.peak {{"pid": {p}, "peak_mib": {peak}}}',
              numbers, numbers),
    st.builds(lambda p, s: f'reference-trainer.result {{"peak_live_mib": {p}, "steps": {s}}}',
              numbers, numbers),
    st.builds(lambda a, b: f"CUDA out of memory. Tried to allocate {a} GiB. {b} MiB is free",
              numbers, numbers),
    st.builds(lambda t, x: f'{{"v": 1, "ts": {t}, "event": "run.finished", "x": {x}}}',
              numbers, numbers),
)


def _as_bytes(shape: str | bytes) -> bytes:
    return shape if isinstance(shape, bytes) else shape.encode("utf-8", errors="replace")


@settings(max_examples=200, deadline=None)
@given(st.lists(line_shapes, max_size=12), st.sampled_from([b"\n", b"\r", b"", b"\r\n"]),
       st.integers(1, 97))
def test_any_output_is_read_without_an_exception_or_an_insane_number(
        shapes: list[str | bytes], ending: bytes, cut: int) -> None:
    """Arbitrary bytes and the hostile line shapes, with or without newlines, cut anywhere."""
    data = ending.join(_as_bytes(s) for s in shapes)
    sink = _sink()
    tracker = Tracker(clock=lambda: 5.0)
    for at in range(0, len(data), cut):
        sink.feed(0, data[at:at + cut])
        tracker.feed(data[at:at + cut])
    sink.finish()
    lines = [*sink.tail]
    got = measure(lines)
    assert _sane(got.peak_mib)
    assert _sane(got.steps)
    assert _sane(got.cost)
    assert got.peak_mib is None or 0 < got.peak_mib < bounds.MAX_MIB
    injected = read_inject_lines(lines)
    assert _sane(injected.peak_mib)
    assert _sane(injected.limit_mib)
    found = parse_numbers(lines)
    if found is not None:
        assert all(_sane(getattr(found, name)) for name in found.__slots__)
    summary = tracker.summary()
    assert summary is None or (_sane(summary["step"]) and _sane(summary["total"]))
    for raw in data.split(b"\n"):
        record = parse_line(raw)
        assert record is None or all(
            (math.isfinite(v) and abs(v) < 1e18) if isinstance(v, float)
            else abs(v) < 10**30 if isinstance(v, int) else True for v in record.values())
    classify(Outcome(exit_code=1, duration_s=1.0, tail=tuple(lines), oom_line=sink.oom_line))
