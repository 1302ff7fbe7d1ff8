# ruff: noqa: INP001, T201 - a standalone program the tests' recordings came from
"""Two srun tasks; task 1 says its last words, then dies by a signal; task 0 waits, as a peer
in a collective would.

`python srun_rank_dies.py abort|segv|kill`: task 1 ends by SIGABRT (`os.abort()`, how an
uncaught C++/NCCL error ends a process), SIGSEGV (a real invalid read) or SIGKILL (sent to
itself, as the kernel's OOM killer would). Recorded under the Slurm tier's srun into
tests/data/tails/srun_*.txt (see the README there).
"""

import ctypes
import os
import signal
import sys
import time

rank = int(os.environ.get("SLURM_PROCID", "0"))
how = sys.argv[1] if len(sys.argv) > 1 else "abort"
print(f"rank {rank} step 1 loss 2.31", flush=True)
if rank == 1:
    time.sleep(1)
    print(f"rank 1 last words before {how}: the collective's buffer is bad", flush=True)
    print("rank 1 on stderr: about to fail", file=sys.stderr, flush=True)
    if how == "abort":
        os.abort()
    elif how == "segv":
        ctypes.string_at(0)
    else:
        os.kill(os.getpid(), signal.SIGKILL)
time.sleep(3600)
