"""Numbers from the stores, the policy and the knob map, validated where they are read."""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from supervisor.command import CommandError
from supervisor.dialects.knobmap import load as load_knobmap
from supervisor.estimate import Estimator, ModelSpec, clear_cache, fits
from supervisor.fits import FitStore, trace_problem
from supervisor.knobs import Knobs
from supervisor.policy import PolicyError, load
from tests.unit.test_estimate import FakeChild

RUNG = """
[[rung]]
name = "halve batch"
action = "halve"
knob = "per_device_batch"
floor = 1
compensate = "grad_accum"
"""


@pytest.mark.parametrize("peak", ["NaN", "Infinity", "-Infinity", "1e999", '"1e999"',
                                  "-1e308", "0", '"abc"', "null", "true", "[1]"])
def test_an_insane_kept_prediction_is_dropped_said_and_traced_again(
        tmp_path: Path, peak: str) -> None:
    """A traces row whose peak is NaN, 1e999 (number or text), negative or no number: the
    command's own config is never skipped (or passed) on it; the row goes, a line says so, and
    the config is traced again."""
    spec = ModelSpec.from_config("kept", {"model_type": "llama", "x": 25}, source="test")
    knobs = Knobs(per_device_batch=1, cutoff_len=64)
    db = tmp_path / "fits.sqlite3"
    clear_cache()  # this process's traces: only the store is under test
    with FitStore.open(db) as store:
        Estimator(spec, run=FakeChild(mib_per_sample=5.0), store=store).predict(knobs)
    with closing(sqlite3.connect(db)) as raw, raw:
        (key, text), = raw.execute("SELECT key, prediction FROM traces").fetchall()
        kept = json.loads(text)
        poisoned = json.dumps(kept).replace(f'"peak_mib": {json.dumps(kept["peak_mib"])}',
                                            f'"peak_mib": {peak}')
        raw.execute("UPDATE traces SET prediction = ? WHERE key = ?", (poisoned, key))
    clear_cache()
    said: list[str] = []
    child = FakeChild(mib_per_sample=5.0)
    with FitStore.open(db) as store:
        store.on_dropped = said.append
        prediction = Estimator(spec, run=child, store=store).predict(knobs)
    assert prediction is not None
    assert prediction.peak_mib == 5.0
    assert fits(prediction, 4096.0) is True
    assert len(child.requests) == 1  # traced again
    assert len(said) == 1
    assert "dropped and the config is predicted again" in said[0]
    with closing(sqlite3.connect(db)) as raw:
        fresh = json.loads(raw.execute("SELECT prediction FROM traces").fetchone()[0])
    assert fresh["peak_mib"] == 5.0  # the row was replaced by the new trace


def test_a_sane_kept_prediction_passes() -> None:
    """The shape the estimator keeps is accepted as it is."""
    assert trace_problem({"peak_mib": 61.5, "method": "fake", "raw_peak_mib": None,
                          "breakdown": {"weights": 20.0, "peak_at": "backward"}}) is None
    assert trace_problem({"peak_mib": 61.5, "method": "fake",
                          "breakdown": {"weights": float("nan")}}) is not None


@pytest.mark.parametrize(("line", "said"), [
    ("max_attempts = 99999999999999999999999", "must be below"),
    ("max_attempts = " + "9" * 5000, "not valid TOML"),
    ("[watchdog]\nstall_factor = 1e999", "must be a number >= 0"),
    ("[watchdog]\nstall_floor_s = nan", "must be a number >= 0"),
    ("[gpu]\nrelease_wait_s = 99999999999999999999", "must be below"),
])
def test_policy_numbers_out_of_bounds_are_one_line(tmp_path: Path, line: str, said: str) -> None:
    """Huge, infinite or NaN numbers in a policy: one PolicyError line, never a traceback."""
    path = tmp_path / "p.toml"
    path.write_text(f"{line}\n{RUNG}", encoding="utf-8")
    with pytest.raises(PolicyError, match=said) as caught:
        load(path)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("value", ['["a", "b"]', "3", "{ x = 1 }", "true"])
def test_a_knob_map_whose_program_is_not_a_string_is_refused(tmp_path: Path, value: str) -> None:
    """`program = ["a", "b"]` is refused by name, in one line."""
    path = tmp_path / "map.toml"
    path.write_text(f'program = {value}\n[knobs.per_device_batch]\nflag = "--bs"\n',
                    encoding="utf-8")
    with pytest.raises(CommandError, match="program must be one string") as caught:
        load_knobmap(path)
    assert "\n" not in str(caught.value)
