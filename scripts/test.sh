#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the test suite on the CPU (Triton kernels under the interpreter).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
. "${FASTALIGN_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRITON_INTERPRET=1
python -m pytest -q tests "$@"
