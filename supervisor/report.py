"""The end of a run: report.json, report.md and final-command.sh, all rebuilt from the journal."""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from supervisor.knobs import Knobs
from supervisor.secrets import shell_word

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


def build(events: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The whole run as one JSON-ready mapping, derived from journal events only."""
    started = next((e for e in events if e["event"] == "run.started"), None)
    if started is None:
        msg = "the journal has no run.started event; it is not an oom-supervisor journal"
        raise ValueError(msg)
    attempts: dict[int, dict[str, Any]] = {}
    steps: list[dict[str, Any]] = []
    end: dict[str, Any] | None = None
    final_files: list[str] = []
    progress: list[dict[str, Any]] = []
    device_mib: float | None = None
    predicted: list[dict[str, Any]] = []
    for event in events:
        kind = event["event"]
        if kind == "attempt.started":
            attempts[event["attempt"]] = {
                "attempt": event["attempt"], "rung": event.get("rung"),
                "changed": event.get("changed", {}), "knobs": event["knobs"],
                "argv": event["argv"], "log_dir": event.get("log_dir"),
                "verdict": "running",
            }
        elif kind == "attempt.finished" and event["attempt"] in attempts:
            attempts[event["attempt"]].update({
                k: event.get(k) for k in ("verdict", "oom_kind", "evidence", "numbers",
                                          "exit_code", "duration_s", "peak_live_mib")
            })
        elif kind == "ladder.stepped":
            steps.append({k: v for k, v in event.items() if k not in ("ts", "event")})
        elif kind in ("checkpoint.resumed", "checkpoint.skipped"):
            progress.append({k: v for k, v in event.items() if k != "ts"})
        elif kind == "rung.skipped":
            predicted.append({k: v for k, v in event.items() if k not in ("ts", "event")})
        elif kind == "estimate.setup":
            device_mib = event.get("device_mib")
        elif kind == "final.written":
            final_files = list(event.get("files", []))
        elif kind == "run.finished":
            end = event
    status = end["status"] if end else "running"
    start = Knobs.from_dict(started["knobs"])
    final_attempt = attempts.get(end["attempt"]) if end and end.get("attempt") else None
    final = Knobs.from_dict(final_attempt["knobs"]) if final_attempt else None
    costs = (_costs(start, final, started["policy"], str(started.get("dialect", "")))
             if final and status == "fitted" else [])
    return {
        "run_id": started["run_id"],
        "status": status,
        "summary": _STATUS_LINE.get(status, status),
        "exit_code": end.get("exit_code") if end else None,
        "reason": end.get("reason") if end else None,
        "spent": end.get("spent", []) if end else [],
        "command": started["argv"],
        "cwd": started.get("cwd"),
        "dialect": started.get("dialect"),
        "policy": started["policy"],
        "start_knobs": started["knobs"],
        "final_knobs": final.to_dict() if final and status == "fitted" else None,
        "final_command": final_attempt["argv"] if final_attempt and status == "fitted" else None,
        "final_files": final_files,
        "device_mib": device_mib,
        "skipped_on_prediction": predicted,
        "effective_batch": {
            "start": start.effective_batch,
            "final": final.effective_batch if final and status == "fitted" else None,
            "world_size_known": started.get("world_size_known", True),
        },
        "costs": costs,
        "attempts": list(attempts.values()),
        "steps": steps,
        "progress": progress,
        "oom_verdicts": sum(1 for a in attempts.values() if a["verdict"] == "oom"),
    }


def _costs(start: Knobs, final: Knobs, policy: dict[str, Any],
           dialect: str) -> list[dict[str, Any]]:
    cost_of = {r["knob"]: r["cost"] for r in policy.get("rungs", [])}
    notes = dict(_KNOB_COST_NOTE)
    if "DROPS" in dialect:  # packing (LLaMA-Factory) or axolotl's default: rows are dropped
        notes["cutoff_len"] = "samples longer than the cutoff are DROPPED, not truncated"
    costs = []
    for knob, (before, after) in start.diff(final).items():
        if knob in ("grad_accum", "world_size", "resume_from_checkpoint", "output_dir"):
            continue
        costs.append({"knob": knob, "from": before, "to": after,
                      "cost": cost_of.get(knob, "none"),
                      "note": notes.get(knob, "")})
    return costs


def write(run_dir: Path, events: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Write report.json, report.md and (when fitted) final-command.sh into run_dir."""
    data = build(events)
    _atomic(run_dir / "report.json", json.dumps(data, indent=2, default=str) + "\n")
    _atomic(run_dir / "report.md", render_markdown(data))
    if data["final_command"]:
        script = run_dir / "final-command.sh"
        _atomic(script, final_command_script(data))
        script.chmod(0o755)
    return data


def final_command_script(data: dict[str, Any]) -> str:
    """A shell script that runs the working command exactly, from the original directory."""
    lines = ["#!/bin/sh",
             f"# Working config found by oom-supervisor, run {data['run_id']}.",
             (f"# Effective batch {data['effective_batch']['final']} "
              f"(started at {data['effective_batch']['start']})."),
             "set -e"]
    if data.get("device_mib"):
        lines.insert(3, f"# Found for a device of {data['device_mib']:g} MiB (--device-memory); "
                        "this command carries no limit of its own.")
    if data.get("cwd"):
        lines.append(f"cd {shlex.quote(data['cwd'])}")
    # Redacted secrets become required environment variables: `"${HF_TOKEN:?set HF_TOKEN ...}"`.
    lines.append("exec " + " ".join(shell_word(w) for w in data["final_command"]))
    return "\n".join(lines) + "\n"


def render_markdown(data: dict[str, Any]) -> str:
    """The morning read: what happened, what works, what it cost."""
    out = [f"# oom-supervisor run {data['run_id']}", ""]
    out += [f"**{data['summary']}** (exit code {data['exit_code']}).", ""]
    if data["reason"]:
        out += [f"Reason: {data['reason']}", ""]
    out += [f"- Command: `{shlex.join(data['command'])}`"]
    if data.get("cwd"):
        out += [f"- Directory: `{data['cwd']}`"]
    out += [f"- Dialect: {data['dialect']}",
            f"- Policy: {data['policy']['name']} ({data['policy']['source']})",
            (f"- Attempts: {len(data['attempts'])}, of which {data['oom_verdicts']} ran out "
             "of memory"), ""]
    eb = data["effective_batch"]
    if data["final_knobs"]:
        out += ["## Final config", "",
                "| knob | started | final | cost |", "| --- | --- | --- | --- |"]
        start, final = data["start_knobs"], data["final_knobs"]
        cost_of = {c["knob"]: c for c in data["costs"]}
        for knob in ("per_device_batch", "grad_accum", "cutoff_len", "gradient_checkpointing",
                     "finetuning_type", "lora_rank", "freeze_trainable_layers"):
            note = cost_of.get(knob)
            cost = f"{note['cost']}: {note['note']}" if note else ""
            out.append(f"| {knob} | {_cell(start.get(knob))} | {_cell(final.get(knob))} | "
                       f"{cost} |")
        kept = "kept" if eb["start"] == eb["final"] else "CHANGED"
        out += ["", f"Effective batch: {eb['start']} -> {eb['final']} ({kept})."]
        if not eb["world_size_known"]:
            out.append("The launcher's world size is decided at launch time; it counts as 1 here.")
        for name in data["final_files"]:
            out += ["", f"The working config in the command's own format: `{name}`"]
        out += ["", "Run it again as is: `sh final-command.sh`", "",
                "```sh", shlex.join(data["final_command"]), "```", ""]
    if data["spent"]:
        out += ["## Rungs tried", ""] + [f"- {s}" for s in data["spent"]] + [""]
    out += ["## Attempts", "", "| # | rung | changed | verdict | evidence | seconds |",
            "| --- | --- | --- | --- | --- | --- |"]
    for a in data["attempts"]:
        changed = ", ".join(f"{k} {_cell(v[0])}->{_cell(v[1])}" for k, v in a["changed"].items())
        evidence = (a.get("evidence") or "").replace("|", "\\|")
        if len(evidence) > _EVIDENCE_CHARS:
            evidence = evidence[:_EVIDENCE_CHARS - 3] + "..."
        verdict = a["verdict"] + (f" ({a['oom_kind']})" if a.get("oom_kind") else "")
        out.append(f"| {a['attempt']} | {a['rung'] or '(as given)'} | {changed or '-'} | "
                   f"{verdict} | {evidence} | {a.get('duration_s') or ''} |")
    if data.get("skipped_on_prediction"):
        out += ["", "## Skipped on their predicted memory (never run)", ""]
        for s in data["skipped_on_prediction"]:
            changed = ", ".join(f"{k} {_cell(v[0])}->{_cell(v[1])}"
                                for k, v in s.get("changed", {}).items())
            label = f"{s['rung']} ({changed})" if s.get("rung") else "the command as given"
            out.append(f"- {label}: {s['reason']}")
    if data.get("progress"):
        out += ["", "## Progress kept across OOMs", ""]
        for p in data["progress"]:
            if p["event"] == "checkpoint.resumed":
                out.append(f"- attempt {p['attempt']} resumed from `{p['checkpoint']}`: the "
                           f"{p['step']} steps trained before the OOM were kept")
            else:
                out.append(f"- attempt {p['attempt']} started fresh, not from "
                           f"`{p['checkpoint']}`: {p['reason']}")
    notes = [s for s in data["steps"]
             if s.get("restored") or s.get("skipped") or s.get("note")]
    if notes:
        out += ["", "## Ladder notes", ""]
        for s in notes:
            for knob, before, after in s.get("restored", []):
                out.append(f"- before attempt {s['next_attempt']}, rung {s['rung']} restored "
                           f"{knob} {_cell(before)} -> {_cell(after)}")
            if s.get("note"):
                out.append(f"- attempt {s['next_attempt']}: {s['rung']} {s['note']}")
            for skip in s.get("skipped", []):
                out.append(f"- before attempt {s['next_attempt']}, skipped {skip}")
    out += ["", ("Logs of each attempt: `attempts/NN/stdout.log`, `stderr.log`; every event: "
                 "`journal.jsonl`."), ""]
    return "\n".join(out)


_EVIDENCE_CHARS = 160


def render_table(data: dict[str, Any]) -> str:
    """The attempts as a plain-text table for the terminal."""
    rows = [("#", "rung", "batch x GA", "cutoff", "ckpt", "method", "verdict", "s")]
    for a in data["attempts"]:
        k = a["knobs"]
        method = str(k["finetuning_type"]) + (f" r{k['lora_rank']}"
                                              if k["finetuning_type"] == "lora" else "")
        verdict = a["verdict"] + (f" ({a['oom_kind']})" if a.get("oom_kind") else "")
        rows.append((str(a["attempt"]), a["rung"] or "(as given)",
                     f"{k['per_device_batch']} x {k['grad_accum']}", _cell(k["cutoff_len"]),
                     _cell(k["gradient_checkpointing"]), method, verdict,
                     f"{a.get('duration_s') or 0:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def _cell(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return "-" if value is None else str(value)


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
