#!/usr/bin/env bash
# Creates .venv with Python 3.12 and installs jmoe with its dev extra (= test, which pulls in
# experiments and gpu: pytest, ruff, the corpus, plots, notebook, Triton PTX checks), pinned to the tested versions in constraints.txt.
# On a machine with no package registry (the GPU image) use instead:
#   pip install -e . --no-deps --no-build-isolation
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
    if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
    if command -v pyenv >/dev/null 2>&1 && pyenv prefix 3.12.1 >/dev/null 2>&1; then
        echo "$(pyenv prefix 3.12.1)/bin/python"; return
    fi
    for candidate in python3.12 python3; do
        if command -v "$candidate" >/dev/null 2>&1; then echo "$candidate"; return; fi
    done
    echo "no python3 found; set PYTHON=/path/to/python3.12" >&2; exit 1
}

python_bin="$(find_python)"
"$python_bin" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' \
    || { echo "jmoe needs Python >= 3.11 (3.12 tested); set PYTHON=..." >&2; exit 1; }
"$python_bin" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev]"
.venv/bin/python -c 'import jax, jmoe; print("jmoe ready: jax", jax.__version__, "python", __import__("sys").version.split()[0])'
