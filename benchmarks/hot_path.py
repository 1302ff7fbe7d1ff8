"""What following a flood of output costs the runner, per MiB: the follower's work on each chunk
(`runner._Sink.feed`: progress tracking, the redrawn-frame rule, OOM hints, the tail), without
the pipes and the shim around it.

    PYTHONPATH=<tree> .venv/bin/python benchmarks/hot_path.py flood 100   # 100 MiB of lines
    PYTHONPATH=<tree> .venv/bin/python benchmarks/hot_path.py tqdm        # ~100 MiB of frames

Run it with PYTHONPATH at two trees to compare them; prints the best CPU time of three runs.
The 500 MiB flood of benchmarks/run.py is these chunks behind a real pipe and shim.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from supervisor import runner


def main(kind: str, mib: int) -> float:
    """Best process time of three passes over `mib` MiB of `kind` output."""
    if kind == "flood":
        block = b"".join(b"flood %08d: the chatter of a noisy trainer, one line of many ....."
                         b"...\n" % i for i in range(12_800))  # 1 MiB
        chunks = [block[i:i + 65536] for i in range(0, len(block), 65536)] * mib
    else:  # a bar whose counter moves at every frame
        frames = b"".join(b"\r 42%%|####      | %d/10000000 [00:10<00:20,  1.00it/s]" % i
                          for i in range(19_000 * mib))
        chunks = [frames[i:i + 65536] for i in range(0, len(frames), 65536)]
    with tempfile.TemporaryDirectory() as tmp:
        spec = runner.AttemptSpec(argv=("x",), env={}, log_dir=Path(tmp), echo=False)
        best = float("inf")
        for _ in range(3):
            sink = runner._Sink(spec, lambda _line: False)  # noqa: SLF001 - the unit measured
            started = time.process_time()
            for chunk in chunks:
                sink.feed(0, chunk)
            best = min(best, time.process_time() - started)
    return best


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "flood"
    size = int(sys.argv[2]) if len(sys.argv) > 2 else 100  # noqa: PLR2004
    print(f"{what} {size} MiB: {main(what, size):.3f} s CPU")  # noqa: T201
