"""`plan` and `run` take one margin from the policy, and `plan`'s recommended config is the
config `run` starts with, at every budget of the scenario suite.

The predictions are the peaks the reference trainer measured (tests/data/peaks/lattice-*.json:
the estimator's traced prediction is within about 1 % of them); `run` here is the real loop
(`supervise`) with a scripted first attempt that fits, so its first attempt is what its own
prediction skipping chose.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from supervisor.command import Command
from supervisor.dialects import detect
from supervisor.estimate import Method, ModelSpec, Prediction
from supervisor.journal import read
from supervisor.knobs import Knobs
from supervisor.loop import Memory, supervise
from supervisor.plan import build, recommended_start
from supervisor.policy import Ladder, PolicyError, parse, resolve
from tests.fakes import FITS, ScriptedRunner
from tests.unit.test_walk_lattice import BF16_BUDGETS, QWEN2_BUDGETS, _short, oracle

PEAKS = Path(__file__).parent.parent / "data" / "peaks"
SCENARIOS = [("tiny", b) for b in (400, 200, 130, 100, 70, 40)] + [
    ("tiny-qwen2", b) for b in QWEN2_BUDGETS]
_SAME = ("per_device_batch", "grad_accum", "cutoff_len", "gradient_checkpointing",
         "finetuning_type", "precision")


class _Measured:
    """Predicts each config as the peak the trainer measured for it (None: not measured)."""

    def __init__(self, lattice: str) -> None:
        record = json.loads((PEAKS / f"lattice-{lattice}.json").read_text(encoding="utf-8"))
        self.start = Knobs.from_dict(record["start"])
        self.peaks = {self._key(Knobs.from_dict(r["knobs"])): float(r["peak_live_mib"])
                      for r in record["rows"]}

    @staticmethod
    def _key(knobs: Knobs) -> tuple[str, ...]:
        # The lattice says None where the trainer's dialect reads fp32 (its default).
        return tuple(str(getattr(knobs, k) or "fp32") for k in _SAME)

    def predict(self, knobs: Knobs) -> Prediction | None:
        peak = self.peaks.get(self._key(knobs))
        return None if peak is None else Prediction(peak_mib=peak, method=Method.FAKE)

    def predict_many(self, configs: Sequence[Knobs]) -> list[Prediction | None]:
        return [self.predict(k) for k in configs]

    def calibrate(self, knobs: Knobs, measured_mib: float, *,  # noqa: ARG002
                  lower_bound: bool = False) -> float:  # noqa: ARG002
        return 1.0


def _command(start: Knobs, model: str, cwd: Path) -> Command:
    argv = [sys.executable, "-m", "supervisor.reference_trainer", "--model_name_or_path", model,
            "--per_device_train_batch_size", str(start.per_device_batch),
            "--cutoff_len", str(start.cutoff_len), "--max_steps", "2", "--output_dir", "out"]
    if start.precision:
        argv.append("--bf16")
    return Command(argv=tuple(argv), cwd=str(cwd))


def _first_attempt(tmp_path: Path, command: Command, ladder: Ladder, predictor: _Measured,
                   device_mib: float) -> Knobs:
    dialect = detect(command)
    supervise(command, dialect=dialect, ladder=ladder, run_dir=tmp_path / "run",
              run_attempt=ScriptedRunner([FITS]), echo=False, env={},
              memory=Memory(predictor=predictor, device_mib=device_mib,
                            margin=ladder.estimate_margin))
    started = next(e for e in read(tmp_path / "run" / "journal.jsonl").records
                   if e["event"] == "attempt.started")
    return Knobs.from_dict(started["knobs"])


def _same(a: Knobs, b: Knobs) -> bool:
    return _Measured._key(a) == _Measured._key(b)  # noqa: SLF001 - the one comparison


@pytest.mark.parametrize(("lattice", "device_mib"), SCENARIOS + [
    (f"{m}-bf16", b) for m, budgets in BF16_BUDGETS.items() for b in budgets])
def test_plans_recommendation_is_runs_first_attempt(tmp_path: Path, lattice: str,
                                                   device_mib: float) -> None:
    """At every scenario budget (fp32 and bf16, Llama and Qwen2) `plan` recommends the
    config `run` starts with, under the policy's one margin; with predictions this close to
    the measured peaks that is the least-degraded config that fits."""
    ladder = resolve("default")
    predictor = _Measured(lattice)
    model = lattice.removesuffix("-bf16")
    command = _command(predictor.start, model, tmp_path)
    reading = detect(command).read_sourced(command)
    plan = build(reading.knobs, ladder, ModelSpec.named(model) if model == "tiny" else
                 ModelSpec.from_config(model, {"model_type": "qwen2"}, source="test"),
                 int(device_mib), predict=predictor.predict_many, can_set=reading.can_set)
    recommended = recommended_start(plan)
    assert recommended is not None
    first = _first_attempt(tmp_path, command, ladder, predictor, device_mib)
    assert _same(first, recommended), (first, recommended)
    if not lattice.endswith("-bf16"):  # the bf16 grids hold only part of the walk
        assert _short(first) == oracle(model, device_mib)


def test_a_policys_margin_moves_plan_and_run_together(tmp_path: Path) -> None:
    """A policy with a 10 % margin: both skip the config whose peak is within 10 % of the
    device, and still agree."""
    ladder = dataclasses.replace(resolve("default"), estimate_margin=0.10)
    predictor = _Measured("tiny")
    command = _command(predictor.start, "tiny", tmp_path)
    reading = detect(command).read_sourced(command)
    plan = build(reading.knobs, ladder, ModelSpec.named("tiny"), 100,
                 predict=predictor.predict_many, can_set=reading.can_set)
    recommended = recommended_start(plan)
    assert recommended is not None
    first = _first_attempt(tmp_path, command, ladder, predictor, 100)
    assert _same(first, recommended)
    # Without the margin both start on checkpointing at cutoff 256; with it, on LoRA.
    assert str(first.finetuning_type) == "lora"


@pytest.mark.parametrize("value", [-0.1, 1.0, "5%", True])
def test_a_bad_margin_is_one_clear_line(value: object) -> None:
    """The margin is a fraction in [0, 1); anything else names the table and the key."""
    with pytest.raises(PolicyError, match=r"\[estimate\] margin must be a fraction"):
        parse({"rung": [{"name": "b", "action": "halve", "knob": "per_device_batch"}],
               "estimate": {"margin": value}})
