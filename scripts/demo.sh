#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the main job: the demo of the alignment methods and baselines on the toy world, on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. "${FASTALIGN_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python -m fastalign demo "$@"
