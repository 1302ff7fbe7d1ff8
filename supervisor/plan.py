"""Before a run: every config the ladder would walk, its predicted peak, and the first that fits.

Pure apart from the estimator it is handed (which may start a child process).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from supervisor.classify import OomKind, Verdict, VerdictKind
from supervisor.estimate import ModelSpec, Prediction, fits
from supervisor.knobs import FinetuningType, Knobs
from supervisor.policy import Attempt, Cost, GiveUp, Ladder, Step, next_step

DEFAULT_MARGIN = 0.10
"""Safety margin: a config is recommended when its prediction x (1 + margin) fits the device."""

SEED_BYTES_PER_PARAM: dict[FinetuningType, int] = {
    FinetuningType.FULL: 20,
    FinetuningType.LORA: 10,
    FinetuningType.FREEZE: 6,
}
"""The seed article's rule of thumb (shared/seed: 全参数 ≈ 参数 x 20, LoRA x 10, 冻结 x 6 bytes)."""

START = "(start)"
"""The rung name next_runnable gives the command's own config."""

_ASSUMED_OOM = Verdict(kind=VerdictKind.OOM, oom_kind=OomKind.TORCH,
                       evidence="plan: assumed out of memory to enumerate the ladder")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)(B?)\s*$", re.IGNORECASE)
_POWER = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}


def parse_size_mib(text: str) -> int:
    """Parse `24GiB`, `24GB`, `80G`, `512MiB`, `512M` or a bare number of MiB into MiB.

    Binary and decimal spellings both mean binary units (GPU capacities are quoted in GiB
    whatever the label says: an "80 GB" card holds 80 GiB minus reserved memory).
    """
    match = _SIZE.match(text)
    if match is None or (match.group(3) and not match.group(2)):
        msg = (f"cannot read {text!r} as a memory size; write e.g. 24GiB, 24GB, 80G, 512MiB "
               "or a bare number of MiB")
        raise ValueError(msg)
    number, unit = float(match.group(1)), match.group(2).upper()
    if not unit:
        # A bare number is MiB, or bytes when it has a B (`512B`): refuse the second as a typo.
        if match.group(4):
            msg = f"{text!r} is bytes; give the size in MiB or GiB, e.g. 24GiB"
            raise ValueError(msg)
        unit = "M"
    mib = number * 1024.0 ** (_POWER[unit] - 2)
    if mib < 1:
        msg = f"{text!r} is less than 1 MiB; give a device size such as 24GiB"
        raise ValueError(msg)
    return round(mib)


def walk(start: Knobs, ladder: Ladder) -> list[tuple[Knobs, str | None]]:
    """Every config the ladder tries from `start` if each one runs out of memory, in order.

    Each entry is (knobs, the rung that led there; None for the start).
    """
    history = [Attempt(number=1, knobs=start, rung=None, verdict=_ASSUMED_OOM)]
    while len(history) < ladder.max_attempts:
        step = next_step(start, history, ladder)
        if isinstance(step, GiveUp):
            break
        history.append(Attempt(number=len(history) + 1, knobs=step.knobs, rung=step.rung,
                               verdict=_ASSUMED_OOM))
    return [(a.knobs, a.rung) for a in history]


@dataclass(frozen=True, slots=True, kw_only=True)
class Row:
    """One config of the walk with its prediction and what it gives up against the start."""

    knobs: Knobs
    rung: str | None
    prediction: Prediction | None
    fits: bool | None
    """Predicted peak x (1 + margin) within the device; None when there is no prediction."""
    costs: tuple[tuple[Cost, str], ...]
    seed_mib: float | None
    """The seed article's rule of thumb for this finetuning type (None: parameters unknown)."""

    @property
    def effective_batch(self) -> int:
        """Samples per optimizer step, as the knobs say."""
        return self.knobs.effective_batch


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """The whole table: rows in policy order and the recommended first config."""

    model: str
    params: int | None
    device_mib: int
    margin: float
    rows: tuple[Row, ...]
    recommended: int | None
    """Index into rows of the first config predicted to fit with the margin (None: none does)."""


Predict = Callable[[Sequence[Knobs]], Sequence[Prediction | None]]
"""Predictions for many configs at once (one child process for all of them is fastest)."""


