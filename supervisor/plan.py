"""Before a run: every config the ladder would walk, its predicted peak, and the first that fits.

Pure apart from the estimator it is handed (which may start a child process).
"""

from __future__ import annotations

import dataclasses
import re
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from supervisor._families import PEFT_DEFAULT
from supervisor.bounds import MAX_MIB
from supervisor.classify import OomKind, OomNumbers, Verdict, VerdictKind
from supervisor.estimate import ModelSpec, Prediction, fits
from supervisor.knobs import FinetuningType, Knobs, precision_dtypes
from supervisor.policy import (
    Attempt,
    CanSet,
    Cost,
    GiveUp,
    Ladder,
    Refusal,
    Step,
    blocked,
    next_step,
)

RULE_BYTES_PER_PARAM: dict[FinetuningType, int] = {
    FinetuningType.FULL: 20,
    FinetuningType.LORA: 10,
    FinetuningType.FREEZE: 6,
}
"""LLaMA-Factory's community rule of thumb, bytes per parameter (full ≈ params x 20 B, LoRA x 10,
freeze x 6), as the guide "Llama Factory微调优化:如何选择最佳的微调方法" gives it."""

START = "(start)"
"""The rung name next_runnable gives the command's own config."""

_ASSUMED_OOM = Verdict(kind=VerdictKind.OOM, oom_kind=OomKind.TORCH,
                       evidence="plan: assumed out of memory to enumerate the ladder")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)(B?)\s*$", re.IGNORECASE)
_POWER = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}
_MAX_DEVICE_MIB = MAX_MIB  # 1 EiB


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
    if not mib < _MAX_DEVICE_MIB:  # 400 digits, or 99999999999999999999999TiB (inf included)
        msg = (f"{text[:40]!r} is over 1 EiB; no device holds that much: give a device size "
               "such as 24GiB")
        raise ValueError(msg)
    if mib < 1:
        msg = f"{text!r} is less than 1 MiB; give a device size such as 24GiB"
        raise ValueError(msg)
    return round(mib)


def walk(start: Knobs, ladder: Ladder, *,
         can_set: CanSet | None = None) -> list[tuple[Knobs, str | None]]:
    """Every config the ladder tries from `start` if each one runs out of memory, in order.

    Each entry is (knobs, the rung that led there; None for the start). `can_set` is the
    command's own skip predicate (the one `run` walks with: RunConfig/Reading.can_set).
    """
    return [(k, r) for k, r, _ in _walk(start, ladder, can_set=can_set)[0]]


def _walk(start: Knobs, ladder: Ladder, *, can_set: CanSet | None,
          ) -> tuple[list[tuple[Knobs, str | None, tuple[str, ...]]], GiveUp | None]:
    """The walk with each step's skipped rungs, and the GiveUp that ends it (None: the walk
    stopped at the policy's attempt budget first)."""
    history = [Attempt(number=1, knobs=start, rung=None, verdict=_ASSUMED_OOM)]
    out: list[tuple[Knobs, str | None, tuple[str, ...]]] = [(start, None, ())]
    while len(history) < ladder.max_attempts:
        step = next_step(start, history, ladder, can_set=can_set)
        if isinstance(step, GiveUp):
            return out, step
        history.append(Attempt(number=len(history) + 1, knobs=step.knobs, rung=step.rung,
                               verdict=_ASSUMED_OOM))
        out.append((step.knobs, step.rung, step.skipped))
    return out, None


