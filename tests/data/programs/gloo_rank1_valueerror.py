# ruff: noqa: INP001, T201, EM101, TRY003 - a standalone program the tests' recordings came from
"""Two gloo ranks; rank 1 raises a ValueError after one all-reduce (a bug, not memory).

Rank 0 then sleeps a second (torchrun ends it first), or with `--peer-in-collective` goes
straight into more all-reduces and sees its peer vanish ("Connection closed by peer").
Recorded with `OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 --master_port PORT THIS [FLAG]`
into tests/data/tails/torchrun_rank1_valueerror*.txt (see the README there).
"""

import sys
import time

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
rank = dist.get_rank()
t = torch.ones(1)
dist.all_reduce(t)
if rank == 1:
    raise ValueError("bad value in the data collator")
if "--peer-in-collective" not in sys.argv:
    time.sleep(1)
for _ in range(1000):
    dist.all_reduce(t)
print("done", rank)