def costs(knobs: Knobs, start: Knobs, ladder: Ladder) -> tuple[tuple[Cost, str], ...]:
    """What `knobs` gives up against `start`, per the ladder's rung costs (empty: nothing).

    Each entry is (cost, what changed), e.g. (speed, "batch 8->2 (GA 1->4)").
    """
    found: list[tuple[Cost, str]] = []
    for rung in ladder.rungs:
        now, then = getattr(knobs, rung.knob), getattr(start, rung.knob)
        if now == then or (rung.action == "set" and now != rung.value):
            continue
        label = _SHORT.get(rung.knob, rung.knob)
        if rung.action == "halve":
            detail = f"{label} {then}->{now}"
            if rung.compensate:
                detail += (f" ({_SHORT.get(rung.compensate, rung.compensate)} "
                           f"{getattr(start, rung.compensate)}->{getattr(knobs, rung.compensate)})")
        elif rung.action == "enable":
            detail = label
        else:
            detail = _show(now)
        found.append((rung.cost, detail))
    return tuple(found)


_SHORT = {"per_device_batch": "batch", "grad_accum": "GA", "cutoff_len": "cutoff",
          "gradient_checkpointing": "checkpointing"}


def _costs_cell(row_costs: tuple[tuple[Cost, str], ...]) -> str:
    by_cost: dict[Cost, list[str]] = {}
    for cost, detail in row_costs:
        by_cost.setdefault(cost, []).append(detail)
    return "; ".join(f"{cost}: {', '.join(details)}" for cost, details in by_cost.items()) \
        or "none"


def build(start: Knobs, ladder: Ladder, spec: ModelSpec, device_mib: int, *,  # noqa: PLR0913 - keyword-only knobs
          predict: Predict, margin: float = DEFAULT_MARGIN) -> Plan:
    """Predict every config of the walk and pick the first that fits with the margin."""
    configs = walk(start, ladder)
    predictions = predict([k for k, _ in configs])
    params = spec.parameters()
    rows: list[Row] = []
    for (knobs, rung), prediction in zip(configs, predictions, strict=True):
        seed = None if params is None else (
            params * SEED_BYTES_PER_PARAM[knobs.finetuning_type] / 2**20)
        rows.append(Row(knobs=knobs, rung=rung, prediction=prediction,
                        fits=fits(prediction, device_mib, margin=margin),
                        costs=costs(knobs, start, ladder), seed_mib=seed))
    recommended = next((i for i, r in enumerate(rows) if r.fits), None)
    return Plan(model=spec.name, params=params, device_mib=device_mib, margin=margin,
                rows=tuple(rows), recommended=recommended)


@dataclass(frozen=True, slots=True, kw_only=True)
class Skip:
    """A config passed over on its prediction alone, and why."""

    knobs: Knobs
    rung: str | None
    prediction: Prediction
    reason: str
    attempt: Attempt
    """What the policy's history records for it (number 0: never run), so it moves past it."""


def next_runnable(start: Knobs, history: Sequence[Attempt], ladder: Ladder, *,  # noqa: PLR0913 - keyword-only edges
                  predict: Callable[[Knobs], Prediction | None], device_mib: float,
                  margin: float = DEFAULT_MARGIN) -> tuple[Step | GiveUp, tuple[Skip, ...]]:
    """The next config worth running: the policy's next step, skipping those predicted not to fit.

    With an empty history the start itself is the first candidate (returned as a Step with
    rung "(start)" when it is predicted to fit or has no prediction). A config without a
    prediction is never skipped. Append each Skip's `attempt` to the history the policy sees.
    """
    walked = list(history)
    skips: list[Skip] = []
    candidate: Step | GiveUp = (Step(knobs=start, rung=START) if not history
                                else next_step(start, walked, ladder))
    while isinstance(candidate, Step):
        prediction = predict(candidate.knobs)
        if prediction is None or fits(prediction, device_mib, margin=margin):
            break
        rung = None if candidate.rung == START else candidate.rung
        reason = (f"predicted {prediction.peak_mib:.0f} MiB ({prediction.method}) + "
                  f"{margin:.0%} margin > {device_mib:.0f} MiB device")
        attempt = Attempt(number=0, knobs=candidate.knobs, rung=rung,
                          verdict=Verdict(kind=VerdictKind.OOM, evidence=f"skipped: {reason}"))
        skips.append(Skip(knobs=candidate.knobs, rung=rung, prediction=prediction,
                          reason=reason, attempt=attempt))
        walked.append(attempt)
        candidate = next_step(start, walked, ladder)
    return candidate, tuple(skips)


