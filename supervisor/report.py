"""The end of a run: report.json, report.md and final-command.sh, all rebuilt from the journal."""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any

from supervisor import progress, speed
from supervisor.classify import RECOVERED
from supervisor.command import address_space_cap
from supervisor.events import (
    AttemptRecord,
    CheckpointRescued,
    Notified,
    RescueFailed,
    RunConfig,
    RunState,
    SpeedCompared,
)
from supervisor.files import write_file
from supervisor.knobs import Knobs
from supervisor.secrets import shell_word
from supervisor.text import plural, printable

_STATUS_LINE = {
    "fitted": "fitted: the command finished with the final config below",
    "exhausted": "ladder exhausted: no config on the ladder fitted",
    "fatal": "stopped: the command failed for a reason other than memory",
    "transient": "stopped: a transient failure outlasted its retries",
    "interrupted": "interrupted: the supervisor was told to stop",
    "running": "incomplete: the journal ends while an attempt was running",
}

_KNOB_COST_NOTE = {
    "per_device_batch": "smaller steps are slower; the effective batch is what matters",
    "cutoff_len": "samples longer than the cutoff are truncated",
    "gradient_checkpointing": "activations are recomputed in backward (typically 20-30% slower)",
    "finetuning_type": "a different training: only part of the model learns",
    "lora_rank": "fewer adapter parameters",
    "freeze_trainable_layers": "fewer layers learn",
}


def build(state: RunState) -> dict[str, Any]:
    """The whole run as one JSON-ready mapping, derived from the replayed journal only."""
    config = state.config
    end = state.finished
    status = end.status if end else "running"
    start = config.start
    attempts = [_attempt_row(a) for a in state.attempts]
    fitted = end is not None and status == "fitted" and bool(state.attempts)
    final_record = state.attempt(end.attempt) if end and end.attempt else None
    final = final_record.knobs if fitted and final_record else None
    final_argv = (_pointed_at_final_files(state.final.fresh_argv, state.final.files)
                  if fitted and state.final else (
                      list(final_record.started.argv) if fitted and final_record else None))
    costs = _costs(start, final, config) if final else []
    return {
        "run_id": config.run_id,
        "status": status,
        "summary": _STATUS_LINE.get(status, status),
        "exit_code": end.exit_code if end else None,
        "reason": end.reason if end else None,
        "spent": list(end.spent) if end else [],
        "started_at": state.started_at,
        "ended_at": end.ts if end else None,
        "command": list(config.argv),
        "cwd": config.cwd,
        "dialect": config.dialect_description,
        "policy": {"name": config.policy_name, "source": config.policy_source,
                   "deepspeed": deepspeed_note(config)},
        "start_knobs": start.to_dict(),
        "start_sources": dict(config.start_sources),
        "final_knobs": final.to_dict() if final else None,
        "final_command": final_argv,
        "continue_command": (list(state.final.continue_argv)
                             if fitted and state.final and state.final.continue_argv else None),
        "continue_checkpoint": state.final.continue_checkpoint if fitted and state.final else None,
        "final_files": list(state.final.files) if fitted and state.final else [],
        "final_env": dict(state.final.env) if fitted and state.final else {},
        "device_mib": config.device_mib,
        "device_source": config.device_source,
        "host_cap_mib": _host_cap_mib(config.argv),
        "estimate_distrusted": state.distrusted,
        "estimate_checking": state.checking.reason if state.checking else None,
        "skipped_on_prediction": [
            {"rung": s.rung, "changed": dict(s.changed), "predicted_mib": s.predicted_mib,
             "method": s.method, "reason": s.reason} for s in state.skipped],
        "effective_batch": {
            "start": start.effective_batch,
            "final": final.effective_batch if final else None,
            "world_size_known": config.world_size_known,
        },
        "costs": costs,
        "attempts": attempts,
        "steps": [{k: v for k, v in s.to_record().items() if k not in ("v", "ts", "event")}
                  for s in state.steps],
        "progress": [{k: v for k, v in p.to_record().items() if k not in ("v", "ts")}
                     for p in state.progress],
        "passed_over": [{"attempt": p.attempt, "checkpoint": p.checkpoint, "step": p.step,
                         "reason": p.reason} for p in state.passed_over],
        "rescues": [{k: v for k, v in e.to_record().items() if k not in ("v", "ts")}
                    for e in state.events if isinstance(e, CheckpointRescued | RescueFailed)],
        "resumes": len(state.resumes),
        "resumed": [{"at": r.ts, "attempts_done": r.attempts_done, "pending": r.pending,
                     "orphan": r.orphan} for r in state.resumes],
        "remembered": ({"knobs": config.remembered.to_dict(), "from_run": config.remembered_from,
                        "ignored": config.remembered_ignored}
                       if config.remembered else None),
        "goodput": _goodput(state),
        "oom_verdicts": sum(1 for a in attempts if a["verdict"] == "oom"),
        "duration_s": round((end.ts if end else state.last_ts) - min(
            state.started_at - (config.estimate_s or 0.0),
            config.process_started_at or state.started_at), 3),
        "estimate_s": config.estimate_s,
        "assumed": [k for k in _SHOWN_KNOBS if config.start_sources.get(k) == "assumed"],
        "output_dir": _output_dir(state, final, final_argv),
        "other_changes": _other_changes(start, final, final_argv),
        "notified": [{"command": e.command, "exit_code": e.exit_code, "error": e.error,
                      "output": list(e.output)}
                     for e in state.events if isinstance(e, Notified)],
        "speed": _speed(state),
        "foreign_lines": state.foreign_lines,
    }


