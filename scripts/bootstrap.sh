#!/usr/bin/env bash
# Creates $VENV and installs camtl with its test and benchmark tools and the demo's model.
# - An importable torch (in $PYTHON) is reused: the venv then sees system site-packages.
# - With no torch and no GPU, the CPU build torch==2.13.0 is installed first, so that
#   nothing pulls a multi-GB CUDA build by accident. CAMTL_TORCH_SPEC overrides the choice.
set -euo pipefail
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  if "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    echo "bootstrap: reusing torch $("$PYTHON" -c 'import torch; print(torch.__version__)') from $PYTHON"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi
VPY="$VENV/bin/python"

if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    spec=${CAMTL_TORCH_SPEC:-torch>=2.6}
  else
    spec=${CAMTL_TORCH_SPEC:-torch==2.13.0}  # the CPU build on this project's machines
  fi
  echo "bootstrap: installing $spec"
  "$VPY" -m pip install --disable-pip-version-check -q "$spec"
fi
echo "bootstrap: installing camtl (editable) with the test and demo extras"
"$VPY" -m pip install --disable-pip-version-check -q -e ".[test,demo]"
"$VPY" -c "import torch, camtl; print(f'bootstrap: camtl {camtl.__version__} on torch {torch.__version__}')"
