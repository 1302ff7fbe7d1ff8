#!/usr/bin/env bash
# Build the TRL tier's virtual environment: build_venv.sh VENV_DIR
# (the tier's conftest calls this; it does nothing when VENV_DIR is current).
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
HF_HUB_OFFLINE=1 "$venv/bin/trl" --help > /dev/null
echo "$want" > "$stamp"
