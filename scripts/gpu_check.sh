#!/usr/bin/env bash
# The GPU check: on a CUDA machine with torch and triton preinstalled (no network),
# install camtl in place, run tests/gpu and the benchmarks, and write everything to
# $GPU_CHECK_OUT. Exits non-zero if any part failed.
set -uo pipefail
OUT=${GPU_CHECK_OUT:-gpu-check-out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu-check: no CUDA device is visible to torch in $PY; this check needs a GPU" >&2
  exit 2
fi
status=0
"$PY" -m pip install --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { echo "install failed: $OUT/install.log"; exit 1; }
{ date -u +"%Y-%m-%dT%H:%M:%SZ"; nvidia-smi || true; "$PY" -m camtl info; } 2>&1 | tee "$OUT/environment.txt"
timeout 240 "$PY" -m pytest tests/gpu -q -p no:cacheprovider --junitxml "$OUT/gpu-tests.xml" 2>&1 \
  | tee "$OUT/gpu-tests.txt" || status=1
timeout 270 "$PY" benchmarks/run.py --out "$OUT" 2>&1 | tee "$OUT/bench.txt" || status=1
echo "gpu-check: results in $OUT (status $status)"
exit $status