def recommended_start(plan: Plan) -> Knobs | None:
    """The config a run should start from (None: nothing is predicted to fit)."""
    return None if plan.recommended is None else plan.rows[plan.recommended].knobs


def render(plan: Plan) -> str:
    """The plan as a text table, with the recommendation and the seed's rule of thumb."""
    header = ("#", "rung", "batch x GA", "cutoff", "gc", "method", "eff.batch", "predicted",
              "fits", "seed rule", "costs")
    lines: list[tuple[str, ...]] = []
    for i, row in enumerate(plan.rows):
        k = row.knobs
        method = str(k.finetuning_type)
        if k.finetuning_type is FinetuningType.LORA:
            method += f" r{k.lora_rank}"
        elif k.finetuning_type is FinetuningType.FREEZE:
            method += f" {k.freeze_trainable_layers}"
        predicted = "n/a" if row.prediction is None else (
            _mib(row.prediction.peak_mib) + ("" if row.prediction.method == "fake" else " ~"))
        fit = {True: "yes", False: "no", None: "?"}[row.fits]
        mark = "*" if i == plan.recommended else ""
        lines.append((f"{i + 1}{mark}", row.rung or "(start)",
                      f"{k.per_device_batch} x {k.grad_accum}",
                      "-" if k.cutoff_len is None else str(k.cutoff_len),
                      "on" if k.gradient_checkpointing else "off", method,
                      str(row.effective_batch), predicted, fit,
                      "n/a" if row.seed_mib is None else _mib(row.seed_mib),
                      _costs_cell(row.costs)))
    widths = [max(len(h), *(len(r[j]) for r in lines)) for j, h in enumerate(header)]
    right = {0, 6, 7, 9}

    def fmt(cells: tuple[str, ...]) -> str:
        return "  ".join(c.rjust(w) if j in right else c.ljust(w)
                         for j, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    params = "unknown parameters" if plan.params is None else f"{plan.params / 1e6:,.1f}M params"
    title = (f"model {plan.model} ({params}); device {_mib(plan.device_mib)}, "
             f"safety margin {plan.margin:.0%}")
    out = [title, "", fmt(header),
           fmt(tuple("-" * w for w in widths))]
    out += [fmt(r) for r in lines]
    out.append("")
    if plan.recommended is None:
        out.append("recommended: nothing in this ladder is predicted to fit; a bigger device, "
                   "a shorter cutoff or another policy is needed")
    else:
        row = plan.rows[plan.recommended]
        out.append(f"recommended first config: #{plan.recommended + 1} "
                   f"({_describe(row.knobs)}), predicted {_mib(_peak(row))}")
    methods = {r.prediction.method for r in plan.rows if r.prediction is not None}
    out.append("predicted: peak live tensor memory of two training steps (weights, gradients, "
               "AdamW state, activations)" + (
                   "; ~ marks the analytic fallback" if "analytic" in methods else
                   ", traced under FakeTensorMode"))
    out.append("seed rule: the seed article's rule of thumb, parameters x 20 B (full), "
               "x 10 (LoRA), x 6 (freeze), whatever the batch and cutoff")
    return "\n".join(out) + "\n"


def _peak(row: Row) -> float:
    return 0.0 if row.prediction is None else row.prediction.peak_mib


def _describe(knobs: Knobs) -> str:
    return (f"per_device_batch={knobs.per_device_batch} grad_accum={knobs.grad_accum} "
            f"cutoff_len={knobs.cutoff_len} "
            f"gradient_checkpointing={_show(knobs.gradient_checkpointing)} "
            f"finetuning_type={knobs.finetuning_type}")


def _show(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _mib(value: float) -> str:
    if value >= _GIB_IN_MIB:
        return f"{value / _GIB_IN_MIB:.1f} GiB"
    return f"{value:.0f} MiB" if value >= _WHOLE_MIB else f"{value:.1f} MiB"


_GIB_IN_MIB = 1024
_WHOLE_MIB = 10  # below this, show a decimal
