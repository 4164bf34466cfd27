#!/usr/bin/env bash
# The one command for a lent GPU: gpu tests, kernel benchmark vs peers, training
# throughput; writes benchmarks/results/gpu_check_<device>_<date>.{json,md}.
#
#   scripts/gpu_check.sh            # on the GPU (<= 8 min on one H100 / H200)
#   scripts/gpu_check.sh --smoke    # same pipeline on CPU, tiny shapes, interpret mode
#
# Uses the preinstalled packages; wheels in an (ignored) .whl/ folder, e.g.
# tokamax, are installed to /tmp/site first. PYTHON overrides the interpreter.
# Details: docs/gpu.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [[ " $* " != *" --smoke "* ]] && compgen -G ".whl/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m benchmarks.gpu_check "$@"
