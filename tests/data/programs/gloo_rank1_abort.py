# ruff: noqa: INP001, T201 - a standalone program the tests' recordings came from
"""Two gloo ranks; rank 1 says its last words after one all-reduce, then aborts (SIGABRT: how
an uncaught C++/NCCL error ends a process).

Recorded with `torchrun --nproc_per_node 2 --master_port 29631 THIS` into
tests/data/tails/torchrun_rank1_abort.txt and (with `--tee 3`) torchrun_tee_rank1_abort.txt
(see the README there).
"""

import os
import time

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
rank = dist.get_rank()
t = torch.ones(1)
dist.all_reduce(t)
if rank == 1:
    print("rank 1 last words: the collective's buffer is bad", flush=True)
    os.abort()
time.sleep(1)
dist.all_reduce(t)
print("done", rank)
