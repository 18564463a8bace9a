#!/usr/bin/env bash
# Idempotent set-up: a project-local .venv with loopcpp (editable), the test and
# reference dependencies (torch pinned to the CPU build), and the patched
# llama-cpp-python wheel (built once, then taken from ~/.cache/loopcpp).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv
stamp=$VENV/.loopcpp-setup

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PY=$VENV/bin/python

# reinstall the Python dependencies only when pyproject.toml changed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[setup] installing loopcpp and its dependencies into $VENV"
    "$PY" -m pip install -q --upgrade pip
    "$PY" -m pip install -q torch==2.13.0
    "$PY" -m pip install -q -e ".[dev,serve]"
    echo "$want" > "$stamp"
fi

# the patched wheel: cached by (source sha256, patches, flags); installed if not current
"$PY" -m loopcpp.build wheel --install > /dev/null
