#!/usr/bin/env bash
# The one command for a lent GPU: kernel correctness, kernels vs peers, the layer, training
# throughput, within --budget-seconds (default 420); the report is rewritten after every row.
#
#   bash scripts/gpu_check.sh --out "$OUT"   # on the GPU (the device call: docs/gpu.md)
#   bash scripts/gpu_check.sh --plan         # the schedule and its estimate, runs nothing
#   bash scripts/gpu_check.sh --smoke        # same pipeline on CPU, tiny shapes, interpret mode
#
# Uses the preinstalled packages; wheels in the (ignored) .whl/ folder (scripts/fetch_wheels.sh:
# the corpus and data packages the image lacks, optionally tokamax) are installed to /tmp/site
# first, offline. PYTHON overrides the interpreter. Details: docs/gpu.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [[ " $* " != *" --smoke "* && " $* " != *" --plan "* ]] && compgen -G ".whl/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec "$PYTHON" -u -m benchmarks.gpu_check "$@"
