# Sourced by each real-tool tier's build_venv.sh (tests/<tier>/build_venv.sh VENV_DIR), which sets
# `here` (its folder, holding requirements.txt and constraints.txt) and defines `after_install`
# (the tier's own fix-ups and a smoke check). Builds VENV_DIR, or does nothing when it is current.
#
# The venv is built with uv (`uv venv` + `uv pip install`, one resolve), its downloads cached in a
# folder outside the clone (UV_CACHE_DIR, default ~/.cache/oom-supervisor/uv), so a fresh clone on
# the same machine reuses them. uv is the dev group's (.venv/bin/uv, or OOM_SUPERVISOR_UV); where
# there is none the venv is built with pip as before. uv does not read pip's configuration, so the
# find-links and constraint files pip is configured with here (the CPU torch wheel on this
# machine's disk) are handed to it; torch stays pinned to the CPU build's 2.13.0.
venv="$1"
# Two pytest workers may ask at once: one builds, the other waits here and then finds it current.
mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
flock 9
stamp="$venv/.installed-stamp"
want="$(cat "$here/requirements.txt" "$here/constraints.txt" "$0" "${BASH_SOURCE[0]}" \
        | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
TORCH="torch==2.13.0"    # the CPU wheel, as in the main .venv

repo="$(cd "$here/../.." && pwd)"
uv=""
for candidate in "${OOM_SUPERVISOR_UV:-}" "$repo/.venv/bin/uv" "$(command -v uv || true)"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then uv="$candidate"; break; fi
done

# One line a minute while the build runs (a cold one takes minutes): the console is not silent.
started=$SECONDS
tool=pip
[ -z "$uv" ] || tool=uv
# (sleep's own streams are /dev/null: ended with the ticker, it must not hold a caller's pipe.)
( while sleep 60 > /dev/null 2>&1 < /dev/null; do
      echo "building $(basename "$venv") with $tool: $(( (SECONDS - started) / 60 )) min so far" >&2
  done ) &
ticker=$!
trap 'kill "$ticker" 2> /dev/null || true' EXIT

# pip's configured find-links and constraint files (pip config, PIP_* variables), for uv.
pip_setting() {
    local py_with_pip="$1" key="$2"
    "$py_with_pip" -m pip config list 2> /dev/null \
        | sed -n "s/^[^.]*\.$key='\(.*\)'\$/\1/p" | tr ' ' '\n' | sed '/^$/d' | sort -u
}

rm -rf "$venv"
if [ -n "$uv" ]; then
    export UV_CACHE_DIR="${UV_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/oom-supervisor/uv}"
    export UV_PYTHON_DOWNLOADS=never    # the machine's python3, as `python3 -m venv` took
    pip_py="$(dirname "$uv")/python"
    [ -x "$pip_py" ] || pip_py=python3
    uv_args=()
    for links in $(pip_setting "$pip_py" find-links) ${PIP_FIND_LINKS:-}; do
        uv_args+=(--find-links "$links")
    done
    for constraint in $(pip_setting "$pip_py" constraint) ${PIP_CONSTRAINT:-}; do
        [ -f "$constraint" ] && uv_args+=(--constraint "$constraint")
    done
    "$uv" venv -q --python "$(command -v python3)" "$venv"
    echo '*' > "$venv/.gitignore"        # never committed, whatever the repo's .gitignore says
    py="$venv/bin/python"
    "$uv" pip install -q --python "$py" "${uv_args[@]}" "$TORCH" \
        -r "$here/requirements.txt" -c "$here/constraints.txt"
    tier_uninstall() { "$uv" pip uninstall -q --python "$py" "$@"; }
else
    echo "uv is not installed (the dev group's .venv/bin/uv): building $venv with pip" >&2
    python3 -m venv "$venv"
    echo '*' > "$venv/.gitignore"
    py="$venv/bin/python"
    "$py" -m pip install -q --upgrade pip
    "$py" -m pip install -q "$TORCH"
    "$py" -m pip install -q -r "$here/requirements.txt" -c "$here/constraints.txt"
    tier_uninstall() { "$py" -m pip uninstall -q -y "$@"; }
fi
# torch must be the CPU build pinned above, never a CUDA build a resolver preferred.
"$py" -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.split('+')[0] == '${TORCH#torch==}' and torch.version.cuda is None else f'torch {v} (CUDA {torch.version.cuda}) is not the CPU ${TORCH#torch==}')"
after_install
echo "$want" > "$stamp"
echo "built $(basename "$venv") in $(( SECONDS - started )) s" >&2
