# ruff: noqa: INP001, T201, Q003 - a standalone program the tests run, not a module of the test package
"""A trainer that is hostile to its supervisor in one chosen way, then trains for real.

    python hostile_trainer.py SHAPE [reference trainer arguments...]

It prints what the shape asks for (numbers, markers, garbage: text, never an OOM), then runs
the bundled reference trainer with the remaining arguments, so that whatever out-of-memory the
supervisor sees is a real allocator failure of a real training step (under the injected
`--device-memory` budget the tests set). Shapes:

- `metrics-inf`: the HF Trainer's final metrics line with `train_runtime: 1e999`, NaN, a
  400-digit number, after a training that fits.
- `step-huge`: a tqdm progress frame whose step is a 400-digit number (and `inf/nan` ones).
- `bad-markers`: malformed `oom-supervisor.inject` / `.peak` lines (a list, a string limit, a
  400-digit pid, NaN and 1e999 peaks, a line with no JSON, a torn one).
- `journal-garbage`: appends a line that is not the supervisor's (and one that is JSON but no
  event) to the run's journal.jsonl, as a trainer writing there would.
- `handled-oom`: a training step that runs out of memory (real), caught by the program, which
  prints the traceback as a careful trainer logs it and then exits 0 (it recovered by itself).
- `long-line`: 200 MB on stderr with no newline, then the training; the real OOM's message is
  written at the end of that line, still with no newline, and the program exits 1.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

HUGE = "9" * 400


def _train(argv: list[str]) -> int:
    from supervisor.reference_trainer import main as train  # noqa: PLC0415 - after the shape

    return train(argv)


def main() -> int:
    shape, rest = sys.argv[1], sys.argv[2:]
    if shape == "step-huge":
        print(f"  40%|████      | {HUGE}/{HUGE} [03:10<04:45,  1.98s/it]", flush=True)
        print("  50%|█████     | inf/nan [03:10<04:45,  1.98s/it]", flush=True)
        print("{'current_steps': " + HUGE + ", 'total_steps': " + HUGE + "}", flush=True)
    if shape == "bad-markers":
        pid = os.getpid()
        for line in (
            "oom-supervisor.inject {\"pid\": " + str(pid) + ", \"limit_mib\": \"abc\"}",
            "oom-supervisor.inject {\"pid\": " + str(pid) + ", \"limit_mib\": [1, 2]}",
            "oom-supervisor.inject {\"pid\": " + HUGE + ", \"limit_mib\": " + HUGE + "}",
            "oom-supervisor.inject {\"pid\": \"x\", \"limit_mib\": 1e999}",
            "oom-supervisor.peak {\"pid\": " + str(pid) + ", \"peak_mib\": NaN}",
            "oom-supervisor.peak {\"pid\": " + str(pid) + ", \"peak_mib\": 1e999}",
            "oom-supervisor.peak {\"pid\": " + str(pid) + ", \"peak_mib\": -5}",
            "oom-supervisor.peak not json at all",
            "oom-supervisor.inject {\"pid\": 1, \"limit_mib\"",
        ):
            print(line, file=sys.stderr, flush=True)
    if shape == "journal-garbage":
        journal = Path(os.environ["OOM_SUPERVISOR_ATTEMPT"]).parent.parent / "journal.jsonl"
        with journal.open("a", encoding="utf-8") as handle:
            handle.write("step 3 loss 1.25 -- written by the trainer\n")
            handle.write(json.dumps({"loss": 1.25, "step": 3}) + "\n")
            handle.write("[1, 2, 3]\n")
    if shape == "long-line":
        block = b"x" * (1 << 20)
        for _ in range(200):
            sys.stderr.buffer.write(block)
        sys.stderr.buffer.flush()
        try:
            return _train(rest)
        except Exception as exc:  # noqa: BLE001 - the real error's own message ends the line
            text = traceback.format_exception_only(type(exc), exc)[-1].strip()
            sys.stderr.write(text)  # no newline: the line is 200 MB long and never ends
            sys.stderr.flush()
            return 1
    if shape == "handled-oom":
        try:
            return _train(rest)
        except Exception:  # noqa: BLE001 - a trainer that catches its own OOM and goes on
            traceback.print_exc()
            print("caught the out-of-memory error; carrying on without that batch", flush=True)
            return 0
    code = _train(rest)
    if shape == "metrics-inf":
        print("{'train_runtime': 1e999, 'train_samples_per_second': 'nan', "
              "'train_steps_per_second': " + HUGE + ", 'train_loss': -inf, 'epoch': 1.0}",
              flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