def _speed(state: RunState) -> dict[str, Any] | None:
    """The run's speed comparison (or why none was made), as report.json carries it."""
    found = speed.compared(state)
    if found is None:
        return None
    record = {k: v for k, v in found.to_record().items() if k not in ("v", "ts")}
    record["compared"] = isinstance(found, SpeedCompared)
    return record


def speed_line(data: Mapping[str, Any] | None) -> str | None:
    """One line on the speed comparison: both configs, their step times, the winner."""
    if not data:
        return None
    if not data.get("compared"):
        return f"speed: {data.get('fitted')} kept; {data.get('reason')}"
    if not data.get("attempts") or not data.get("configs") or not data.get("step_s"):
        return None
    parts = []
    for number, config, step_s, rate in zip(data["attempts"], data["configs"], data["step_s"],
                                            data.get("samples_per_s") or (None, None),
                                            strict=False):
        timed = (f"{step_s:.3f} s/step, {rate:.2f} samples/s" if step_s is not None
                 and rate is not None else "not timed")
        parts.append(f"{config} (attempt {number}) {timed}")
    winner = data["configs"][list(data["attempts"]).index(data["winner"])]
    return f"speed compared: {' vs '.join(parts)}: {winner} trains on ({data['reason']})"


def _speed_section(data: Mapping[str, Any] | None) -> list[str]:
    if not data:
        return []
    out = ["## Speed compared", ""]
    if not data.get("compared"):
        rival = f" against {data['alternative']}" if data.get("alternative") else ""
        return [*out, f"Not compared{rival}: {data['fitted']} kept; {data['reason']}.", ""]
    out += [(f"Two configs of the same quality (same method, cutoff and effective batch of "
             f"{data['samples_per_step']}) were each timed over the trainer's own steps; the "
             "faster trains on."), "",
            "| attempt | config | timed steps | s/step | samples/s | |",
            "| --- | --- | --- | --- | --- | --- |"]
    rates = data.get("samples_per_s") or (None, None)
    steps = data.get("timed_steps") or (0, 0)
    for i, number in enumerate(data["attempts"]):
        mark = "**winner**" if number == data["winner"] else ""
        out.append(f"| {number} | {data['configs'][i]} | {steps[i]} | {_cell(data['step_s'][i])} "
                   f"| {_cell(rates[i])} | {mark} |")
    out += ["", f"Why: {data['reason']}.", ""]
    return out


def _goodput(state: RunState, now: float | None = None) -> dict[str, Any] | None:
    """Where the wall time went (progress.goodput), JSON-ready; None when it cannot be told."""
    try:
        measured = progress.goodput(state, now=now)
    except (TypeError, ValueError, KeyError, AttributeError):
        return None  # a journal with odd progress fields: the rest of the report still stands
    return {**measured.to_dict(), "labels": dict(progress.CAUSES)}


def live_goodput(state: RunState, now: float) -> list[str]:
    """Lines for `status`: goodput so far, and where the rest went (none: nothing to say)."""
    good = _goodput(state, now=None if state.finished else now)
    if not good or not good.get("wall_s"):
        return []
    running = good["badput_s"].get("running")
    badput = sorted(((k, v) for k, v in good["badput_s"].items() if k != "running"),
                    key=lambda kv: -kv[1])[:2]
    kept = good["steps"]["kept"]
    held = "held by the newest checkpoint" if good.get("provisional") else "kept"
    lines = [(f"goodput {progress.describe_share(good['goodput'])} of "
             f"{human_duration(good['wall_s'])}: {kept} steps {held}")]
    rest = [f"{progress.CAUSES.get(k, k)} {human_duration(v)}" for k, v in badput]
    if running:
        rest.append(f"running now {human_duration(running)}")
    if rest:
        lines.append("  " + "; ".join(rest))
    return lines


def _step_s(progress_seen: Mapping[str, Any] | None) -> float | None:
    """Seconds per optimizer step, from the trainer's own timed progress (None: unknown)."""
    samples = list((progress_seen or {}).get("samples") or ())
    if len(samples) < 2:  # noqa: PLR2004
        return None
    (s0, t0), (s1, t1) = samples[0], samples[-1]
    return round((t1 - t0) / (s1 - s0), 3) if s1 > s0 else None


def _config_of(knobs: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in knobs.items() if k != "resume_from_checkpoint"}


