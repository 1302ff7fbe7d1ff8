#!/usr/bin/env bash
# The GPU checks of oom-supervisor, for a session lent a CUDA machine; under 8 minutes.
#   scripts/gpu-check.sh [RESULTS_FILE]      (default: $OUT/gpu-check.txt, else ./gpu-check.txt)
# 1. the `gpu`-marked tests (NVML probe, sampler, release wait, --device-memory on CUDA);
# 2. the demo on CUDA under --device-memory: the unmodified reference trainer walks the ladder
#    against real CUDA out-of-memory errors from set_per_process_memory_fraction;
# 3. the estimator against torch.cuda.max_memory_allocated() for each rung of the default
#    ladder on a ~0.55B-parameter random Llama (scripts/gpu_check_estimate.py).
# Missing pure-Python dependencies travel as wheels in .whl/ (see docs/memory.md).
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-${OUT:-.}/gpu-check.txt}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ! "$PY" -c 'import structlog, tenacity, ruamel.yaml' 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/oom-site .whl/*.whl
  export PYTHONPATH=/tmp/oom-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
exec > >(tee "$RESULTS") 2>&1
started=$(date +%s)
section() { echo; echo "== $1 ($(( $(date +%s) - started )) s)"; }

section "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c 'import sys, torch, transformers, peft; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available(), "transformers", transformers.__version__, "peft", peft.__version__)'

section "1. gpu-marked tests"
timeout 180 "$PY" -m pytest -q -m gpu tests/gpu -W ignore -p no:cacheprovider -rs
echo "pytest exit: $?"

section "2. demo on CUDA under --device-memory (200 MiB)"
runs=$(mktemp -d)
demo=(-- "$PY" -m supervisor.reference_trainer --model_name_or_path tiny --finetuning_type full
      --per_device_train_batch_size 8 --gradient_accumulation_steps 1 --cutoff_len 1024
      --max_steps 2 --output_dir "$runs/out")
if "$PY" -m supervisor run --help 2>/dev/null | grep -q -- --device-memory; then
  timeout 200 "$PY" -m supervisor run --quiet --runs-dir "$runs" --run-id demo --device-memory 200MiB "${demo[@]}"
else  # before the CLI has the flag: the same injection through the environment
  timeout 200 env PYTHONPATH="$PWD/supervisor/_inject:$PYTHONPATH" OOM_SUPERVISOR_DEVICE_MIB=200 \
    "$PY" -m supervisor run --quiet --runs-dir "$runs" --run-id demo "${demo[@]}"
fi
echo "supervisor exit: $?"
"$PY" - "$runs/demo/report.json" <<'PYEOF'
import json, sys
try:
    report = json.load(open(sys.argv[1]))
except OSError as error:
    sys.exit(f"no report: {error}")
for a in report.get("attempts", []):
    print(a.get("attempt"), a.get("rung"), a.get("verdict"), a.get("oom_kind"), a.get("peak_live_mib"),
          (a.get("evidence") or "")[:150])
print("final:", report.get("final_knobs"))
PYEOF

section "3. estimator vs torch.cuda.max_memory_allocated() (~0.55B Llama)"
timeout 240 "$PY" scripts/gpu_check_estimate.py "$(dirname "$RESULTS")/gpu-check-estimate.json" 180
echo "estimate check exit: $?"
section "done"
