# ruff: noqa: INP001, T201 - a standalone program the tests' recordings came from
"""Two gloo ranks; rank 1 sends itself SIGKILL after one all-reduce, as the OOM killer would.

Recorded with `torchrun --nproc_per_node 2 --master_port 29611 THIS` into
tests/data/tails/torchrun_rank1_sigkill.txt (see the README there).
"""

import os
import signal
import time

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
rank = dist.get_rank()
t = torch.ones(1)
dist.all_reduce(t)
if rank == 1:
    os.kill(os.getpid(), signal.SIGKILL)
time.sleep(1)
dist.all_reduce(t)
print("done", rank)
