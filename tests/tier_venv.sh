# Sourced by each real-tool tier's build_venv.sh (tests/<tier>/build_venv.sh VENV_DIR), which sets
# `here` (its folder, holding requirements.txt and constraints.txt) and defines `after_install`
# (the tier's own fix-ups and a smoke check). Builds VENV_DIR, or does nothing when it is current.
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
rm -rf "$venv"
python3 -m venv "$venv"
echo '*' > "$venv/.gitignore"        # never committed, whatever the repo's .gitignore says
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q torch==2.13.0    # the CPU wheel, as in the main .venv
"$py" -m pip install -q -r "$here/requirements.txt" -c "$here/constraints.txt"
after_install
echo "$want" > "$stamp"