@dataclass(frozen=True, slots=True, kw_only=True)
class Row:
    """One config of the walk with its prediction and what it gives up against the start."""

    knobs: Knobs
    rung: str | None
    prediction: Prediction | None
    fits: bool | None
    """Predicted peak x (1 + margin) within the device; None when there is no prediction."""
    costs: tuple[tuple[Cost, str], ...]
    rule_mib: float | None
    """LLaMA-Factory's rule of thumb for this finetuning type (None: parameters unknown)."""

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
    assumptions: tuple[str, ...] = ()
    """What the plan read or assumed about the command (precision, quantisation, ranks...)."""
    levers: tuple[Lever, ...] = ()
    """What each well-known lever would make of the command's own config."""
    skipped: tuple[str, ...] = ()
    """Rungs `run` would pass over for this program, each once, with the reason."""
    walk_end: str | None = None
    """Why the walk ends there: the ladder is spent, or the attempt budget is."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Lever:
    """One well-known way to save memory, applied alone to the command's config."""

    name: str
    knobs: Knobs
    prediction: Prediction | None
    fits: bool | None
    guide: str
    """What the LLaMA-Factory community guide (or another source it names) says of it."""
    blocked: str | None = None
    """Why `run` cannot produce this config for this program (None: it can)."""


Predict = Callable[[Sequence[Knobs]], Sequence[Prediction | None]]
"""Predictions for many configs at once (one child process for all of them is fastest)."""


def costs(knobs: Knobs, start: Knobs, ladder: Ladder) -> tuple[tuple[Cost, str], ...]:
    """What `knobs` gives up against `start`, per the ladder's rung costs (empty: nothing).

    Each entry is (cost, what changed), e.g. (speed, "batch 8->2 (GA 1->4)").
    """
    found: list[tuple[Cost, str]] = []
    for rung in ladder.rungs:
        now, then = getattr(knobs, rung.knob), getattr(start, rung.knob)
        if now == then or (rung.action in ("set", "raise") and now != rung.value):
            continue  # (ZeRO-3 is the zero-3 rung's, not also zero-2's)
        label = _SHORT.get(rung.knob, rung.knob)
        if rung.action == "halve":
            detail = f"{label} {then}->{now}"
            if rung.compensate:
                detail += (f" ({_SHORT.get(rung.compensate, rung.compensate)} "
                           f"{getattr(start, rung.compensate)}->{getattr(knobs, rung.compensate)})")
        elif rung.action == "enable":
            detail = label
        elif rung.knob == "quantization_bit":
            detail = f"{now}-bit weights"
        elif rung.knob == "deepspeed_stage":
            detail = f"ZeRO-{now}" + (f" (was ZeRO-{then})" if then else "")
        else:
            detail = _show(now)
        found.append((rung.cost, detail))
    return tuple(found)


_SHORT = {"per_device_batch": "batch", "grad_accum": "GA", "cutoff_len": "cutoff",
          "gradient_checkpointing": "checkpointing", "deepspeed_offload": "ZeRO offload to CPU",
          "expandable_segments": "expandable segments"}


def _costs_cell(row_costs: tuple[tuple[Cost, str], ...]) -> str:
    by_cost: dict[Cost, list[str]] = {}
    for cost, detail in row_costs:
        by_cost.setdefault(cost, []).append(detail)
    return "; ".join(f"{cost}: {', '.join(details)}" for cost, details in by_cost.items()) \
        or "none"


