#!/usr/bin/env bash
# One entry point for a fresh clone:
#   ./run.sh demo   set up .venv, then build, convert and generate from the built-in small NOSA checkpoint
#   ./run.sh test   set up .venv (with test extras), then run the CPU test suite (one process per core)
#   ./run.sh setup  only set up .venv
#   ./run.sh -- ARGS...   set up, then run `nosa-jax ARGS...`
set -euo pipefail
cd "$(dirname "$0")"

find_python() {
    # A Python >= 3.12 (jax 0.11 needs it): $NOSA_PYTHON, then PATH, then pyenv's installed versions.
    local candidates=()
    [ -n "${NOSA_PYTHON:-}" ] && candidates+=("$NOSA_PYTHON")
    for name in python3.12 python3.13 python3 python; do
        command -v "$name" >/dev/null 2>&1 && candidates+=("$(command -v "$name")")
    done
    local pyenv_root="${PYENV_ROOT:-$HOME/.pyenv}"
    if command -v pyenv >/dev/null 2>&1; then pyenv_root="$(pyenv root)"; fi
    for p in $(ls -d "$pyenv_root"/versions/3.*/bin/python 2>/dev/null | sort -rV); do candidates+=("$p"); done
    # Prefer 3.12 (what the GPU machine runs), else any newer one.
    for want in 'sys.version_info[:2] == (3, 12)' 'sys.version_info >= (3, 12)'; do
        for p in "${candidates[@]}"; do
            if "$p" -c "import sys, venv; sys.exit(0 if $want else 1)" >/dev/null 2>&1; then
                echo "$p"; return 0
            fi
        done
    done
    return 1
}

setup() {
    local extras="$1"
    local stamp=".venv/.nosa-setup-$extras"
    if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then return 0; fi
    if [ ! -x .venv/bin/python ]; then
        local py
        if ! py="$(find_python)"; then
            echo "error: no Python >= 3.12 found (jax 0.11.2 needs it)." >&2
            echo "  Looked at \$NOSA_PYTHON, python3.12/python3.13/python3 on PATH and pyenv's versions folder." >&2
            echo "  Fix: install one (e.g. 'pyenv install 3.12') or set NOSA_PYTHON=/path/to/python3.12." >&2
            exit 2
        fi
        echo "setup: creating .venv with $py ($("$py" --version 2>&1))"
        "$py" -m venv .venv
        .venv/bin/python -m pip install -q --upgrade pip
    fi
    echo "setup: installing nosa-jax[$extras] into .venv"
    # (sed drops the machine-local pip index warnings; pipefail keeps pip's exit status)
    .venv/bin/python -m pip install -q -e ".[$extras]" 2>&1 | sed '/is ignored: it is neither a file nor a directory/d' 
    touch "$stamp"
}

cmd="${1:-demo}"; [ $# -gt 0 ] && shift
case "$cmd" in
    setup) setup test ;;
    demo) setup test; exec .venv/bin/nosa-jax demo "$@" ;;
    # one test process per core (pytest-xdist; the suite is compile-bound, see tests/conftest.py)
    test) setup test; exec .venv/bin/python -m pytest -q -n auto "$@" ;;
    --) setup test; exec .venv/bin/nosa-jax "$@" ;;
    *) echo "usage: ./run.sh [demo|test|setup|-- NOSA_JAX_ARGS...]" >&2; exit 2 ;;
esac
