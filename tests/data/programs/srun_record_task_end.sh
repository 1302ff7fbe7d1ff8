#!/bin/bash
# srun_record_task_end.sh OUT HOW [--label], inside `salloc --ntasks 2`: srun 2 tasks in this allocation; once srun says task 1 ended,
# cancel the step as the supervisor does (scancel JOB.STEP), keep srun's whole output.
out="$1"; how="$2"; shift 2
srun --ntasks 2 "$@" python3 "$(dirname "$0")"/srun_rank_dies.py "$how" > "$out" 2>&1 &
pid=$!
for _ in $(seq 200); do grep -q "task 1:" "$out" && break; sleep 0.1; done
sleep 5
scancel --quiet "$SLURM_JOB_ID.0"
wait $pid
echo "srun exit $?" >&2