def levers(start: Knobs) -> list[tuple[str, Knobs, str]]:
    """The levers LLaMA-Factory's guide and practitioners reach for, each applied to `start` alone.

    Each is (name, knobs, what the guide says of it). Levers already in use are left out.
    """
    out: list[tuple[str, Knobs, str]] = []
    if start.precision in {None, "fp32"}:
        out.append(("bf16 mixed precision", dataclasses.replace(start, precision="bf16-mixed"),
                    "LLaMA-Factory guide: mixed precision (fp16/bf16) lowers memory"))
    lora = dataclasses.replace(start, finetuning_type=FinetuningType.LORA,
                               gradient_checkpointing=True)
    if start.finetuning_type is not FinetuningType.LORA or not start.gradient_checkpointing:
        out.append(("LoRA + checkpointing", lora,
                    "LLaMA-Factory guide: LoRA ~ params x 10 B (7B ~75GB), full x 20 (~140GB)"))
    if start.quantization_bit is None:
        out.append(("QLoRA (4-bit) + ckpt", dataclasses.replace(lora, quantization_bit=4),
                    "QLoRA paper: 4-bit base ~0.5 B/param"))
    if (start.deepspeed_stage or 0) < 3:  # noqa: PLR2004 - ZeRO-3
        if start.world_size > 1:
            out.append((f"ZeRO-3 over {start.world_size} GPUs",
                        dataclasses.replace(start, deepspeed_stage=3),
                        "LLaMA-Factory guide: ZeRO-3 for very large models"))
        elif not start.deepspeed_offload:
            out.append(("ZeRO-2 + CPU offload", dataclasses.replace(
                start, deepspeed_stage=2, deepspeed_offload=True),
                "LLaMA-Factory guide: ZeRO-3 for very large models (1 GPU: offload)"))
    if start.cutoff_len is not None and start.cutoff_len > 256:  # noqa: PLR2004 - a useful floor
        out.append((f"cutoff {start.cutoff_len} -> {start.cutoff_len // 2}",
                    dataclasses.replace(start, cutoff_len=start.cutoff_len // 2),
                    "LLaMA-Factory guide: lower cutoff_len (e.g. 2048 -> 512)"))
    return out


def build(start: Knobs, ladder: Ladder, spec: ModelSpec, device_mib: int, *,  # noqa: PLR0913 - keyword-only knobs
          predict: Predict, margin: float | None = None,
          assumptions: Sequence[str] = (), advise: bool = True,
          can_set: CanSet | None = None, confirm: Confirm | None = None) -> Plan:
    """Predict every config of the walk (and each lever) and pick the first that fits.

    `can_set` is the command's skip predicate, the one `run` walks with: the table holds
    exactly the configs `run` would try, and the rungs it would skip are listed with why.
    `confirm`: `predict` counts analytically and traces confirm the configs next_runnable
    asks for (the one `run` would start with and its neighbour across the device line).
    `margin` None: the policy's (`[estimate] margin`), the one `run` skips by.
    """
    margin = ladder.estimate_margin if margin is None else margin
    if confirm is not None:
        next_runnable(start, [], ladder, predict=lambda k: predict([k])[0],
                      device_mib=device_mib, margin=margin, can_set=can_set, confirm=confirm)
    walked, give_up = _walk(start, ladder, can_set=can_set)
    configs = [(k, r) for k, r, _ in walked]
    extra = levers(start) if advise else []
    everything = list(predict([k for k, _ in configs] + [k for _, k, _ in extra]))
    predictions, lever_predictions = everything[:len(configs)], everything[len(configs):]
    params = spec.parameters()
    rows: list[Row] = []
    for (knobs, rung), prediction in zip(configs, predictions, strict=True):
        rule = None if params is None else (
            params * RULE_BYTES_PER_PARAM[knobs.finetuning_type] / 2**20)
        rows.append(Row(knobs=knobs, rung=rung, prediction=prediction,
                        fits=fits(prediction, device_mib, margin=margin),
                        costs=costs(knobs, start, ladder), rule_mib=rule))
    recommended = next((i for i, r in enumerate(rows) if r.fits), None)
    found = tuple(Lever(name=name, knobs=knobs, prediction=prediction, guide=guide,
                        fits=fits(prediction, device_mib, margin=margin),
                        blocked=blocked(start, knobs, can_set))
                  for (name, knobs, guide), prediction in zip(extra, lever_predictions,
                                                             strict=True))
    skipped = [s for _, _, step_skips in walked for s in step_skips]
    if give_up is not None:
        skipped += give_up.skipped
    end = (f"the ladder is spent after {len(rows)} configs" if give_up is not None else
           f"the policy's attempt budget ({ladder.max_attempts}) ends the walk")
    return Plan(model=spec.name, params=params, device_mib=device_mib, margin=margin,
                rows=tuple(rows), recommended=recommended, assumptions=tuple(assumptions),
                levers=found, skipped=_skip_lines(ladder, skipped), walk_end=end)


def _skip_lines(ladder: Ladder, reasons: Sequence[str]) -> tuple[str, ...]:
    """Each rung's skip reason once; a conditional rung says what it waits for instead."""
    out: dict[str, str] = {}
    for reason in reasons:
        name = reason.split(":", 1)[0]
        rung = next((r for r in ladder.rungs if r.name == name), None)
        if rung is None or reason.endswith("that config was already tried"):
            continue
        out.setdefault(name, reason if rung.when != "fragmented" else (
            f"{name}: taken only after an OOM whose own figures show fragmentation "
            "(CUDA's reserved-but-unallocated memory); a prediction cannot say"))
    return tuple(out.values())


@dataclass(frozen=True, slots=True, kw_only=True)
class Skip:
    """A config passed over on its prediction alone, and why."""

    knobs: Knobs
    rung: str | None
    prediction: Prediction
    reason: str
    attempt: Attempt
    """What the policy's history records for it (number 0: never run), so it moves past it."""


Confirm = Callable[[Sequence[Knobs]], object]
"""Trace these configs; the `predict` handed beside it then answers with their traces."""
def method_words(prediction: Prediction) -> str:
    """How a prediction was made, in words: `FakeTensor trace` or `analytic count`."""
    return "FakeTensor trace" if str(prediction.method) == "fake" else "analytic count"


def next_runnable(start: Knobs, history: Sequence[Attempt], ladder: Ladder, *,  # noqa: PLR0913 - keyword-only edges
                  predict: Callable[[Knobs], Prediction | None], device_mib: float,
                  margin: float | None = None, can_set: CanSet | None = None,
                  refusal: Refusal | None = None, confirm: Confirm | None = None,
                  ) -> tuple[Step | GiveUp, tuple[Skip, ...]]:
    """The next config worth running: the policy's next step, skipping those predicted not to fit.

    With an empty history the start itself is the first candidate (returned as a Step with
    rung "(start)" when it is predicted to fit or has no prediction). A config without a
    prediction is never skipped. Append each Skip's `attempt` to the history the policy sees.

    The order that pays (`confirm`, with a `predict` that counts analytically until a config
    is traced): the analytic count ranks every config in an instant; the trace confirms only
    the config the walk would take and its neighbour across the device line (the last one
    passed over before it; when nothing is predicted to fit, the one predicted smallest).
    Where a trace moves the line the walk is ranked again and the new pair confirmed, until
    both sides of the line are traced (or cannot be): a handful of traces instead of one per
    config of the walk, and the same landing as tracing them all wherever the traces agree
    with each other in order.
    `margin` None: the policy's (`[estimate] margin`), the one `plan` recommends by.
    """
    margin = ladder.estimate_margin if margin is None else margin
    asked: set[Knobs] = set()
    while True:
        candidate, skips = _next_runnable(start, history, ladder, predict=predict,
                                          device_mib=device_mib, margin=margin,
                                          can_set=can_set, refusal=refusal)
        if confirm is None:
            return candidate, skips
        pair = confirming(candidate, skips)
        wanted = [k for k in pair if k not in asked]
        if not wanted:
            return candidate, skips
        asked.update(wanted)
        confirm(wanted)


def confirming(candidate: Step | GiveUp, skips: Sequence[Skip]) -> list[Knobs]:
    """The configs a trace should confirm: the one taken and its neighbour across the line."""
    out = [candidate.knobs] if isinstance(candidate, Step) else []
    if skips:
        neighbour = skips[-1] if isinstance(candidate, Step) else \
            min(skips, key=lambda s: s.prediction.peak_mib)
        out.append(neighbour.knobs)
    return out


def _next_runnable(start: Knobs, history: Sequence[Attempt], ladder: Ladder, *,  # noqa: PLR0913 - keyword-only edges
                   predict: Callable[[Knobs], Prediction | None], device_mib: float,
                   margin: float, can_set: CanSet | None, refusal: Refusal | None,
                   ) -> tuple[Step | GiveUp, tuple[Skip, ...]]:
    walked = list(history)
    skips: list[Skip] = []
    candidate: Step | GiveUp = (Step(knobs=start, rung=START) if not history
                                else next_step(start, walked, ladder, can_set=can_set,
                                                refusal=refusal))
    while isinstance(candidate, Step):
        prediction = predict(candidate.knobs)
        if prediction is None or fits(prediction, device_mib, margin=margin):
            break
        rung = None if candidate.rung == START else candidate.rung
        plus = f" + {margin:.0%} margin" if margin else ""
        reason = (f"predicted {prediction.peak_mib:.0f} MiB ({method_words(prediction)}){plus}"
                  f" > {device_mib:.0f} MiB device")
        attempt = Attempt(number=0, knobs=candidate.knobs, rung=rung,
                          verdict=Verdict(kind=VerdictKind.OOM, evidence=f"skipped: {reason}"))
        skips.append(Skip(knobs=candidate.knobs, rung=rung, prediction=prediction,
                          reason=reason, attempt=attempt))
        walked.append(attempt)
        candidate = next_step(start, walked, ladder, can_set=can_set, refusal=refusal)
    return candidate, tuple(skips)


OOM_BOUND_ERROR = 0.05
"""How far the analytic count may be above a config's real peak before the walk trusts it
to say "cannot fit" against an OOM's figures: within 2 % on every config measured (the
Llama and Qwen2 lattices, fp32 and bf16), so a config passed over by the count is at least
5 % over what the device was shown to hold."""


def usable_bound_mib(numbers: OomNumbers | None) -> float | None:
    """The most an OOM's own figures prove the device can hold (None: they say too little).

    The attempt held `allocated` and asked for `tried` more and was refused: less than
    allocated + tried is usable. The device's capacity bounds it too; and where the message
    gives free and reserved-but-unallocated memory, what PyTorch could have had is allocated
    + reserved + free.
    """
    if numbers is None:
        return None
    bounds = []
    if numbers.capacity_mib:
        bounds.append(numbers.capacity_mib)
    if numbers.allocated_mib is not None and numbers.tried_mib:
        bounds.append(numbers.allocated_mib + numbers.tried_mib)
    if None not in (numbers.allocated_mib, numbers.free_mib,
                    numbers.reserved_unallocated_mib):
        bounds.append(float(numbers.allocated_mib or 0) + float(numbers.free_mib or 0)
                      + float(numbers.reserved_unallocated_mib or 0))
    return min(bounds) if bounds else None


def history_bound_mib(history: Sequence[Attempt]) -> float | None:
    """The largest usable bound the run's OOMs proved (a later OOM may have had more room)."""
    bounds = [b for a in history if a.number > 0 and a.verdict.is_oom
              and (b := usable_bound_mib(a.verdict.numbers)) is not None]
    return max(bounds) if bounds else None


def next_listening(start: Knobs, history: Sequence[Attempt], ladder: Ladder, *,  # noqa: PLR0913 - keyword-only edges
                   count: Callable[[Knobs], Prediction | None],
                   can_set: CanSet | None = None, refusal: Refusal | None = None,
                   ) -> tuple[Step | GiveUp, tuple[Skip, ...]]:
    """The blind walk's next step, listening to its OOMs: a config whose analytic count is
    clearly above what an earlier OOM's own figures proved the device holds (usable_bound_mib,
    OOM_BOUND_ERROR) is passed over with that reason, as a prediction skip is.

    Before any OOM with figures it is the policy's next step. Where every config left is over
    the bound the walk goes on for real (GiveUp with the skips: the caller takes next_step),
    so the landing is never more degraded than the walk's.
    """
    bound = history_bound_mib(history)
    if bound is None or not history:
        return next_step(start, history, ladder, can_set=can_set, refusal=refusal), ()
    candidate, skips = _next_runnable(start, history, ladder, predict=count, device_mib=bound,
                                      margin=-OOM_BOUND_ERROR, can_set=can_set,
                                      refusal=refusal)
    shown = tuple(dataclasses.replace(skip, reason=(
        f"counted {skip.prediction.peak_mib:.0f} MiB from the model's shape, over the "
        f"{bound:.0f} MiB an earlier attempt's out-of-memory error showed the device holds")
    ) for skip in skips)
    return candidate, tuple(dataclasses.replace(
        s, attempt=dataclasses.replace(s.attempt, verdict=dataclasses.replace(
            s.attempt.verdict, evidence=f"skipped: {s.reason}"))) for s in shown)


def recommended_start(plan: Plan) -> Knobs | None:
    """The config a run should start from (None: nothing is predicted to fit)."""
    return None if plan.recommended is None else plan.rows[plan.recommended].knobs


WIDTH = 100
"""The table and every line of the plan fit this many columns."""

_READ = (("model", "model"), ("precision", "precision"), ("quantization_bit", "quantisation"),
         ("deepspeed_stage", "ZeRO stage"), ("deepspeed_offload", "offload"),
         ("world_size", "world size"), ("cutoff_len", "cutoff"),
         ("gradient_checkpointing", "checkpointing"))


def describe_reading(knobs: Knobs, sources: Mapping[str, str]) -> str:
    """What the command says about memory and where each value came from, in one line.

    `sources` maps a knob to its Source ("command_line", "config_file", "program",
    "known_default", "assumed"); a knob it does not name counts as assumed.
    """
    parts = []
    for name, label in _READ:
        value = getattr(knobs, name)
        source = str(sources.get(name, "assumed")).replace("_", " ")
        if value is None:
            shown = {"precision": "fp32", "quantization_bit": "none",
                     "deepspeed_stage": "none", "deepspeed_offload": "no"}.get(name, "unknown")
        else:
            shown = _show(value)
        parts.append(f"{label} {shown} ({source})")
    if knobs.finetuning_type is FinetuningType.LORA or knobs.quantization_bit is not None:
        # The layers LoRA adapts, as the program names them (TRL's own default, peft's list
        # for the model type, is narrower than the every-linear-layer assumed here).
        source = str(sources.get("lora_target", "assumed")).replace("_", " ")
        shown = ("peft's own list for the model type" if knobs.lora_target == PEFT_DEFAULT
                 else (knobs.lora_target or "every linear layer").replace(",", " "))
        parts.append(f"LoRA targets {shown} ({source})")
    return "read: " + ", ".join(parts)


def render(plan: Plan) -> str:
    """The plan as text within 100 columns: the table, the recommendation, levers, assumptions."""
    header = ("#", "rung", "batch", "cutoff", "gc", "method", "predicted", "fits", "gives up")
    lines: list[tuple[str, ...]] = []
    for i, row in enumerate(plan.rows):
        k = row.knobs
        predicted = "n/a" if row.prediction is None else (
            _mib(row.prediction.peak_mib) + ("" if row.prediction.method == "fake" else " ~"))
        mark = "*" if i == plan.recommended else ""
        lines.append((f"{i + 1}{mark}", _rung(row.rung),
                      f"{k.per_device_batch}x{k.grad_accum}",
                      "-" if k.cutoff_len is None else str(k.cutoff_len),
                      "on" if k.gradient_checkpointing else "off", _method(k), predicted,
                      {True: "yes", False: "no", None: "?"}[row.fits],
                      _costs_cell(row.costs)))
    widths = [max(len(h), *(len(r[j]) for r in lines)) for j, h in enumerate(header[:-1])]
    last = max(WIDTH - sum(widths) - 2 * len(widths), 12)
    right = {0, 6}

    def fmt(cells: Sequence[str]) -> list[str]:
        head = "  ".join(c.rjust(w) if j in right else c.ljust(w)
                         for j, (c, w) in enumerate(zip(cells[:-1], widths, strict=True)))
        wrapped = textwrap.wrap(cells[-1], last) or [""]
        pad = " " * (len(head) + 2)
        return [f"{head}  {wrapped[0]}".rstrip(), *(pad + more for more in wrapped[1:])]

    params = "unknown parameters" if plan.params is None else f"{plan.params / 1e6:,.1f}M params"
    out = _wrap(f"model {plan.model} ({params}); device {_mib(plan.device_mib)}, "
                f"safety margin {plan.margin:.0%}")
    out += ["", *fmt(header), *fmt(tuple("-" * w for w in [*widths, last]))]
    for cells in lines:
        out += fmt(cells)
    out.append("")
    if plan.recommended is None:
        out += _wrap("recommended: nothing `run` can try is predicted to fit this device "
                     "(`run` would exhaust the ladder); see the levers below, or a bigger "
                     "device")
    else:
        row = plan.rows[plan.recommended]
        out += _wrap(f"recommended first config: #{plan.recommended + 1} "
                     f"({_describe(row.knobs)}), predicted {_mib(_peak(row))}")
    if plan.walk_end is not None:
        out += _wrap(f"walk: as `run` would take it for this program; {plan.walk_end}")
    if plan.skipped:
        out += _wrap("skipped, as `run` would skip them:")
        for line in plan.skipped:
            out += _wrap(line, "  - ", "    ")
    out += _render_breakdown(plan)
    out += _render_levers(plan)
    notes = list(plan.assumptions) + list(dict.fromkeys(
        a for r in plan.rows if r.prediction is not None for a in r.prediction.assumptions))
    if notes:
        out += ["", "assumptions:"]
        for note in dict.fromkeys(notes):
            out += _wrap(note, "  - ", "    ")
    methods = {r.prediction.method for r in plan.rows if r.prediction is not None}
    out.append("")
    out += _wrap("predicted: peak live tensor memory of two training steps (weights, "
                 "gradients, AdamW state, activations; SDPA attention, no dropout)" + (
                     "; ~ marks the analytic fallback" if "analytic" in methods else
                     ", traced under FakeTensorMode"))
    rules = {str(r.knobs.finetuning_type): r.rule_mib for r in plan.rows
             if r.rule_mib is not None}
    out += _wrap("rule of thumb: LLaMA-Factory's community rule (the guide \"Llama Factory微调优化:"
                 '如何选择最佳的微调方法"), not a prediction: parameters x 20 B (full), x 10 '
                 "(LoRA), x 6 (freeze), whatever the batch, cutoff and precision"
                 + (": " + ", ".join(f"{k} {_mib(v)}" for k, v in rules.items())
                    if rules else ""))
    return "\n".join(out) + "\n"


_RUNG_WIDTH = 14


def _rung(name: str | None) -> str:
    name = (name or "(start)").removeprefix("gradient-")
    return name if len(name) <= _RUNG_WIDTH else name[:_RUNG_WIDTH - 1] + "~"


def _render_breakdown(plan: Plan) -> list[str]:
    """The start row's predicted peak by part, each with the dtype the program holds it in."""
    row = plan.rows[0] if plan.rows else None
    if row is None or row.prediction is None:
        return []
    parts = row.prediction.breakdown
    knobs = row.knobs
    frozen, trainable, compute = precision_dtypes(knobs.precision)
    said = "" if knobs.precision is not None else ", assumed"
    if knobs.quantization_bit is not None:
        frozen = f"{knobs.quantization_bit}-bit"
    held = (f"{trainable}{said}" if knobs.finetuning_type is FinetuningType.FULL
            else f"trainable {trainable}, frozen {frozen}{said}")
    moments = "8-bit" if "8bit" in (knobs.optimizer or "") else f"{trainable}{said}"
    shown = [(name, parts.get(key), dtype) for name, key, dtype in (
        ("weights", "weights_mib", held),
        ("gradients", "gradients_mib", f"{trainable}{said}"),
        ("optimizer state", "optimizer_mib", f"AdamW moments, {moments}"),
        ("activations and temporaries", "activations_and_temporaries_mib",
         f"computed in {compute}{said}"))]
    if any(value is None for _, value, _ in shown):
        return []
    text = ", ".join(f"{name} {_mib(float(str(value)))} ({dtype})" for name, value, dtype in shown)
    phase = parts.get("peak_phase")
    return ["", *_wrap(f"start (#1), {_mib(row.prediction.peak_mib)}"
                       + (f" at the {phase} peak" if phase else "") + f": {text}")]


def _render_levers(plan: Plan) -> list[str]:
    if not plan.levers:
        return []
    start = plan.rows[0].prediction if plan.rows else None
    out = ["", "levers, each alone on the command's own config"
           + (f" ({_mib(start.peak_mib)}):" if start is not None else ":")]
    width = max(len(lever.name) for lever in plan.levers)
    for lever in plan.levers:
        if lever.prediction is None:
            said = "no prediction"
        else:
            said = _mib(lever.prediction.peak_mib)
            if start is not None:
                saved = start.peak_mib - lever.prediction.peak_mib
                said += f" ({'saves' if saved >= 0 else 'adds'} {_mib(abs(saved))})"
            said += ", fits" if lever.fits else ", does not fit"
        if lever.blocked is not None:
            said += f"; run cannot try it here: {lever.blocked}"
        out += _wrap(f"{lever.name.ljust(width)}  {said}; {lever.guide}", "  ",
                     "  " + " " * (width + 2))
    return out


def _wrap(text: str, first: str = "", rest: str = "  ") -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=first, subsequent_indent=rest) or [""]


