#!/usr/bin/env bash
# Build the axolotl tier's virtual environment: build_venv.sh VENV_DIR
# (the tier's conftest calls this; it does nothing when VENV_DIR is current).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
after_install() {
    AXOLOTL_DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 "$venv/bin/axolotl" --help > /dev/null
}
source "$here/../tier_venv.sh"
