"""Measure the reference trainer's peak live MiB for every config of the default ladder's walk.

Usage: .venv/bin/python scripts/measure_peaks.py MODEL OUT.json
       .venv/bin/python scripts/measure_peaks.py --lattice MODEL OUT.json
       .venv/bin/python scripts/measure_peaks.py --lattice-bf16 MODEL OUT.json
       .venv/bin/python scripts/measure_peaks.py --fill MODEL RECORD.json

MODEL is a named size of supervisor/models.py (tiny, small, tiny-qwen2).

Runs `python -m supervisor.reference_trainer` once per config (CPU, OMP_NUM_THREADS=1,
--max_steps 2, no budget: the live-bytes tracker only measures) and writes what each result
line says. tests/data/peaks/README.md names the runs recorded with it.

`--lattice` measures a grid instead of one walk, from the scenario suite's start (full
fine-tuning, batch 8, cutoff 512): for full and LoRA r8, checkpointing off and on, every batch
of the halving (8x1, 4x2, 2x4, 1x8) at cutoff 512, and 1x8 at cutoff 256; then a few configs
in each bf16 precision for the estimator's precision check: `bf16-mixed` (--bf16: autocast
over fp32 weights, a Hugging Face script's switch) and `bf16-base-mixed` (--load_in_bf16: the
model loaded in bf16, its trainable parameters upcast to fp32, LLaMA-Factory's `bf16: true`).
`--lattice-bf16` measures the same grid (no extra rows) in `bf16-mixed`, the scenario suite's
bf16 (the script's --bf16), from the same start in that precision. When OUT.json exists, the rows it already has are kept and only the missing ones measured
(each new row marked with the date it was measured): a long measurement can be resumed, and a
grid that grew is filled in.

`--fill` measures the configs of today's walk (the reference trainer's own command read as
`run` reads it: no 8-bit optimizer or 4-bit base without bitsandbytes) that RECORD.json
lacks, and appends them to it, each row marked with the date it was measured.
"""

# A script: its output is the progress it prints.
# ruff: noqa: INP001, T201

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from supervisor.knobs import FinetuningType, Knobs
from supervisor.plan import walk
from supervisor.policy import resolve

START = Knobs(per_device_batch=8, grad_accum=1, cutoff_len=1024)
"""The demo's ambitious start: full fine-tuning, batch 8 x 1024 tokens."""

LATTICE_START = Knobs(per_device_batch=8, grad_accum=1, cutoff_len=512)
"""The scenario suite's start (benchmarks/scenarios.py): full fine-tuning, batch 8 x 512."""


