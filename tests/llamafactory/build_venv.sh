#!/usr/bin/env bash
# Build the LLaMA-Factory tier's virtual environment: build_venv.sh VENV_DIR
# (make test and the tier's conftest both call this; it does nothing when VENV_DIR is current).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$1"
# Two pytest workers may ask at once: one builds, the other waits here and then finds it current.
mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
flock 9
stamp="$venv/.installed-stamp"
want="$(cat "$here/requirements.txt" "$here/constraints.txt" "$0" | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
rm -rf "$venv"
python3 -m venv "$venv"
echo '*' > "$venv/.gitignore"        # never committed, whatever the repo's .gitignore says
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q torch==2.13.0    # the CPU wheel, as in the main .venv
"$py" -m pip install -q -r "$here/requirements.txt" -c "$here/constraints.txt"
# The torchvision that comes with it is a CUDA build: importing it breaks
# `from transformers import PreTrainedModel`. The text path does not need it.
"$py" -m pip uninstall -q -y torchvision
# llamafactory imports torchaudio unconditionally; its CUDA-linked extension libraries fail to
# load on a CPU torch unless they are absent (torchaudio then imports without them).
rm -f "$venv"/lib/python3*/site-packages/torchaudio/lib/*.so
HF_HUB_OFFLINE=1 "$venv/bin/llamafactory-cli" version > /dev/null
echo "$want" > "$stamp"
