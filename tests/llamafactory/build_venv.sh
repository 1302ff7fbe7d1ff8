#!/usr/bin/env bash
# Build the LLaMA-Factory tier's virtual environment: build_venv.sh VENV_DIR
# (make test and the tier's conftest both call this; it does nothing when VENV_DIR is current).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
after_install() {
    # The torchvision that comes with it is a CUDA build: importing it breaks
    # `from transformers import PreTrainedModel`. The text path does not need it.
    tier_uninstall torchvision
    # llamafactory imports torchaudio unconditionally; its CUDA-linked extension libraries fail to
    # load on a CPU torch unless they are absent (torchaudio then imports without them).
    rm -f "$venv"/lib/python3*/site-packages/torchaudio/lib/*.so
    HF_HUB_OFFLINE=1 "$venv/bin/llamafactory-cli" version > /dev/null
}
source "$here/../tier_venv.sh"