def lattice(precision: str | None = None) -> list[tuple[Knobs, str | None]]:
    """The grid --lattice measures (the rung column says which part of the grid); in one
    precision only (no bf16 extras) where `precision` is given."""
    if precision is not None:
        return [(dataclasses.replace(k, precision=precision), rung)
                for k, rung in lattice() if rung == "grid"]
    out: list[tuple[Knobs, str | None]] = []
    for method in (FinetuningType.FULL, FinetuningType.LORA):
        for ckpt in (False, True):
            out.extend((dataclasses.replace(LATTICE_START, finetuning_type=method,
                                            gradient_checkpointing=ckpt,
                                            per_device_batch=batch, grad_accum=8 // batch),
                        "grid") for batch in (8, 4, 2, 1))
            out.append((dataclasses.replace(LATTICE_START, finetuning_type=method,
                                            gradient_checkpointing=ckpt, per_device_batch=1,
                                            grad_accum=8, cutoff_len=256), "grid"))
    # Full and LoRA, with and without checkpointing, with and without accumulation, in each
    # bf16 precision (the first four per precision were the first bf16 rows recorded).
    for precision in ("bf16-mixed", "bf16-base-mixed"):
        for method, ckpt, batch, cutoff in (
                (FinetuningType.FULL, False, 1, 512), (FinetuningType.FULL, True, 2, 512),
                (FinetuningType.LORA, False, 1, 512), (FinetuningType.LORA, True, 2, 512),
                (FinetuningType.FULL, True, 8, 256), (FinetuningType.LORA, False, 4, 512)):
            out.append((dataclasses.replace(LATTICE_START, finetuning_type=method,
                                            gradient_checkpointing=ckpt, per_device_batch=batch,
                                            grad_accum=8 // batch, cutoff_len=cutoff,
                                            precision=precision),
                        "bf16"))
    return out


def walked(model: str) -> list[tuple[Knobs, str | None]]:
    """Today's walk from START, with the reference trainer's own skip predicate (as `run`)."""
    from supervisor.command import Command  # noqa: PLC0415
    from supervisor.dialects import detect  # noqa: PLC0415
    command = Command(argv=(sys.executable, "-m", "supervisor.reference_trainer",
                            *flags(model, START, "TMP")), cwd=str(Path.cwd()))
    reading = detect(command).read_sourced(command)
    return walk(START, resolve("default"), can_set=reading.can_set)


_MEMORY_KNOBS = ("per_device_batch", "grad_accum", "cutoff_len", "gradient_checkpointing",
                 "finetuning_type", "lora_rank", "freeze_trainable_layers", "precision")


def _key(data: dict[str, object]) -> tuple[object, ...]:
    return tuple(data.get(k) for k in _MEMORY_KNOBS)


def flags(model: str, knobs: Knobs, out: str) -> list[str]:
    """The reference trainer's flags for one config."""
    argv = ["--model_name_or_path", model, "--max_steps", "2", "--output_dir", out,
            "--per_device_train_batch_size", str(knobs.per_device_batch),
            "--gradient_accumulation_steps", str(knobs.grad_accum),
            "--cutoff_len", str(knobs.cutoff_len),
            "--finetuning_type", str(knobs.finetuning_type),
            "--lora_rank", str(knobs.lora_rank),
            "--freeze_trainable_layers", str(knobs.freeze_trainable_layers)]
    if knobs.gradient_checkpointing:
        argv.append("--gradient_checkpointing")
    if knobs.precision == "bf16-mixed":
        argv.append("--bf16")
    elif knobs.precision == "bf16-base-mixed":
        argv.append("--load_in_bf16")
    elif knobs.precision is not None:
        msg = f"the reference trainer has no flag for precision {knobs.precision!r}"
        raise ValueError(msg)
    return argv


def main() -> int:
    args = sys.argv[1:]
    bf16 = args[:1] == ["--lattice-bf16"]
    grid = args[:1] == ["--lattice"] or bf16
    fill = args[:1] == ["--fill"]
    model, out_path = (args[1:] if grid or fill else args)[:2]
    out_path = Path(out_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    rows: list[dict[str, object]] = []
    precision = "bf16-mixed" if bf16 else None
    todo = lattice(precision) if grid else walked(model)
    kept: dict[str, object] = {}
    fill = fill or (grid and out_path.exists())
    if fill:
        kept = json.loads(out_path.read_text(encoding="utf-8"))
        rows = kept["rows"]  # type: ignore[assignment]
        have = {_key(r["knobs"]) for r in rows}  # type: ignore[arg-type]
        todo = [(k, r) for k, r in todo if _key(k.to_dict()) not in have]
        print(f"{len(todo)} configs are not in {out_path}", flush=True)
    for knobs, rung in todo:
        with tempfile.TemporaryDirectory() as tmp:
            argv = [sys.executable, "-m", "supervisor.reference_trainer",
                    *flags(model, knobs, tmp)]
            started = time.monotonic()
            proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)  # noqa: S603
            wall = time.monotonic() - started
        line = next((x for x in reversed(proc.stdout.splitlines())
                     if x.startswith("reference-trainer.result ")), None)
        if proc.returncode != 0 or line is None:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        result = json.loads(line.split(" ", 1)[1])
        rows.append({"knobs": knobs.to_dict(), "rung": rung,
                     "argv": ["python", "-m", "supervisor.reference_trainer",
                              *flags(model, knobs, "TMP")],
                     "peak_live_mib": result["peak_live_mib"],
                     "max_rss_mib": result["max_rss_mib"], "wall_s": round(wall, 1),
                     **({"recorded": time.strftime("%Y-%m-%d", time.gmtime())} if fill else {})})
        print(f"{len(rows):2d} {rung or '(start)':24s} b{knobs.per_device_batch}xGA"
              f"{knobs.grad_accum} L{knobs.cutoff_len} gc={knobs.gradient_checkpointing} "
              f"{knobs.finetuning_type} {knobs.precision or 'fp32'}: "
              f"{result['peak_live_mib']} MiB, {wall:.1f} s", flush=True)
        # Written after every row: a long measurement keeps what it measured.
        record = _record(model, grid, rows, precision)
        if fill:
            record = {**kept, "rows": rows}
        out_path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return 0


def _record(model: str, grid: bool, rows: list[dict[str, object]],  # noqa: FBT001
            precision: str | None = None) -> dict[str, object]:
    import peft  # noqa: PLC0415 - only for the versions recorded
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415
    return {
        "model": model,
        "start": dataclasses.replace(LATTICE_START if grid else START,
                                     precision=precision).to_dict(),
        "policy": "lattice" if grid else "default",
        "recorded": time.strftime("%Y-%m-%d", time.gmtime()),
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers.__version__, "peft": peft.__version__,
                        "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU only",
                        "OMP_NUM_THREADS": "1"},
        "rows": rows,
    }


if __name__ == "__main__":
    sys.exit(main())