def _method(knobs: Knobs) -> str:
    method = str(knobs.finetuning_type)
    if knobs.finetuning_type is FinetuningType.LORA:
        method += f" r{knobs.lora_rank}"
    elif knobs.finetuning_type is FinetuningType.FREEZE:
        method += f" {knobs.freeze_trainable_layers}"
    if knobs.quantization_bit is not None:
        method = f"q{knobs.quantization_bit} {method}"
    if knobs.optimizer is not None and "8bit" in knobs.optimizer:
        method += " 8bit-opt"
    return method


def _peak(row: Row) -> float:
    return 0.0 if row.prediction is None else row.prediction.peak_mib


def _describe(knobs: Knobs) -> str:
    """The config named in full: every knob a rung may have changed, none left out."""
    parts = [f"per_device_batch={knobs.per_device_batch}", f"grad_accum={knobs.grad_accum}",
             f"cutoff_len={knobs.cutoff_len}",
             f"gradient_checkpointing={_show(knobs.gradient_checkpointing)}",
             f"finetuning_type={knobs.finetuning_type}"]
    if knobs.finetuning_type is FinetuningType.LORA:
        parts.append(f"lora_rank={knobs.lora_rank}")
    elif knobs.finetuning_type is FinetuningType.FREEZE:
        parts.append(f"freeze_trainable_layers={knobs.freeze_trainable_layers}")
    for name in ("quantization_bit", "optimizer", "precision", "deepspeed_stage",
                 "deepspeed_offload"):
        value = getattr(knobs, name)
        if value not in (None, False):
            parts.append(f"{name}={_show(value)}")
    if knobs.expandable_segments:
        parts.append("PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")
    return " ".join(parts)


def _show(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _mib(value: float) -> str:
    if value >= _GIB_IN_MIB:
        return f"{value / _GIB_IN_MIB:.1f} GiB"
    return f"{value:.0f} MiB" if value >= _WHOLE_MIB else f"{value:.1f} MiB"


_GIB_IN_MIB = 1024
_WHOLE_MIB = 10  # below this, show a decimal
