#!/usr/bin/env bash
# Create (or reuse) a virtual environment in .venv with fastalign installed for development.
# torch is pinned first: an unpinned torch would pull a multi-GB CUDA build on CPU-only machines.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${FASTALIGN_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==${FASTALIGN_TORCH_VERSION:-2.13.0}"
python -m pip install -q setuptools wheel pybind11 cmake ninja
python -m pip install -q --no-build-isolation -e ".[test]"
python -c "import fastalign; print('fastalign', fastalign.__version__, '| native extension:', fastalign.native_available())"