def _cost_section(data: dict[str, Any]) -> list[str]:
    """What the trainer measured of each attempt that trained, and what the speed cost was."""
    rows = [a for a in data["attempts"] if a.get("cost") or a.get("step_s")]
    if not rows:
        return []
    out = ["", "## Measured speed", "",
           "| # | config | verdict | s / optimizer step | samples / s | runtime | loss |",
           "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for a in rows:
        cost = a.get("cost") or {}
        out.append(f"| {a['attempt']} | {describe_knobs(a['knobs'], short=True)} | "
                   f"{a['verdict']} | {_cell(a.get('step_s'))} | "
                   f"{_cell(cost.get('samples_per_s'))} | "
                   f"{human_duration(cost['runtime_s']) if cost.get('runtime_s') else '-'} | "
                   f"{_cell(cost.get('loss'))} |")
    final = next((a for a in reversed(rows) if a["verdict"] == "fits"), None)
    if final is not None and final.get("step_s"):
        others = [a for a in rows if a is not final and a.get("step_s")
                  and _config_of(a["knobs"]) != _config_of(final["knobs"])]
        if others:
            fastest = min(others, key=lambda a: a["step_s"])
            ratio = final["step_s"] / fastest["step_s"] - 1
            word = "slower" if ratio > 0 else "faster"
            out += ["", (f"Measured: the working config takes {final['step_s']:g} s per "
                         f"optimizer step, {abs(ratio):.0%} {word} than attempt "
                         f"{fastest['attempt']} ({describe_knobs(fastest['knobs'], short=True)}, "
                         f"{fastest['step_s']:g} s) before it failed.")]
        total = (final.get("progress_total") or 0)
        if total:
            out += ["", (f"At {final['step_s']:g} s per step, the whole run's {total} steps "
                         f"take about {human_duration(total * final['step_s'])} of training.")]
    return out


def _host_cap_mib(argv: Sequence[str]) -> float | None:
    """The address-space cap the command sets for itself (`prlimit --as=N`), MiB."""
    cap = address_space_cap(tuple(argv))
    return round(cap / 2**20, 1) if cap is not None else None


def _attempt_row(record: AttemptRecord) -> dict[str, Any]:
    started, done = record.started, record.finished
    row: dict[str, Any] = {
        "attempt": record.number, "rung": started.rung, "changed": dict(started.changed),
        "knobs": started.knobs.to_dict(), "argv": list(started.argv), "log_dir": started.log_dir,
        "started_at": started.ts, "verdict": "running",
    }
    row["config"] = describe_knobs(row["knobs"], short=True)
    if done is not None:
        row.update({"verdict": done.verdict, "oom_kind": done.oom_kind,
                    "evidence": done.evidence, "numbers": dict(done.numbers or {}),
                    "exit_code": done.exit_code, "duration_s": done.duration_s,
                    "peak_mib": done.peak_mib, "peak_source": done.peak_source,
                    "host_peak_mib": done.host_peak_mib,
                    "host_cap_mib": done.host_cap_mib, "host_cap_source": done.host_cap_source,
                    "cost": dict(done.cost) if done.cost else None,
                    "step_s": _step_s(done.progress),
                    "progress_total": (done.progress or {}).get("total"),
                    "predicted_mib": done.predicted_mib,
                    "trained_steps": dict(done.trained_steps or {}) or None,
                    "checkpoints": [list(c) for c in done.checkpoints],
                    "adopted": done.adopted, "escaped": list(done.escaped),
                    "wrapper_died": done.wrapper_died,
                    "need_mib": (need_mib(done.numbers, done.peak_mib)
                                 if done.verdict == "oom" else None)})
    return row


def _sibling(start: Knobs, final: Knobs, final_argv: list[str] | None) -> str | None:
    """The sibling folder the final command writes to, when its dialect moved it there."""
    if not start.output_dir or final.finetuning_type == start.finetuning_type:
        return None
    from supervisor.dialects._config import output_dir_for  # noqa: PLC0415

    sibling = output_dir_for(start.output_dir, final)
    words = final_argv or []
    return sibling if any(w == sibling or w.endswith(f"={sibling}") for w in words) else None


def _output_dir(state: RunState, final: Knobs | None,
                final_argv: list[str] | None) -> str | None:
    """Where the working command writes its model (the final.written record says, if it can)."""
    if final is None:
        return None
    told = getattr(state.final, "output_dir", None)
    if isinstance(told, str) and told:
        return told
    return _sibling(state.config.start, final, final_argv) or final.output_dir


def _learning_rate(argv: list[str]) -> float | None:
    """The learning rate the command line sets (None: not on it, e.g. in a config file)."""
    for i, word in enumerate(argv):
        name, eq, value = word.partition("=")
        if name in ("--learning_rate", "--learning-rate", "--lr"):
            text = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            try:
                return float(text)
            except ValueError:
                return None
    return None


def _other_changes(start: Knobs, final: Knobs | None, final_argv: list[str] | None) -> list[str]:
    """What the rungs changed besides memory: the output folder, hyper-parameters kept as set."""
    if final is None or final.finetuning_type == start.finetuning_type:
        return []
    out = []
    sibling = _sibling(start, final, final_argv)
    if sibling:
        out.append(f"{final.finetuning_type} trains a different parameter set, so it writes to "
                   f"its own folder `{sibling}`, not `{start.output_dir}`")
    rate = _learning_rate(final_argv or [])
    if rate is not None and rate >= 1e-4 and final.finetuning_type != "full":  # noqa: PLR2004
        out.append(f"the learning rate ({rate:g}) was kept for {final.finetuning_type}; it is "
                   "already in the range adapters usually train at (1e-4 to 2e-4)")
    else:
        out.append(f"the learning rate{f' ({rate:g})' if rate is not None else ''} and other "
                   f"hyper-parameters chosen for {start.finetuning_type} fine-tuning were kept "
                   f"for {final.finetuning_type}; {final.finetuning_type} usually wants a higher "
                   "learning rate (LoRA: 1e-4 to 2e-4 where full fine-tuning uses 1e-5 to "
                   "2e-5): check it before the long run")
    if final.finetuning_type != "full":
        what = "a LoRA adapter" if final.finetuning_type == "lora" else "a partly trained model"
        out.append(f"the result is {what}, not fully fine-tuned weights")
    return out


def _costs(start: Knobs, final: Knobs, config: RunConfig) -> list[dict[str, Any]]:
    notes = dict(_KNOB_COST_NOTE)
    if config.cutoff_drops_rows:  # packing (LLaMA-Factory) or axolotl's default: rows are dropped
        # The share each cutoff drops would need the tokenised dataset: not computed (yet).
        notes["cutoff_len"] = ("samples longer than the cutoff are DROPPED, not truncated "
                               "(what share of rows: not computed, the dataset is not read)")
    cost_of = _rung_costs(config)
    costs = []
    for knob, (before, after) in start.diff(final).items():
        if knob in ("grad_accum", "world_size", "resume_from_checkpoint", "output_dir"):
            continue
        costs.append({"knob": knob, "from": before, "to": after,
                      "cost": cost_of.get(knob, "none"),
                      "note": notes.get(knob, "")})
    return costs


def deepspeed_note(config: RunConfig) -> str | None:
    """One line for a DeepSpeed command: whether this run's ladder walks the ZeRO rungs."""
    stage = config.start.deepspeed_stage
    if stage is None:
        return None
    if {"deepspeed_stage", "deepspeed_offload"} & set(_rung_costs(config)):
        return (f"DeepSpeed ZeRO-{stage}: the '{config.policy_name}' ladder walks the ZeRO "
                "rungs (ZeRO-2, ZeRO-3, optimizer offload) before any cut in cutoff or method")
    return (f"DeepSpeed ZeRO-{stage}: the ZeRO rungs (ZeRO-2, ZeRO-3, optimizer offload) are "
            f"in `--policy multi-gpu`, not in the '{config.policy_name}' ladder this run walks")


def _rung_costs(config: RunConfig) -> dict[str, str]:
    """knob -> the cost its rung declares, from the journaled policy text."""
    from supervisor._compat import tomllib  # noqa: PLC0415

    try:
        data = tomllib.loads(config.policy_text) if config.policy_text else {}
    except (tomllib.TOMLDecodeError, ValueError):
        return {}
    out: dict[str, str] = {}
    for rung in data.get("rung", []) if isinstance(data.get("rung"), list) else []:
        if isinstance(rung, dict) and isinstance(rung.get("knob"), str):
            out.setdefault(rung["knob"], str(rung.get("cost", "none")))
    return out


def _pointed_at_final_files(argv: Sequence[str], files: Sequence[str]) -> list[str]:
    """The working argv with a config copy inside the run folder (`attempts/NN/cfg.yml`,
    `final/cfg.yml`) replaced by the `final<suffix>` file the report points to.

    Both hold the same working values (the dialect wrote them from the same knobs); the one
    the report names is the one final-command.sh must run. A copy outside the run folder (a
    private copy holding secrets) is left as it is.
    """
    finals = {PurePath(f).suffix: f for f in files
              if PurePath(f).stem == "final" and len(PurePath(f).parts) == 1}
    out = []
    for word in argv:
        path = PurePath(word)
        run_dir = None
        if (len(path.parts) > 3 and path.parent.name.isdigit()  # noqa: PLR2004 - run/attempts/NN/x
                and path.parent.parent.name == "attempts"):
            run_dir = path.parent.parent.parent
        elif len(path.parts) > 2 and path.parent.name == "final":  # noqa: PLR2004 - run/final/x
            run_dir = path.parent.parent
        if run_dir is not None and path.is_absolute() and path.suffix in finals:
            out.append(str(run_dir / finals[path.suffix]))
        else:
            out.append(word)
    return out


def write(run_dir: Path, state: RunState, *, pictures: bool = True) -> dict[str, Any]:
    """Write report.json, report.md and (when fitted) final-command.sh into run_dir.

    `pictures` False: memory.png and goodput.png are not drawn here but named as they will be
    (the caller draws them from report.json: plot.draw_later, a child the exit waits not on).
    """
    data = build(state)
    from supervisor import plot  # noqa: PLC0415 - matplotlib is optional and slow to import

    memory, timeline = plot.drawable(data) if not pictures else (False, False)
    if memory or (pictures and plot.write(run_dir / "memory.png", data) is not None):
        data["plot"] = "memory.png"
    else:
        data["plot_missing"] = plot.why_not(data)
    if timeline or (pictures and plot.write_time(run_dir / "goodput.png", data) is not None):
        data["time_plot"] = "goodput.png"
    _atomic(run_dir / "report.json", json.dumps(data, indent=2, default=str) + "\n")
    _atomic(run_dir / "report.md", printable(render_markdown(data)))
    if data["final_command"]:
        script = run_dir / "final-command.sh"
        _atomic(script, final_command_script(data), mode=0o755)
    if data.get("continue_command"):
        script = run_dir / "continue-command.sh"
        _atomic(script, final_command_script(data, continue_run=True), mode=0o755)
    return data


def final_command_script(data: dict[str, Any], *, continue_run: bool = False) -> str:
    """A shell script that runs the working command exactly, from the original directory.

    The default is a fresh run of the working config; `continue_run` continues this run from
    its last checkpoint instead (and writes into its output folder).
    """
    what = (f"Continues run {data['run_id']} from {data['continue_checkpoint']}."
            if continue_run else
            f"Working config found by oom-supervisor, run {data['run_id']}: a fresh run.")
    lines = ["#!/bin/sh", f"# {what}",
             (f"# Effective batch {data['effective_batch']['final']} "
              f"(started at {data['effective_batch']['start']})."),
             "set -e"]
    if data.get("device_mib"):
        how = ("--device-memory; this command carries no limit of its own"
               if data.get("device_source") == "--device-memory" else
               str(data.get("device_source") or "the device's size"))
        lines.insert(3, f"# Found for a device of {data['device_mib']:g} MiB ({how}).")
    if data.get("cwd"):
        lines.append(f"cd {shlex.quote(data['cwd'])}")
    for name, value in sorted((data.get("final_env") or {}).items()):
        lines.append(f"export {name}={shell_word(value)}")  # set by a rung (e.g. the allocator)
    # Redacted secrets become required environment variables: `"${HF_TOKEN:?set HF_TOKEN ...}"`.
    argv = data["continue_command"] if continue_run else data["final_command"]
    lines.append("exec " + " ".join(shell_word(w) for w in argv))
    return "\n".join(lines) + "\n"


def render_markdown(data: dict[str, Any]) -> str:
    """The morning read: what happened, when, what works, what it cost, and memory per attempt."""
    out = [f"# oom-supervisor run {data['run_id']}", ""]
    resumed = len(data.get("resumed") or ())
    again = (f" Resumed {'once' if resumed == 1 else f'{resumed} times'} after the supervisor "
             "died or was stopped (below)." if resumed else "")
    out += [f"**{data['summary']}** (exit code {_cell(data['exit_code'])}).{again}", ""]
    if data["reason"]:
        out += [f"Reason: {data['reason']}", ""]
    device = data.get("device_mib")
    out += [f"- Started: {local_time(data.get('started_at'))}",
            (f"- Ended: {local_time(data.get('ended_at'))}" if data.get("ended_at")
             else "- Ended: not yet (the journal ends while an attempt runs)"),
            f"- Total time: {human_duration(data.get('duration_s'))}"
            + (f", of which {human_duration(data['estimate_s'])} predicting memory before "
               "attempt 1" if data.get("estimate_s") else ""),
            f"- Command: `{shlex.join(data['command'])}`"]
    if data.get("cwd"):
        out += [f"- Directory: `{data['cwd']}`"]
    out += [f"- Dialect: {data['dialect']}",
            f"- Policy: {data['policy']['name']} ({data['policy']['source']})"
            + (f"; {data['policy']['deepspeed']}" if data["policy"].get("deepspeed") else ""),
            f"- Device: {_device_words(device, data.get('device_source'))}",
            (f"- Attempts: {len(data['attempts'])}, of which {data['oom_verdicts']} ran out "
             "of memory")]
    for r in data.get("resumed") or ():
        pending = (f", adopting attempt {r['pending']}" if r.get("pending") and
                   r.get("orphan") == "adopt" else f", ending attempt {r['pending']}"
                   if r.get("pending") else "")
        out.append(f"- Resumed at {local_time(r['at'])} after "
                   f"{plural(r['attempts_done'], 'finished attempt')}{pending} (the supervisor "
                   "had died or been stopped)")
    if data.get("remembered"):
        kept = data["remembered"]
        out.append(f"- Remembered fit: attempt 1 ran {describe_knobs(kept['knobs'])}, the config "
                   f"that fitted in run {kept.get('from_run') or '?'} with the same model, "
                   f"device and memory settings; the command's own config is "
                   f"{describe_knobs(data['start_knobs'])} (`--fresh` starts there)"
                   + (f"; that run's command differed only where memory does not depend on "
                      f"it: {kept['ignored']}" if kept.get("ignored") else ""))
    start = data["start_knobs"]
    # An assumed "none" (no quantisation, no ZeRO) says nothing a reader can act on.
    assumed = [k for k in data.get("assumed") or () if start.get(k) is not None]
    if assumed:
        out.append("- Assumed (nothing in the command or the program confirmed them): "
                   + ", ".join(f"{k} = {_cell(start.get(k))}" for k in assumed))
    out.append("")
    eb = data["effective_batch"]
    out += _time_section(data)
    if data["final_knobs"]:
        out += _final_section(data, eb)
    out += _speed_section(data.get("speed"))
    if data.get("plot"):
        out += ["## Memory per attempt", "", f"![memory per attempt]({data['plot']})", ""]
    elif data.get("plot_missing"):
        out += ["## Memory per attempt", "", f"No picture: {data['plot_missing']}.", ""]
    if data["spent"]:
        out += ["## Rungs tried", ""] + [f"- {s}" for s in data["spent"]] + [""]
    out += _attempts_section(data, device)
    out += _cost_section(data)
    if data.get("skipped_on_prediction"):
        out += ["", "## Skipped on their predicted memory (never run)", ""]
        for s in data["skipped_on_prediction"]:
            changed = ", ".join(f"{k} {_cell(v[0])} -> {_cell(v[1])}"
                                for k, v in s.get("changed", {}).items())
            label = f"{s['rung']} ({changed})" if s.get("rung") else "the command as given"
            out.append(f"- {label}: {s['reason']}")
    if data.get("estimate_checking"):
        out.append(f"- checked for real instead of skipped: {data['estimate_checking']}")
    if data.get("progress") or data.get("rescues"):
        out += ["", "## Progress kept across attempts", ""]
        out += [rescue_line(r) for r in data.get("rescues") or ()]
        for p in data.get("progress") or ():
            if p["event"] == "checkpoint.resumed":
                out.append(f"- attempt {p['attempt']} resumed from `{p['checkpoint']}`: the "
                           f"{p['step']} steps trained before it were kept")
            else:
                out.append(f"- attempt {p['attempt']} started fresh, not from "
                           f"`{p['checkpoint']}`: {p['reason']}")
    if data.get("passed_over"):
        out += ["", "## Checkpoints passed over (never resumed)", ""]
        out += [f"- `{p['checkpoint']}` (before attempt {p['attempt']}): {p['reason']}"
                for p in data["passed_over"]]
    notes = [s for s in data["steps"]
             if s.get("restored") or s.get("skipped") or s.get("note")]
    if notes:
        out += ["", "## Ladder notes", ""]
        said: set[str] = set()
        for s in notes:
            if s.get("restored"):
                restored = ", ".join(f"{knob} {_cell(before)} -> {_cell(after)}"
                                     for knob, before, after in s["restored"])
                out.append(f"- before attempt {s['next_attempt']}, rung {s['rung']} restored "
                           f"{restored}")
            if s.get("note"):
                out.append(f"- attempt {s['next_attempt']}: {s['rung']} {s['note']}")
            for skip in s.get("skipped", []):
                if skip in said:  # the same reason at every step: said once, the journal
                    continue      # keeps every one
                said.add(skip)
                out.append(f"- before attempt {s['next_attempt']}, skipped {skip}")
    troubles = [a for a in data["attempts"] if a.get("escaped") or a.get("wrapper_died")]
    if troubles:
        out += ["", "## Processes", ""]
        for a in troubles:
            if a.get("wrapper_died"):
                out.append(f"- attempt {a['attempt']}: its wrapper died without writing the "
                           "command's exit status (a reboot, a preemption, a kill of its group)")
            if a.get("escaped"):
                out.append(f"- attempt {a['attempt']}: found outside its process tree by the "
                           f"attempt's marker, and ended: {', '.join(a['escaped'])}")
    for n in data.get("notified", []):
        result = (f"exit code {n['exit_code']}" if n.get("exit_code") is not None
                  else f"did not run ({n.get('error')})")
        out += ["", f"Notified with `{n['command']}`: {result}."]
        if n.get("output"):
            out += ["", "Its last lines (all of its output is in `notify.log`):", "", "```text",
                    *n["output"], "```"]
    if data.get("foreign_lines"):
        out += ["", foreign_note(int(data["foreign_lines"])) + "."]
    out += ["", ("Logs of each attempt: `attempts/NN/stdout.log`, `stderr.log`; every event: "
                 "`journal.jsonl`; the supervisor's own log: `supervisor.jsonl`."), ""]
    return "\n".join(out)


def foreign_note(lines: int) -> str:
    """The sentence for lines of journal.jsonl the supervisor did not write."""
    return (f"journal.jsonl holds {_count(lines, 'line')} the supervisor did not write "
            "(something else, such as the training program, wrote into it); "
            f"{'it was' if lines == 1 else 'they were'} skipped")


def _count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _time_section(data: dict[str, Any]) -> list[str]:
    """"Where the time went": goodput, badput by cause, and every accident with its cost."""
    good = data.get("goodput")
    if not good or not good.get("wall_s"):
        return []
    wall, productive = good["wall_s"], good["productive_s"]
    steps = good["steps"]
    kept_words = ("held by the newest checkpoint (nothing has fitted yet)"
                  if good.get("provisional") else "kept in the final model")
    out = ["## Where the time went", "",
           (f"Goodput **{progress.describe_share(good['goodput'])}**: "
            f"{human_duration(productive)} of {human_duration(wall)} went into the "
            f"{_count(steps['kept'], 'step')} {kept_words}; "
            f"{_count(steps['trained'], 'step')} trained in all"
            + (f", {steps['retrained']} of them twice or thrown away." if steps["retrained"]
               else ".")), ""]
    if not good.get("measured"):
        out += [("(Some attempt showed no step progress; its whole time is counted as "
                "training.)"), ""]
    if data.get("time_plot"):
        out += [f"![where the time went]({data['time_plot']})", ""]
    out += ["| where | time | share |", "| --- | ---: | ---: |",
            (f"| training kept | {human_duration(productive)} | "
            f"{progress.describe_share(good['goodput'])} |")]
    for cause, label in progress.CAUSES.items():
        seconds = good["badput_s"].get(cause)
        if seconds:
            out.append(f"| {label} | {human_duration(seconds)} | "
                       f"{progress.describe_share(seconds / wall)} |")
    accidents = good.get("accidents") or []
    if accidents:
        out += ["", "What happened, and what it cost:", ""]
        for a in accidents:
            cost = f"cost {human_duration(a['cost_s'])}" if a["cost_s"] else "no time lost"
            lost = f", {a['steps_lost']} steps trained and not kept" if a["steps_lost"] else ""
            out.append(f"- {local_time(a['at'])} {a['what']}: {cost}{lost}")
    return [*out, ""]


def _final_section(data: dict[str, Any], eb: dict[str, Any]) -> list[str]:
    start, final = data["start_knobs"], data["final_knobs"]
    cost_of = {c["knob"]: c for c in data["costs"]}
    assumed = set(data.get("assumed", ()))
    out = ["## Final config", "", f"Working config: {describe_knobs(final)}.", "",
           "| knob | started | final | cost |", "| --- | --- | --- | --- |"]
    for knob in _SHOWN_KNOBS:
        if not _differs(knob, start, final):
            continue
        note = cost_of.get(knob)
        cost = f"{note['cost']}: {note['note']}" if note else ""
        if knob == "grad_accum":
            cost = "keeps the effective batch"
        was = _cell(start.get(knob)) + (" (assumed)" if knob in assumed else "")
        out.append(f"| {knob} | {was} | {_cell(final.get(knob))} | {cost} |")
    kept = "kept" if eb["start"] == eb["final"] else "CHANGED"
    out += ["", f"Effective batch: {eb['start']} -> {eb['final']} ({kept})."]
    if not eb["world_size_known"]:
        out.append("The launcher's world size is decided at launch time; it counts as 1 here.")
    given = _given_up(data["costs"])
    if given:
        out += ["", f"Given up: {given}."]
    if data.get("output_dir"):
        out += ["", f"The model will be written to `{data['output_dir']}`."]
    out += [f"- {note}" for note in data.get("other_changes", [])]
    for name in data["final_files"]:
        out += ["", f"The working config in the command's own format: `{name}`"]
    out += ["", "Run it again as is, as a fresh run: `sh final-command.sh`", "",
            "```sh", shlex.join(data["final_command"]), "```", ""]
    if data.get("continue_command"):
        out += [(f"Continue this run from `{data['continue_checkpoint']}` (it writes into "
                 "this run's output folder): `sh continue-command.sh`"), ""]
    elif data.get("continue_checkpoint"):
        steps = (data.get("final_knobs") or {}).get("max_steps")
        out += [(f"This run trained all its {steps} steps (`{data['continue_checkpoint']}`): "
                 "continuing it would train nothing, so there is no continue-command.sh; to "
                 "train further, raise max_steps in the command and continue from that "
                 "checkpoint."), ""]
    return out


def rescue_line(rescue: Mapping[str, Any]) -> str:
    """One rescue checkpoint (or a failed one) in a sentence."""
    took = f" in {rescue['seconds']:.1f} s" if rescue.get("seconds") is not None else ""
    if rescue["event"] == "checkpoint.rescue_failed":
        return (f"- attempt {rescue['attempt']} tried to save step {rescue['step']} on its way "
                f"out and could not ({rescue.get('error')}); it left nothing behind, and the next "
                "attempt went on from the checkpoint before it")
    folder = rescue.get("checkpoint") or f"checkpoint-{rescue['step']}"
    if rescue["why"] == "oom":
        return (f"- attempt {rescue['attempt']} ran out of memory in the step after step "
                f"{rescue['step']}, and first saved `{folder}` (the last completed step){took}")
    if rescue["why"] == "error":
        return (f"- attempt {rescue['attempt']} failed after step {rescue['step']}, and first "
                f"saved `{folder}` (the last completed step){took}")
    return (f"- attempt {rescue['attempt']} was asked to stop and saved `{folder}` at its next "
            f"step end{took}")


def _attempts_section(data: dict[str, Any], device: float | None) -> list[str]:
    head = f"memory (device {_mib(device)})" if device else "memory"
    out = ["## Attempts", "", f"| # | rung | config | verdict | {head} | predicted | time |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    evidence: list[str] = []
    for a in data["attempts"]:
        verdict = a["verdict"] + (f" ({a['oom_kind']})" if a.get("oom_kind") else "")
        out.append(f"| {a['attempt']} | {a['rung'] or '(as given)'} | "
                   f"{describe_knobs(a['knobs'], short=True)} | {verdict} | "
                   f"{memory_words(a, device).replace('|', '/')} | "
                   f"{_mib(a.get('predicted_mib')) if a.get('predicted_mib') else '-'} | "
                   f"{human_duration(a.get('duration_s')) if 'duration_s' in a else 'running'} |")
        if a.get("evidence") and str(a["evidence"]).startswith(RECOVERED):
            line = str(a["evidence"])[len(RECOVERED):].lstrip(": ")
            evidence.append(f"- attempt {a['attempt']}: the program ran out of memory, caught "
                            f"the error and recovered by itself (it exited 0, so the config "
                            f"counts as a fit): `{_evidence(line)}`")
        elif a.get("evidence"):
            evidence.append(f"- attempt {a['attempt']}: `{_evidence(a['evidence'])}`")
    if evidence:
        out += ["", "Evidence (the line each verdict rests on):", "", *evidence]
    return out


def _evidence(text: str) -> str:
    """One line, uncut up to the allocated-by-PyTorch figure, then cut at _EVIDENCE_CHARS."""
    line = " ".join(text.split()).replace("`", "'")
    keep = _EVIDENCE_CHARS
    marker = line.find("allocated by PyTorch")
    if marker >= 0:
        keep = max(keep, marker + len("allocated by PyTorch") + 1)
    return line if len(line) <= keep else line[:keep].rstrip() + " ..."


_EVIDENCE_CHARS = 400

_SHOWN_KNOBS = ("per_device_batch", "grad_accum", "cutoff_len", "gradient_checkpointing",
                "finetuning_type", "lora_rank", "freeze_trainable_layers", "precision",
                "quantization_bit", "deepspeed_stage", "deepspeed_offload")


def _differs(knob: str, start: dict[str, Any], final: dict[str, Any]) -> bool:
    """A knob changed in a way that matters (a LoRA rank on a full run does not)."""
    if start.get(knob) == final.get(knob):
        return False
    if knob == "lora_rank":
        return "lora" in (start.get("finetuning_type"), final.get("finetuning_type"))
    if knob == "freeze_trainable_layers":
        return "freeze" in (start.get("finetuning_type"), final.get("finetuning_type"))
    return True


def _given_up(costs: list[dict[str, Any]]) -> str:
    """`quality (cutoff_len 1024 -> 512, ...); speed (...)`, or "" when nothing was."""
    parts = []
    for kind in ("quality", "speed"):
        knobs = [f"{c['knob']} {_cell(c['from'])} -> {_cell(c['to'])}"
                 for c in costs if c["cost"] == kind]
        if knobs:
            parts.append(f"{kind} ({', '.join(knobs)})")
    return "; ".join(parts)


def render_table(data: dict[str, Any]) -> str:
    """The attempts as a plain-text table for the terminal (status), 100 columns at most."""
    device = data.get("device_mib")
    rows = [("#", "rung", "config", "verdict", "memory", "time")]
    for a in data["attempts"]:
        verdict = a["verdict"] + (f" ({a['oom_kind']})" if a.get("oom_kind") else "")
        rows.append((str(a["attempt"]), a["rung"] or "(as given)",
                     describe_knobs(a["knobs"], short=True), verdict,
                     memory_words(a, device, short=True),
                     human_duration(a["duration_s"]) if "duration_s" in a else "running"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


# --- words for people (shared with the console and status) -------------------------------------

def describe_knobs(knobs: Mapping[str, Any], *, short: bool = False) -> str:
    """A config in words: `LoRA r8, batch 1 x 4 accumulated (effective 4), cutoff 512, ...`."""
    method = str(knobs.get("finetuning_type", "full"))
    if method == "lora":
        words = f"LoRA r{knobs.get('lora_rank')}"
    elif method == "freeze":
        words = f"freeze ({knobs.get('freeze_trainable_layers')} layers train)"
    else:
        words = "full" if short else "full fine-tuning"
    batch, accum = knobs.get("per_device_batch"), knobs.get("grad_accum") or 1
    world = knobs.get("world_size") or 1
    if short:
        parts = [words, f"b{batch}x{accum}"]
        if knobs.get("cutoff_len"):
            parts.append(f"cut {knobs['cutoff_len']}")
        if knobs.get("gradient_checkpointing"):
            parts.append("ckpt")
    else:
        effective = (batch or 0) * accum * world
        batch_words = (f"batch {batch} x {accum} accumulated (effective {effective})"
                       if accum > 1 or world > 1 else f"batch {batch}")
        parts = [words, batch_words]
        if knobs.get("cutoff_len"):
            parts.append(f"cutoff {knobs['cutoff_len']}")
        parts.append(f"checkpointing {'on' if knobs.get('gradient_checkpointing') else 'off'}")
    if knobs.get("quantization_bit"):
        parts.append(f"{knobs['quantization_bit']}-bit")
    if knobs.get("deepspeed_stage"):
        parts.append(f"ZeRO-{knobs['deepspeed_stage']}"
                     + (" offload" if knobs.get("deepspeed_offload") else ""))
    return ", ".join(parts) if not short else " ".join(parts)


def memory_words(row: Mapping[str, Any], device_mib: float | None, *,
                 short: bool = False) -> str:
    """An attempt's memory beside the device: its peak, or what its OOM message proves."""
    numbers = row.get("numbers") or {}
    of = f" of {_mib(device_mib)}" if device_mib else ""
    if row.get("verdict") == "oom" and numbers:
        tried, allocated = numbers.get("tried_mib"), numbers.get("allocated_mib")
        free, capacity = numbers.get("free_mib"), numbers.get("capacity_mib")
        if short:  # status: the same figures as report.md, in fewer words
            need = row.get("need_mib")
            if need:
                return f">= {_mib(need)}{of}"
            said = [f"{word} {_mib(value)}" for word, value in
                    (("tried", tried), ("allocated", allocated), ("capacity", capacity))
                    if value is not None]
            if said:
                return ", ".join(said) + of
            host = row.get("host_peak_mib")
            return f"host {_mib(host)}" if host else "no figures"
        parts = []
        if tried is not None:
            parts.append(f"tried {_mib(tried)}")
        if allocated is not None:
            parts.append(f"allocated {_mib(allocated)}")
        if free is not None:
            parts.append(f"free {_mib(free)}")
        if capacity is not None:
            parts.append(f"capacity {_mib(capacity)}")
        if row.get("host_peak_mib") and capacity is None and not device_mib:
            parts.append(f"host memory peak {_mib(row['host_peak_mib'])}")
        return ", ".join(parts)
    peak = row.get("peak_mib")
    if peak:
        share = f" ({peak / device_mib:.0%})" if device_mib else ""
        lead = "peak" if row.get("verdict") != "oom" else "reached"
        return f"{lead} {_mib(peak)}{of}{share}"
    host = row.get("host_peak_mib")
    if host:
        # No device figure: what the attempt's processes held in host memory (resident).
        return f"host {_mib(host)}" if short else f"host memory peak {_mib(host)} (resident)"
    return "-"


def need_mib(numbers: Mapping[str, float] | None, peak_mib: float | None) -> float | None:
    """What an OOM proves the attempt needed at least: allocated + tried, else its peak."""
    numbers = numbers or {}
    allocated, tried = numbers.get("allocated_mib"), numbers.get("tried_mib")
    if allocated is not None and tried is not None:
        return round(allocated + tried, 2)
    return peak_mib


def human_duration(seconds: float | None) -> str:
    """`7.1 s`, `4 min 25 s`, `6 h 0 min`: a duration as a person says it."""
    if seconds is None:
        return "-"
    if seconds < 60:  # noqa: PLR2004
        return f"{seconds:.1f} s"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {secs} s"


def local_time(ts: float | None) -> str:
    """A journal timestamp in local time, to the second, with the zone's name."""
    if not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(ts))


def _device_words(device: float | None, source: str | None) -> str:
    if not device:
        return "unknown (no --device-memory and no GPU visible)"
    return f"{_mib(device)} ({source or 'source not recorded'})"


def _mib(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 10240:  # noqa: PLR2004
        return f"{value / 1024:.1f} GiB"
    return f"{value:.1f} MiB" if value < 100 else f"{value:.0f} MiB"  # noqa: PLR2004


def cell(value: object) -> str:
    """A knob value for people: `on`/`off` for booleans, `-` for none."""
    return _cell(value)


def _cell(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return "-" if value is None else str(value)


def _atomic(path: Path, text: str, *, mode: int = 0o644) -> None:
    # Whole or not at all: `report` after a full disk finds the last good file, never half.
    write_file(path, text, mode=mode, then=_REWRITE.format(run_dir=path.parent))


_REWRITE = "then `oom-supervisor report {run_dir}` writes the report again"
